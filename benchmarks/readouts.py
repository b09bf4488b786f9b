"""Which read-out of frozen features finds a cohort's findings: poolings of an encoder's patch tokens,
raw pixels, and a hand-made lung-statistics reference, all through the same linear probe.

Every row is `sscxr probe`'s logistic regression (C chosen on validation) on the same labelled
subsets (whole patients, `labelled_subset`), so the rows differ only in their features:

- encoder rows: the mean of the last 4 blocks' final-normed patch tokens, pooled as `grid4` (the
  probe's default for localized findings), `avg`, `max`, `avg+max`, `std`, or a 2 x 2 max;
  `--pca K` adds rows whose features are first reduced by a PCA fitted on every training image
  (no labels: a legitimate part of the representation);
- `pixels K`: the image area-downsampled to K x K (`--pixels 8,16,32,64`: which resolution is the
  strongest raw-pixel reference, chosen on validation);
- `lung stats`: seven numbers per image from the cache's lung mask (mean, SD, 95th and 99th percentile
  inside it, mean outside, two contrasts): what a read-out that knows where the lungs are can reach
  with this many labels. Only for caches with masks.

Prints one line per row: mean validation AUC-ROC, then each test split's mean test AUC-ROC over the
draws. Choose on the validation column.

    python benchmarks/readouts.py --cache runs/demo/data/cache --encoder runs/demo/pretrain/gmml \
        --task pneumonia_vs_healthy --fraction 0.3 --tests test,test_site --pixels 8,16,32,64
"""

from __future__ import annotations

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.decomposition import PCA
from sklearn.metrics import roc_auc_score

from sscxr.data.cache import ImageCache
from sscxr.evaluation.probe import _read, fit_linear_probe, load_frozen_encoder
from sscxr.models.loading import Normalization
from sscxr.models.vit import build_vit
from sscxr.tasks.labels import TASKS, labelled_subset


def patch_tokens(encoder: torch.nn.Module, cache: ImageCache, norm: Normalization) -> torch.Tensor:
    """(N, T, D): the mean of the last 4 blocks' final-normed patch tokens of every cache row."""
    out = []
    idx = np.arange(len(cache.rows))
    with torch.inference_mode():
        for start in range(0, len(idx), 64):
            x = (_read(cache, idx[start : start + 64], cache.size) - norm.mean) / norm.std
            blocks = encoder.forward_intermediates(
                x, indices=4, return_prefix_tokens=True, norm=True, output_fmt="NLC", intermediates_only=True
            )
            out.append(torch.stack([patch for patch, _ in blocks]).mean(0))
    return torch.cat(out)


def poolings(tokens: torch.Tensor, keep: list[str] | None = None) -> dict[str, np.ndarray]:
    """(N, T, D) tokens -> {pooling name: (N, F) features}, only the `keep` ones when given."""
    b, n, d = tokens.shape
    g = round(n**0.5)
    grid = tokens.transpose(1, 2).reshape(b, d, g, g)
    feats = {
        "grid4": F.adaptive_avg_pool2d(grid, min(4, g)).flatten(1),
        "avg": tokens.mean(1),
        "max": tokens.amax(1),
        "avg+max": torch.cat([tokens.mean(1), tokens.amax(1)], 1),
        "std": tokens.std(1),
        "grid2 max": F.adaptive_max_pool2d(grid, min(2, g)).flatten(1),
    }
    return {k: v.numpy() for k, v in feats.items() if keep is None or k in keep}


def lung_stats(cache: ImageCache) -> np.ndarray:
    """(N, 7) intensity statistics inside and outside each row's lung mask."""
    rows = []
    for i in range(len(cache.rows)):
        image = cache.image_float(i)
        lung = cache.mask(i) > 0
        inside, outside = image[lung], image[~lung]
        p95, p99, med = np.percentile(inside, [95, 99, 50])
        mean = inside.mean()
        rows.append([mean, inside.std(), p95, p99, outside.mean(), mean - outside.mean(), p95 - med])
    return np.asarray(rows, np.float32)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cache", required=True)
    p.add_argument("--encoder", action="append", default=[], help="NAME=PATH (repeatable)")
    p.add_argument("--task", default="healthy_vs_pathology")
    p.add_argument("--fraction", type=float, default=0.3)
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--tests", default="test,test_site", help="test splits of the cache")
    p.add_argument("--pca", type=int, action="append", default=[], help="also rows after a PCA to K dims")
    p.add_argument("--pixels", default="32", help="comma-separated sizes of the raw-pixel rows")
    p.add_argument("--poolings", default=None, help="comma-separated encoder poolings (default: all)")
    args = p.parse_args()
    keep = args.poolings.split(",") if args.poolings else None

    cache = ImageCache.open(args.cache)
    rows = cache.rows
    features: dict[str, np.ndarray] = {}
    for spec in args.encoder:
        name, path = spec.split("=", 1)
        encoder, cfg, norm, _ = load_frozen_encoder(path, cache.size, Normalization(*cache.stats))
        for kind, x in poolings(patch_tokens(encoder, cache, norm), keep).items():
            features[f"{name} {kind}"] = x
    if args.encoder:
        torch.manual_seed(0)
        for kind, x in poolings(patch_tokens(build_vit(cfg), cache, norm), keep).items():
            features[f"random {kind}"] = x
    pixels = _read(cache, np.arange(len(rows)), cache.size)
    for k in (int(v) for v in args.pixels.split(",")):
        features[f"pixels {k}"] = F.interpolate(pixels, size=k, mode="area").flatten(1).numpy()
    if cache.has_masks and cache.mask_available[cache.indices()].all():
        features["lung stats"] = lung_stats(cache)

    label_map = TASKS[args.task].label_map
    y = np.array([label_map.get(r.label, -1) for r in rows])
    split = np.array([r.split for r in rows])
    patient = np.array([r.patient_id for r in rows])
    train = np.where((split == "train") & (y >= 0))[0]
    val = np.where((split == "val") & (y >= 0))[0]
    tests = {s: np.where((split == s) & (y >= 0))[0] for s in args.tests.split(",")}
    seeds = [int(s) for s in args.seeds.split(",")]
    print(f"{args.task}, {args.fraction:g} of the training patients labelled, draws {seeds}")
    for name, x0 in features.items():
        for k in [0, *args.pca]:
            x = x0 if k == 0 else PCA(k, random_state=0).fit(x0[split == "train"]).transform(x0)
            vals, aucs = [], {s: [] for s in tests}
            for seed in seeds:
                sub = train[labelled_subset(patient[train], y[train], args.fraction, seed=seed)]
                probe = fit_linear_probe(x[sub], y[sub], x[val], y[val])
                vals.append(probe.val_auc)
                for s, idx in tests.items():
                    aucs[s].append(roc_auc_score(y[idx], probe.predict_proba(x[idx])[:, 1]))
            label = name if k == 0 else f"{name} pca{k}"
            cols = "  ".join(f"{s} {np.mean(v):.3f}" for s, v in aucs.items())
            print(f"{label:24s} val {np.mean(vals):.3f}  {cols}", flush=True)


if __name__ == "__main__":
    main()
