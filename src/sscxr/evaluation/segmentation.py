"""`sscxr segment evaluate` and `sscxr segment predict`: lung masks scored against ground truth, or written.

Evaluation runs at the *cache* resolution: the prediction for a cached S x S image is compared with the
cached (resized, thresholded) mask, so every model and test set is scored on the same grid. HD in mm uses
the spacing of one cache pixel, i.e. the original spacing x original size / size inside the cache (the
cache resizes, so the DICOM spacing alone would be wrong by that factor). Per image: Dice, IoU, HD95 and
HD (px, mm), with the metrics module's empty-mask policy (an HD to an empty mask is undefined, never 0);
then mean, std and a patient-level bootstrap 95% CI, with and without lung post-processing.

Prediction runs at the input's own size: the image is fitted into the model's frame as in training,
the lung probability is resized back to the original H x W, then thresholded.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from sscxr.data.cache import ImageCache, fit_geometry, resize_to_cache
from sscxr.data.io import read_xray
from sscxr.data.near_duplicates import require_no_leakage
from sscxr.engine.distributed import resolve_device
from sscxr.errors import ConfigError, DataError, SSCXRError
from sscxr.evaluation.inputs import collect_inputs
from sscxr.metrics.classification import MetricValue
from sscxr.metrics.segmentation import (
    SEG_METRICS,
    Summary,
    postprocess_lungs,
    segmentation_metrics,
    summarize,
)
from sscxr.models.unetr import Segmenter
from sscxr.utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "CaseRecord",
    "PredictResult",
    "SegEvaluation",
    "SegTestSpec",
    "cache_pixel_spacing",
    "evaluate_on_cache",
    "parse_model_spec",
    "parse_test_spec",
    "predict_cache",
    "predict_files",
    "predict_mask",
    "resolve_device",
]

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------ specs
@dataclass(frozen=True)
class SegTestSpec:
    """A test set: rows of `split` (None = all rows) of a prepared cache that have masks."""

    name: str
    cache: Path
    split: str | None = "test"


def parse_model_spec(text: str) -> tuple[str, Path]:
    """`NAME=RUN` (or just `RUN`, named after its folder) -> (name, run path)."""
    name, sep, path = text.partition("=")
    if not sep:
        name, path = Path(text).name, text
    if not name or not path:
        raise ConfigError(f"--model {text!r}: expected NAME=RUN_FOLDER (e.g. ss-cxr=runs/seg)")
    return name, Path(path)


def parse_test_spec(text: str) -> SegTestSpec:
    """`NAME=CACHE[:SPLIT]` -> SegTestSpec; without `:SPLIT` the split is "test"; `:all` or `:*` = every
    row (the same tokens as `sscxr evaluate`)."""
    name, sep, rest = text.partition("=")
    if not sep or not name or not rest:
        raise ConfigError(f"--test {text!r}: expected NAME=CACHE:SPLIT (e.g. montgomery=cache/mc:test)")
    cache, colon, split = rest.rpartition(":")
    if not colon or "/" in split or os.sep in split or not cache:
        cache, split = rest, "test"  # no split given (or the colon belongs to the path)
    return SegTestSpec(name, Path(cache), None if split in ("all", "*") else split)


# ------------------------------------------------------------------------------------- evaluation
def cache_pixel_spacing(cache: ImageCache, i: int) -> tuple[float, float] | None:
    """(row, column) mm spacing of one *cache* pixel of row `i`: original spacing x original / cached size.

    None when the source had no spacing (PNG, JPEG) or failed to decode.
    """
    spacing, shape = cache.pixel_spacing(i), cache.original_shape(i)
    if spacing is None or shape is None:
        return None
    h, w, _, _ = fit_geometry(shape, cache.size, cache.fit)
    return spacing[0] * shape[0] / h, spacing[1] * shape[1] / w


def predict_cache(
    segmenter: Segmenter, cache: ImageCache, rows: np.ndarray, batch_size: int = 16, progress: bool = False
) -> np.ndarray:
    """Predicted lung masks of cache rows at the cache resolution.

    Returns:
        (K, S, S) bool, thresholded at the segmenter's threshold.
    """
    out = np.zeros((len(rows), cache.size, cache.size), dtype=bool)
    starts = range(0, len(rows), batch_size)
    for start in tqdm(starts, desc="predict", unit="batch", disable=not progress, leave=False):
        chunk = rows[start : start + batch_size]
        images = torch.from_numpy(np.stack([cache.image_float(int(i)) for i in chunk]))[:, None]
        prob = segmenter.probabilities(images)
        out[start : start + len(chunk)] = (prob > segmenter.spec.threshold).numpy()
    return out


@dataclass
class CaseRecord:
    """Metrics of one test image (raw prediction, and post-processed when asked)."""

    row: int
    patient_id: str
    path: str
    metrics: dict[str, MetricValue]
    metrics_pp: dict[str, MetricValue] | None = None


@dataclass
class SegEvaluation:
    """One (model, test set) evaluation.

    Attributes:
        summary / summary_pp: per metric, mean / std / bootstrap CI of the raw (post-processed) masks.
        masks: (K, S, S) bool raw predictions, in `records` order (for overlays; not saved).
        n_spacing: images whose mm spacing is known.
    """

    model: str
    model_path: str
    test: SegTestSpec
    records: list[CaseRecord]
    summary: dict[str, Summary]
    summary_pp: dict[str, Summary] | None
    masks: np.ndarray
    size: int
    threshold: float
    n_spacing: int
    meta: dict[str, Any] = field(default_factory=dict)


def masked_rows(cache: ImageCache, split: str | None) -> np.ndarray:
    """Decoded rows of `split` (None = all) that have masks; DataError when there are none."""
    rows = cache.indices(split=split)
    rows = rows[cache.mask_available[rows]] if cache.has_masks else rows[:0]
    if rows.size == 0:
        where = f"split {split!r}" if split else "any split"
        raise DataError(f"{cache.root}: no decoded images with masks in {where}; nothing to evaluate.")
    return rows


def summarize_records(
    records: Sequence[CaseRecord], post: bool, n_boot: int, seed: int
) -> dict[str, Summary]:
    """Per metric `Summary` over the records (bootstrap resampling patients)."""
    groups = np.empty(len(records), dtype=object)
    groups[:] = [r.patient_id for r in records]
    out = {}
    for name in SEG_METRICS:
        values = [(r.metrics_pp if post else r.metrics)[name] for r in records]  # type: ignore[index]
        out[name] = summarize(values, groups, n_boot=n_boot, seed=seed)
    return out


def evaluate_on_cache(
    segmenter: Segmenter,
    name: str,
    model_path: str,
    test: SegTestSpec,
    *,
    postprocess: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    batch_size: int = 16,
    progress: bool = False,
) -> SegEvaluation:
    """Score `segmenter` on a test set of a cache (see the module docstring for the conventions)."""
    cache = ImageCache.open(test.cache)
    rows = masked_rows(cache, test.split)
    masks = predict_cache(segmenter, cache, rows, batch_size, progress)
    records = []
    for k, i in enumerate(rows):
        i = int(i)
        gt, spacing = cache.mask(i), cache_pixel_spacing(cache, i)
        rec = CaseRecord(
            i, cache.rows[i].patient_id, cache.rows[i].path, segmentation_metrics(masks[k], gt, spacing)
        )
        if postprocess:
            rec.metrics_pp = segmentation_metrics(postprocess_lungs(masks[k]), gt, spacing)
        records.append(rec)
    n_spacing = sum(cache_pixel_spacing(cache, int(i)) is not None for i in rows)
    extra = segmenter.meta.get("extra", {})
    return SegEvaluation(
        model=name,
        model_path=model_path,
        test=test,
        records=records,
        summary=summarize_records(records, False, n_boot, seed),
        summary_pp=summarize_records(records, True, n_boot, seed) if postprocess else None,
        masks=masks,
        size=cache.size,
        threshold=segmenter.spec.threshold,
        n_spacing=n_spacing,
        meta={
            "n_images": len(rows),
            "n_patients": len({r.patient_id for r in records}),
            "init": extra.get("init", {}).get("mode"),
            "weights_from": extra.get("weights_from"),
        },
    )


# --------------------------------------------------------------------------------------- predict
@dataclass
class PredictResult:
    """What `predict_files` did: masks written (input, output) and inputs that failed (input, reason)."""

    written: list[tuple[Path, Path]] = field(default_factory=list)
    failures: list[tuple[Path, str]] = field(default_factory=list)


def predict_mask(segmenter: Segmenter, image: np.ndarray, postprocess: bool = False) -> np.ndarray:
    """Lung mask of one image at its own size.

    Args:
        image: (H, W) float32 in [0, 1] (as `read_xray` returns).
        postprocess: keep the two largest components and fill holes.

    Returns:
        (H, W) bool.
    """
    size = segmenter.spec.vit.img_size
    h, w, top, left = fit_geometry(image.shape, size, segmenter.spec.fit)
    framed = torch.from_numpy(resize_to_cache(image, size, segmenter.spec.fit))[None, None]
    prob = segmenter.probabilities(framed)[:, None, top : top + h, left : left + w]  # drop the letterbox
    prob = F.interpolate(prob, size=image.shape, mode="bilinear", align_corners=False)[0, 0]
    mask = (prob > segmenter.spec.threshold).numpy()
    return postprocess_lungs(mask) if postprocess else mask


def mask_png(mask: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def predict_files(
    segmenter: Segmenter,
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    postprocess: bool = False,
    progress: bool = True,
) -> PredictResult:
    """Write `<stem>_mask.png` (0 / 255, the input's H x W) for every input image; failures are listed.

    Also writes `predictions.csv` (input, mask, height, width, lung fraction) and, when some inputs
    could not be read, `failures.csv` (input, reason). Unreadable files never stop the others.
    """
    out = Path(out_dir)
    result, lines = PredictResult(), [["input", "mask", "height", "width", "lung_fraction"]]
    for src, rel in tqdm(collect_inputs(inputs), desc="segment", unit="img", disable=not progress):
        try:
            image = read_xray(src).image
            mask = predict_mask(segmenter, image, postprocess)
        except SSCXRError as e:
            log.warning("%s: skipped (%s)", src, e)
            result.failures.append((src, str(e)))
            continue
        atomic_write_bytes(out / rel, mask_png(mask))
        result.written.append((src, out / rel))
        lines.append([str(src), str(rel), str(mask.shape[0]), str(mask.shape[1]), f"{mask.mean():.4f}"])
    atomic_write_text(out / "predictions.csv", _rows_csv(lines))
    if result.failures:
        atomic_write_text(
            out / "failures.csv", _rows_csv([["input", "reason"]] + [[str(p), r] for p, r in result.failures])
        )
    return result


def _rows_csv(rows: Sequence[Sequence[str]]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ runner
def run_evaluation(
    models: Sequence[tuple[str, Path]],
    tests: Sequence[SegTestSpec],
    *,
    postprocess: bool = False,
    n_boot: int = 1000,
    seed: int = 0,
    device: str = "auto",
    batch_size: int = 16,
    progress: bool = True,
    allow_leakage: bool = False,
) -> list[SegEvaluation]:
    """Evaluate every model on every test set (the report: `reports.segmentation.write_segmentation_report`).

    Args:
        models: (name, run folder or model.json) pairs; names must be unique.
        tests: the test sets.
        postprocess: also score the post-processed masks (two largest components, holes filled).
        n_boot: bootstrap resamples (by patient) for the 95% CIs; 0 = none.
        allow_leakage: evaluate (with a warning) test caches whose patients or near-duplicate images
            are in two splits; refused otherwise.

    Returns:
        One evaluation per (model, test set), models outermost.

    Raises:
        DataError: leakage in a test cache and not `allow_leakage`.
    """
    from sscxr.models.unetr import load_segmenter

    names = [n for n, _ in models] + [t.name for t in tests]
    if len({n for n, _ in models}) != len(models) or len({t.name for t in tests}) != len(tests):
        raise ConfigError(f"model and test-set names must be unique, got {names}")
    # Refuse a test cache whose test rows leak into its training rows (patients, near-duplicate images),
    # as `sscxr evaluate` does; checked before any model runs.
    for cache_dir in dict.fromkeys(t.cache for t in tests):
        require_no_leakage(ImageCache.open(cache_dir), allow_leakage, "pass --allow-leakage")
    dev = resolve_device(device)
    evals = []
    for name, path in models:
        segmenter = load_segmenter(path).to(dev)
        for test in tests:
            log.info("evaluating %s on %s", name, test.name)
            evals.append(
                evaluate_on_cache(
                    segmenter,
                    name,
                    str(path),
                    test,
                    postprocess=postprocess,
                    n_boot=n_boot,
                    seed=seed,
                    batch_size=batch_size,
                    progress=progress,
                )
            )
    return evals
