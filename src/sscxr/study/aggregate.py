"""Honest uncertainty for a study: means over labelled-subset draws, with intervals that include the
draw-to-draw variance as well as the test-patient resampling, and paired differences between rows.

A *row* is one way of getting a classifier (an encoder start and an evaluation mode: "SS-CXR linear",
"scratch finetune"); a *draw* is one labelled subset (seed). At one label fraction and on one test
set, every row has one predictions file per draw, all on the same test images.

The interval is a two-level bootstrap (Davison & Hinkley 1997, sec. 3.8; the "hierarchical bootstrap"
of Saravanan et al. 2020): each resample draws S of the S draws with replacement and the test
patients with replacement (all images of a patient together), and computes the mean over the drawn
draws of the metric on the drawn patients. The same (draws, patients) resample is used for every row,
so the difference between two rows is paired: what varies between the rows is only the row.

Why not the patient bootstrap of one run: at 1% labels the spread between draws is several times
the test-set sampling error, and an interval that ignores it claims a precision no rerun would show.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sscxr.errors import DataError
from sscxr.metrics import auc_roc, average_precision, resample_indices

__all__ = [
    "METRICS",
    "Comparison",
    "Estimate",
    "Predictions",
    "RowResult",
    "compare_rows",
    "read_predictions",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictions:
    """One predictions CSV (`sscxr.evaluation.predict.write_predictions`): the test images in file order.

    Attributes:
        index: (N,) cache rows.
        patient: (N,) patient ids.
        y: (N,) true class index into `class_names`.
        probs: (N, C) class probabilities.
        pred: (N,) predicted class index (at the threshold chosen on validation).
    """

    class_names: tuple[str, ...]
    index: np.ndarray
    patient: np.ndarray
    y: np.ndarray
    probs: np.ndarray
    pred: np.ndarray


def read_predictions(path: str | Path) -> Predictions:
    """Read a predictions CSV written by `sscxr evaluate` or `sscxr probe`."""
    path = Path(path)
    try:
        with path.open(newline="") as f:
            rows = list(csv.DictReader(f))
    except OSError as e:
        raise DataError(f"{path}: cannot read predictions ({e.strerror})") from e
    if not rows:
        raise DataError(f"{path}: no predictions (empty file)")
    names = tuple(c[2:] for c in rows[0] if c.startswith("p_"))
    code = {n: k for k, n in enumerate(names)}
    try:
        return Predictions(
            class_names=names,
            index=np.array([int(r["index"]) for r in rows], dtype=np.int64),
            patient=np.array([r["patient"] for r in rows], dtype=object),
            y=np.array([code[r["class"]] for r in rows], dtype=np.int64),
            probs=np.array([[float(r[f"p_{n}"]) for n in names] for r in rows], dtype=np.float64),
            pred=np.array([code[r["pred"]] for r in rows], dtype=np.int64),
        )
    except (KeyError, ValueError) as e:
        raise DataError(f"{path}: not a predictions file of sscxr ({e!r})") from e


# ------------------------------------------------------------------------------------------ metrics
def _auc(p: Predictions, idx: np.ndarray, fn: Callable[[np.ndarray, np.ndarray], object]) -> float:
    """Binary: of the positive class (1); multi-class: macro one-vs-rest. NaN when undefined."""
    y, s = p.y[idx], p.probs[idx]
    classes = [1] if s.shape[1] == 2 else range(s.shape[1])
    vals = [fn(y == c, s[:, c]).value for c in classes]  # type: ignore[attr-defined]
    return float(np.mean(vals)) if all(v is not None for v in vals) else float("nan")


def _rate(p: Predictions, idx: np.ndarray, positive: bool, of_positive: bool) -> float:
    """Binary rates of class 1 (sensitivity: positives called positive; specificity: negatives called
    negative); macro over classes for multi-class. NaN when the denominator is 0."""
    y, pred = p.y[idx], p.pred[idx]
    classes = [1] if p.probs.shape[1] == 2 else range(p.probs.shape[1])
    vals = []
    for c in classes:
        truth = (y == c) if of_positive else (y != c)
        if not truth.any():
            return float("nan")
        called = (pred == c) if positive else (pred != c)
        vals.append(float((called & truth).sum() / truth.sum()))
    return float(np.mean(vals))


#: name -> f(predictions, resample indices) -> value (NaN when undefined on that resample).
METRICS: dict[str, Callable[[Predictions, np.ndarray], float]] = {
    "auc_roc": lambda p, i: _auc(p, i, auc_roc),
    "auc_pr": lambda p, i: _auc(p, i, average_precision),
    "sensitivity": lambda p, i: _rate(p, i, positive=True, of_positive=True),
    "specificity": lambda p, i: _rate(p, i, positive=False, of_positive=False),
    "accuracy": lambda p, i: float((p.y[i] == p.pred[i]).mean()) if i.size else float("nan"),
}


@dataclass(frozen=True)
class Estimate:
    """A mean over draws with its two-level bootstrap interval.

    Attributes:
        mean: mean over the draws of the metric on the whole test set.
        low, high: the interval (NaN when undefined on too many resamples).
        sd: standard deviation between draws (ddof=1; 0 for one draw).
        per_draw: the metric of each draw on the whole test set, in seed order.
    """

    mean: float
    low: float
    high: float
    sd: float
    per_draw: tuple[float, ...]

    def to_dict(self) -> dict[str, object]:
        def num(v: float) -> float | None:
            return None if np.isnan(v) else round(float(v), 6)

        return {
            "mean": num(self.mean), "low": num(self.low), "high": num(self.high), "sd": num(self.sd),
            "per_draw": [num(v) for v in self.per_draw],
        }  # fmt: skip


@dataclass
class RowResult:
    """Every metric of one row at one fraction on one test set."""

    row: str
    seeds: tuple[int, ...]
    metrics: dict[str, Estimate] = field(default_factory=dict)


@dataclass
class Comparison:
    """All rows of one (task, fraction, test set), and each row's paired differences to the references.

    `diffs[row][reference][metric]` is the Estimate of metric(row) - metric(reference).
    """

    seeds: tuple[int, ...]
    n_images: int
    n_patients: int
    rows: dict[str, RowResult]
    diffs: dict[str, dict[str, dict[str, Estimate]]]
    n_boot: int
    alpha: float


def _interval(values: np.ndarray, alpha: float) -> tuple[float, float]:
    ok = values[~np.isnan(values)]
    if ok.size < 0.9 * values.size:  # undefined on >10% of the resamples: no honest interval
        return float("nan"), float("nan")
    low, high = np.quantile(ok, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def _estimate(per_draw: np.ndarray, boot: np.ndarray, alpha: float) -> Estimate:
    sd = float(np.std(per_draw, ddof=1)) if per_draw.size > 1 else 0.0
    low, high = _interval(boot, alpha)
    return Estimate(float(np.mean(per_draw)), low, high, sd, tuple(float(v) for v in per_draw))


def _check_same_images(preds: Mapping[str, Mapping[int, Predictions]]) -> Predictions:
    first = next(iter(next(iter(preds.values())).values()))
    for row, by_seed in preds.items():
        for seed, p in by_seed.items():
            if p.index.shape != first.index.shape or not np.array_equal(p.index, first.index):
                raise DataError(
                    f"row {row!r}, seed {seed}: the predictions are on other test images than the first "
                    "row's; every row of a comparison must be evaluated on the same test set"
                )
            if not np.array_equal(p.y, first.y):
                raise DataError(f"row {row!r}, seed {seed}: the test labels differ from the first row's")
    return first


def compare_rows(
    preds: Mapping[str, Mapping[int, Predictions]],
    references: Sequence[str] = (),
    metrics: Sequence[str] = tuple(METRICS),
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Comparison:
    """Means over draws, two-level bootstrap intervals and paired differences to `references`.

    Args:
        preds: row -> seed -> predictions on one test set. Only the seeds every row has are used (a row
            still running, or a fraction with fewer draws, must not be compared on other draws).
        references: rows to compare every other row with (those absent are skipped).
        metrics: names from `METRICS`.
        n_boot: resamples.
        alpha: 1 - coverage of the intervals.
        seed: seed of the resampling (the only randomness).

    Returns:
        The Comparison; with one draw, the intervals are those of the patient bootstrap alone.
    """
    if not preds:
        raise ValueError("compare_rows needs at least one row")
    common = sorted(set.intersection(*(set(by_seed) for by_seed in preds.values())))
    if not common:
        raise DataError(f"the rows {sorted(preds)} share no seed: nothing can be compared")
    for row, by_seed in preds.items():
        dropped = sorted(set(by_seed) - set(common))
        if dropped:
            log.warning("row %r: seeds %s left out (not every row has them)", row, dropped)
    first = _check_same_images(preds)
    rows = list(preds)
    n, s = first.index.size, len(common)
    rng = np.random.default_rng(seed)
    # The resamples, shared by every row and metric: patients (cluster bootstrap) and draws.
    patient_draws = list(resample_indices(first.patient, n, n_boot, rng))
    seed_draws = rng.integers(0, s, size=(n_boot, s))
    everything = np.arange(n)
    # values[row][metric] -> (per_draw (S,), per-resample per-draw (B, S))
    per_draw: dict[str, dict[str, np.ndarray]] = {r: {} for r in rows}
    boot_draw: dict[str, dict[str, np.ndarray]] = {r: {} for r in rows}
    for r in rows:
        for m in metrics:
            fn = METRICS[m]
            per_draw[r][m] = np.array([fn(preds[r][k], everything) for k in common])
            boot_draw[r][m] = np.array([[fn(preds[r][k], idx) for k in common] for idx in patient_draws])
    picks = np.arange(n_boot)[:, None]

    def boot_mean(r: str, m: str) -> np.ndarray:
        # (B,) mean over each resample's drawn draws of the metric on its drawn patients.
        return np.mean(boot_draw[r][m][picks, seed_draws], axis=1)

    results = {
        r: RowResult(
            r, tuple(common), {m: _estimate(per_draw[r][m], boot_mean(r, m), alpha) for m in metrics}
        )
        for r in rows
    }
    diffs: dict[str, dict[str, dict[str, Estimate]]] = {}
    for r in rows:
        for ref in references:
            if ref not in preds or ref == r:
                continue
            diffs.setdefault(r, {})[ref] = {
                m: _estimate(per_draw[r][m] - per_draw[ref][m], boot_mean(r, m) - boot_mean(ref, m), alpha)
                for m in metrics
            }
    return Comparison(tuple(common), n, len(set(first.patient.tolist())), results, diffs, n_boot, alpha)
