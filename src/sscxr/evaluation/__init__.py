"""Evaluation of fine-tuned classifiers: prediction (`predict`), metrics on arrays (`classification`)
and the `sscxr evaluate` engine (`runner`). Reports are built from its output by `sscxr.reports`."""

from __future__ import annotations

from sscxr.evaluation.classification import (
    ThresholdChoice,
    ThresholdRule,
    choose_threshold,
    evaluate_arrays,
    metric_summary,
    parse_threshold,
)
from sscxr.evaluation.predict import (
    SplitSpec,
    Targets,
    class_targets,
    label_map_of,
    open_split,
    parse_split_spec,
    predict,
    write_predictions,
)
from sscxr.evaluation.runner import EvalOptions, ModelSpec, TestSpec, evaluate_models

__all__ = [
    "EvalOptions",
    "ModelSpec",
    "SplitSpec",
    "Targets",
    "TestSpec",
    "ThresholdChoice",
    "ThresholdRule",
    "choose_threshold",
    "class_targets",
    "evaluate_arrays",
    "evaluate_models",
    "label_map_of",
    "metric_summary",
    "open_split",
    "parse_split_spec",
    "parse_threshold",
    "predict",
    "write_predictions",
]
