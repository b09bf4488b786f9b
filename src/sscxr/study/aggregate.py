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

The metrics are those of the one table, `sscxr.metrics.CLASSIFICATION_METRICS`: a study aggregates its
reported entries (`study_metrics`), so a metric added with `register_metric` is aggregated, written
and reported by studies with no other edit.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sscxr.errors import DataError
from sscxr.metrics import CLASSIFICATION_METRICS, classification_metrics, resample_indices

__all__ = [
    "Comparison",
    "Estimate",
    "Predictions",
    "RowResult",
    "compare_rows",
    "metric_values",
    "read_predictions",
    "study_metrics",
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
def study_metrics() -> tuple[str, ...]:
    """The metrics a study aggregates: the reported entries of `CLASSIFICATION_METRICS` (those the
    evaluation bootstraps), in report order. Read at call time, so registered metrics are included."""
    return tuple(s.key for s in CLASSIFICATION_METRICS.select(reported=True))


def metric_values(p: Predictions, idx: np.ndarray, metrics: Sequence[str]) -> dict[str, float]:
    """The table's metrics of the predictions `p` on the images `idx` (resample indices): one
    `MetricSpec.of_result` each (class-scope ones: binary, the positive class's; else the mean over
    the classes), NaN where undefined.

    The predicted classes are the file's own (at the threshold frozen on validation). The AUCs are the
    table's fast implementations on the whole test set too (equal to scikit-learn's to 1e-12): the
    point estimate and every resample then come from one implementation, as in earlier studies.
    """
    specs = [CLASSIFICATION_METRICS[m] for m in metrics]
    if idx.size == 0:
        return {s.key: float("nan") for s in specs}
    y, scores = p.y[idx], p.probs[idx]
    result = classification_metrics(y, scores, p.class_names, fast_auc=True, y_pred=p.pred[idx])
    out: dict[str, float] = {}
    for s in specs:
        v = s.of_result(result, y, scores).value
        out[s.key] = float("nan") if v is None else float(v)
    return out


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
    metrics: Sequence[str] | None = None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> Comparison:
    """Means over draws, two-level bootstrap intervals and paired differences to `references`.

    Args:
        preds: row -> seed -> predictions on one test set. Only the seeds every row has are used (a row
            still running, or a fraction with fewer draws, must not be compared on other draws).
        references: rows to compare every other row with (those absent are skipped).
        metrics: keys of `CLASSIFICATION_METRICS`; None = `study_metrics()`.
        n_boot: resamples.
        alpha: 1 - coverage of the intervals.
        seed: seed of the resampling (the only randomness).

    Returns:
        The Comparison; with one draw, the intervals are those of the patient bootstrap alone.
    """
    if not preds:
        raise ValueError("compare_rows needs at least one row")
    metrics = study_metrics() if metrics is None else tuple(metrics)
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
        # Every metric of one (draw, resample) comes from one ClassificationResult.
        whole = [metric_values(preds[r][k], everything, metrics) for k in common]
        boot = [[metric_values(preds[r][k], idx, metrics) for k in common] for idx in patient_draws]
        for m in metrics:
            per_draw[r][m] = np.array([v[m] for v in whole])
            boot_draw[r][m] = np.array([[v[m] for v in draws] for draws in boot])
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
