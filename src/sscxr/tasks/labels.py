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
from typing import Any

import numpy as np
import torch

from sscxr.data.cache import ImageCache
from sscxr.errors import ConfigError, DataError

__all__ = [
    "TASKS",
    "LabelTask",
    "check_classes_present",
    "class_counts",
    "class_weights",
    "count_excluded",
    "labelled_subset",
    "resolve_task",
    "select_rows",
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


def check_classes_present(counts: Sequence[int], class_names: Sequence[str], what: str) -> None:
    """Raise DataError naming the classes with no image (`counts`: images per class; `what`: where)."""
    absent = [n for n, k in zip(class_names, counts, strict=True) if k == 0]
    if absent:
        raise DataError(
            f"{what} has no image of class(es) {absent} (images per class: "
            f"{dict(zip(class_names, counts, strict=True))}); every class is needed to learn it and for "
            "AUC-ROC, which chooses the best checkpoint: re-split the manifest or choose another task"
        )


def class_weights(counts: Sequence[int]) -> torch.Tensor:
    """Inverse-frequency loss weights `N / (C * n_c)` (1 for every class when balanced).

    Args:
        counts: training images per class (all > 0).

    Returns:
        (C,) float32.
    """
    if not counts or min(counts) <= 0:
        raise ConfigError(f"class_balance=loss_weights needs images of every class in training, got {counts}")
    n = torch.tensor(list(counts), dtype=torch.float64)
    return (n.sum() / (len(counts) * n)).float()


def _split_rows(cache: ImageCache, split: str, task: LabelTask) -> tuple[np.ndarray, dict[str, int]]:
    """Decoded rows of `split` whose label the task uses, and the per-label counts left out."""
    idx = cache.indices(split=split)
    labels = [cache.rows[i].label for i in idx]
    excluded = count_excluded(labels, task.label_map)
    if excluded:
        log.info(
            "split %r: left out %d of %d images whose label task %r does not use: %s",
            split, sum(excluded.values()), len(idx), task.name, excluded,
        )  # fmt: skip
    keep = np.array([lab in task.label_map for lab in labels], dtype=bool)
    return (idx[keep] if idx.size else idx), excluded


def class_counts(cache: ImageCache, rows: np.ndarray, task: LabelTask) -> list[int]:
    """Images per class of the task among cache `rows` (all labelled with a label the task uses)."""
    classes = np.asarray([task.label_map[cache.rows[i].label] for i in rows], dtype=np.int64)
    return np.bincount(classes, minlength=len(task.class_names)).tolist()


def select_rows(
    cache: ImageCache,
    task: LabelTask,
    train_split: str = "train",
    val_split: str = "val",
    fraction: float = 1.0,
    max_per_class: int | None = None,
    subset_seed: int = 0,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """Training and validation rows of a cache for a task; test splits are refused, never read.

    Args:
        cache: the prepared cache.
        task: classes and their labels.
        train_split, val_split: split names (neither may start with "test").
        fraction, max_per_class, subset_seed: the labelled subset of the training rows
            (`labelled_subset`); the validation rows are always all used.

    Returns:
        (train rows (K,), val rows (V,), info for `model.json`: splits, excluded images per label,
        images per class, and the labelled subset drawn).
    """
    for role, split in (("train", train_split), ("val", val_split)):
        if split.lower().startswith("test"):
            raise ConfigError(
                f"data.{role}_split={split!r}: fine-tuning never reads a test split (the best checkpoint "
                "is chosen on validation); evaluate test sets afterwards with `sscxr evaluate`"
            )
    if train_split == val_split:
        raise ConfigError(f"data.train_split and data.val_split are both {train_split!r}")
    train, ex_train = _split_rows(cache, train_split, task)
    val, ex_val = _split_rows(cache, val_split, task)
    info: dict[str, Any] = {
        "splits": {"train": train_split, "val": val_split},
        "excluded": {"train": ex_train, "val": ex_val},
    }
    if fraction < 1.0 or max_per_class is not None:
        pids = [cache.rows[i].patient_id for i in train]
        classes = [task.label_map[cache.rows[i].label] for i in train]
        pos = labelled_subset(pids, classes, fraction, max_per_class, subset_seed)
        info["labelled_subset"] = {
            "fraction": fraction, "max_per_class": max_per_class, "seed": subset_seed,
            "images": int(pos.size), "of_images": int(train.size),
            "patients": len({pids[p] for p in pos}), "of_patients": len(set(pids)),
        }  # fmt: skip
        log.info("labelled subset: %s", info["labelled_subset"])
        train = train[pos]
    counts = {"train": class_counts(cache, train, task), "val": class_counts(cache, val, task)}
    check_classes_present(counts["train"], task.class_names, f"{cache.root}: split {train_split!r}")
    if val.size:
        check_classes_present(counts["val"], task.class_names, f"{cache.root}: split {val_split!r}")
    info["n_images"] = {r: dict(zip(task.class_names, c, strict=True)) for r, c in counts.items()}
    return train, val, info
