"""Guards: small pure checks that turn results too weak to trust into flags a user can act on.

Each check returns a list of `Flag`s (empty when all is well). `sscxr finetune` logs every flag it
raises as a WARNING and writes them into `model.json` under "flags"; `sscxr evaluate` writes the
operating-point flags of each (model, test set) into metrics.json and shows them, with the model's
training flags, in the report. Nothing here stops a run: the flags make a weak result visible, so
that an AUC of 0.43 or a threshold that calls every image positive is never reported silently.

Codes:
- "small_validation": a class of the validation split has fewer than `MIN_VALIDATION` images or
  patients, so the best checkpoint and any threshold chosen on it are noise-driven.
- "below_chance": the best validation value of an AUC-type metric is at or below chance (or missing).
- "few_steps": training took fewer than `MIN_STEPS` optimiser steps.
- "degenerate_operating_point": the frozen threshold gives a sensitivity or specificity of exactly 0
  or 1 on a test set (one class is all called one way), except the perfect point (both 1).
- "unbalanced_loss": an unweighted loss on training classes whose counts differ by more than `ratio`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

__all__ = [
    "CODES",
    "MIN_STEPS",
    "MIN_VALIDATION",
    "Flag",
    "check_balance",
    "check_best_metric",
    "check_operating_point",
    "check_steps",
    "check_validation",
]

#: Images (and patients) per class below which a validation split is called small.
MIN_VALIDATION = 20
#: Optimiser steps below which a fine-tuning is called short (see `train.min_steps`).
MIN_STEPS = 300
CODES = (
    "small_validation",
    "below_chance",
    "few_steps",
    "degenerate_operating_point",
    "unbalanced_loss",
    "leakage",
)


@dataclass(frozen=True)
class Flag:
    """One warning about a result.

    Attributes:
        code: one of `CODES` (stable: other tools filter on it).
        message: one line that says what is wrong and what to do.
    """

    code: str
    message: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown flag code {self.code!r}; one of {CODES}")

    def to_dict(self) -> dict[str, str]:
        """{"code": ..., "message": ...} (JSON ready)."""
        return {"code": self.code, "message": self.message}


def check_validation(
    images_per_class: Mapping[str, int],
    patients_per_class: Mapping[str, int],
    minimum: int = MIN_VALIDATION,
) -> list[Flag]:
    """Flag a validation split with fewer than `minimum` images or patients in some class.

    Args:
        images_per_class: {class name: validation images}; empty = no validation split.
        patients_per_class: {class name: validation patients} (a missing class counts as its images).
        minimum: the smallest acceptable count per class.

    Returns:
        [] or one "small_validation" flag naming every class below `minimum`.
    """
    if not images_per_class:
        return [
            Flag(
                "small_validation",
                "no validation images: the exported weights are the last ones and no threshold can be "
                "chosen on validation; give a validation split (data.val_split)",
            )
        ]
    small = []
    for name, n_images in images_per_class.items():
        n_patients = int(patients_per_class.get(name, n_images))
        if n_images < minimum or n_patients < minimum:
            small.append(f"{name!r} {n_images} images / {n_patients} patients")
    if not small:
        return []
    return [
        Flag(
            "small_validation",
            f"small validation split ({'; '.join(small)}; fewer than {minimum}): the best checkpoint and "
            "thresholds chosen on it are noisy; move more patients into validation (sscxr split) or "
            "report the last weights and AUC only",
        )
    ]


def check_best_metric(name: str, value: float | None, chance: float = 0.5) -> list[Flag]:
    """Flag an AUC-type best validation metric at or below chance, or missing.

    Only metrics whose name contains "auc" are checked (accuracy-type metrics have no fixed chance
    level); for AUC-PR pass the positive prevalence as `chance`.

    Args:
        name: the metric's name, e.g. "val/auc_roc".
        value: its best validation value, or None when there was none.
        chance: the value of a random scorer (0.5 for AUC-ROC).

    Returns:
        [] or one "below_chance" flag.
    """
    if "auc" not in name.lower():
        return []
    if value is None:
        return [
            Flag(
                "below_chance",
                f"no best validation {name}: the model was never shown to beat chance; "
                "check the validation split has every class",
            )
        ]
    if value > chance:
        return []
    return [
        Flag(
            "below_chance",
            f"best validation {name} {value:.3f} is at or below chance ({chance:.3f}): the model did not "
            "learn the task; try more steps (train.min_steps), classify.mode=lp_ft or frozen, or more labels",
        )
    ]


def check_steps(total_steps: int, floor: int = MIN_STEPS) -> list[Flag]:
    """Flag a training run of fewer than `floor` optimiser steps.

    Returns:
        [] or one "few_steps" flag.
    """
    if total_steps >= floor:
        return []
    return [
        Flag(
            "few_steps",
            f"only {total_steps} optimiser steps (fewer than {floor}): the model is barely trained; "
            f"set train.min_steps={floor} (or more epochs / a smaller batch)",
        )
    ]


def _is_edge(x: float | None) -> bool:
    return x is not None and x in (0.0, 1.0)


def check_operating_point(sensitivity: float | None, specificity: float | None) -> list[Flag]:
    """Flag an operating point where sensitivity or specificity is exactly 0 or 1.

    A value at 0 or 1 means one class lies entirely on one side of the frozen threshold, which on a
    real test set almost always means the threshold sits outside the scores' range (e.g. a Youden
    threshold from a tiny validation split). The perfect point (both 1) is a separable test set, not a
    degenerate threshold, and is not flagged; undefined values (None) are not judged.

    Returns:
        [] or one "degenerate_operating_point" flag.
    """
    if not (_is_edge(sensitivity) or _is_edge(specificity)):
        return []
    if sensitivity == 1.0 and specificity == 1.0:
        return []

    def fmt(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.3f}"

    called = ""
    if sensitivity == 1.0 and specificity == 0.0:
        called = " (every image called positive)"
    elif sensitivity == 0.0 and specificity == 1.0:
        called = " (every image called negative)"
    return [
        Flag(
            "degenerate_operating_point",
            f"degenerate operating point: sensitivity {fmt(sensitivity)}, specificity {fmt(specificity)}"
            f"{called}; the threshold is at the edge of the scores: choose it on a larger validation "
            "split, or compare by AUC",
        )
    ]


def check_balance(counts: Sequence[int], class_balance: str, ratio: float = 1.5) -> list[Flag]:
    """Flag `class_balance="none"` on training classes whose largest / smallest count exceeds `ratio`.

    Args:
        counts: training images per class.
        class_balance: the configured setting ("auto", "none", "loss_weights").
        ratio: the imbalance above which an unweighted loss is flagged.

    Returns:
        [] or one "unbalanced_loss" flag.
    """
    if class_balance != "none" or not counts or min(counts) <= 0:
        return []
    r = max(counts) / min(counts)
    if r <= ratio:
        return []
    return [
        Flag(
            "unbalanced_loss",
            f"classify.class_balance=none on training classes {list(counts)} ({r:.1f}:1): the loss favours "
            "the majority class; use classify.class_balance=auto or loss_weights",
        )
    ]
