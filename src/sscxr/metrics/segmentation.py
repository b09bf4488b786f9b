"""Segmentation metrics per image (Dice, IoU, Hausdorff distances), their summary, lung post-processing.

Empty-mask policy (MONAI returns NaN in all of these cases; sscxr decides explicitly):
- both masks empty: the prediction is right, so Dice = 1, IoU = 1, HD = HD95 = 0 (px and mm);
- exactly one empty: Dice = 0, IoU = 0, and every Hausdorff distance is *undefined* (value None, reason
  "empty prediction" / "empty ground truth"): a distance to nothing is not a number, and reporting 0
  (as some code does) would reward a model for predicting nothing. Summaries count these per metric.

Hausdorff distances use MONAI's edge extraction and surface distances; HD95 is MONAI's definition: the
larger of the two directed 95th percentiles of edge-to-edge distances. Spacing is (row, column) in mm,
the spacing of the *mask grid* (after any resize), as in DICOM PixelSpacing.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.metrics.utils import get_edge_surface_distance
from scipy import ndimage

from sscxr.metrics.bootstrap import CI, bootstrap_ci
from sscxr.metrics.classification import MetricValue, defined, undefined

SEG_METRICS = ("dice", "iou", "hd95_px", "hd_px", "hd95_mm", "hd_mm")


def _check_masks(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, g = np.asarray(pred).astype(bool), np.asarray(gt).astype(bool)
    if p.shape != g.shape or p.ndim != 2:
        raise ValueError(f"pred and gt must be (H, W) masks of one shape, got {p.shape} and {g.shape}")
    return p, g


def _hausdorff(p: np.ndarray, g: np.ndarray, spacing: Sequence[float] | None) -> tuple[float, float]:
    """(HD95, HD) between the edges of two non-empty masks, via MONAI."""
    with warnings.catch_warnings():
        # MONAI 1.5+ warns about its own internal `always_return_as_numpy` argument; nothing to act on.
        warnings.filterwarnings("ignore", message=".*always_return_as_numpy.*")
        _, dists, _ = get_edge_surface_distance(
            torch.as_tensor(p), torch.as_tensor(g), spacing=spacing, symmetric=True, warn_empty=False
        )
    hd95 = max(float(torch.quantile(d.double(), 0.95)) for d in dists)
    hd = max(float(d.max()) for d in dists)
    return hd95, hd


def segmentation_metrics(
    pred: np.ndarray, gt: np.ndarray, spacing_mm: tuple[float, float] | None = None
) -> dict[str, MetricValue]:
    """Dice, IoU and Hausdorff distances of one binary mask against its ground truth.

    Args:
        pred: (H, W) bool predicted mask.
        gt: (H, W) bool ground-truth mask.
        spacing_mm: (row, column) pixel spacing of this grid in mm; None when unknown.
    Returns:
        {name: MetricValue} for ``SEG_METRICS``: dice, iou, hd95_px, hd_px (max), hd95_mm, hd_mm
        (undefined "pixel spacing unknown" without spacing). See the module's empty-mask policy.
    """
    p, g = _check_masks(pred, gt)
    inter, n_p, n_g = int((p & g).sum()), int(p.sum()), int(g.sum())
    hd_px: tuple[MetricValue, MetricValue]
    hd_mm: tuple[MetricValue, MetricValue]
    if n_p == 0 and n_g == 0:
        dice = iou = defined(1.0)
        hd_px = hd_mm = (defined(0.0), defined(0.0))
    else:
        dice, iou = defined(2 * inter / (n_p + n_g)), defined(inter / (n_p + n_g - inter))
        if n_p == 0 or n_g == 0:
            gone = undefined("empty prediction" if n_p == 0 else "empty ground truth")
            hd_px = hd_mm = (gone, gone)
        else:
            hd95, hd = _hausdorff(p, g, None)
            hd_px = (defined(hd95), defined(hd))
            if spacing_mm is not None:
                hd95, hd = _hausdorff(p, g, [float(s) for s in spacing_mm])
                hd_mm = (defined(hd95), defined(hd))
    if spacing_mm is None:
        hd_mm = (undefined("pixel spacing unknown"),) * 2
    return {
        "dice": dice,
        "iou": iou,
        "hd95_px": hd_px[0],
        "hd_px": hd_px[1],
        "hd95_mm": hd_mm[0],
        "hd_mm": hd_mm[1],
    }


@dataclass(frozen=True)
class Summary:
    """Mean of the defined per-image values, with a (patient-level) bootstrap CI of the mean.

    Attributes:
        mean, std: over defined values (None when there are none; std is the sample std, ddof=1,
            None below 2 values).
        ci: bootstrap CI of the mean, None when n_boot = 0.
        n: number of defined values; n_undefined: values left out as undefined.
    """

    mean: float | None
    std: float | None
    ci: CI | None
    n: int
    n_undefined: int


def summarize(
    values: Sequence[float | MetricValue | None],
    groups: np.ndarray | Sequence[object] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
) -> Summary:
    """NaN-aware summary of per-image values: undefined ones are left out and counted.

    Args:
        values: per-image values; None, NaN or an undefined MetricValue = undefined.
        groups: per-image patient ids (same length) for a patient-level bootstrap; None = per image.
        n_boot: bootstrap resamples (0 = no CI).
        alpha: 1 - coverage.
        seed: seed or Generator of the bootstrap.
    """
    raw = [v.value if isinstance(v, MetricValue) else v for v in values]
    ok = np.array([v is not None and not np.isnan(v) for v in raw], dtype=bool)
    x = np.array([v for v, k in zip(raw, ok, strict=True) if k], dtype=np.float64)
    n_undef = int((~ok).sum())
    if x.size == 0:
        return Summary(None, None, None, 0, n_undef)
    std = float(np.std(x, ddof=1)) if x.size > 1 else None
    ci = None
    if n_boot > 0:
        g = None if groups is None else np.asarray(groups)[ok]
        ci = bootstrap_ci(lambda idx: float(x[idx].mean()), g, n_boot, alpha, seed, n=x.size)
    return Summary(float(x.mean()), std, ci, int(x.size), n_undef)


def postprocess_lungs(mask: np.ndarray, keep: int = 2, fill_holes: bool = True) -> np.ndarray:
    """Keep the ``keep`` largest connected components (the two lungs) and fill their holes.

    8-connectivity, so that a lung cut by a one-pixel diagonal gap stays one component.

    Args:
        mask: (H, W) bool.
        keep: components to keep (largest first; ties by label order, so deterministic).
        fill_holes: fill enclosed background (vessels / nodules predicted as background).
    Returns:
        (H, W) bool.
    """
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    m = np.asarray(mask).astype(bool)
    labels, n = ndimage.label(m, structure=np.ones((3, 3), dtype=bool))
    if n > keep:
        sizes = np.bincount(labels.ravel())[1:]
        largest = np.argsort(-sizes, kind="stable")[:keep] + 1
        m = np.isin(labels, largest)
    return ndimage.binary_fill_holes(m) if fill_holes else m
