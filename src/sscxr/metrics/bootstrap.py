"""Patient-level (cluster) bootstrap confidence intervals.

Images of one patient are correlated, so resampling images would understate the uncertainty. Each
resample draws as many patients as there are, with replacement, and takes *all* images of every drawn
patient (twice if the patient is drawn twice). The interval is the percentile interval of the metric over
the resamples. Resamples on which the metric is undefined (e.g. AUC when a resample has no positives) are
skipped and counted; the interval is then conditional on the metric being defined, and a warning is
logged when more than ``1 - min_valid_fraction`` of them were skipped.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from sscxr.metrics.classification import MetricValue

log = logging.getLogger(__name__)

Scalar = float | int | MetricValue | None


@dataclass(frozen=True)
class CI:
    """A point estimate with its bootstrap percentile interval.

    Attributes:
        point: the metric on all data (None when undefined there).
        low, high: the interval bounds (None when no resample was defined).
        n_valid: resamples on which the metric was defined; n_boot: resamples drawn.
        alpha: 1 - coverage (0.05 -> 95 % interval).
        note: why the interval is missing or suspect (None when all is well).
    """

    point: float | None
    low: float | None
    high: float | None
    n_valid: int
    n_boot: int
    alpha: float = 0.05
    note: str | None = None

    @property
    def n_undefined(self) -> int:
        """Resamples skipped because the metric was undefined on them."""
        return self.n_boot - self.n_valid

    def format(self, spec: str = ".3f", scale: float = 1.0) -> str:
        """``"0.912 [0.880, 0.940]"``; ``n/a`` parts where undefined."""

        def f(v: float | None) -> str:
            return "n/a" if v is None else format(v * scale, spec)

        return f"{f(self.point)} [{f(self.low)}, {f(self.high)}]"


def _value(x: Scalar) -> float | None:
    """A metric output as float, None when undefined (None, NaN, undefined MetricValue)."""
    v = x.value if isinstance(x, MetricValue) else x
    if v is None or math.isnan(float(v)):
        return None
    return float(v)


def _group_layout(groups: np.ndarray | None, n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sample order sorted by group, and each group's start offset and size in that order."""
    if groups is None:
        codes = np.arange(n)
    else:
        g = np.asarray(groups)
        if g.shape != (n,):
            raise ValueError(f"groups must be (N,) = ({n},), got {g.shape}")
        # A dict rather than np.unique: ids may mix types (str and int) that cannot be sorted together.
        lookup: dict[object, int] = {}
        codes = np.array([lookup.setdefault(x, len(lookup)) for x in g.tolist()], dtype=np.int64)
    order = np.argsort(codes, kind="stable")
    sizes = np.bincount(codes)
    starts = np.r_[0, np.cumsum(sizes)[:-1]]
    return order, starts, sizes


def resample_indices(
    groups: np.ndarray | None, n: int, n_boot: int, rng: np.random.Generator
) -> Iterator[np.ndarray]:
    """Yield ``n_boot`` cluster-bootstrap index arrays into ``range(n)``.

    Args:
        groups: (N,) patient ids (any comparable values), or None for an ordinary per-sample bootstrap.
        n: N.
        n_boot: number of resamples.
        rng: the only source of randomness.
    Yields:
        (M,) int64 indices; M varies with the sizes of the drawn patients.
    """
    order, starts, sizes = _group_layout(groups, n)
    draws = rng.integers(0, sizes.size, size=(n_boot, sizes.size))
    for d in draws:
        lengths = sizes[d]
        # Concatenate the drawn groups' slices without a Python loop over patients.
        offsets = np.repeat(starts[d] - (np.cumsum(lengths) - lengths), lengths)
        yield order[np.arange(int(lengths.sum())) + offsets]


def _interval(values: list[float], n_boot: int, alpha: float, min_valid: float, name: str) -> CI:
    n_valid = len(values)
    note = None
    if n_valid == 0:
        return CI(None, None, None, 0, n_boot, alpha, "undefined on every resample")
    if n_valid < min_valid * n_boot:
        note = f"defined on only {n_valid}/{n_boot} resamples: interval is conditional on definedness"
        log.warning("bootstrap of %s: %s", name, note)
    low, high = np.quantile(np.asarray(values), [alpha / 2, 1 - alpha / 2])
    return CI(None, float(low), float(high), n_valid, n_boot, alpha, note)


def _check(n_boot: int, alpha: float) -> None:
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha}")


def bootstrap_ci(
    metric_fn: Callable[[np.ndarray], Scalar],
    groups: np.ndarray | None,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
    *,
    n: int | None = None,
    min_valid_fraction: float = 0.9,
) -> CI:
    """Patient-level bootstrap percentile interval of one metric.

    Args:
        metric_fn: maps an index array (into the N samples) to the metric: float, or None / NaN /
            undefined MetricValue when undefined on those samples.
        groups: (N,) patient ids; None = each sample its own patient (then ``n`` is required).
        n_boot: number of resamples.
        alpha: 1 - coverage.
        seed: seed or Generator; the same seed gives the same interval.
        n: N when groups is None.
        min_valid_fraction: warn (and set ``note``) below this fraction of defined resamples.
    Returns:
        CI with the point estimate on all samples.
    """
    _check(n_boot, alpha)
    n = int(np.asarray(groups).shape[0]) if groups is not None else n
    if n is None:
        raise ValueError("give n when groups is None")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    values = [
        v for idx in resample_indices(groups, n, n_boot, rng) if (v := _value(metric_fn(idx))) is not None
    ]
    ci = _interval(values, n_boot, alpha, min_valid_fraction, getattr(metric_fn, "__name__", "metric"))
    return CI(_value(metric_fn(np.arange(n))), ci.low, ci.high, ci.n_valid, n_boot, alpha, ci.note)


def bootstrap_metrics(
    y_true: np.ndarray,
    scores: np.ndarray,
    groups: np.ndarray | None,
    fn: Callable[[np.ndarray, np.ndarray], Mapping[str, Scalar]],
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int | np.random.Generator = 0,
    *,
    min_valid_fraction: float = 0.9,
) -> dict[str, CI]:
    """Intervals for a whole dict of metrics from one shared set of patient resamples.

    Args:
        y_true: (N,) labels.
        scores: (N, ...) scores (or predictions, or per-image values).
        groups: (N,) patient ids, or None for a per-sample bootstrap.
        fn: ``fn(y_true[idx], scores[idx]) -> {name: value}``; a value may be None / NaN /
            undefined MetricValue. The names come from the call on all samples.
        n_boot, alpha, seed, min_valid_fraction: as in `bootstrap_ci`.
    Returns:
        {name: CI}.
    """
    _check(n_boot, alpha)
    y, s = np.asarray(y_true), np.asarray(scores)
    if s.shape[0] != y.shape[0]:
        raise ValueError(f"y_true and scores disagree on N: {y.shape[0]} vs {s.shape[0]}")
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    point = {k: _value(v) for k, v in fn(y, s).items()}
    draws: dict[str, list[float]] = {k: [] for k in point}
    for idx in resample_indices(groups, y.shape[0], n_boot, rng):
        for k, v in fn(y[idx], s[idx]).items():
            if k in draws and (x := _value(v)) is not None:
                draws[k].append(x)
    out = {}
    for k, vals in draws.items():
        ci = _interval(vals, n_boot, alpha, min_valid_fraction, k)
        out[k] = CI(point[k], ci.low, ci.high, ci.n_valid, n_boot, alpha, ci.note)
    return out
