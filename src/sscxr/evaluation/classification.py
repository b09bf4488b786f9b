"""Classification evaluation: frozen operating thresholds, metrics with patient-bootstrap intervals.

`evaluate_arrays` works on arrays only (labels, probabilities, patient ids) and returns a JSON-ready
result; `sscxr.evaluation.runner.evaluate_models` runs models on named test sets and assembles the
document saved as metrics.json, from which `sscxr.reports` builds every table and figure.

Thresholds are chosen on the validation split only, once per model, then frozen: the test sets are
never read before the threshold is fixed, and `choose_threshold` has no access to them.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from sscxr.errors import ConfigError
from sscxr.metrics import (
    MetricValue,
    bootstrap_metrics,
    classification_metrics,
    curves,
    defined,
    expected_calibration_error,
    reliability_curve,
    threshold_for_sensitivity,
    youden_threshold,
)
from sscxr.metrics import predict as predict_classes

__all__ = [
    "ALL",
    "CLASS_METRICS",
    "OVERALL_METRICS",
    "ThresholdChoice",
    "ThresholdRule",
    "choose_threshold",
    "evaluate_arrays",
    "metric_summary",
    "parse_threshold",
]

ALL = "all"  # the "class" of metrics computed over every class (accuracy, ECE, macro AUCs)
CLASS_METRICS = ("sensitivity", "specificity", "fpr", "fnr", "precision", "auc_pr", "auc_roc")
# balanced_accuracy is the mean sensitivity over the classes present; macro_specificity the mean specificity.
OVERALL_METRICS = (
    "accuracy",
    "balanced_accuracy",
    "macro_specificity",
    "macro_auc_roc",
    "macro_auc_pr",
    "ece",
)


# ------------------------------------------------------------------------------------------ thresholds
@dataclass(frozen=True)
class ThresholdRule:
    """How a binary model's operating threshold is set.

    kind: "default" (the model's stored threshold, 0.5 if none), "fixed" (``value``), "youden"
    (max sensitivity + specificity - 1 on validation) or "sensitivity" (the largest threshold reaching
    sensitivity >= ``value`` on validation). Multi-class models always predict the arg-max.
    """

    kind: str = "default"
    value: float | None = None

    @property
    def needs_validation(self) -> bool:
        return self.kind in ("youden", "sensitivity")

    def __str__(self) -> str:
        if self.kind == "fixed":
            return f"{self.value:g}"
        return f"sensitivity:{self.value:g}" if self.kind == "sensitivity" else self.kind


def parse_threshold(text: str) -> ThresholdRule:
    """``default`` | a number in (0, 1) | ``youden`` | ``sensitivity:0.95``.

    Raises:
        ConfigError: anything else, or a number out of range.
    """
    t = text.strip().lower()
    if t in ("default", "youden"):
        return ThresholdRule(t)
    head, _, tail = t.partition(":")
    try:
        if head == "sensitivity" and tail:
            target = float(tail)
            if 0.0 < target <= 1.0:
                return ThresholdRule("sensitivity", target)
        elif not tail and 0.0 < float(head) < 1.0:
            return ThresholdRule("fixed", float(head))
    except ValueError:
        pass
    raise ConfigError(f"--threshold {text!r}: use default, a number in (0, 1), youden or sensitivity:0.95")


@dataclass(frozen=True)
class ThresholdChoice:
    """The frozen operating point of one model: ``value`` None means arg-max."""

    value: float | None
    rule: str
    chosen_on: str
    n_val: int = 0
    note: str | None = None


def choose_threshold(
    rule: ThresholdRule,
    class_names: Sequence[str],
    stored: Mapping[str, Any] | None = None,
    y_val: np.ndarray | None = None,
    p_val: np.ndarray | None = None,
    val_name: str = "validation",
) -> ThresholdChoice:
    """Fix a model's threshold from its stored default, a fixed number or the validation data only.

    Args:
        rule: the rule.
        class_names: the model's classes (a threshold applies to binary tasks only).
        stored: model.json "thresholds" ({"default": 0.5}).
        y_val: (M,) validation class indices; p_val: (M, 2) validation probabilities.
        val_name: how the validation data are named in the report.
    Raises:
        ConfigError: the rule needs validation data and none (or a one-class set) was given.
    """
    if len(class_names) != 2:
        note = None if rule.kind == "default" else f"threshold rule {rule} applies to binary tasks only"
        return ThresholdChoice(None, "arg-max", "multi-class: arg-max", note=note)
    if rule.kind == "default":
        value = float((stored or {}).get("default", 0.5))
        return ThresholdChoice(value, "default", "model default (model.json)")
    if rule.kind == "fixed":
        return ThresholdChoice(float(rule.value or 0.5), "fixed", "given on the command line")
    if y_val is None or p_val is None:
        raise ConfigError(f"--threshold {rule} is chosen on a validation split: give --val CACHE_DIR:SPLIT")
    try:
        if rule.kind == "youden":
            value = youden_threshold(y_val, p_val[:, 1])
        else:
            value = threshold_for_sensitivity(y_val, p_val[:, 1], float(rule.value or 0.0))
    except ValueError as e:
        raise ConfigError(f"{val_name}: cannot choose the {rule} threshold: {e}") from e
    return ThresholdChoice(float(value), str(rule), f"{val_name} ({len(y_val)} images)", n_val=len(y_val))


# --------------------------------------------------------------------------------------------- metrics
def metric_summary(
    y: np.ndarray,
    probs: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None,
    n_bins: int = 15,
    fast_auc: bool = False,
) -> dict[str, MetricValue]:
    """Every reported metric as ``{"<class>/<metric>": MetricValue, "all/<metric>": ...}``.

    This is the function bootstrapped: each resample of patients calls it once, so all metrics share
    the same resamples. Point estimates take their AUCs from scikit-learn; resamples (`fast_auc`) from
    the metrics module's equal, faster implementation.
    """
    res = classification_metrics(y, probs, class_names, threshold, fast_auc=fast_auc)
    out: dict[str, MetricValue] = {
        f"{ALL}/accuracy": res.accuracy,
        f"{ALL}/balanced_accuracy": res.balanced_accuracy,
        f"{ALL}/macro_specificity": _mean([r.specificity for r in res.rows]),
        f"{ALL}/macro_auc_roc": res.macro_auc_roc,
        f"{ALL}/macro_auc_pr": res.macro_auc_pr,
        f"{ALL}/ece": defined(expected_calibration_error(y, probs, n_bins)),
    }
    for row in res.rows:
        out.update({f"{row.name}/{m}": getattr(row, m) for m in CLASS_METRICS})
    return out


def _mean(values: Sequence[MetricValue]) -> MetricValue:
    # Strict like the metrics module's macro AUCs: averaging only the defined classes would change meaning.
    bad = next((v for v in values if not v.defined), None)
    return bad if bad is not None else defined(float(np.mean([v.value for v in values])))


def _denominators(y: np.ndarray, pred: np.ndarray, class_names: Sequence[str]) -> dict[str, int]:
    """Images in each metric's denominator (the "n" column): positives, negatives, predicted positives."""
    n = {f"{ALL}/{m}": int(y.size) for m in OVERALL_METRICS}
    for k, name in enumerate(class_names):
        pos, neg, called = int((y == k).sum()), int((y != k).sum()), int((pred == k).sum())
        n.update({f"{name}/sensitivity": pos, f"{name}/fnr": pos, f"{name}/specificity": neg})
        n.update({f"{name}/fpr": neg, f"{name}/precision": called})
        n.update({f"{name}/auc_pr": int(y.size), f"{name}/auc_roc": int(y.size)})
    return n


def _num(x: float | None, digits: int = 6) -> float | None:
    return None if x is None or not math.isfinite(x) else round(float(x), digits)


def _metric_rows(
    point: dict[str, MetricValue], cis: dict[str, Any], n: dict[str, int]
) -> list[dict[str, Any]]:
    rows = []
    for key, mv in point.items():
        cls, metric = key.split("/", 1)
        ci = cis.get(key)
        rows.append(
            {
                "class": cls,
                "metric": metric,
                "value": _num(mv.value),
                "ci_low": _num(ci.low) if ci is not None and mv.defined else None,
                "ci_high": _num(ci.high) if ci is not None and mv.defined else None,
                "n": n[key],
                "reason": mv.reason,
                "ci_note": ci.note if ci is not None else None,
            }
        )
    return rows


def _counts(y: np.ndarray, patients: np.ndarray, class_names: Sequence[str]) -> dict[str, dict[str, int]]:
    return {
        name: {"images": int((y == k).sum()), "patients": len(set(patients[y == k].tolist()))}
        for k, name in enumerate(class_names)
    }


def _curves(y: np.ndarray, probs: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, name in enumerate(class_names):
        c = curves(y, probs, positive=k)
        out[name] = (
            None
            if c is None
            else {key: np.round(getattr(c, key), 5).tolist() for key in ("fpr", "tpr", "precision", "recall")}
        )
    return out


def _reliability(y: np.ndarray, probs: np.ndarray, n_bins: int) -> dict[str, Any]:
    rc = reliability_curve(y, probs, n_bins)
    return {
        "kind": "positive class" if probs.shape[1] == 2 else "top label",
        "bin_edges": np.round(rc.bin_edges, 6).tolist(),
        "confidence": [_num(v) for v in rc.confidence],
        "observed": [_num(v) for v in rc.observed],
        "counts": rc.counts.astype(int).tolist(),
    }


def _empty_result(class_names: Sequence[str], threshold: float | None) -> dict[str, Any]:
    """A test set with no image the task uses: every metric n/a with that reason, nothing to plot."""
    reason = "no image of this test set has a label the task uses"
    keys = [(ALL, m) for m in OVERALL_METRICS] + [(c, m) for c in class_names for m in CLASS_METRICS]
    k = len(class_names)
    return {
        "class_names": list(class_names), "threshold": threshold, "n_images": 0, "n_patients": 0,
        "counts": {c: {"images": 0, "patients": 0} for c in class_names},
        "metrics": [{"class": c, "metric": m, "value": None, "ci_low": None, "ci_high": None, "n": 0,
                     "reason": reason, "ci_note": None} for c, m in keys],
        "confusion": [[0] * k for _ in range(k)], "curves": {c: None for c in class_names},
        "reliability": None,
    }  # fmt: skip


def evaluate_arrays(
    y: np.ndarray,
    probs: np.ndarray,
    patients: np.ndarray | None,
    class_names: Sequence[str],
    threshold: float | None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
    n_bins: int = 15,
) -> dict[str, Any]:
    """Metrics, 95% patient-bootstrap intervals, counts, confusion matrix, curves and calibration.

    Args:
        y: (N,) class indices (every one in [0, C)).
        probs: (N, C) probabilities.
        patients: (N,) patient ids (resampling unit); None = each image its own patient.
        class_names: C names.
        threshold: frozen binary threshold, None = arg-max.
        n_boot: bootstrap resamples (0: no intervals).
        alpha: 1 - coverage.
        seed: bootstrap seed (the same seed and patients give the same resamples for every model).
        n_bins: calibration bins.
    Returns:
        JSON-ready dict: "metrics" (rows of class, metric, value, ci_low, ci_high, n, reason, ci_note),
        "counts", "confusion", "curves", "reliability", "threshold".
    """
    y, probs = np.asarray(y, dtype=np.int64), np.asarray(probs, dtype=np.float64)
    if y.size == 0:
        return _empty_result(class_names, threshold)
    groups = np.asarray(patients, dtype=object) if patients is not None else None
    point = metric_summary(y, probs, class_names, threshold, n_bins)
    cis: dict[str, Any] = {}
    if n_boot > 0:

        def summary(yy: np.ndarray, ss: np.ndarray) -> dict[str, MetricValue]:
            # The threshold stays frozen; AUCs of resamples come from the fast path (equal to sklearn).
            return metric_summary(yy, ss, class_names, threshold, n_bins, fast_auc=True)

        cis = bootstrap_metrics(y, probs, groups, summary, n_boot=n_boot, alpha=alpha, seed=seed)
    pred = predict_classes(probs, threshold)
    confusion = classification_metrics(y, probs, class_names, threshold).confusion
    pats = groups if groups is not None else np.arange(y.size).astype(object)
    return {
        "class_names": list(class_names),
        "threshold": threshold,
        "n_images": int(y.size),
        "n_patients": len(set(pats.tolist())),
        "counts": _counts(y, pats, class_names),
        "metrics": _metric_rows(point, cis, _denominators(y, pred, class_names)),
        "confusion": confusion.astype(int).tolist(),
        "curves": _curves(y, probs, class_names),
        "reliability": _reliability(y, probs, n_bins),
    }
