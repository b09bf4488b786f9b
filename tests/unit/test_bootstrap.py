"""Patient-level bootstrap: coverage of the point, width vs data size, whole patients, seeds, speed."""

from __future__ import annotations

import time

import numpy as np
import pytest

from sscxr.metrics import auc_roc, bootstrap_ci, bootstrap_metrics, classification_metrics, resample_indices


def _cohort(n_patients: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Labels, positive-class scores and patient ids; 1 to 3 images per patient, same label per patient."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 4, n_patients)
    groups = np.repeat(np.arange(n_patients), per)
    y = np.repeat(rng.integers(0, 2, n_patients), per)
    p = 1 / (1 + np.exp(-(rng.normal(size=y.size) + 1.2 * (2 * y - 1))))
    return y, p, groups


def _auc_fn(y: np.ndarray, p: np.ndarray):
    return lambda idx: auc_roc(y[idx] == 1, p[idx])


def test_interval_contains_point() -> None:
    y, p, g = _cohort(200)
    ci = bootstrap_ci(_auc_fn(y, p), g, n_boot=300, seed=0)
    assert ci.point == pytest.approx(auc_roc(y == 1, p).value)
    assert ci.low < ci.point < ci.high
    assert (ci.n_valid, ci.n_boot, ci.n_undefined, ci.note) == (300, 300, 0, None)


def test_more_patients_narrower() -> None:
    widths = []
    for n in (100, 400):
        y, p, g = _cohort(n, seed=n)
        ci = bootstrap_ci(_auc_fn(y, p), g, n_boot=400, seed=1)
        widths.append(ci.high - ci.low)
    # Width scales like 1 / sqrt(n): 4x the patients should roughly halve it.
    assert widths[1] < 0.75 * widths[0]


def test_resamples_keep_patients_whole() -> None:
    _, p, g = _cohort(50)
    members = {pid: np.flatnonzero(g == pid) for pid in np.unique(g)}
    seen = []

    def metric(idx: np.ndarray) -> float:
        counts = np.bincount(idx, minlength=g.size)
        for rows in members.values():
            # Every image of a patient is drawn as often as the patient: all or none, never a part.
            assert np.all(counts[rows] == counts[rows[0]])
        # As many patient draws as there are patients.
        assert sum(counts[rows[0]] for rows in members.values()) == len(members)
        seen.append(idx.size)
        return float(p[idx].mean())

    bootstrap_ci(metric, g, n_boot=100, seed=3)
    assert len(set(seen)) > 1  # resample sizes vary: patients have different image counts


def test_string_and_mixed_patient_ids() -> None:
    g = np.array(["p1", "p1", 7, 7, "x"], dtype=object)
    for idx in resample_indices(g, 5, 20, np.random.default_rng(0)):
        c = np.bincount(idx, minlength=5)
        assert c[0] == c[1] and c[2] == c[3]


def test_seed_reproducible() -> None:
    y, p, g = _cohort(80)
    a = bootstrap_ci(_auc_fn(y, p), g, n_boot=200, seed=7)
    b = bootstrap_ci(_auc_fn(y, p), g, n_boot=200, seed=7)
    c = bootstrap_ci(_auc_fn(y, p), g, n_boot=200, seed=8)
    assert a == b
    assert (a.low, a.high) != (c.low, c.high)
    d = bootstrap_ci(_auc_fn(y, p), g, n_boot=200, seed=np.random.default_rng(7))
    assert d == a


def test_undefined_resamples_are_skipped_and_counted() -> None:
    # One positive patient among 20: many resamples miss it and the AUC is undefined there.
    y = np.zeros(20, dtype=int)
    y[0] = 1
    p = np.linspace(1, 0, 20)
    ci = bootstrap_ci(_auc_fn(y, p), np.arange(20), n_boot=200, seed=0)
    assert 0 < ci.n_valid < 200
    assert ci.n_undefined == 200 - ci.n_valid
    assert ci.note is not None and "resamples" in ci.note
    none = bootstrap_ci(lambda idx: None, None, n_boot=10, n=5)
    assert (none.point, none.low, none.high, none.n_valid) == (None, None, None, 0)


def test_bootstrap_metrics_shares_resamples() -> None:
    y, p, g = _cohort(60)
    scores = np.stack([1 - p, p], 1)

    def fn(yy: np.ndarray, ss: np.ndarray) -> dict:
        r = classification_metrics(yy, ss, ["n", "p"], fast_auc=True)
        return {"auc": r.macro_auc_roc, "acc": r.accuracy, "sens": r.row("p").sensitivity}

    out = bootstrap_metrics(y, scores, g, fn, n_boot=150, seed=4)
    assert set(out) == {"auc", "acc", "sens"}
    single = bootstrap_ci(_auc_fn(y, p), g, n_boot=150, seed=4)
    assert out["auc"] == single  # same seed, same patient draws, same interval
    for ci in out.values():
        assert ci.low <= ci.point <= ci.high


def test_iid_bootstrap_without_groups() -> None:
    x = np.random.default_rng(0).normal(size=500)
    ci = bootstrap_ci(lambda idx: float(x[idx].mean()), None, n_boot=500, seed=0, n=500)
    # Normal-theory 95 % half-width of the mean is 1.96 / sqrt(500) ~ 0.088.
    assert (ci.high - ci.low) / 2 == pytest.approx(1.96 / np.sqrt(500), rel=0.2)
    with pytest.raises(ValueError):
        bootstrap_ci(lambda idx: 0.0, None, n_boot=10)


def test_speed_1000_auc_resamples_on_1000_images() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 1000)
    p = rng.random(1000) + 0.3 * y
    g = np.repeat(np.arange(500), 2)
    start = time.perf_counter()
    bootstrap_ci(_auc_fn(y, p), g, n_boot=1000, seed=0)
    # About 0.3 s on one core; the bound leaves room for a busy shared machine.
    assert time.perf_counter() - start < 5.0
