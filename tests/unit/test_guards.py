"""Guards: each flag fires on a constructed weak result and stays quiet on a normal one."""

from __future__ import annotations

import pytest

from sscxr.evaluation.guards import (
    CODES,
    MIN_STEPS,
    MIN_VALIDATION,
    Flag,
    check_balance,
    check_best_metric,
    check_operating_point,
    check_steps,
    check_validation,
)


def _codes(flags: list[Flag]) -> list[str]:
    return [f.code for f in flags]


def test_flag_is_a_code_and_a_message() -> None:
    f = Flag("few_steps", "only 20 optimiser steps")
    assert f.to_dict() == {"code": "few_steps", "message": "only 20 optimiser steps"}
    assert set(CODES) == {
        "small_validation",
        "below_chance",
        "few_steps",
        "degenerate_operating_point",
        "unbalanced_loss",
        "leakage",
    }
    with pytest.raises(ValueError, match="unknown flag code"):
        Flag("oops", "x")
    assert MIN_VALIDATION == 20 and MIN_STEPS == 300


def test_check_validation() -> None:
    # The pediatric run: 14 pneumonia images in validation.
    flags = check_validation({"healthy": 63, "pneumonia": 14}, {"healthy": 63, "pneumonia": 14})
    assert _codes(flags) == ["small_validation"] and "'pneumonia' 14 images" in flags[0].message
    assert "healthy" not in flags[0].message
    # Enough images, but from too few patients.
    assert _codes(check_validation({"a": 40, "b": 40}, {"a": 40, "b": 12})) == ["small_validation"]
    assert _codes(check_validation({}, {})) == ["small_validation"]  # no validation at all
    assert check_validation({"a": 20, "b": 25}, {"a": 20, "b": 25}) == []
    assert check_validation({"a": 5, "b": 5}, {"a": 5, "b": 5}, minimum=5) == []


def test_check_best_metric() -> None:
    flags = check_best_metric("val/auc_roc", 0.43)
    assert _codes(flags) == ["below_chance"] and "0.430" in flags[0].message
    assert _codes(check_best_metric("val/auc_roc", 0.5)) == ["below_chance"]  # at chance
    assert _codes(check_best_metric("val/auc_roc", None)) == ["below_chance"]
    assert _codes(check_best_metric("val/auc_pr", 0.2, chance=0.25)) == ["below_chance"]
    assert check_best_metric("val/auc_roc", 0.81) == []
    assert check_best_metric("val/auc_pr", 0.3, chance=0.25) == []
    assert check_best_metric("val/loss", 0.2) == [] and check_best_metric("val/accuracy", 0.1) == []


def test_check_steps() -> None:
    flags = check_steps(20)
    assert _codes(flags) == ["few_steps"] and "20" in flags[0].message
    assert check_steps(300) == [] and check_steps(5000) == []
    assert _codes(check_steps(99, floor=100)) == ["few_steps"]


def test_check_operating_point() -> None:
    flags = check_operating_point(1.0, 0.0)
    assert _codes(flags) == ["degenerate_operating_point"]
    assert "sensitivity 1.000, specificity 0.000" in flags[0].message and "positive" in flags[0].message
    assert _codes(check_operating_point(0.0, 1.0)) == ["degenerate_operating_point"]
    assert _codes(check_operating_point(1.0, 0.62)) == ["degenerate_operating_point"]
    assert _codes(check_operating_point(0.71, 0.0)) == ["degenerate_operating_point"]
    assert check_operating_point(0.85, 0.78) == []
    assert check_operating_point(1.0, 1.0) == []  # a separable test set, not a degenerate threshold
    assert check_operating_point(None, 0.9) == [] and check_operating_point(None, None) == []


def test_check_balance() -> None:
    flags = check_balance([3875, 1341], "none")
    assert _codes(flags) == ["unbalanced_loss"] and "2.9:1" in flags[0].message
    assert _codes(check_balance([45, 10], "none")) == ["unbalanced_loss"]
    assert check_balance([45, 10], "loss_weights") == [] and check_balance([45, 10], "auto") == []
    assert check_balance([15, 10], "none") == []  # 1.5:1 is not above the ratio
    assert check_balance([20, 10], "none", ratio=2.0) == []
