"""Classification metrics, thresholds, calibration and the classification accumulator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    average_precision_score,
    confusion_matrix,
    precision_score,
    recall_score,
    roc_auc_score,
)

from sscxr.metrics import (
    ClassificationAccumulator,
    auc_roc,
    average_precision,
    binary_rates,
    classification_metrics,
    confusion,
    curves,
    expected_calibration_error,
    paper_accuracy,
    reliability_curve,
    threshold_for_sensitivity,
    youden_threshold,
)

# Binary hand example: positives score 0.9 0.8 0.7 0.3, negatives 0.6 0.55 0.4 0.2 0.1 0.05.
# Arg-max (p1 > 0.5): TP 3, FN 1, FP 2, TN 4.
P_POS = [0.9, 0.8, 0.7, 0.3]
P_NEG = [0.6, 0.55, 0.4, 0.2, 0.1, 0.05]


def _binary_example() -> tuple[np.ndarray, np.ndarray]:
    y = np.array([1] * 4 + [0] * 6)
    p1 = np.array(P_POS + P_NEG)
    return y, np.stack([1 - p1, p1], axis=1)


def test_binary_hand_example() -> None:
    y, s = _binary_example()
    res = classification_metrics(y, s, ["healthy", "covid-19"])
    np.testing.assert_array_equal(res.confusion, [[4, 2], [1, 3]])
    pos = res.row("covid-19")
    assert (pos.tp, pos.fp, pos.tn, pos.fn, pos.support) == (3, 2, 4, 1, 4)
    expected = {
        "sensitivity": 0.75,
        "specificity": 4 / 6,
        "fpr": 2 / 6,
        "fnr": 0.25,
        "precision": 3 / 5,
        "npv": 4 / 5,
        "f1": 6 / 9,
        # 21 of the 24 (positive, negative) pairs are ranked right.
        "auc_roc": 21 / 24,
        # Precision at each positive in rank order: 1, 1, 1, 4/7.
        "auc_pr": (3 + 4 / 7) / 4,
    }
    for name, value in expected.items():
        assert getattr(pos, name).value == pytest.approx(value), name
    assert res.accuracy.value == pytest.approx(0.7)
    assert res.balanced_accuracy.value == pytest.approx((0.75 + 4 / 6) / 2)
    assert res.macro_auc_roc.value == pytest.approx(21 / 24)
    assert res.positive_class == "covid-19"


def test_binary_rates_complements_and_undefined() -> None:
    r = binary_rates(tp=7, fp=3, tn=11, fn=2)
    assert r["sensitivity"].value + r["fnr"].value == pytest.approx(1.0)
    assert r["specificity"].value + r["fpr"].value == pytest.approx(1.0)
    none = binary_rates(tp=0, fp=0, tn=5, fn=0)
    for k in ("sensitivity", "fnr", "precision", "f1"):
        assert none[k].value is None and none[k].reason
    assert none["specificity"].value == 1.0
    assert "no positive samples" in none["sensitivity"].reason
    assert none["sensitivity"].format() == f"n/a ({none['sensitivity'].reason})"


def test_three_class_one_vs_rest_hand_example() -> None:
    y = np.array([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    pred = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0])
    s = np.full((10, 3), 0.2)
    s[np.arange(10), pred] = 0.6
    res = classification_metrics(y, s, ["healthy", "pneumonia", "covid-19"])
    np.testing.assert_array_equal(res.confusion, [[2, 1, 0], [0, 2, 1], [1, 0, 3]])
    counts = [(r.tp, r.fn, r.fp, r.tn) for r in res.rows]
    assert counts == [(2, 1, 1, 6), (2, 1, 1, 6), (3, 1, 1, 5)]
    assert res.row("covid-19").sensitivity.value == pytest.approx(0.75)
    assert res.row("covid-19").specificity.value == pytest.approx(5 / 6)
    assert res.accuracy.value == pytest.approx(0.7)
    assert res.balanced_accuracy.value == pytest.approx((2 / 3 + 2 / 3 + 0.75) / 3)
    aucs = [roc_auc_score(y == k, s[:, k]) for k in range(3)]
    assert res.macro_auc_roc.value == pytest.approx(np.mean(aucs))
    assert res.positive_class is None


def test_matches_sklearn_on_random_three_class() -> None:
    rng = np.random.default_rng(3)
    y = rng.integers(0, 3, 300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    s = np.round(np.exp(logits) / np.exp(logits).sum(1, keepdims=True), 1)  # rounding makes ties
    res = classification_metrics(y, s, ["a", "b", "c"])
    pred = s.argmax(1)
    np.testing.assert_array_equal(res.confusion, confusion_matrix(y, pred, labels=[0, 1, 2]))
    np.testing.assert_allclose([r.sensitivity.value for r in res.rows], recall_score(y, pred, average=None))
    np.testing.assert_allclose([r.precision.value for r in res.rows], precision_score(y, pred, average=None))
    for k, r in enumerate(res.rows):
        assert r.auc_roc.value == pytest.approx(roc_auc_score(y == k, s[:, k]), abs=1e-12)
        assert r.auc_pr.value == pytest.approx(average_precision_score(y == k, s[:, k]), abs=1e-12)
        assert r.sensitivity.value + r.fnr.value == pytest.approx(1.0)
        assert r.specificity.value + r.fpr.value == pytest.approx(1.0)
    assert res.macro_auc_roc.value == pytest.approx(np.mean([r.auc_roc.value for r in res.rows]))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    macro = classification_metrics(y, probs, ["a", "b", "c"]).macro_auc_roc.value
    assert macro == pytest.approx(roc_auc_score(y, probs, multi_class="ovr", average="macro"))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_fast_aucs_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.random(200) < 0.3
    p = np.round(rng.random(200) * 0.6 + 0.3 * y, 2)
    assert auc_roc(y, p).value == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert average_precision(y, p).value == pytest.approx(average_precision_score(y, p), abs=1e-12)


def test_paper_table1_vit_s_accuracy() -> None:
    # The paper's "TPR" column (0.975) is the specificity; FNR is 0.190; 200 images per class.
    assert paper_accuracy(200, 200, specificity=0.975, fnr=0.190) * 100 == pytest.approx(89.25)


def test_undefined_when_a_class_is_absent() -> None:
    y = np.zeros(6, dtype=int)
    p1 = np.linspace(0.1, 0.9, 6)
    res = classification_metrics(y, np.stack([1 - p1, p1], 1), ["neg", "pos"])
    pos = res.row("pos")
    assert pos.sensitivity.value is None and "no positive samples" in pos.sensitivity.reason
    assert pos.auc_roc.value is None and pos.auc_roc.reason == "only one class present in y_true"
    assert pos.auc_pr.value is None
    assert res.macro_auc_roc.value is None
    assert pos.specificity.value == pytest.approx(0.5)
    assert res.flat()["pos/auc_roc"] is None
    assert curves(y, np.stack([1 - p1, p1], 1), positive=1) is None


def test_three_class_macro_auc_undefined_if_one_class_missing() -> None:
    y = np.array([0, 0, 1, 1])
    s = np.array([[0.8, 0.1, 0.1], [0.5, 0.4, 0.1], [0.2, 0.7, 0.1], [0.3, 0.3, 0.4]])
    res = classification_metrics(y, s, ["a", "b", "c"])
    assert res.row("c").auc_roc.value is None
    assert res.macro_auc_roc.value is None and "'c'" in res.macro_auc_roc.reason
    # Balanced accuracy averages over the classes present (sklearn): recalls 1 and 1/2.
    assert res.balanced_accuracy.value == pytest.approx(0.75)


def test_unknown_labels_are_masked() -> None:
    y, s = _binary_example()
    extra = np.array([[0.1, 0.9], [0.9, 0.1], [0.5, 0.5]])
    y_int = np.r_[y, [-1, -1, -1]]
    y_float = np.r_[y.astype(float), [np.nan, np.nan, np.nan]]
    ref = classification_metrics(y, s, ["n", "p"])
    for labels in (y_int, y_float):
        res = classification_metrics(labels, np.r_[s, extra], ["n", "p"])
        assert res.flat() == ref.flat()
        assert (res.n, res.n_unknown) == (10, 3)
    np.testing.assert_array_equal(confusion(y_int, np.r_[s.argmax(1), [1, 0, 0]], 2), ref.confusion)


def test_binary_threshold_changes_predictions() -> None:
    y, s = _binary_example()
    res = classification_metrics(y, s, ["n", "p"], threshold=0.3)
    # p1 >= 0.3: all 4 positives, and negatives 0.6, 0.55, 0.4.
    np.testing.assert_array_equal(res.confusion, [[3, 3], [0, 4]])
    with pytest.raises(ValueError, match="binary"):
        classification_metrics(np.array([0, 1, 2]), np.eye(3), ["a", "b", "c"], threshold=0.5)


def test_youden_on_constructed_case() -> None:
    neg, pos = [0.1, 0.2, 0.3, 0.5, 0.55], [0.4, 0.6, 0.7, 0.8]
    y, p = np.array([0] * 5 + [1] * 4), np.array(neg + pos)
    # J(0.6) = 3/4 - 0 beats J(0.4) = 1 - 2/5 and every other candidate.
    assert youden_threshold(y, p) == pytest.approx(0.6)


def test_youden_is_brute_force_optimum() -> None:
    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 150)
    p = rng.random(150) + 0.4 * y
    t = youden_threshold(y, p)
    j = [np.mean(p[y == 1] >= c) - np.mean(p[y == 0] >= c) for c in np.unique(p)]
    assert np.mean(p[y == 1] >= t) - np.mean(p[y == 0] >= t) == pytest.approx(max(j))


def test_threshold_for_sensitivity() -> None:
    y = np.array([1] * 4 + [0] * 6)
    p = np.array(P_POS + P_NEG)
    assert threshold_for_sensitivity(y, p, 0.5) == 0.8
    assert threshold_for_sensitivity(y, p, 0.75) == 0.7
    assert threshold_for_sensitivity(y, p, 0.76) == 0.3
    assert threshold_for_sensitivity(y, p, 1.0) == 0.3
    rng = np.random.default_rng(1)
    y2, p2 = rng.integers(0, 2, 97), rng.random(97)
    for target in (0.8, 0.9, 0.95):
        t = threshold_for_sensitivity(y2, p2, target)
        assert np.mean(p2[y2 == 1] >= t) >= target
        assert np.mean(p2[y2 == 1] >= np.nextafter(t, 2.0)) < target  # largest such threshold
    with pytest.raises(ValueError):
        threshold_for_sensitivity(y, p, 0.0)


def test_curves_match_sklearn_shapes() -> None:
    y, s = _binary_example()
    c = curves(y, s, positive=1)
    assert c is not None
    assert c.fpr[0] == 0.0 and c.tpr[-1] == 1.0 and c.recall[0] == 1.0
    assert np.trapezoid(c.tpr, c.fpr) == pytest.approx(21 / 24)


def test_ece_perfectly_calibrated_is_zero() -> None:
    p = np.array([0.25] * 4 + [0.75] * 4)
    y = np.array([1, 0, 0, 0, 1, 1, 1, 0])
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(0.0, abs=1e-12)


def test_ece_hand_values() -> None:
    # Bin (0.8, 0.9]: confidence 0.9, 3/4 positive -> gap 0.15 on 4 of 6 samples;
    # bin (0.1, 0.2]: confidence 0.2, 0/2 positive -> gap 0.2 on 2 of 6.
    y, p = np.array([1, 1, 1, 0, 0, 0]), np.array([0.9] * 4 + [0.2] * 2)
    assert expected_calibration_error(y, p, n_bins=10) == pytest.approx(4 / 6 * 0.15 + 2 / 6 * 0.2)
    # Binary (N, 2) scores use the positive-class column, same answer.
    assert expected_calibration_error(y, np.stack([1 - p, p], 1), n_bins=10) == pytest.approx(
        4 / 6 * 0.15 + 2 / 6 * 0.2
    )
    # Top-label, 3 classes: confidences 0.7 (right), 0.7 (wrong), 0.8 (right) -> 2/3 * 0.2 + 1/3 * 0.2.
    probs = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1], [0.1, 0.8, 0.1]])
    assert expected_calibration_error(np.array([0, 1, 1]), probs, n_bins=10) == pytest.approx(0.2)
    rc = reliability_curve(np.array([0, 1, 1]), probs, n_bins=10)
    assert rc.counts.tolist() == [0, 0, 0, 0, 0, 0, 2, 1, 0, 0]
    assert np.isnan(rc.observed[0]) and rc.observed[6] == pytest.approx(0.5)


def _split_updates(acc: ClassificationAccumulator, idx: np.ndarray, y: np.ndarray, s: np.ndarray) -> None:
    for chunk in np.array_split(np.arange(idx.size), 3):
        acc.update(torch.as_tensor(idx[chunk]), torch.as_tensor(y[chunk]), torch.as_tensor(s[chunk]))


def test_accumulator_dedupes_and_matches_direct() -> None:
    y, s = _binary_example()
    idx = np.arange(10)
    acc = ClassificationAccumulator(["n", "p"])
    # A padded shard repeats samples 0 and 1: they must be counted once.
    _split_updates(acc, np.r_[idx, [0, 1]], np.r_[y, y[:2]], np.r_[s, s[:2]].astype(np.float32))
    res = acc.compute()
    assert res.n == 10
    ref = classification_metrics(y, s.astype(np.float32), ["n", "p"])
    assert res.flat() == pytest.approx(ref.flat())
    acc.reset()
    assert len(acc) == 0 and acc.compute().n == 0


def _dist_worker(rank: int, world: int, init: str, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    y, s = _binary_example()
    # Uneven shards (7 and 3 samples), rank 1 padded with a repeat of sample 0.
    shard = np.arange(7) if rank == 0 else np.array([7, 8, 9, 0])
    acc = ClassificationAccumulator(["n", "p"])
    _split_updates(acc, shard, y[shard], s[shard])
    res = acc.compute()
    if rank == 0:
        torch.save({"flat": res.flat(), "n": res.n}, out)
    dist.destroy_process_group()


@pytest.mark.dist
def test_accumulator_gathers_across_two_gloo_ranks(tmp_path) -> None:
    import torch.multiprocessing as mp

    out = str(tmp_path / "res.pt")
    mp.spawn(_dist_worker, args=(2, f"file://{tmp_path / 'rdzv'}", out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    y, s = _binary_example()
    assert got["n"] == 10
    assert got["flat"] == pytest.approx(classification_metrics(y, s, ["n", "p"]).flat())


def test_point_aucs_come_from_sklearn_and_equal_the_fast_path() -> None:
    from sklearn.metrics import average_precision_score, roc_auc_score

    rng = np.random.default_rng(5)
    y = rng.integers(0, 3, 200)
    s = rng.dirichlet(np.ones(3), 200)
    s = np.round(s, 2)  # ties
    exact = classification_metrics(y, s, ["a", "b", "c"])
    fast = classification_metrics(y, s, ["a", "b", "c"], fast_auc=True)
    for k, (re, rf) in enumerate(zip(exact.rows, fast.rows, strict=True)):
        assert re.auc_roc.value == roc_auc_score(y == k, s[:, k])
        assert re.auc_pr.value == average_precision_score(y == k, s[:, k])
        assert abs(re.auc_roc.value - rf.auc_roc.value) < 1e-12
        assert abs(re.auc_pr.value - rf.auc_pr.value) < 1e-12
