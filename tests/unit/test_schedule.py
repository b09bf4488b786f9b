"""Schedules, lr scaling, layer-wise lr decay and parameter groups."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch import nn

from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.schedule import (
    MAX_FLOOR_VALIDATIONS,
    EpochPlan,
    apply_layer_decay,
    build_optimizer,
    build_schedules,
    cosine_schedule,
    plan_epochs,
    resolve_lr,
    warmup_steps,
)
from sscxr.errors import ConfigError
from sscxr.tasks.base import Batch, StepOutput, Task


def test_cosine_warmup_then_decay_endpoints_and_monotonicity() -> None:
    s = cosine_schedule(1.0, 0.01, total_steps=100, warmup_steps=10, start_warmup=0.0)
    assert s.shape == (100,)
    assert s[0] == 0.0
    assert s[10] == pytest.approx(1.0)  # first step after warm-up is exactly the base value
    assert s[-1] == pytest.approx(0.01)
    assert np.all(np.diff(s[:11]) > 0)  # warm-up rises strictly
    assert np.all(np.diff(s[10:]) <= 1e-12)  # cosine never rises
    assert s[55] == pytest.approx(0.01 + 0.5 * 0.99 * (1 + math.cos(math.pi * 45 / 89)))


def test_cosine_without_warmup_and_clipped_warmup() -> None:
    s = cosine_schedule(0.04, 0.4, total_steps=5, warmup_steps=0)
    assert s[0] == pytest.approx(0.04) and s[-1] == pytest.approx(0.4)
    assert np.all(np.diff(s) > 0)  # a rising "cosine" (weight decay 0.04 -> 0.4)
    clipped = cosine_schedule(1.0, 0.0, total_steps=4, warmup_steps=10)
    assert clipped.shape == (4,) and np.all(np.diff(clipped) > 0)
    assert cosine_schedule(2.0, 1.0, total_steps=1, warmup_steps=0).tolist() == [2.0]
    with pytest.raises(ValueError, match="total_steps"):
        cosine_schedule(1.0, 0.0, total_steps=0, warmup_steps=0)


def test_resolve_lr_scales_with_global_batch_and_honours_override() -> None:
    cfg = OptimConfig(blr=5e-4)
    assert resolve_lr(cfg, 256) == pytest.approx(5e-4)
    assert resolve_lr(cfg, 1024) == pytest.approx(2e-3)
    assert resolve_lr(cfg, 64) == pytest.approx(1.25e-4)
    assert resolve_lr(OptimConfig(lr=3e-4), 1024) == 3e-4
    assert cfg.lr is None  # pure: nothing written back


def test_build_schedules_lengths_and_constant_weight_decay() -> None:
    cfg = OptimConfig(lr=1.0, min_lr=0.0, warmup_epochs=1.0, weight_decay=0.05, weight_decay_end=None)
    lr, wd = build_schedules(cfg, 1.0, steps_per_epoch=4, epochs=3)
    assert lr.shape == wd.shape == (12,)
    assert lr[4] == pytest.approx(1.0) and lr[-1] == pytest.approx(0.0)
    assert np.allclose(wd, 0.05)


def test_min_steps_floor_raises_epochs_and_spaces_validation(caplog: pytest.LogCaptureFixture) -> None:
    # 36 images at batch 16: 2 steps per epoch; 40 epochs are 80 steps, below the floor of 300.
    caplog.set_level(logging.INFO)
    plan = plan_epochs(TrainConfig(epochs=40, min_steps=300), steps_per_epoch=2, n_samples=36)
    assert plan.raised and plan.epochs == 150 and plan.epochs * 2 >= 300
    assert plan.val_every == math.ceil(150 / MAX_FLOOR_VALIDATIONS) == 6
    assert "80 optimiser steps, below train.min_steps=300: training 150 epochs" in caplog.text
    assert plan == plan_epochs(TrainConfig(epochs=40, min_steps=300), steps_per_epoch=2)  # pure
    # Enough steps, or no floor: the config's own epochs and validation spacing.
    assert plan_epochs(TrainConfig(epochs=40, min_steps=300, val_every=2), 8) == EpochPlan(40, 2, False)
    assert plan_epochs(TrainConfig(epochs=3, min_steps=None), 1).epochs == 3
    # A user's coarser val_every is kept.
    assert plan_epochs(TrainConfig(epochs=1, min_steps=100, val_every=10), 1).val_every == 10
    with pytest.raises(ConfigError, match="min_steps"):
        TrainConfig(min_steps=0)


def test_warmup_is_capped_at_a_fraction_of_the_run(caplog: pytest.LogCaptureFixture) -> None:
    # 5 warm-up epochs of a 10-epoch run at 2 steps per epoch would be half of its 20 steps.
    caplog.set_level(logging.INFO)
    capped = OptimConfig(warmup_epochs=5, warmup_max_fraction=0.1)
    assert warmup_steps(capped, steps_per_epoch=2, total_steps=20) == 2
    assert "warm-up capped" in caplog.text
    assert warmup_steps(OptimConfig(warmup_epochs=5), 2, 20) == 10  # no cap by default (pre-training)
    assert warmup_steps(capped, steps_per_epoch=2, total_steps=300) == 10  # under the cap: unchanged
    lr, _ = build_schedules(capped, 1.0, steps_per_epoch=2, epochs=10)
    assert lr[2] == pytest.approx(1.0) and np.all(np.diff(lr[:3]) > 0)  # peak right after 2 steps
    with pytest.raises(ConfigError, match="warmup_max_fraction"):
        OptimConfig(warmup_max_fraction=0.0)


def test_config_validation() -> None:
    with pytest.raises(ConfigError, match="amp"):
        TrainConfig(amp="fp8")
    with pytest.raises(ConfigError, match="batch_size"):
        TrainConfig(batch_size=0)
    with pytest.raises(ConfigError, match="layer_decay"):
        OptimConfig(layer_decay=1.5)


class _VitLike(Task):
    """Parameter names laid out like timm's ViT, to test grouping by name."""

    def __init__(self, depth: int = 3) -> None:
        super().__init__()
        self.cls_token = nn.Parameter(torch.zeros(1, 1, 4))
        self.pos_embed = nn.Parameter(torch.zeros(1, 5, 4))
        self.patch_embed = nn.Linear(4, 4)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4)) for _ in range(depth))
        self.head = nn.Linear(4, 2)

    def training_step(self, batch: Batch) -> StepOutput:
        return StepOutput(self.head(batch["x"]).sum())


def test_param_groups_exclude_biases_norms_and_tokens_from_decay() -> None:
    task = _VitLike()
    groups = task.param_groups(0.05)
    name_of = {id(p): n for n, p in task.named_parameters()}
    decay = {name_of[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    no_decay = {name_of[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert decay == {"patch_embed.weight", "head.weight"} | {f"blocks.{i}.1.weight" for i in range(3)}
    assert {"cls_token", "pos_embed", "head.bias", "blocks.0.0.weight", "blocks.2.1.bias"} <= no_decay
    assert all(g["lr_scale"] == 1.0 and g["wd_scale"] == 1.0 for g in groups)


def test_layer_decay_scales_lr_by_depth() -> None:
    task = _VitLike(depth=3)
    groups = apply_layer_decay(task.param_groups(0.05), task.named_parameters(), 0.5, task.layer_id)
    scale_of = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    params = dict(task.named_parameters())
    assert scale_of[id(params["head.weight"])] == 1.0  # top: depth + 1 = 4
    assert scale_of[id(params["blocks.2.1.weight"])] == 0.5
    assert scale_of[id(params["blocks.0.1.weight"])] == 0.125
    assert scale_of[id(params["pos_embed"])] == scale_of[id(params["patch_embed.weight"])] == 0.0625


def test_optimizer_groups_follow_schedules_with_their_scales() -> None:
    task = _VitLike()
    cfg = OptimConfig(lr=1.0, weight_decay=0.1, layer_decay=0.5)
    opt, wd_mults = build_optimizer(task, cfg, lr=1.0, device=torch.device("cpu"))
    assert sorted(set(wd_mults)) == [0.0, 1.0]
    n_trainable = sum(1 for p in task.parameters() if p.requires_grad)
    assert sum(len(g["params"]) for g in opt.param_groups) == n_trainable
    top = [g for g in opt.param_groups if g["lr_scale"] == 1.0]
    assert top and all(g["lr"] == 1.0 for g in top)
    assert all(g["weight_decay"] in (0.0, pytest.approx(0.1)) for g in opt.param_groups)
