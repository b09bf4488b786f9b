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
- `CLASSIFICATION_METRICS` is the one table of the reported metrics: each `MetricSpec` says how the
  metric is computed, its name, its report column, its place in the report order and its "n". The
  per-class rows (`ClassRow`), the evaluation's metric dict (and so its bootstrap intervals, metrics.json
  and metrics.csv) and the report tables all read it: adding a metric is one entry (or one
  `register_metric` call).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Literal

import numpy as np
from scipy.stats import rankdata
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

from sscxr.metrics.calibration import expected_calibration_error
from sscxr.metrics.labels import known_mask

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

    The rates are the threshold-kind one-vs-rest metrics of `CLASSIFICATION_METRICS` plus the table's
    own accuracy (TP + TN) / all, in ``RATE_NAMES`` order, then any registered ones.

    Returns:
        dict with keys ``RATE_NAMES``: sensitivity (TPR, recall), specificity (TNR), fpr, fnr,
        precision (PPV), npv, accuracy, f1 (and the registered threshold-kind class metrics).
    """
    rates = {
        s.key: s.from_counts(tp, fp, tn, fn) for s in CLASSIFICATION_METRICS.select("class", kind="threshold")
    }
    rates["accuracy"] = _ratio(tp + tn, tp + fp + tn + fn, "no samples")
    order = [*RATE_NAMES, *(k for k in rates if k not in RATE_NAMES)]
    return {k: rates[k] for k in order}


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


def _sklearn_auc_roc(y_bin: np.ndarray, score: np.ndarray) -> MetricValue:
    y = np.asarray(y_bin, dtype=bool)
    if y.all() or not y.any():  # the case `auc_roc` calls undefined, with its reason
        return undefined("only one class present in y_true")
    return defined(float(roc_auc_score(y, score)))


def _sklearn_auc_pr(y_bin: np.ndarray, score: np.ndarray) -> MetricValue:
    y = np.asarray(y_bin, dtype=bool)
    if not y.any():
        return undefined("no positive samples in y_true")
    return defined(float(average_precision_score(y, score)))


def sklearn_aucs(y_bin: np.ndarray, score: np.ndarray) -> tuple[MetricValue, MetricValue]:
    """(AUC-ROC, AUC-PR) from scikit-learn itself, with the same undefined cases as `auc_roc` and
    `average_precision`. Used for every reported point estimate; bootstrap resamples use the fast,
    equal (tested to 1e-12) implementations above."""
    return _sklearn_auc_roc(y_bin, score), _sklearn_auc_pr(y_bin, score)


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
    """One-vs-rest metrics of one class (for binary tasks the row of class 1 is "the" result).

    Every class-scope metric of `CLASSIFICATION_METRICS` is in ``values`` and readable as an attribute:
    ``row.sensitivity``, ``row.auc_roc``, ``row.<registered key>``.
    """

    name: str
    support: int
    tp: int
    fp: int
    tn: int
    fn: int
    values: dict[str, MetricValue] = field(default_factory=dict, hash=False)

    def __getattr__(self, key: str) -> MetricValue:
        # Only reached when ordinary lookup fails; vars() avoids recursing before ``values`` exists
        # (copy and unpickling look up special methods on a bare instance).
        values = vars(self).get("values")
        if values is not None and key in values:
            return values[key]
        raise AttributeError(f"{type(self).__name__} has no attribute or metric {key!r}")

    def metrics(self) -> dict[str, MetricValue]:
        """The metrics by name, in `CLASSIFICATION_METRICS` order."""
        return dict(self.values)


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


# ------------------------------------------------------------------------------ the metric table
MetricKind = Literal["threshold", "score"]
MetricScope = Literal["class", "overall"]
# What the report's "n" column counts for a metric, from the one-vs-rest counts (overall: all images).
DENOMINATORS: dict[str, Callable[[int, int, int, int], int]] = {
    "positives": lambda tp, fp, tn, fn: tp + fn,
    "negatives": lambda tp, fp, tn, fn: tn + fp,
    "predicted positives": lambda tp, fp, tn, fn: tp + fp,
    "predicted negatives": lambda tp, fp, tn, fn: tn + fn,
    "all": lambda tp, fp, tn, fn: tp + fp + tn + fn,
}


@dataclass(frozen=True)
class MetricSpec:
    """One classification metric: how it is computed, named, ordered, counted and shown.

    Attributes:
        key: its name in metric dicts, metrics.json and metrics.csv: ``"<class>/<key>"`` for a
            one-vs-rest metric, ``"all/<key>"`` for an overall one. Unique in the table.
        label: its column header in the report tables (``"Sens"``).
        kind: ``"threshold"``: a function of the predicted classes (frozen threshold or arg-max);
            ``"score"``: of the ranking of the scores only.
        compute: returns a MetricValue, or a float (None / NaN: undefined), from
            - scope "class", kind "threshold": ``compute(tp, fp, tn, fn)``, the class against the rest;
            - scope "class", kind "score": ``compute(y_bin, score, fast)``, (N,) bools and (N,) scores
              of the class; ``fast`` is True on bootstrap resamples (a quicker, equal implementation
              may be used);
            - scope "overall": ``compute(result, y_true, scores, n_bins)``, the ClassificationResult
              with every class row, the raw labels and (N, C) scores, and the calibration bins.
        higher_is_better: the direction of a better model (for readers and model selection).
        doc: its definition in one line, including when it is undefined.
        scope: ``"class"`` (one value per class against the rest) or ``"overall"``.
        denominator: what the report's "n" column counts (a key of `DENOMINATORS`).
        reported: in the evaluation's metric dict, so in the bootstrap, metrics.json, metrics.csv;
            False: on `ClassRow` only.
        column: a column of the paper-style result tables (Tables 1-4), in table order.
        percent: shown x 100 with 2 decimals (as the paper prints ACC); else 3 decimals.
    """

    key: str
    label: str
    kind: MetricKind
    compute: Callable[..., MetricValue | float | None]
    higher_is_better: bool
    doc: str
    scope: MetricScope = "class"
    denominator: str = "all"
    reported: bool = True
    column: bool = True
    percent: bool = False

    def __post_init__(self) -> None:
        if not self.key.isidentifier():
            raise ValueError(f"metric key {self.key!r} must be an identifier (it names a ClassRow attribute)")
        if self.kind not in ("threshold", "score"):
            raise ValueError(f"metric {self.key!r}: kind must be 'threshold' or 'score', got {self.kind!r}")
        if self.scope not in ("class", "overall"):
            raise ValueError(f"metric {self.key!r}: scope must be 'class' or 'overall', got {self.scope!r}")
        if self.denominator not in DENOMINATORS:
            raise ValueError(f"metric {self.key!r}: denominator must be one of {sorted(DENOMINATORS)}")
        if self.column and not self.reported:
            raise ValueError(f"metric {self.key!r}: a report column must be reported")

    def from_counts(self, tp: int, fp: int, tn: int, fn: int) -> MetricValue:
        """A class-scope threshold metric of one class's one-vs-rest counts."""
        return as_metric(self.compute(tp, fp, tn, fn))

    def from_scores(self, y_bin: np.ndarray, score: np.ndarray, fast: bool = False) -> MetricValue:
        """A class-scope score metric of one class's (N,) positives and (N,) scores."""
        return as_metric(self.compute(y_bin, score, fast))

    def overall(
        self, result: ClassificationResult, y_true: np.ndarray, scores: np.ndarray, n_bins: int
    ) -> MetricValue:
        """An overall metric of a whole ClassificationResult (and the raw labels and scores)."""
        return as_metric(self.compute(result, y_true, scores, n_bins))

    def count(self, row: ClassRow) -> int:
        """The report's "n" of this class-scope metric on one class row."""
        return DENOMINATORS[self.denominator](row.tp, row.fp, row.tn, row.fn)

    def of_result(
        self, result: ClassificationResult, y_true: np.ndarray, scores: np.ndarray, n_bins: int = 15
    ) -> MetricValue:
        """One value of this metric for a whole ClassificationResult (what a study aggregates).

        An overall metric is `overall`; a class-scope one is summarised as the macro AUCs are: for a
        binary task the positive class's (class 1), else the mean over the classes, undefined if any
        class's is.
        """
        if self.scope == "overall":
            return self.overall(result, y_true, scores, n_bins)
        values = [row.values[self.key] for row in result.rows]
        if len(values) == 2:
            return values[1]
        return _macro(values, result.class_names, self.label)


class MetricTable:
    """The classification metrics in report order; built-ins plus those added by `register`.

    One module-level instance, `CLASSIFICATION_METRICS`, is read at call time by `classification_metrics`
    (the `ClassRow` values), `binary_rates`, `overall_metrics`, the evaluation's metric dict (bootstrap,
    metrics.json, "n" column) and the report tables (columns, labels, formats).
    """

    def __init__(self, specs: Iterable[MetricSpec]) -> None:
        self._specs: list[MetricSpec] = []
        for spec in specs:
            self._check_new(spec)
            self._specs.append(spec)
        self._builtin = frozenset(self.keys())

    def __iter__(self) -> Iterator[MetricSpec]:
        return iter(tuple(self._specs))

    def __len__(self) -> int:
        return len(self._specs)

    def __contains__(self, key: object) -> bool:
        return any(s.key == key for s in self._specs)

    def __getitem__(self, key: str) -> MetricSpec:
        for s in self._specs:
            if s.key == key:
                return s
        raise KeyError(f"no classification metric {key!r}; known: {', '.join(self.keys())}")

    def keys(self) -> tuple[str, ...]:
        """Every key, in report order."""
        return tuple(s.key for s in self._specs)

    def select(
        self,
        scope: MetricScope | None = None,
        *,
        kind: MetricKind | None = None,
        reported: bool | None = None,
        column: bool | None = None,
    ) -> tuple[MetricSpec, ...]:
        """The entries matching every given filter (None: any), in report order."""
        return tuple(
            s
            for s in self._specs
            if (scope is None or s.scope == scope)
            and (kind is None or s.kind == kind)
            and (reported is None or s.reported == reported)
            and (column is None or s.column == column)
        )

    def _check_new(self, spec: MetricSpec) -> None:
        if spec.key in self:
            raise ValueError(f"a classification metric {spec.key!r} exists already (keys are unique)")
        shadowed = hasattr(ClassRow, spec.key) or spec.key in {f.name for f in fields(ClassRow)}
        if spec.scope == "class" and shadowed:
            raise ValueError(f"metric key {spec.key!r} would shadow ClassRow.{spec.key}")

    def register(self, spec: MetricSpec, *, before: str | None = None) -> MetricSpec:
        """Add a metric: last in report order, or just before the metric ``before``.

        Raises:
            ValueError: the key exists already or would shadow a ClassRow attribute.
            KeyError: ``before`` is not in the table.
        """
        self._check_new(spec)
        at = len(self._specs) if before is None else self._specs.index(self[before])
        self._specs.insert(at, spec)
        return spec

    def unregister(self, key: str) -> MetricSpec:
        """Remove a registered (not built-in) metric and return it."""
        if key in self._builtin:
            raise ValueError(f"{key!r} is a built-in metric: it cannot be unregistered")
        spec = self[key]
        self._specs.remove(spec)
        return spec


def _strict_mean(values: Sequence[MetricValue]) -> MetricValue:
    # Strict like the macro AUCs: averaging only the defined classes would change meaning.
    bad = next((v for v in values if not v.defined), None)
    return bad if bad is not None else defined(float(np.mean([v.value for v in values])))


def _ece(result: ClassificationResult, y_true: np.ndarray, scores: np.ndarray, n_bins: int) -> MetricValue:
    return defined(expected_calibration_error(y_true, scores, n_bins))


_NO_POS, _NO_NEG = "no positive samples (TP + FN = 0)", "no negative samples (TN + FP = 0)"

CLASSIFICATION_METRICS = MetricTable(
    [
        # One-vs-rest, per class, in the order of metrics.json and of the paper-style columns.
        MetricSpec("sensitivity", "Sens", "threshold", lambda tp, fp, tn, fn: _ratio(tp, tp + fn, _NO_POS),
                   True, "TPR, recall: TP / (TP + FN)", denominator="positives"),
        MetricSpec("specificity", "Spec", "threshold", lambda tp, fp, tn, fn: _ratio(tn, tn + fp, _NO_NEG),
                   True, "TNR: TN / (TN + FP) (the SS-CXR paper's \"TPR\" column)", denominator="negatives"),
        MetricSpec("fpr", "FPR", "threshold", lambda tp, fp, tn, fn: _ratio(fp, tn + fp, _NO_NEG),
                   False, "FP / (TN + FP) = 1 - specificity", denominator="negatives"),
        MetricSpec("fnr", "FNR", "threshold", lambda tp, fp, tn, fn: _ratio(fn, tp + fn, _NO_POS),
                   False, "FN / (TP + FN) = 1 - sensitivity", denominator="positives"),
        MetricSpec("precision", "PPV", "threshold",
                   lambda tp, fp, tn, fn: _ratio(tp, tp + fp, "no positive predictions (TP + FP = 0)"),
                   True, "PPV: TP / (TP + FP)", denominator="predicted positives", column=False),
        MetricSpec("npv", "NPV", "threshold",
                   lambda tp, fp, tn, fn: _ratio(tn, tn + fn, "no negative predictions (TN + FN = 0)"),
                   True, "TN / (TN + FN)", denominator="predicted negatives", reported=False, column=False),
        MetricSpec("f1", "F1", "threshold",
                   lambda tp, fp, tn, fn: _ratio(2 * tp, 2 * tp + fp + fn,
                                                 "no positive samples and no positive predictions"),
                   True, "2 TP / (2 TP + FP + FN)", reported=False, column=False),
        MetricSpec("auc_pr", "AUC-PR", "score",
                   lambda y, s, fast: average_precision(y, s) if fast else _sklearn_auc_pr(y, s),
                   True, "average precision of the class's score; undefined without positives"),
        MetricSpec("auc_roc", "AUC-ROC", "score",
                   lambda y, s, fast: auc_roc(y, s) if fast else _sklearn_auc_roc(y, s),
                   True, "area under the ROC curve of the class's score; undefined with one class only"),
        # Over all classes ("all/<key>"); ACC closes the paper-style tables.
        MetricSpec("accuracy", "ACC %", "threshold", lambda r, y, s, b: r.accuracy, True,
                   "correct / all at the operating threshold or arg-max", scope="overall", percent=True),
        MetricSpec("balanced_accuracy", "BAcc", "threshold", lambda r, y, s, b: r.balanced_accuracy, True,
                   "mean sensitivity over the classes present", scope="overall", column=False),
        MetricSpec("macro_specificity", "Spec (mean)", "threshold",
                   lambda r, y, s, b: _strict_mean([row.specificity for row in r.rows]), True,
                   "mean one-vs-rest specificity; undefined if any class's is", scope="overall",
                   column=False),
        MetricSpec("macro_auc_roc", "AUC-ROC (macro)", "score", lambda r, y, s, b: r.macro_auc_roc, True,
                   "binary: the positive class's AUC-ROC; else the mean one-vs-rest", scope="overall",
                   column=False),
        MetricSpec("macro_auc_pr", "AUC-PR (macro)", "score", lambda r, y, s, b: r.macro_auc_pr, True,
                   "binary: the positive class's AUC-PR; else the mean one-vs-rest", scope="overall",
                   column=False),
        MetricSpec("ece", "ECE", "score", _ece, False,
                   "expected calibration error, equal-width bins", scope="overall", column=False),
    ]
)  # fmt: skip


def register_metric(spec: MetricSpec, *, before: str | None = None) -> MetricSpec:
    """Add a classification metric to `CLASSIFICATION_METRICS` (see `MetricTable.register`): it is then
    computed on every `ClassRow`, reported and bootstrapped by the evaluation and, with ``column``,
    shown in the report tables, with no other edit."""
    return CLASSIFICATION_METRICS.register(spec, before=before)


def unregister_metric(key: str) -> MetricSpec:
    """Remove a metric added by `register_metric`."""
    return CLASSIFICATION_METRICS.unregister(key)


def overall_metrics(
    result: ClassificationResult, y_true: np.ndarray, scores: np.ndarray, n_bins: int = 15
) -> dict[str, MetricValue]:
    """The reported overall metrics of the table, ``{key: MetricValue}`` in report order.

    Args:
        result: `classification_metrics` of ``y_true`` and ``scores``.
        y_true: (N,) labels as given to it; scores: (N, C); n_bins: calibration bins.
    """
    return {
        s.key: s.overall(result, y_true, scores, n_bins)
        for s in CLASSIFICATION_METRICS.select("overall", reported=True)
    }


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
    y_bin, score = y == k, s[:, k]
    values = {
        spec.key: spec.from_counts(tp, fp, tn, fn)
        if spec.kind == "threshold"
        else spec.from_scores(y_bin, score, fast)
        for spec in CLASSIFICATION_METRICS.select("class")
    }
    return ClassRow(name, tp + fn, tp, fp, tn, fn, values)


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
    y_pred: np.ndarray | None = None,
) -> ClassificationResult:
    """Per-class one-vs-rest rates and AUCs, accuracy, balanced accuracy, macro AUCs, confusion matrix.

    Args:
        y_true: (N,) class indices; -1 or NaN = unknown (masked out).
        scores: (N, C) class probabilities.
        class_names: C names.
        threshold: binary tasks only: predict class 1 when ``scores[:, 1] >= threshold``; None = arg-max.
        fast_auc: compute the AUCs with this module's rank-based implementations (for bootstrap
            resamples, where scikit-learn's per-call validation dominates) instead of scikit-learn.
        y_pred: (N,) predicted classes fixed elsewhere (a predictions file, at the threshold frozen
            when it was written); None = ``predict(scores, threshold)``.
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
    if y_pred is None:
        pred = predict(s, threshold)
    elif np.shape(y_pred) != (n_all,):
        raise ValueError(f"y_pred must be (N,) = ({n_all},) like y_true, got {np.shape(y_pred)}")
    else:
        pred = np.asarray(y_pred)[known_mask(y_true)]
    cm = confusion(y, pred, len(names))
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
