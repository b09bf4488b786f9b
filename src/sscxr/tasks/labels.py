"""Classification tasks as label mappings, and the small labelled subsets fine-tuning may train on.

A task maps canonical manifest labels (`healthy`, `pneumonia`, `covid-19`, `non-covid`, ...) onto an
ordered list of classes. Order matters: class k is output k of the head, and for binary tasks class 1
is the *positive* class (sensitivity, AUC-ROC and the decision threshold refer to it). Images whose
label the task does not use are left out, and `count_excluded` says how many, per label.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from sscxr.errors import ConfigError, DataError

__all__ = [
    "TASKS",
    "LabelTask",
    "count_excluded",
    "labelled_subset",
    "check_classes_present",
    "resolve_task",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LabelTask:
    """An ordered mapping of classes onto manifest labels.

    Attributes:
        name: the task's name ("custom" for user-defined classes).
        classes: ((class name, (label, ...)), ...) in class-index order; for 2 classes, the second is
            the positive class.
    """

    name: str
    classes: tuple[tuple[str, tuple[str, ...]], ...]

    def __post_init__(self) -> None:
        names = [c for c, _ in self.classes]
        if len(names) < 2 or len(set(names)) != len(names) or not all(names):
            raise ConfigError(
                f"task {self.name!r}: needs at least 2 distinct, non-empty class names, got {names}"
            )
        labels = [lab for _, labs in self.classes for lab in labs]
        if any(not labs for _, labs in self.classes):
            raise ConfigError(f"task {self.name!r}: every class needs at least one manifest label")
        dup = sorted(k for k, n in Counter(labels).items() if n > 1)
        if dup:
            raise ConfigError(f"task {self.name!r}: labels {dup} are given to more than one class")
        if "" in labels:
            raise ConfigError(f"task {self.name!r}: the empty label means 'unlabelled' and cannot be a class")

    @property
    def class_names(self) -> tuple[str, ...]:
        """Class names in index order."""
        return tuple(c for c, _ in self.classes)

    @property
    def label_map(self) -> dict[str, int]:
        """Manifest label -> class index."""
        return {lab: k for k, (_, labs) in enumerate(self.classes) for lab in labs}

    @property
    def positive_class(self) -> str | None:
        """Class 1 of a binary task, else None."""
        return self.class_names[1] if len(self.classes) == 2 else None

    def to_dict(self) -> dict[str, list[str]]:
        """{class name: [labels]} in class order (JSON ready)."""
        return {c: list(labs) for c, labs in self.classes}


def _task(name: str, *classes: tuple[str, tuple[str, ...]]) -> LabelTask:
    return LabelTask(name, tuple(classes))


# The paper's tasks (section 4.2). Binary tasks list the negative class first: class 1 is the positive.
TASKS: dict[str, LabelTask] = {
    t.name: t
    for t in (
        _task(
            "covid_vs_noncovid",
            ("non-covid", ("healthy", "pneumonia", "non-covid")),
            ("covid-19", ("covid-19",)),
        ),
        _task("healthy_vs_pathology", ("healthy", ("healthy",)), ("pathology", ("pneumonia", "covid-19"))),
        _task("pneumonia_vs_healthy", ("healthy", ("healthy",)), ("pneumonia", ("pneumonia",))),
        _task("pneumonia_vs_covid", ("pneumonia", ("pneumonia",)), ("covid-19", ("covid-19",))),
        _task(
            "three_class",
            ("healthy", ("healthy",)),
            ("pneumonia", ("pneumonia",)),
            ("covid-19", ("covid-19",)),
        ),
    )
}


def resolve_task(name: str, classes: Sequence[tuple[str, Sequence[str]]] | None = None) -> LabelTask:
    """The named task, or a user-defined one when `classes` is given.

    Args:
        name: a key of `TASKS`, or any name for user-defined classes (e.g. "custom").
        classes: [(class name, [labels, ...]), ...] in class order; overrides `name`'s mapping.

    Raises:
        ConfigError: unknown task name without classes, or an invalid mapping.
    """
    if classes:
        return LabelTask(
            name or "custom", tuple((str(c), tuple(str(x) for x in labs)) for c, labs in classes)
        )
    if name not in TASKS:
        raise ConfigError(
            f"classify.task={name!r} is not a known task ({', '.join(TASKS)}); "
            "choose one, or define classify.classes: [{name: ..., labels: [...]}, ...]"
        )
    return TASKS[name]


def count_excluded(labels: Sequence[str], label_map: Mapping[str, int]) -> dict[str, int]:
    """How many rows each unused label loses: {label ("" = unlabelled): count}, sorted by label."""
    counts = Counter(lab for lab in labels if lab not in label_map)
    return dict(sorted(counts.items()))


def _patient_class(classes: np.ndarray) -> int:
    """A patient's stratum: the class most of their images have (ties: the lowest index)."""
    values, counts = np.unique(classes, return_counts=True)
    return int(values[np.argmax(counts)])


def labelled_subset(
    patient_ids: Sequence[str],
    classes: Sequence[int] | np.ndarray,
    fraction: float = 1.0,
    max_per_class: int | None = None,
    seed: int = 0,
) -> np.ndarray:
    """Pick a labelled subset by patient: whole patients, stratified by class, reproducible by seed.

    Patients are grouped by their majority class and shuffled per class with `seed`; each class keeps
    `ceil(fraction * patients)` of them (at least one), then, if `max_per_class` is set, patients are
    added in that order while the class's image count stays <= `max_per_class` (a patient who would
    overshoot is skipped; at least one patient is kept). A patient's images are never split.

    Args:
        patient_ids: (N,) patient id of each image.
        classes: (N,) class index of each image.
        fraction: share of each class's patients to keep, in (0, 1].
        max_per_class: cap on the images per class, or None.
        seed: seed of the shuffles.

    Returns:
        (K,) sorted positions (into the inputs) of the images kept.
    """
    if not 0.0 < fraction <= 1.0:
        raise ConfigError(f"classify.labelled_fraction must be in (0, 1], got {fraction}")
    if max_per_class is not None and max_per_class < 1:
        raise ConfigError(f"classify.max_labelled_per_class must be >= 1 or null, got {max_per_class}")
    pids = np.asarray(patient_ids, dtype=object)
    cls = np.asarray(classes, dtype=np.int64)
    if pids.shape != cls.shape:
        raise ValueError(f"patient_ids {pids.shape} and classes {cls.shape} differ in length")
    by_patient: dict[str, list[int]] = {}
    for i, p in enumerate(pids):
        by_patient.setdefault(str(p), []).append(i)
    strata: dict[int, list[str]] = {}
    for p in sorted(by_patient):  # sorted: the result must not depend on row order
        strata.setdefault(_patient_class(cls[by_patient[p]]), []).append(p)
    rng = np.random.default_rng(seed)
    kept: list[int] = []
    for c in sorted(strata):
        order = [strata[c][j] for j in rng.permutation(len(strata[c]))]
        order = order[: max(1, math.ceil(fraction * len(order)))]
        n_images = 0
        for k, p in enumerate(order):
            n = len(by_patient[p])
            if max_per_class is not None and k > 0 and n_images + n > max_per_class:
                continue
            kept += by_patient[p]
            n_images += n
    return np.sort(np.asarray(kept, dtype=np.int64))


def check_classes_present(classes: np.ndarray, class_names: Sequence[str], what: str) -> None:
    """Raise DataError naming the classes with no image in `classes` (`what`: e.g. "the val split")."""
    counts = np.bincount(np.asarray(classes, dtype=np.int64), minlength=len(class_names))
    absent = [n for n, k in zip(class_names, counts, strict=True) if k == 0]
    if absent:
        raise DataError(
            f"{what} has no image of class(es) {absent} (counts {dict(zip(class_names, counts.tolist(), strict=True))}); "
            "AUC-ROC and the best-checkpoint choice need every class: re-split the manifest "
            "(`sscxr split`) or choose another task"
        )
