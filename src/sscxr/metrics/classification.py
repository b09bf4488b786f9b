"""Classification metrics: confusion counts, one-vs-rest rates, AUCs, operating thresholds.

Conventions:
- Labels are integer class indices in ``[0, C)``; ``-1`` (or NaN in a float array) means "unknown" and
  the sample is masked out of every metric (torchxrayvision's convention, with -1 for int arrays).
- Scores are ``(N, C)`` class probabilities (or any scores that rank samples per class).
- A metric whose denominator is zero is *undefined*: it is returned as ``MetricValue(None, reason)``,
  never as 0, 1 or NaN, so that reports can print ``n/a (reason)``.
- Standard names: sensitivity = TPR = TP / (TP + FN), specificity = TNR = TN / (TN + FP),
  FPR = 1 - specificity, FNR = 1 - sensitivity. The SS-CXR paper's column headed "TPR" is the
  specificity; see `paper_accuracy`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, fields

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

RATE_NAMES = ("sensitivity", "specificity", "fpr", "fnr", "precision", "npv", "accuracy", "f1")


@dataclass(frozen=True)
class MetricValue:
    """A metric that may be undefined.

    Attributes:
        value: the number, or None when the metric is undefined on these data.
        reason: why it is undefined (None when defined).
    """

    value: float | None
    reason: str | None = None

    @property
    def defined(self) -> bool:
        """True when the metric has a value."""
        return self.value is not None

    def format(self, spec: str = ".4f", scale: float = 1.0) -> str:
        """``format(value * scale, spec)``, or ``"n/a (reason)"`` when undefined."""
        return f"n/a ({self.reason})" if self.value is None else format(self.value * scale, spec)

    def __str__(self) -> str:
        return self.format()


def defined(value: float) -> MetricValue:
    """A defined metric value."""
    return MetricValue(float(value), None)


def undefined(reason: str) -> MetricValue:
    """An undefined metric with the reason it is undefined."""
    return MetricValue(None, reason)


def as_metric(value: MetricValue | float | None, reason: str = "undefined") -> MetricValue:
    """Normalise a float / None / NaN / MetricValue into a MetricValue (None and NaN -> undefined)."""
    if isinstance(value, MetricValue):
        return value
    if value is None or math.isnan(float(value)):
        return undefined(reason)
    return defined(float(value))


def _ratio(num: float, den: float, reason: str) -> MetricValue:
    return defined(num / den) if den > 0 else undefined(reason)


def binary_rates(tp: int, fp: int, tn: int, fn: int) -> dict[str, MetricValue]:
    """Rates of a 2x2 confusion table; each is undefined when its denominator is 0.

    Returns:
        dict with keys ``RATE_NAMES``: sensitivity (TPR, recall), specificity (TNR), fpr, fnr,
        precision (PPV), npv, accuracy, f1.
    """
    pos, neg = tp + fn, tn + fp
    no_pos, no_neg = "no positive samples (TP + FN = 0)", "no negative samples (TN + FP = 0)"
    return {
        "sensitivity": _ratio(tp, pos, no_pos),
        "specificity": _ratio(tn, neg, no_neg),
        "fpr": _ratio(fp, neg, no_neg),
        "fnr": _ratio(fn, pos, no_pos),
        "precision": _ratio(tp, tp + fp, "no positive predictions (TP + FP = 0)"),
        "npv": _ratio(tn, tn + fn, "no negative predictions (TN + FN = 0)"),
        "accuracy": _ratio(tp + tn, pos + neg, "no samples"),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, "no positive samples and no positive predictions"),
    }


def known_mask(y_true: np.ndarray) -> np.ndarray:
    """Boolean mask of samples with a known label (not NaN, not negative). ``y_true: (N,)``."""
    y = np.asarray(y_true)
    if np.issubdtype(y.dtype, np.floating):
        return ~np.isnan(y) & (np.nan_to_num(y, nan=-1.0) >= 0)
    return y >= 0


def _clean(y_true: np.ndarray, scores: np.ndarray, n_classes: int | None = None) -> tuple[np.ndarray, ...]:
    """Drop unknown labels; check shapes, finiteness and label range. Returns int labels and scores."""
    y, s = np.asarray(y_true), np.asarray(scores, dtype=np.float64)
    if y.ndim != 1 or s.shape[0] != y.shape[0]:
        raise ValueError(f"y_true must be (N,) and scores (N, ...) with the same N; got {y.shape}, {s.shape}")
    keep = known_mask(y)
    y, s = y[keep].astype(np.int64), s[keep]
    if not np.isfinite(s).all():
        raise ValueError("scores contain NaN or inf; check the model outputs")
    if n_classes is not None and y.size and y.max() >= n_classes:
        raise ValueError(f"label {int(y.max())} out of range for {n_classes} classes")
    return y, s


def confusion(y_true: np.ndarray, y_pred: np.ndarray, n_classes: int) -> np.ndarray:
    """Confusion matrix; unknown labels (-1 / NaN) are dropped.

    Args:
        y_true: (N,) true class indices.
        y_pred: (N,) predicted class indices.
        n_classes: C.
    Returns:
        (C, C) int64 counts, rows = true class, columns = predicted class (sklearn's layout).
    """
    keep = known_mask(y_true)
    yt, yp = np.asarray(y_true)[keep].astype(np.int64), np.asarray(y_pred)[keep].astype(np.int64)
    if yt.size and (min(yt.min(), yp.min()) < 0 or max(yt.max(), yp.max()) >= n_classes):
        raise ValueError(f"class indices must lie in [0, {n_classes})")
    return np.bincount(yt * n_classes + yp, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def auc_roc(y_bin: np.ndarray, score: np.ndarray) -> MetricValue:
    """Area under the ROC curve (Mann-Whitney U with average ranks for ties).

    Equal to sklearn's ``roc_auc_score`` (the tests check this); computed here from ranks because
    sklearn's input validation costs milliseconds a call, which dominates a 1000-resample bootstrap.

    Args:
        y_bin: (N,) bool or 0/1, positives.
        score: (N,) higher = more likely positive.
    """
    y = np.asarray(y_bin, dtype=bool)
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return undefined("only one class present in y_true")
    ranks = rankdata(score)
    return defined((ranks[y].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def sklearn_aucs(y_bin: np.ndarray, score: np.ndarray) -> tuple[MetricValue, MetricValue]:
    """(AUC-ROC, AUC-PR) from scikit-learn itself, with the same undefined cases as `auc_roc` and
    `average_precision`. Used for every reported point estimate; bootstrap resamples use the fast,
    equal (tested to 1e-12) implementations above."""
    y = np.asarray(y_bin, dtype=bool)
    one_class = y.all() or not y.any()  # the case `auc_roc` calls undefined, with its reason
    roc = (
        undefined("only one class present in y_true")
        if one_class
        else defined(float(roc_auc_score(y, score)))
    )
    pr = (
        defined(float(average_precision_score(y, score)))
        if y.any()
        else undefined("no positive samples in y_true")
    )
    return roc, pr


def average_precision(y_bin: np.ndarray, score: np.ndarray) -> MetricValue:
    """AUC-PR, computed as average precision: sum over thresholds of (R_k - R_{k-1}) * P_k.

    This is sklearn's ``average_precision_score`` (step-wise, no trapezoidal interpolation, which would
    be optimistic), re-implemented for speed and tested against sklearn. Defined as soon as there is one
    positive (all-positive data give 1); undefined without positives.

    Args:
        y_bin: (N,) bool or 0/1, positives.
        score: (N,) higher = more likely positive.
    """
    y = np.asarray(y_bin, dtype=bool)
    if not y.any():
        return undefined("no positive samples in y_true")
    order = np.argsort(-np.asarray(score, dtype=np.float64), kind="mergesort")
    s, yy = np.asarray(score, dtype=np.float64)[order], y[order]
    # One operating point per distinct score: tied samples enter together.
    last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]
    tps = np.cumsum(yy)[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1]
    return defined(float(np.sum(np.diff(np.r_[0.0, recall]) * precision)))


@dataclass(frozen=True)
class ClassRow:
    """One-vs-rest metrics of one class (for binary tasks the row of class 1 is "the" result)."""

    name: str
    support: int
    tp: int
    fp: int
    tn: int
    fn: int
    sensitivity: MetricValue
    specificity: MetricValue
    fpr: MetricValue
    fnr: MetricValue
    precision: MetricValue
    npv: MetricValue
    f1: MetricValue
    auc_roc: MetricValue
    auc_pr: MetricValue

    def metrics(self) -> dict[str, MetricValue]:
        """The MetricValue fields by name, in declaration order."""
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        return {k: v for k, v in values.items() if isinstance(v, MetricValue)}


@dataclass(frozen=True)
class ClassificationResult:
    """Everything `classification_metrics` computes.

    Attributes:
        class_names: C names; ``rows[k]`` is class k against the rest.
        confusion: (C, C) counts, rows = true, columns = predicted.
        positive_class: name of class 1 for binary tasks, else None.
        threshold: the binary threshold used (None: arg-max).
        n: number of samples with a known label; n_unknown: masked-out samples.
    """

    class_names: tuple[str, ...]
    rows: tuple[ClassRow, ...]
    accuracy: MetricValue
    balanced_accuracy: MetricValue
    macro_auc_roc: MetricValue
    macro_auc_pr: MetricValue
    confusion: np.ndarray
    positive_class: str | None
    threshold: float | None
    n: int
    n_unknown: int

    def row(self, name: str) -> ClassRow:
        """The one-vs-rest row of the class called ``name``."""
        return self.rows[self.class_names.index(name)]

    def summary(self) -> dict[str, MetricValue]:
        """Flat ``{"accuracy": ..., "covid-19/sensitivity": ...}`` of every MetricValue."""
        out = {
            "accuracy": self.accuracy,
            "balanced_accuracy": self.balanced_accuracy,
            "macro_auc_roc": self.macro_auc_roc,
            "macro_auc_pr": self.macro_auc_pr,
        }
        for r in self.rows:
            out.update({f"{r.name}/{k}": v for k, v in r.metrics().items()})
        return out

    def flat(self) -> dict[str, float | None]:
        """`summary` as plain numbers (None where undefined), for logs and JSON."""
        return {k: v.value for k, v in self.summary().items()}


def predict(scores: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Predicted classes: arg-max, or for binary tasks class 1 when ``scores[:, 1] >= threshold``.

    Args:
        scores: (N, C).
    Returns:
        (N,) int64.
    """
    s = np.asarray(scores)
    if threshold is None:
        return np.argmax(s, axis=1).astype(np.int64)
    if s.shape[1] != 2:
        raise ValueError(f"a threshold needs a binary task (2 score columns), got {s.shape[1]}")
    return (s[:, 1] >= threshold).astype(np.int64)


def _class_row(name: str, k: int, cm: np.ndarray, y: np.ndarray, s: np.ndarray, fast: bool) -> ClassRow:
    tp = int(cm[k, k])
    fn = int(cm[k].sum()) - tp
    fp = int(cm[:, k].sum()) - tp
    tn = int(cm.sum()) - tp - fn - fp
    r = binary_rates(tp, fp, tn, fn)
    return ClassRow(
        name, tp + fn, tp, fp, tn, fn,
        r["sensitivity"], r["specificity"], r["fpr"], r["fnr"], r["precision"], r["npv"], r["f1"],
        *((auc_roc(y == k, s[:, k]), average_precision(y == k, s[:, k])) if fast
          else sklearn_aucs(y == k, s[:, k])),
    )  # fmt: skip


def _macro(values: Sequence[MetricValue], names: Sequence[str], what: str) -> MetricValue:
    # Strict: a macro average over the classes that happen to be defined would silently change meaning.
    for v, n in zip(values, names, strict=True):
        if not v.defined:
            return undefined(f"{what} undefined for class {n!r}: {v.reason}")
    return defined(float(np.mean([v.value for v in values])))


def classification_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    class_names: Sequence[str],
    threshold: float | None = None,
    fast_auc: bool = False,
) -> ClassificationResult:
    """Per-class one-vs-rest rates and AUCs, accuracy, balanced accuracy, macro AUCs, confusion matrix.

    Args:
        y_true: (N,) class indices; -1 or NaN = unknown (masked out).
        scores: (N, C) class probabilities.
        class_names: C names.
        threshold: binary tasks only: predict class 1 when ``scores[:, 1] >= threshold``; None = arg-max.
        fast_auc: compute the AUCs with this module's rank-based implementations (for bootstrap
            resamples, where scikit-learn's per-call validation dominates) instead of scikit-learn.
    Returns:
        ClassificationResult. For C = 2 the macro AUCs are those of class 1 (the positive class), as in
        sklearn's binary ``roc_auc_score``; for C > 2 they are the mean of the one-vs-rest AUCs and are
        undefined if any class's AUC is. Balanced accuracy is the mean sensitivity over the classes
        present in y_true (sklearn's definition).
    """
    names = tuple(class_names)
    n_all = int(np.asarray(y_true).shape[0])
    y, s = _clean(y_true, scores, len(names))
    if s.ndim != 2 or s.shape[1] != len(names):
        raise ValueError(f"scores must be (N, {len(names)}) for classes {names}, got {s.shape}")
    cm = confusion(y, predict(s, threshold), len(names))
    rows = tuple(_class_row(n, k, cm, y, s, fast_auc) for k, n in enumerate(names))
    recalls = [r.sensitivity.value for r in rows if r.support > 0]
    bal = defined(float(np.mean(recalls))) if recalls else undefined("no samples")
    if len(names) == 2:
        macro_roc, macro_pr = rows[1].auc_roc, rows[1].auc_pr
    else:
        macro_roc = _macro([r.auc_roc for r in rows], names, "AUC-ROC")
        macro_pr = _macro([r.auc_pr for r in rows], names, "AUC-PR")
    return ClassificationResult(
        class_names=names,
        rows=rows,
        accuracy=_ratio(float(np.trace(cm)), float(cm.sum()), "no samples"),
        balanced_accuracy=bal,
        macro_auc_roc=macro_roc,
        macro_auc_pr=macro_pr,
        confusion=cm,
        positive_class=names[1] if len(names) == 2 else None,
        threshold=threshold,
        n=int(y.size),
        n_unknown=n_all - int(y.size),
    )


@dataclass(frozen=True)
class Curves:
    """ROC and precision-recall curves of one class against the rest (sklearn's arrays)."""

    fpr: np.ndarray
    tpr: np.ndarray
    roc_thresholds: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    pr_thresholds: np.ndarray


def _binary_scores(y_true: np.ndarray, scores: np.ndarray, positive: int) -> tuple[np.ndarray, np.ndarray]:
    y, s = _clean(y_true, scores)
    p = s[:, positive] if s.ndim == 2 else s
    return y == positive, p


def curves(y_true: np.ndarray, scores: np.ndarray, positive: int = 1) -> Curves | None:
    """ROC and PR curve arrays for plotting.

    Args:
        y_true: (N,) class indices (-1 / NaN unknown).
        scores: (N, C) scores, or (N,) scores of the positive class.
        positive: the class plotted against the rest.
    Returns:
        Curves, or None when y_true holds only one of {positive, rest} (the ROC curve is undefined).
    """
    yb, p = _binary_scores(y_true, scores, positive)
    if yb.all() or not yb.any():
        return None
    fpr, tpr, rt = roc_curve(yb, p)
    prec, rec, pt = precision_recall_curve(yb, p)
    return Curves(fpr, tpr, rt, prec, rec, pt)


def youden_threshold(y_true: np.ndarray, p: np.ndarray) -> float:
    """The threshold maximising Youden's J = sensitivity + specificity - 1 (predict positive if p >= t).

    Args:
        y_true: (N,) 0/1 labels (-1 / NaN unknown).
        p: (N,) positive-class scores.
    Returns:
        One of the scores (ties in J: the largest such threshold, i.e. the most specific).
    Raises:
        ValueError: when y_true lacks positives or negatives.
    """
    yb, s = _binary_scores(y_true, p, 1)
    if yb.all() or not yb.any():
        raise ValueError("Youden's threshold needs both positive and negative samples")
    fpr, tpr, thr = roc_curve(yb, s)
    # Index 0 is sklearn's +inf threshold (nothing predicted positive): not a usable operating point.
    j = (tpr - fpr)[1:]
    return float(thr[1:][int(np.argmax(j))])


def threshold_for_sensitivity(y_true: np.ndarray, p: np.ndarray, target: float) -> float:
    """The largest threshold t whose sensitivity (fraction of positives with p >= t) is >= target.

    Args:
        y_true: (N,) 0/1 labels (-1 / NaN unknown).
        p: (N,) positive-class scores.
        target: wanted sensitivity in (0, 1].
    Raises:
        ValueError: target out of range or no positives.
    """
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target sensitivity must lie in (0, 1], got {target}")
    yb, s = _binary_scores(y_true, p, 1)
    pos = np.sort(s[yb])[::-1]
    if pos.size == 0:
        raise ValueError("a sensitivity target needs positive samples")
    # k positives at or above t give sensitivity k / n_pos; the tolerance absorbs target * n rounding.
    k = max(1, math.ceil(target * pos.size - 1e-9))
    return float(pos[k - 1])


def paper_accuracy(n_neg: int, n_pos: int, specificity: float, fnr: float) -> float:
    """Accuracy from the SS-CXR tables' columns (their "TPR" column is the specificity).

    accuracy = (n_neg * specificity + n_pos * (1 - FNR)) / (n_neg + n_pos); e.g. Table 1, ViT-S:
    (200 * 0.975 + 200 * (1 - 0.190)) / 400 = 0.8925.

    Returns:
        accuracy as a fraction in [0, 1].
    """
    return (n_neg * specificity + n_pos * (1.0 - fnr)) / (n_neg + n_pos)
