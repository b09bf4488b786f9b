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
    CLASSIFICATION_METRICS,
    ClassificationResult,
    MetricValue,
    bootstrap_metrics,
    classification_metrics,
    curves,
    overall_metrics,
    reliability_curve,
    threshold_for_sensitivity,
    youden_threshold,
)

__all__ = [
    "ALL",
    "ThresholdChoice",
    "ThresholdRule",
    "choose_threshold",
    "evaluate_arrays",
    "metric_summary",
    "parse_threshold",
]

ALL = "all"  # the "class" of metrics computed over every class (accuracy, ECE, macro AUCs)
# Which metrics are reported, in which order, and their "n": the reported entries of
# `sscxr.metrics.CLASSIFICATION_METRICS` (overall ones as "all/<key>", then each class's).


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

    The metrics and their order are the reported entries of `CLASSIFICATION_METRICS`: the overall
    ones first, then each class's one-vs-rest ones. This is the function bootstrapped: each resample
    of patients calls it once, so all metrics share the same resamples. Point estimates take their
    AUCs from scikit-learn; resamples (`fast_auc`) from the metrics module's equal, faster
    implementation.
    """
    res = classification_metrics(y, probs, class_names, threshold, fast_auc=fast_auc)
    out = {f"{ALL}/{k}": v for k, v in overall_metrics(res, y, probs, n_bins).items()}
    shown = [s.key for s in CLASSIFICATION_METRICS.select("class", reported=True)]
    for row in res.rows:
        out.update({f"{row.name}/{m}": row.values[m] for m in shown})
    return out


def _denominators(res: ClassificationResult) -> dict[str, int]:
    """Images in each metric's denominator (the "n" column), from each metric's `denominator`:
    positives, negatives, predicted positives, ... of the class; all images for overall metrics."""
    n = {f"{ALL}/{s.key}": res.n for s in CLASSIFICATION_METRICS.select("overall", reported=True)}
    per_class = CLASSIFICATION_METRICS.select("class", reported=True)
    for row in res.rows:
        n.update({f"{row.name}/{s.key}": s.count(row) for s in per_class})
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
    overall = [s.key for s in CLASSIFICATION_METRICS.select("overall", reported=True)]
    per_class = [s.key for s in CLASSIFICATION_METRICS.select("class", reported=True)]
    keys = [(ALL, m) for m in overall] + [(c, m) for c in class_names for m in per_class]
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
    res = classification_metrics(y, probs, class_names, threshold)
    pats = groups if groups is not None else np.arange(y.size).astype(object)
    return {
        "class_names": list(class_names),
        "threshold": threshold,
        "n_images": int(y.size),
        "n_patients": len(set(pats.tolist())),
        "counts": _counts(y, pats, class_names),
        "metrics": _metric_rows(point, cis, _denominators(res)),
        "confusion": res.confusion.astype(int).tolist(),
        "curves": _curves(y, probs, class_names),
        "reliability": _reliability(y, probs, n_bins),
    }
