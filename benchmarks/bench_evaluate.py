"""Throughput of `sscxr evaluate`: inference images/s, bootstrap and report time, on a synthetic cohort.

    python benchmarks/bench_evaluate.py [--n 300] [--size 64] [--preset tiny_cpu] [--patch 16]
                                        [--batch 64] [--n-boot 1000] [--device auto] [--keep DIR]

A randomly initialised ViT classifier (the numbers measure speed, not accuracy) is exported and
evaluated the way the command does it: inference on every test split (plus validation for the
threshold), predictions CSVs, metrics with patient-bootstrap intervals, then the report with figures.
Prints one line per measurement.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from sscxr.data.cache import ImageCache, prepare
from sscxr.evaluation import (
    EvalOptions,
    ModelSpec,
    SplitSpec,
    TestSpec,
    evaluate_models,
    parse_threshold,
    predict,
)
from sscxr.evaluation.predict import resolve_device
from sscxr.models.classifier import ViTClassifier, export_classifier, load_classifier
from sscxr.models.loading import Normalization
from sscxr.models.vit import build_vit, vit_preset
from sscxr.reports import write_report
from sscxr.synthetic import SynthConfig, generate_cohort

LABEL_MAP = {"healthy": 0, "pneumonia": 1, "covid-19": 2}


def _cohort(root: Path, n: int, size: int) -> Path:
    cfg = SynthConfig(n_adult=n, n_pediatric=max(n // 6, 6), size=size, seed=0)
    manifest = generate_cohort(cfg, root / "cohort", progress=False)
    prepare(manifest, root / "cache", size=size, progress=False)
    return root / "cache"


def _model(root: Path, preset: str, size: int, patch: int, device: str) -> ModelSpec:
    cfg = vit_preset(preset, img_size=size, patch_size=patch, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = ViTClassifier(build_vit(cfg), list(LABEL_MAP), normalization=Normalization(0.4, 0.25))
    extra = {"task": "3-class", "label_map": LABEL_MAP, "command": "bench_evaluate.py"}
    (root / "run").mkdir(exist_ok=True)
    export_classifier(model, cfg, root / "run", extra)
    loaded, meta = load_classifier(root / "run", device=resolve_device(device))
    return ModelSpec(preset, loaded, meta, root / "run")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=300, help="adult images of the synthetic cohort")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--preset", default="tiny_cpu")
    ap.add_argument("--patch", type=int, default=16)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--n-boot", type=int, default=1000)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--precision", default="auto")
    ap.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = ap.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_eval_"))
    root.mkdir(parents=True, exist_ok=True)
    cache = _cohort(root, args.n, args.size)
    spec = _model(root, args.preset, args.size, args.patch, args.device)
    tests = [
        TestSpec(name, SplitSpec(cache, (split,)))
        for name, split in (
            ("training distribution", "test"),
            ("unseen site", "test_site"),
            ("pediatric", "test_pediatric"),
        )
    ]
    opts = EvalOptions(
        parse_threshold("default"),
        n_boot=args.n_boot,
        batch_size=args.batch,
        device=args.device,
        precision=args.precision,
        progress=False,
    )
    # Warm-up (thread pools, allocator, kernels): the timings below are steady-state.
    warm = ImageCache.open(cache)
    predict(
        spec.model,
        spec.meta,
        warm,
        warm.indices()[: args.batch],
        args.batch,
        args.device,
        args.precision,
        progress=False,
    )
    start = time.perf_counter()
    doc = evaluate_models([spec], tests, None, opts, root / "report", "bench")
    evaluated = time.perf_counter() - start
    write_report(doc, root / "report")
    total = time.perf_counter() - start
    n_img = sum(r["n_images"] for r in doc["results"])
    infer_s = sum(r["seconds"] for r in doc["results"])
    cfg = spec.meta["vit"]
    print(
        f"device {resolve_device(args.device)}, model {args.preset} {cfg['img_size']}px/{cfg['patch_size']}, "
        f"batch {args.batch}, precision {args.precision}"
    )
    print(f"inference: {n_img} images in {infer_s:.2f} s = {n_img / infer_s:.1f} images/s")
    print(
        f"evaluate (inference + CSVs + {args.n_boot}-resample bootstrap): {evaluated:.2f} s "
        f"= {n_img / evaluated:.1f} images/s end to end"
    )
    print(
        f"report (tables + {len(list((root / 'report' / 'figures').glob('*.png')))} figures): "
        f"{total - evaluated:.2f} s; files in {root / 'report'}"
    )


if __name__ == "__main__":
    main()
