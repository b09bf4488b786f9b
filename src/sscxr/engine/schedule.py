"""Per-iteration schedules (lr, weight decay), the run's length, the lr scaling rule and layer-wise lr decay.

Schedules are precomputed arrays indexed by the optimiser step (dinov2's CosineScheduler): the value
for any step is a pure function of the config, so a resumed run sees exactly the same numbers. The
run's length (`plan_epochs`: the `train.min_steps` floor) and the warm-up cap
(`optim.warmup_max_fraction`) are pure functions of the config and the training-set size too.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from sscxr.engine.config import OptimConfig, TrainConfig

if TYPE_CHECKING:
    from sscxr.tasks.base import Task

log = logging.getLogger(__name__)

#: When `train.min_steps` raises the epoch count, validation is spaced to at most about this many passes:
#: validating a full validation split after each of 150 two-step epochs would cost more than training.
MAX_FLOOR_VALIDATIONS = 25


@dataclass(frozen=True)
class EpochPlan:
    """How long a run trains and how often it validates.

    Attributes:
        epochs: epochs to train (the schedule spans them); `train.epochs` unless the floor raised it.
        val_every: epochs between validations.
        raised: True when `train.min_steps` raised the epoch count.
    """

    epochs: int
    val_every: int
    raised: bool


def plan_epochs(train_cfg: TrainConfig, steps_per_epoch: int, n_samples: int | None = None) -> EpochPlan:
    """The run's epochs under the `train.min_steps` floor, and its validation spacing.

    When `epochs * steps_per_epoch < min_steps`, the run trains `ceil(min_steps / steps_per_epoch)`
    epochs and validates every `max(val_every, ceil(epochs / MAX_FLOOR_VALIDATIONS))` epochs (the last
    epoch always validates). Pure: a resumed run plans the same.

    Args:
        train_cfg: the loop settings.
        steps_per_epoch: optimiser steps per epoch (>= 1).
        n_samples: training samples, only for the log line.
    """
    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1 (got {steps_per_epoch})")
    t = train_cfg
    if t.min_steps is None or t.epochs * steps_per_epoch >= t.min_steps:
        return EpochPlan(t.epochs, t.val_every, raised=False)
    epochs = math.ceil(t.min_steps / steps_per_epoch)
    val_every = max(t.val_every, math.ceil(epochs / MAX_FLOOR_VALIDATIONS))
    what = f"{n_samples} training samples: " if n_samples is not None else ""
    log.info(
        f"{what}{steps_per_epoch} steps per epoch; {t.epochs} epochs would be "
        f"{t.epochs * steps_per_epoch} optimiser steps, below train.min_steps={t.min_steps}: training "
        f"{epochs} epochs ({epochs * steps_per_epoch} steps), validating every {val_every} epochs"
    )
    return EpochPlan(epochs, val_every, raised=True)


def warmup_steps(optim_cfg: OptimConfig, steps_per_epoch: int, total_steps: int) -> int:
    """Warm-up length in steps: `warmup_epochs * steps_per_epoch`, capped at `warmup_max_fraction`.

    The cap keeps a short run's warm-up from eating most of it (5 warm-up epochs of a 10-epoch run
    at 2 steps per epoch: 10 of 20 steps); the cap is logged when it applies.
    """
    warmup = round(optim_cfg.warmup_epochs * steps_per_epoch)
    frac = optim_cfg.warmup_max_fraction
    if frac is not None and warmup > math.floor(frac * total_steps):
        cap = math.floor(frac * total_steps)
        log.info(
            f"warm-up capped: optim.warmup_epochs={optim_cfg.warmup_epochs:g} is {warmup} of the run's "
            f"{total_steps} steps, more than optim.warmup_max_fraction={frac:g}: warming up {cap} steps"
        )
        warmup = cap
    return warmup


def cosine_schedule(
    base: float, final: float, total_steps: int, warmup_steps: int, start_warmup: float = 0.0
) -> np.ndarray:
    """Linear warm-up from `start_warmup` to `base`, then a half cosine from `base` down to `final`.

    Args:
        base: value reached at the end of the warm-up (index `warmup_steps`).
        final: value at the last step (index `total_steps - 1`).
        total_steps: number of optimiser steps in the whole run (>= 1).
        warmup_steps: length of the linear warm-up (clipped to `total_steps`).
        start_warmup: value at step 0.

    Returns:
        float64 array `(total_steps,)`.
    """
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1 (got {total_steps})")
    if warmup_steps < 0:
        raise ValueError(f"warmup_steps must be >= 0 (got {warmup_steps})")
    warmup_steps = min(warmup_steps, total_steps)
    # endpoint=False: the warm-up ends one step before `base`, so the first cosine step is exactly `base`.
    warmup = np.linspace(start_warmup, base, warmup_steps, endpoint=False)
    n = total_steps - warmup_steps
    t = np.arange(n) / max(n - 1, 1)
    cosine = final + 0.5 * (base - final) * (1.0 + np.cos(math.pi * t))
    return np.concatenate([warmup, cosine]).astype(np.float64)


def resolve_lr(optim_cfg: OptimConfig, global_batch: int) -> float:
    """Absolute peak learning rate: `optim.lr` if given, else `blr * global_batch / 256` (linear scaling).

    Pure: the result is logged by the engine, never written back into the config.
    """
    if global_batch < 1:
        raise ValueError(f"global_batch must be >= 1 (got {global_batch})")
    if optim_cfg.lr is not None:
        return float(optim_cfg.lr)
    return float(optim_cfg.blr) * global_batch / 256.0


def build_schedules(
    optim_cfg: OptimConfig, lr: float, steps_per_epoch: int, epochs: int
) -> tuple[np.ndarray, np.ndarray]:
    """The lr and weight-decay arrays of a run: `(epochs * steps_per_epoch,)` each.

    `epochs` is the planned length (`plan_epochs`), not necessarily `train.epochs`.
    """
    total = epochs * steps_per_epoch
    warmup = warmup_steps(optim_cfg, steps_per_epoch, total)
    lr_at = cosine_schedule(lr, optim_cfg.min_lr, total, warmup)
    wd_end = optim_cfg.weight_decay if optim_cfg.weight_decay_end is None else optim_cfg.weight_decay_end
    wd_at = cosine_schedule(optim_cfg.weight_decay, wd_end, total, 0)
    return lr_at, wd_at


def apply_layer_decay(
    groups: list[dict],
    named_params: Iterable[tuple[str, torch.nn.Parameter]],
    layer_decay: float,
    layer_id: Callable[[str], int | None],
) -> list[dict]:
    """Split parameter groups by depth and scale their lr: `lr_scale *= layer_decay ** (top - depth)`.

    Args:
        groups: parameter groups as returned by `Task.param_groups`.
        named_params: the task's `named_parameters()` (to find each parameter's name).
        layer_decay: factor per layer (BEiT / MAE fine-tuning recipe), in (0, 1].
        layer_id: name -> depth (0 = embeddings, i + 1 = block i, None = top: heads, final norm).

    Returns:
        New groups (same keys) with one group per (input group, depth).
    """
    name_of = {id(p): n for n, p in named_params}
    depth_of = {n: layer_id(n) for n in name_of.values()}
    depths = [d for d in depth_of.values() if d is not None]
    top = max(depths, default=0) + 1
    out: list[dict] = []
    for group in groups:
        by_depth: dict[int, list[torch.nn.Parameter]] = {}
        for p in group["params"]:
            d = depth_of.get(name_of.get(id(p), ""))
            by_depth.setdefault(top if d is None else d, []).append(p)
        for d in sorted(by_depth):
            scale = float(group.get("lr_scale", 1.0)) * layer_decay ** (top - d)
            out.append({**group, "params": by_depth[d], "lr_scale": scale})
    log.info("layer-wise lr decay %.3f over %d depths: %d parameter groups", layer_decay, top + 1, len(out))
    return out


def set_optim_values(optimizer: torch.optim.Optimizer, lr: float, wd: float, wd_mults: list[float]) -> None:
    """Write this iteration's lr and weight decay into every group, with the group's scales.

    `wd_mults[i]` is group i's weight-decay multiplier (0 for groups that never decay).
    """
    for group, mult in zip(optimizer.param_groups, wd_mults, strict=True):
        group["lr"] = lr * float(group.get("lr_scale", 1.0))
        group["weight_decay"] = wd * mult


def build_optimizer(
    task: Task, optim_cfg: OptimConfig, lr: float, device: torch.device
) -> tuple[torch.optim.AdamW, list[float]]:
    """AdamW over `task.param_groups`, and each group's weight-decay multiplier.

    The groups are asked for with weight_decay=1.0, so each group's `weight_decay` reads as its share
    of the scheduled weight decay (0 for biases and norms); `wd_scale` multiplies it further.
    """
    groups = task.param_groups(1.0)
    if optim_cfg.layer_decay is not None and optim_cfg.layer_decay != 1.0:
        groups = apply_layer_decay(groups, task.named_parameters(), optim_cfg.layer_decay, task.layer_id)
    grouped = {id(p) for g in groups for p in g["params"]}
    left_out = [n for n, p in task.named_parameters() if p.requires_grad and id(p) not in grouped]
    if left_out:
        raise ValueError(f"Task.param_groups left trainable parameters out of the optimiser: {left_out[:5]}")
    wd_mults: list[float] = []
    for g in groups:
        g.setdefault("lr_scale", 1.0)
        wd_mults.append(float(g["weight_decay"]) * float(g.setdefault("wd_scale", 1.0)))
        g["weight_decay"] = optim_cfg.weight_decay * wd_mults[-1]
        g["lr"] = lr * float(g["lr_scale"])
    fused = optim_cfg.fused if optim_cfg.fused is not None else device.type in ("cuda", "cpu")
    optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(optim_cfg.betas), fused=fused)
    return optimizer, wd_mults
