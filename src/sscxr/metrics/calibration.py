"""Calibration: expected calibration error (ECE) and reliability-diagram data.

Which probability is checked:
- multi-class (scores ``(N, C)``, C > 2): *top-label* calibration, confidence = max_k p_k, observed =
  1 if the arg-max class is right (Guo et al. 2017);
- binary (scores ``(N,)`` = P(class 1), or ``(N, 2)``): *positive-class* reliability, confidence =
  P(class 1), observed = 1 if the label is 1. This is the curve clinicians read ("of the images given
  30 %, do 30 % have the disease?") and, unlike top-label, it does not fold 0.2 onto 0.8.

Bins are equal-width on [0, 1], right-closed, ``(lo, hi]``, with 0 in the first bin. Labels -1 / NaN are
unknown and masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from sscxr.metrics.labels import known_mask


def _confidence_and_outcome(y_true: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, observed) pairs per the module's binary / top-label rule, unknown labels dropped."""
    y, p = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    if p.shape[0] != y.shape[0] or p.ndim not in (1, 2):
        raise ValueError(f"probs must be (N,) or (N, C) with N = len(y_true); got {p.shape}, {y.shape}")
    keep = known_mask(y)
    y, p = y[keep].astype(np.int64), p[keep]
    if y.size == 0:
        raise ValueError("no samples with a known label")
    if not (np.isfinite(p).all() and p.min() >= 0.0 and p.max() <= 1.0):
        raise ValueError("calibration needs probabilities in [0, 1] (apply softmax/sigmoid first)")
    if p.ndim == 1 or p.shape[1] == 2:
        conf = p if p.ndim == 1 else p[:, 1]
        return conf, (y == 1).astype(np.float64)
    return p.max(axis=1), (p.argmax(axis=1) == y).astype(np.float64)


def _bin_index(conf: np.ndarray, n_bins: int) -> np.ndarray:
    # Right-closed bins (lo, hi], p = 0 in bin 0. Searching the edges (not ceil(p * n)) keeps decimal
    # probabilities in their bin: 0.7 * 10 is 7.000000000000001 in floating point.
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    return np.clip(np.searchsorted(edges, conf, side="left") - 1, 0, n_bins - 1)


@dataclass(frozen=True)
class ReliabilityCurve:
    """Per-bin reliability data. Empty bins hold NaN (matplotlib leaves a gap), count 0.

    Attributes:
        bin_edges: (n_bins + 1,) in [0, 1].
        confidence: (n_bins,) mean predicted probability per bin.
        observed: (n_bins,) observed frequency (fraction positive / fraction correct) per bin.
        counts: (n_bins,) samples per bin.
    """

    bin_edges: np.ndarray
    confidence: np.ndarray
    observed: np.ndarray
    counts: np.ndarray


def reliability_curve(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> ReliabilityCurve:
    """Reliability-diagram data.

    Args:
        y_true: (N,) class indices (-1 / NaN unknown).
        probs: (N,) P(class 1) for binary tasks, or (N, C) probabilities.
        n_bins: number of equal-width bins.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    conf, obs = _confidence_and_outcome(y_true, probs)
    b = _bin_index(conf, n_bins)
    counts = np.bincount(b, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(b, weights=conf, minlength=n_bins) / counts
        mean_obs = np.bincount(b, weights=obs, minlength=n_bins) / counts
    return ReliabilityCurve(np.linspace(0.0, 1.0, n_bins + 1), mean_conf, mean_obs, counts)


def expected_calibration_error(y_true: np.ndarray, probs: np.ndarray, n_bins: int = 15) -> float:
    """ECE = sum over bins of (n_b / N) * |observed_b - confidence_b|.

    Args:
        y_true: (N,) class indices (-1 / NaN unknown).
        probs: (N,) P(class 1) for binary tasks, or (N, C) probabilities (top-label for C > 2).
        n_bins: number of equal-width bins (15 as in Guo et al.).
    Returns:
        ECE in [0, 1].
    """
    rc = reliability_curve(y_true, probs, n_bins)
    full = rc.counts > 0
    gaps = np.abs(rc.observed[full] - rc.confidence[full])
    return float(np.sum(rc.counts[full] * gaps) / rc.counts.sum())
