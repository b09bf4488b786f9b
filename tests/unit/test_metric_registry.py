"""The one table of classification metrics (`CLASSIFICATION_METRICS`): its entries reproduce hand-computed
values, it keeps the reported keys, order and report columns, and a metric registered in a test (and
removed after it) appears in the class rows, the evaluation's metric dict, the bootstrap intervals, the
"n" column and the report tables without any other edit."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from sscxr.evaluation import evaluate_arrays, metric_summary
from sscxr.metrics import (
    CLASSIFICATION_METRICS,
    MetricSpec,
    binary_rates,
    bootstrap_ci,
    bootstrap_metrics,
    classification_metrics,
    confusion,
    expected_calibration_error,
    overall_metrics,
    register_metric,
    unregister_metric,
)
from sscxr.reports import study as study_report
from sscxr.reports.tables import fmt_metric, metric_index, paper_columns, paper_tables, summary_table

TOY = "ovr_balanced_accuracy"
TOY_LABEL = "BAcc (OvR)"

# Hand case: positives score 0.9 0.8 0.7 0.3, negatives 0.6 0.55 0.4 0.2 0.1 0.05; arg-max calls
# p1 > 0.5 positive, so class 1 has TP 3, FN 1, FP 2, TN 4 (and class 0 the mirror: TP 4, FN 2, FP 1, TN 3).
P_POS = [0.9, 0.8, 0.7, 0.3]
P_NEG = [0.6, 0.55, 0.4, 0.2, 0.1, 0.05]
NAMES = ["healthy", "covid-19"]


def _hand_case() -> tuple[np.ndarray, np.ndarray]:
    y = np.array([1] * 4 + [0] * 6)
    p1 = np.array(P_POS + P_NEG)
    return y, np.stack([1 - p1, p1], axis=1)


def _toy_from_counts(tp: int, fp: int, tn: int, fn: int) -> float | None:
    """One-vs-rest balanced accuracy, (sensitivity + specificity) / 2; None without positives or negatives."""
    if tp + fn == 0 or tn + fp == 0:
        return None
    return (tp / (tp + fn) + tn / (tn + fp)) / 2


def _toy_of_labels(y: np.ndarray, probs: np.ndarray, k: int) -> float | None:
    """The toy metric of class k recomputed from scratch (not through the table), for the bootstrap check."""
    cm = confusion(y, probs.argmax(1), probs.shape[1])
    tp = int(cm[k, k])
    fn, fp = int(cm[k].sum()) - tp, int(cm[:, k].sum()) - tp
    return _toy_from_counts(tp, fp, int(cm.sum()) - tp - fn - fp, fn)


@pytest.fixture
def toy_metric() -> Iterator[MetricSpec]:
    """Register the toy metric for one test; remove it afterwards so no other test sees it."""
    before = CLASSIFICATION_METRICS.keys()
    spec = register_metric(
        MetricSpec(
            TOY,
            TOY_LABEL,
            "threshold",
            _toy_from_counts,
            higher_is_better=True,
            doc="(sensitivity + specificity) / 2 of the class against the rest",
            denominator="all",
        )
    )
    try:
        yield spec
    finally:
        unregister_metric(TOY)
    assert CLASSIFICATION_METRICS.keys() == before


def _doc(y: np.ndarray, probs: np.ndarray, n_boot: int = 0) -> dict[str, Any]:
    """A minimal evaluation document (one binary model, one test set) for the report tables."""
    result = evaluate_arrays(y, probs, None, NAMES, None, n_boot=n_boot, seed=0)
    info = {"task": "binary", "class_names": NAMES, "positive_class": NAMES[1]}
    return {
        "run": "r",
        "models": {"m": info},
        "test_sets": {"t": {}},
        "results": [{**result, "model": "m", "test_set": "t", "task": "binary"}],
    }


# ------------------------------------------------------------------ the table keeps today's outputs
def test_table_keeps_the_reported_keys_order_and_columns() -> None:
    reported = CLASSIFICATION_METRICS.select("class", reported=True)
    assert [s.key for s in reported] == [
        "sensitivity", "specificity", "fpr", "fnr", "precision", "auc_pr", "auc_roc"
    ]  # fmt: skip
    overall = CLASSIFICATION_METRICS.select("overall", reported=True)
    assert [s.key for s in overall] == [
        "accuracy", "balanced_accuracy", "macro_specificity", "macro_auc_roc", "macro_auc_pr", "ece"
    ]  # fmt: skip
    assert [(c.label, c.key) for c in paper_columns()] == [
        ("Sens", "sensitivity"), ("Spec", "specificity"), ("FPR", "fpr"), ("FNR", "fnr"),
        ("AUC-PR", "auc_pr"), ("AUC-ROC", "auc_roc"), ("ACC %", "accuracy"),
    ]  # fmt: skip
    # The study's paper-shaped tables take the same columns (it aggregates or derives all of these).
    assert study_report._paper_columns() == [(c.label, c.key) for c in paper_columns()]
    assert [s.key for s in CLASSIFICATION_METRICS.select("class", reported=False)] == ["npv", "f1"]
    assert [s.key for s in CLASSIFICATION_METRICS if s.percent] == ["accuracy"]
    y, probs = _hand_case()
    summary = metric_summary(y, probs, NAMES, None)
    assert list(summary) == [f"all/{s.key}" for s in overall] + [
        f"{c}/{s.key}" for c in NAMES for s in reported
    ]


# ------------------------------------------------------------ the entries reproduce hand values
def test_threshold_entries_reproduce_hand_counts() -> None:
    tp, fp, tn, fn = 3, 2, 4, 1
    hand = {
        "sensitivity": 3 / 4,  # TP / (TP + FN)
        "specificity": 4 / 6,  # TN / (TN + FP)
        "fpr": 2 / 6,
        "fnr": 1 / 4,
        "precision": 3 / 5,  # TP / (TP + FP)
        "npv": 4 / 5,  # TN / (TN + FN)
        "f1": 6 / 9,  # 2 TP / (2 TP + FP + FN)
    }
    specs = CLASSIFICATION_METRICS.select("class", kind="threshold")
    assert {s.key for s in specs} == set(hand)
    for s in specs:
        assert s.from_counts(tp, fp, tn, fn).value == pytest.approx(hand[s.key]), s.key
    assert {k: v.value for k, v in binary_rates(tp, fp, tn, fn).items()} == pytest.approx(
        {**hand, "accuracy": 7 / 10}
    )
    # No positives and one false positive: the rates over positives are undefined (with the reason,
    # never 0); precision 0 / 1 and F1 0 / 1 are defined.
    none = {s.key: s.from_counts(0, 1, 4, 0) for s in specs}
    for key in ("sensitivity", "fnr"):
        assert none[key].value is None and none[key].reason.startswith("no positive samples"), key
    assert (none["specificity"].value, none["precision"].value, none["f1"].value) == pytest.approx(
        (0.8, 0, 0)
    )
    assert none["npv"].value == 1.0
    # The "n" column: positives, negatives, predicted positives, predicted negatives, all.
    row = classification_metrics(*_hand_case(), NAMES).row("covid-19")
    counts = {s.key: s.count(row) for s in CLASSIFICATION_METRICS.select("class")}
    assert counts == {"sensitivity": 4, "specificity": 6, "fpr": 6, "fnr": 4, "precision": 5, "npv": 5,
                      "f1": 10, "auc_pr": 10, "auc_roc": 10}  # fmt: skip


@pytest.mark.parametrize("fast", [False, True])
def test_score_entries_reproduce_a_hand_ranking(fast: bool) -> None:
    # Ranked: 0.9 (+), 0.6 (-), 0.4 (+), 0.3 (-), 0.1 (-). AUC-ROC: 5 of the 6 (+, -) pairs are ordered
    # right; AUC-PR (average precision): precision 1/1 and 2/3 at the two positives.
    y_bin = np.array([True, True, False, False, False])
    score = np.array([0.9, 0.4, 0.6, 0.3, 0.1])
    roc, pr = CLASSIFICATION_METRICS["auc_roc"], CLASSIFICATION_METRICS["auc_pr"]
    assert roc.from_scores(y_bin, score, fast).value == pytest.approx(5 / 6)
    assert pr.from_scores(y_bin, score, fast).value == pytest.approx((1 + 2 / 3) / 2)
    assert roc.from_scores(np.ones(3, bool), score[:3], fast).reason == "only one class present in y_true"
    assert pr.from_scores(np.zeros(3, bool), score[:3], fast).reason == "no positive samples in y_true"


def test_overall_entries_reproduce_hand_values() -> None:
    y, probs = _hand_case()
    res = classification_metrics(y, probs, NAMES)
    got = {k: v.value for k, v in overall_metrics(res, y, probs).items()}
    assert got == pytest.approx(
        {
            "accuracy": 7 / 10,  # TP 3 + TN 4 of 10
            "balanced_accuracy": (3 / 4 + 4 / 6) / 2,  # mean sensitivity of the two classes
            "macro_specificity": (3 / 4 + 4 / 6) / 2,  # class 0's specificity is class 1's sensitivity
            "macro_auc_roc": 21 / 24,  # binary: the positive class's; 21 of 24 pairs ordered right
            "macro_auc_pr": (3 + 4 / 7) / 4,  # precision 1, 1, 1, 4/7 at the positives
            "ece": expected_calibration_error(y, probs, 15),
        }
    )


# -------------------------------------------------- a registered metric reaches every consumer
def test_registered_metric_is_on_every_class_row(toy_metric: MetricSpec) -> None:
    y, probs = _hand_case()
    res = classification_metrics(y, probs, NAMES)
    hand = (3 / 4 + 4 / 6) / 2  # class 1: TP 3, FN 1, FP 2, TN 4; class 0 mirrors it
    for row in res.rows:
        assert getattr(row, TOY).value == pytest.approx(hand)
        assert list(row.metrics())[-1] == TOY
        assert res.flat()[f"{row.name}/{TOY}"] == pytest.approx(hand)
    assert binary_rates(3, 2, 4, 1)[TOY].value == pytest.approx(hand)
    assert binary_rates(0, 0, 5, 0)[TOY].value is None  # the toy's None is "undefined"


def test_registered_metric_is_in_the_metric_dict_and_the_bootstrap(toy_metric: MetricSpec) -> None:
    rng = np.random.default_rng(4)
    y = rng.integers(0, 2, 60)
    p1 = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.3, 60), 0.01, 0.99)
    probs = np.stack([1 - p1, p1], axis=1)
    patients = np.array([f"p{i // 2}" for i in range(60)], dtype=object)
    summary = metric_summary(y, probs, NAMES, None)
    assert list(summary)[-1] == f"covid-19/{TOY}"
    cis = bootstrap_metrics(
        y, probs, patients, lambda a, b: metric_summary(a, b, NAMES, None), n_boot=40, seed=2
    )
    for k, name in enumerate(NAMES):
        ci = cis[f"{name}/{TOY}"]
        # The same resamples through a from-scratch computation give the same interval.
        direct = bootstrap_ci(
            lambda idx, k=k: _toy_of_labels(y[idx], probs[idx], k), patients, n_boot=40, seed=2
        )
        assert ci.point == pytest.approx(_toy_of_labels(y, probs, k))
        assert (ci.low, ci.high, ci.n_valid) == pytest.approx((direct.low, direct.high, direct.n_valid))
    # evaluate_arrays: a metrics.json row with its value, interval and "n" (all images).
    result = evaluate_arrays(y, probs, patients, NAMES, None, n_boot=40, seed=2)
    row = metric_index(result)[("covid-19", TOY)]
    assert row["value"] == pytest.approx(_toy_of_labels(y, probs, 1), abs=1e-6)
    assert row["ci_low"] == pytest.approx(cis[f"covid-19/{TOY}"].low, abs=1e-6)
    assert row["n"] == 60
    empty = evaluate_arrays(np.zeros(0, int), np.zeros((0, 2)), None, NAMES, None)
    assert ("covid-19", TOY) in metric_index(empty)


def test_registered_metric_is_a_report_column(toy_metric: MetricSpec) -> None:
    y, probs = _hand_case()
    doc = _doc(y, probs)
    (table,) = paper_tables(doc)
    labels = ["Sens", "Spec", "FPR", "FNR", "AUC-PR", "AUC-ROC", "ACC %", TOY_LABEL]
    assert table.columns == ["Model", *labels]
    assert table.groups[1][1] == len(labels)
    cell = table.rows[0][table.columns.index(TOY_LABEL)]
    assert (
        cell
        == format((3 / 4 + 4 / 6) / 2, ".3f")
        == fmt_metric(metric_index(doc["results"][0])[("covid-19", TOY)])
    )
    # Other tables keep their shape; a study aggregates the table's reported metrics, so its paper
    # table gains the column too.
    assert summary_table([doc]).columns == ["Run", "Model", "Task", "ACC %", "Sens", "Spec"]
    assert study_report._paper_columns()[-1] == (TOY_LABEL, TOY)


def test_register_places_and_refuses(toy_metric: MetricSpec) -> None:
    def spec(key: str, **kw: Any) -> MetricSpec:
        return MetricSpec(key, key, "threshold", _toy_from_counts, True, "toy", **kw)

    with pytest.raises(ValueError, match="exists already"):
        register_metric(spec("balanced_accuracy"))  # the overall metric's key: keys are unique
    for shadow in ("tp", "support", "values", "metrics"):
        with pytest.raises(ValueError, match="shadow"):
            register_metric(spec(shadow))
    with pytest.raises(ValueError, match="built-in"):
        unregister_metric("sensitivity")
    with pytest.raises(ValueError, match="reported"):
        spec("hidden", reported=False)  # a report column that is not reported
    with pytest.raises(ValueError, match="denominator"):
        spec("odd", denominator="images")
    register_metric(spec("early", percent=True), before="fpr")
    try:
        assert CLASSIFICATION_METRICS.keys()[:3] == ("sensitivity", "specificity", "early")
        assert [c.key for c in paper_columns()][:4] == ["sensitivity", "specificity", "early", "fpr"]
        row = {"metric": "early", "value": 0.5, "ci_low": None, "ci_high": None}
        assert fmt_metric(row) == "50.00"  # the entry's percent flag sets the format
    finally:
        unregister_metric("early")


def test_registered_score_metric_gets_the_fast_flag_on_resamples_only() -> None:
    seen: list[bool] = []

    def mean_gap(y_bin: np.ndarray, score: np.ndarray, fast: bool) -> float | None:
        seen.append(fast)
        if y_bin.all() or not y_bin.any():
            return None
        return float(score[y_bin].mean() - score[~y_bin].mean())

    register_metric(MetricSpec("mean_gap", "Gap", "score", mean_gap, True, "mean score gap", column=False))
    try:
        y, probs = _hand_case()
        result = evaluate_arrays(y, probs, None, NAMES, None, n_boot=5, seed=0)
        gap = metric_index(result)[("covid-19", "mean_gap")]["value"]
        assert gap == pytest.approx(np.mean(P_POS) - np.mean(P_NEG), abs=1e-6)
        assert True in seen and False in seen
        (table,) = paper_tables(_doc(y, probs))
        assert "Gap" not in table.columns  # column=False: reported, not a column
    finally:
        unregister_metric("mean_gap")
