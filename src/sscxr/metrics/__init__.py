"""Evaluation metrics: pure functions, accumulators that gather across ranks, bootstrap intervals.

Undefined metrics (a zero denominator, a single class, a distance to an empty mask) are
``MetricValue(None, reason)``, never a number; see `classification` and `segmentation` for the policies.
"""

from __future__ import annotations

from sscxr.metrics.accumulator import Accumulator, ClassificationAccumulator, SegmentationAccumulator
from sscxr.metrics.bootstrap import CI, bootstrap_ci, bootstrap_metrics, resample_indices
from sscxr.metrics.calibration import ReliabilityCurve, expected_calibration_error, reliability_curve
from sscxr.metrics.classification import (
    ClassificationResult,
    ClassRow,
    Curves,
    MetricValue,
    as_metric,
    auc_roc,
    average_precision,
    binary_rates,
    classification_metrics,
    confusion,
    curves,
    defined,
    known_mask,
    paper_accuracy,
    predict,
    threshold_for_sensitivity,
    undefined,
    youden_threshold,
)
from sscxr.metrics.segmentation import (
    SEG_METRICS,
    Summary,
    postprocess_lungs,
    segmentation_metrics,
    summarize,
)

__all__ = [
    "CI",
    "SEG_METRICS",
    "Accumulator",
    "ClassRow",
    "ClassificationAccumulator",
    "ClassificationResult",
    "Curves",
    "MetricValue",
    "ReliabilityCurve",
    "SegmentationAccumulator",
    "Summary",
    "as_metric",
    "auc_roc",
    "average_precision",
    "binary_rates",
    "bootstrap_ci",
    "bootstrap_metrics",
    "classification_metrics",
    "confusion",
    "curves",
    "defined",
    "expected_calibration_error",
    "known_mask",
    "paper_accuracy",
    "postprocess_lungs",
    "predict",
    "reliability_curve",
    "resample_indices",
    "segmentation_metrics",
    "summarize",
    "threshold_for_sensitivity",
    "undefined",
    "youden_threshold",
]
