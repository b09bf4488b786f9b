"""The study's statistics: means over draws, two-level intervals, paired differences."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from sscxr.errors import DataError
from sscxr.metrics import MetricSpec, register_metric, unregister_metric
from sscxr.study.aggregate import Predictions, compare_rows, read_predictions

TOY = "toy_youden"


def _preds(scores: np.ndarray, y: np.ndarray, patients: np.ndarray | None = None) -> Predictions:
    n = y.size
    probs = np.stack([1 - scores, scores], axis=1)
    return Predictions(
        class_names=("healthy", "pneumonia"),
        index=np.arange(n),
        patient=np.arange(n).astype(object) if patients is None else patients,
        y=y.astype(np.int64),
        probs=probs,
        pred=(scores >= 0.5).astype(np.int64),
    )


@pytest.fixture
def data() -> tuple[np.ndarray, np.random.Generator]:
    rng = np.random.default_rng(0)
    return (rng.random(200) < 0.4).astype(np.int64), rng


def test_point_estimate_is_mean_over_draws_of_sklearn_auc(data) -> None:
    y, rng = data
    draws = {s: _preds(np.clip(y * 0.3 + rng.random(y.size) * 0.7, 0, 1), y) for s in range(4)}
    c = compare_rows({"a": draws}, n_boot=50)
    expected = np.mean([roc_auc_score(y, p.probs[:, 1]) for p in draws.values()])
    est = c.rows["a"].metrics["auc_roc"]
    assert est.mean == pytest.approx(expected, abs=1e-12)
    assert est.per_draw == pytest.approx([roc_auc_score(y, p.probs[:, 1]) for p in draws.values()])
    assert est.low < est.mean < est.high
    # sensitivity / specificity at the stored predictions, by hand for draw 0
    p0 = draws[0]
    sens0 = ((p0.pred == 1) & (y == 1)).sum() / (y == 1).sum()
    assert c.rows["a"].metrics["sensitivity"].per_draw[0] == pytest.approx(sens0)


def _youden(tp: int, fp: int, tn: int, fn: int) -> float | None:
    """Youden's J = sensitivity + specificity - 1 of a class against the rest (None without both)."""
    return tp / (tp + fn) + tn / (tn + fp) - 1 if tp + fn and tn + fp else None


@pytest.fixture
def toy_metric() -> Iterator[MetricSpec]:
    """A metric registered in the one table for one test, removed afterwards."""
    spec = register_metric(MetricSpec(TOY, "J", "threshold", _youden, True, "Youden's J", column=False))
    try:
        yield spec
    finally:
        unregister_metric(TOY)


def test_a_registered_metric_is_aggregated_with_no_other_edit(data, toy_metric: MetricSpec) -> None:
    y, rng = data
    ref = {s: _preds(np.clip(y * 0.2 + rng.random(y.size) * 0.8, 0, 1), y) for s in range(3)}
    draws = {s: _preds(np.clip(y * 0.35 + rng.random(y.size) * 0.65, 0, 1), y) for s in range(3)}
    c = compare_rows({"ref": ref, "a": draws}, references=["ref"], n_boot=100)
    # By hand, at the stored predictions of each draw (binary: the positive class's J).
    hand = [
        ((p.pred == 1) & (y == 1)).sum() / (y == 1).sum()
        + ((p.pred == 0) & (y == 0)).sum() / (y == 0).sum()
        - 1
        for p in draws.values()
    ]
    est = c.rows["a"].metrics[TOY]
    assert est.per_draw == pytest.approx(hand, abs=1e-12)
    assert est.mean == pytest.approx(np.mean(hand), abs=1e-12)
    assert est.low < est.mean < est.high
    d = c.diffs["a"]["ref"][TOY]
    assert d.mean == pytest.approx(est.mean - c.rows["ref"].metrics[TOY].mean) and d.low > 0


def test_interval_includes_the_spread_between_draws(data) -> None:
    y, rng = data
    base = np.clip(y * 0.4 + rng.random(y.size) * 0.6, 0, 1)
    steady = {s: _preds(base, y) for s in range(5)}
    # Same first draw, but the other draws are much worse or much better: draw-to-draw variance.
    shaky = {0: _preds(base, y)}
    for s in range(1, 5):
        noise = rng.random(y.size)
        mix = 0.2 if s % 2 else 0.9
        shaky[s] = _preds(np.clip(mix * base + (1 - mix) * noise, 0, 1), y)
    c = compare_rows({"steady": steady, "shaky": shaky}, n_boot=300)
    st, sh = c.rows["steady"].metrics["auc_roc"], c.rows["shaky"].metrics["auc_roc"]
    assert st.sd == pytest.approx(0.0) and sh.sd > 0.05
    assert (sh.high - sh.low) > 1.5 * (st.high - st.low)


def test_paired_difference_is_zero_for_identical_rows_and_excludes_zero_for_a_better_row(data) -> None:
    y, rng = data
    draws = {s: _preds(np.clip(y * 0.2 + rng.random(y.size) * 0.8, 0, 1), y) for s in range(3)}
    better = {s: _preds(np.clip(y * 0.6 + rng.random(y.size) * 0.4, 0, 1), y) for s in range(3)}
    c = compare_rows({"ref": draws, "same": dict(draws), "better": better}, references=["ref"], n_boot=200)
    d_same = c.diffs["same"]["ref"]["auc_roc"]
    assert (d_same.mean, d_same.low, d_same.high) == (0.0, 0.0, 0.0)
    d = c.diffs["better"]["ref"]["auc_roc"]
    assert d.low > 0 and d.mean == pytest.approx(
        c.rows["better"].metrics["auc_roc"].mean - c.rows["ref"].metrics["auc_roc"].mean
    )
    assert "ref" not in c.diffs  # a reference is not compared with itself


def test_only_common_draws_are_compared(data) -> None:
    y, rng = data
    a = {s: _preds(rng.random(y.size), y) for s in range(5)}
    b = {s: _preds(rng.random(y.size), y) for s in (0, 1)}
    c = compare_rows({"a": a, "b": b}, n_boot=20)
    assert c.seeds == (0, 1) and len(c.rows["a"].metrics["auc_roc"].per_draw) == 2


def test_rows_on_other_test_images_are_refused(data) -> None:
    y, rng = data
    a = _preds(rng.random(y.size), y)
    b = _preds(rng.random(y.size), y)
    b = Predictions(b.class_names, b.index + 1, b.patient, b.y, b.probs, b.pred)
    with pytest.raises(DataError, match="other test images"):
        compare_rows({"a": {0: a}, "b": {0: b}}, n_boot=5)


def test_patients_are_resampled_together() -> None:
    # 2 patients with 50 images each: a patient bootstrap has only 3 distinct resamples of AUC support.
    y = np.r_[np.zeros(50), np.ones(50)].astype(np.int64)
    scores = np.linspace(0, 1, 100)
    patients = np.array(["p0"] * 50 + ["p1"] * 50, dtype=object)
    c = compare_rows({"a": {0: _preds(scores, y, patients)}}, n_boot=200)
    # Each resample holds only one class in 1/2 of the cases: AUC undefined there -> no interval.
    assert np.isnan(c.rows["a"].metrics["auc_roc"].low)


def test_read_predictions_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "p.csv"
    path.write_text(
        "index,path,patient,label,class,p_healthy,p_pneumonia,pred\n"
        "3,a.png,P1,healthy,healthy,0.8,0.2,healthy\n"
        "7,b.png,P2,pneumonia,pneumonia,0.1,0.9,pneumonia\n"
    )
    p = read_predictions(path)
    assert p.class_names == ("healthy", "pneumonia")
    assert p.index.tolist() == [3, 7] and p.y.tolist() == [0, 1] and p.pred.tolist() == [0, 1]
    assert p.probs[1, 1] == pytest.approx(0.9)
    path.write_text("index,path\n1,a.png\n")
    with pytest.raises(DataError, match="not a predictions file"):
        read_predictions(path)
