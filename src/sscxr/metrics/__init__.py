"""Evaluation metrics: pure functions, accumulators that gather across ranks, bootstrap intervals.

Undefined metrics (a zero denominator, a single class, a distance to an empty mask) are
``MetricValue(None, reason)``, never a number; see `classification` and `segmentation` for the policies.
The classification metrics that are reported are one table, `CLASSIFICATION_METRICS`; `register_metric`
adds one.
"""

from __future__ import annotations

from sscxr.metrics.accumulator import Accumulator, ClassificationAccumulator, SegmentationAccumulator
from sscxr.metrics.bootstrap import CI, bootstrap_ci, bootstrap_metrics, resample_indices
from sscxr.metrics.calibration import ReliabilityCurve, expected_calibration_error, reliability_curve
from sscxr.metrics.classification import (
    CLASSIFICATION_METRICS,
    ClassificationResult,
    ClassRow,
    Curves,
    MetricSpec,
    MetricTable,
    MetricValue,
    as_metric,
    auc_roc,
    average_precision,
    binary_rates,
    classification_metrics,
    confusion,
    curves,
    defined,
    overall_metrics,
    paper_accuracy,
    predict,
    register_metric,
    threshold_for_sensitivity,
    undefined,
    unregister_metric,
    youden_threshold,
)
from sscxr.metrics.labels import known_mask
from sscxr.metrics.segmentation import (
    SEG_METRICS,
    Summary,
    postprocess_lungs,
    segmentation_metrics,
    summarize,
)

__all__ = [
    "CI",
    "CLASSIFICATION_METRICS",
    "SEG_METRICS",
    "Accumulator",
    "ClassRow",
    "ClassificationAccumulator",
    "ClassificationResult",
    "Curves",
    "MetricSpec",
    "MetricTable",
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
    "overall_metrics",
    "paper_accuracy",
    "postprocess_lungs",
    "predict",
    "register_metric",
    "reliability_curve",
    "resample_indices",
    "segmentation_metrics",
    "summarize",
    "threshold_for_sensitivity",
    "undefined",
    "unregister_metric",
    "youden_threshold",
]
