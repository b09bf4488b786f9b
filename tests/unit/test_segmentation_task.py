"""Segmentation task on the engine (overfit, best export, encoder start), evaluation helpers, report cells."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import safetensors.torch
import torch

from sscxr.config import PretrainConfig, load_config
from sscxr.data.cache import prepare
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.trainer import fit
from sscxr.errors import ConfigError, DataError
from sscxr.evaluation.segmentation import (
    CaseRecord,
    SegEvaluation,
    SegTestSpec,
    cache_pixel_spacing,
    parse_model_spec,
    parse_test_spec,
    predict_mask,
    summarize_records,
)
from sscxr.metrics.segmentation import segmentation_metrics
from sscxr.models.gmml import GMMLModel
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.unetr import Segmenter, SegmenterSpec, build_unetr
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.reports.segmentation import fmt_summary, paper_table, per_image_csv
from sscxr.synthetic import SynthConfig, generate_cohort
from sscxr.tasks.segmentation import SegmentConfig, _dice_iou, build_segmentation

# A tiny ViT at 64 px (patch 8: 3 decoder levels) and a narrow decoder: trains in seconds on a CPU.
TINY = [
    "model.img_size=64",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
    "model.drop_path_rate=0.0",
    "seg.feature_size=8",
    "seg.n_vis=2",
    "train.workers=0",
    "train.progress=false",
    "train.checkpoint_every=0",
]


# Tiny models: one intra-op thread is faster on a shared CPU (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The synthetic cohort's exact lung masks, 16 images cached at 64 px."""
    root = tmp_path_factory.mktemp("seg_cache")
    cfg = SynthConfig(n_adult=16, n_pediatric=0, size=64, seed=0, repeat_fraction=0.0)
    manifest = generate_cohort(cfg, root / "cohort", workers=1, progress=False)
    prepare(manifest, root / "cache", size=64, workers=0, progress=False)
    return root / "cache"


def _cfg(cache: Path, *overrides: str) -> SegmentConfig:
    return load_config(SegmentConfig, [], [f"data.cache={cache}", *TINY, *overrides])


def test_paper_defaults() -> None:
    cfg = load_config(SegmentConfig, ["segment/unetr_vit_s16"])
    assert (cfg.model.img_size, cfg.model.patch_size, cfg.model.embed_dim, cfg.model.depth) == (
        256,
        16,
        384,
        12,
    )
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.weight_decay_end) == (5e-4, 1e-5, None)
    assert (cfg.train.epochs, cfg.train.best_metric, cfg.train.best_mode) == (400, "val/dice", "max")
    tiny = load_config(SegmentConfig, ["segment/tiny"]).model
    pre = load_config(PretrainConfig, ["tiny"]).model  # the pre-training demo's encoder
    assert (tiny.img_size, tiny.patch_size, tiny.embed_dim, tiny.depth, tiny.num_heads) == (
        128,
        16,
        192,
        6,
        3,
    )
    assert (pre.embed_dim, pre.depth, pre.num_heads, pre.patch_size) == (192, 6, 3, 16)


def test_overfits_synthetic_lungs_and_exports_best(cache: Path, tmp_path: Path) -> None:
    cfg = _cfg(
        cache,
        "data.augment.enabled=false",
        "data.val_split=train",
        "optim.lr=3e-3",
        "optim.warmup_epochs=0",
        "train.epochs=40",
        "train.batch_size=8",
        "train.val_every=10",
        "train.log_every=10",
    )
    torch.manual_seed(0)
    task, train_set, val_set = build_segmentation(cfg, seed=0)
    assert all(k.startswith("model.") for k in task.state_dict())  # the loss adds no state
    result = fit(task, train_set, val_set, cfg.train, cfg.optim, tmp_path, None, None, resume=False)
    assert result.best_metric is not None and result.best_metric > 0.9, result.best_metric
    meta = json.loads((tmp_path / "model.json").read_text())
    assert meta["format"] == "sscxr-segmenter" and meta["blocks"] == [1, 3, 4] and meta["img_size"] == 64
    assert meta["extra"]["weights_from"].startswith("checkpoints/best.pt")
    best = load_checkpoint(tmp_path / "checkpoints" / "best.pt")["model"]
    exported = safetensors.torch.load_file(str(tmp_path / "model.safetensors"))
    assert all(torch.equal(exported[k], best[f"model.{k}"]) for k in exported)
    assert (tmp_path / "overlays" / "epoch_040.png").is_file()


def test_build_uses_gmml_export(cache: Path, tmp_path: Path) -> None:
    vit = ViTConfig(img_size=64, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
    torch.manual_seed(5)
    enc = GMMLModel(build_vit(vit), hidden=16, bottleneck=8).encoder
    with torch.no_grad():
        for p in enc.parameters():
            p.add_(1.0)
    export_encoder(enc, vit, Normalization(0.3, 0.25), tmp_path / "gmml" / "encoder")
    task, _, _ = build_segmentation(
        _cfg(cache, "seg.init=sscxr", f"seg.init_path={tmp_path / 'gmml'}"), seed=0
    )
    state = task.model.encoder.state_dict()
    assert all(torch.equal(state[k], v) for k, v in enc.state_dict().items())
    assert task.spec.normalization == Normalization(0.3, 0.25)
    assert task.extra_export["init"]["missing"] == [] and task.extra_export["init"]["mode"] == "sscxr"
    sample = task.vis_batch["image"]  # type: ignore[index]
    assert sample.shape == (2, 1, 64, 64)


def test_config_errors(cache: Path) -> None:
    with pytest.raises(ConfigError, match="init_path"):
        _cfg(cache, "seg.init=sscxr")
    with pytest.raises(ConfigError, match="ignores"):
        _cfg(cache, "seg.init=scratch", "seg.init_path=x")
    with pytest.raises(ConfigError, match="out_channels"):
        _cfg(cache, "seg.out_channels=3")
    with pytest.raises(ConfigError, match="img_size"):
        build_segmentation(_cfg(cache, "model.img_size=32"), seed=0)


def test_a_split_without_masks_names_where_they_are_and_the_fix(cache: Path) -> None:
    """A user whose masks sit in other splits is told which, and how to assign splits."""
    with pytest.raises(DataError, match=r"masked images are \d+ in 'train'.*sscxr split MANIFEST"):
        build_segmentation(_cfg(cache, "data.train_split=nosuch"), seed=0)


def test_one_channel_variant_trains(cache: Path) -> None:
    task, train_set, _ = build_segmentation(_cfg(cache, "seg.out_channels=1"), seed=0)
    batch = {k: torch.stack([train_set[i][k] for i in range(2)]) for k in ("image", "mask")}
    out = task.training_step(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and task.model.head.conv.conv.weight.grad is not None


def test_validation_dice_policy() -> None:
    empty, full = torch.zeros(1, 4, 4, dtype=torch.bool), torch.ones(1, 4, 4, dtype=torch.bool)
    half = torch.zeros(1, 4, 4, dtype=torch.bool)
    half[:, :2] = True
    dice, iou = _dice_iou(torch.cat([empty, empty, half]), torch.cat([empty, full, full]))
    assert dice.tolist() == [1.0, 0.0, pytest.approx(2 / 3)]
    assert iou.tolist() == [1.0, 0.0, 0.5]


# ------------------------------------------------------------------------------- evaluation
def test_cache_pixel_spacing_follows_the_resize() -> None:
    def stub(fit: str) -> SimpleNamespace:
        return SimpleNamespace(
            size=100,
            fit=fit,
            pixel_spacing=lambda i: (0.2, 0.1) if i == 0 else None,
            original_shape=lambda i: (1000, 500),
        )

    assert cache_pixel_spacing(stub("stretch"), 0) == pytest.approx((2.0, 0.5))  # type: ignore[arg-type]
    # Letterbox: 1000 x 500 -> 100 x 50, one scale for both axes.
    assert cache_pixel_spacing(stub("pad"), 0) == pytest.approx((2.0, 1.0))  # type: ignore[arg-type]
    assert cache_pixel_spacing(stub("pad"), 1) is None  # type: ignore[arg-type]


@pytest.mark.parametrize("fit", ["stretch", "pad"])
def test_predict_mask_maps_back_to_the_original_geometry(fit: str) -> None:
    """A stand-in model whose lung probability is the framed image itself: the mask must be the image."""
    spec = SegmenterSpec(
        vit=ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2),
        normalization=Normalization(0.0, 1.0),
        fit=fit,
    )
    seg = Segmenter(build_unetr(spec), spec)
    seg.probabilities = lambda images, amp=True: images[:, 0].float()  # type: ignore[method-assign]
    image = np.zeros((40, 90), dtype=np.float32)
    image[5:30, 10:50] = 1.0  # a bright block off centre
    mask = predict_mask(seg, image)
    assert mask.shape == (40, 90)
    assert (mask == (image > 0.5)).mean() > 0.97


def test_parse_specs() -> None:
    assert parse_test_spec("mc=/data/cache:test_site") == SegTestSpec("mc", Path("/data/cache"), "test_site")
    assert parse_test_spec("mc=cache") == SegTestSpec("mc", Path("cache"), "test")
    assert parse_test_spec("mc=cache:all").split is None
    assert parse_test_spec("mc=cache:*").split is None  # the same tokens as `sscxr evaluate`
    assert parse_model_spec("ss-cxr=runs/a") == ("ss-cxr", Path("runs/a"))
    assert parse_model_spec("runs/b") == ("b", Path("runs/b"))
    for bad in ("nocache", "=x", "a="):
        with pytest.raises(ConfigError):
            parse_test_spec(bad)


def _evaluation() -> SegEvaluation:
    disc = np.zeros((16, 16), dtype=bool)
    disc[4:12, 4:12] = True
    records = [
        CaseRecord(0, "p0", "a.png", segmentation_metrics(disc, disc)),
        CaseRecord(1, "p0", "b.png", segmentation_metrics(np.zeros_like(disc), disc)),  # empty prediction
        CaseRecord(2, "p1", "c.png", segmentation_metrics(disc, disc, (0.5, 0.5))),
    ]
    for r in records:
        r.metrics_pp = r.metrics
    summary = summarize_records(records, False, n_boot=50, seed=0)
    return SegEvaluation(
        "m",
        "runs/m",
        SegTestSpec("t", Path("c")),
        records,
        summary,
        summary,
        np.zeros((3, 16, 16), bool),
        16,
        0.5,
        1,
    )


def test_undefined_hd_is_counted_never_zero() -> None:
    ev = _evaluation()
    assert ev.summary["hd95_px"].n == 2 and ev.summary["hd95_px"].n_undefined == 1
    assert ev.summary["dice"].mean == pytest.approx(2 / 3)  # the empty prediction counts as Dice 0
    table = paper_table([ev])
    assert [r[0] for r in table.rows] == ["m", "m + post-processing"]
    hd_cell = table.rows[0][table.columns.index("HD95 px")]
    assert hd_cell.startswith("0.00") and "(1 undefined)" in hd_cell
    assert table.rows[0][table.columns.index("HD95 mm")].startswith("0.00")  # one image has a spacing
    rows = list(csv.DictReader(io.StringIO(per_image_csv([ev]))))
    empty = next(r for r in rows if r["path"] == "b.png" and r["postprocessed"] == "False")
    assert empty["hd95_px"] == "" and "empty prediction" in empty["undefined"] and empty["dice"] == "0"
    assert fmt_summary(ev.summary["hd_mm"].__class__(None, None, None, 0, 3)) == "n/a (no defined value)"


def test_overlays_show_the_post_processed_masks_when_they_were_scored() -> None:
    from sscxr.metrics.segmentation import postprocess_lungs
    from sscxr.reports.segmentation import _case

    gt = np.zeros((16, 16), dtype=bool)
    gt[2:14, 2:7] = gt[2:14, 9:14] = True
    raw = gt.copy()
    raw[0, 15] = True  # a speck that post-processing removes (not among the two largest components)
    rec = CaseRecord(0, "p0", "a.png", segmentation_metrics(raw, gt))
    rec.metrics_pp = segmentation_metrics(postprocess_lungs(raw), gt)
    ev = _evaluation()
    ev.records, ev.masks = [rec], raw[None]
    cache = SimpleNamespace(image_float=lambda i: np.zeros((16, 16), np.float32), mask=lambda i: gt)
    shown = _case(cache, ev, 0, "best")  # type: ignore[arg-type]
    assert np.array_equal(shown.pred, postprocess_lungs(raw)) and not shown.pred[0, 15]
    assert "Dice 1.000" in shown.title  # the post-processed mask's Dice, not the raw one's
    ev.summary_pp = None  # raw masks only: the overlay shows them
    raw_case = _case(cache, ev, 0, "best")  # type: ignore[arg-type]
    assert raw_case.pred[0, 15] and "Dice 1.000" not in raw_case.title
