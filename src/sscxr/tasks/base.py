"""The Task interface: what a model must provide to be trained by the one engine (`sscxr.engine.fit`).

Pre-training (GMML), classification and segmentation differ only in their Task. The engine owns the
loop, the optimiser, mixed precision, checkpoints and distribution; a Task owns the loss, the
validation metrics and the task-specific artefacts (pictures, exported weights).
"""

from __future__ import annotations

import abc
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn

Batch = dict[str, torch.Tensor]

# Parameters that are not weights of a linear map: decaying them towards zero only hurts (the usual
# ViT recipe: no weight decay on biases, norms, position embeddings and special tokens).
NO_DECAY_NAMES: frozenset[str] = frozenset(
    {"pos_embed", "cls_token", "reg_token", "dist_token", "mask_token"}
)
# Names that belong to the input end of a ViT: layer-wise lr decay gives them the smallest lr.
EMBED_NAMES: frozenset[str] = NO_DECAY_NAMES | {"patch_embed"}
_BLOCK_RE = re.compile(r"(?:^|\.)blocks\.(\d+)\.")


@dataclass
class StepOutput:
    """What `Task.training_step` returns.

    Attributes:
        loss: scalar tensor to back-propagate (mean over this process's micro-batch).
        logs: detached scalar tensors to log (e.g. {"loss": ..., "mask_frac": ...}); the engine averages
            them over steps and ranks and calls `.item()` only at log time.
    """

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)


def reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum `t` over all processes (identity in a single process). Not differentiable: pass detached tensors.

    Args:
        t: a tensor of any shape, on any device; with the nccl backend a CPU tensor makes a round trip
            through the current CUDA device, because nccl only reduces CUDA tensors.

    Returns:
        A new tensor on `t`'s device with the element-wise sum over ranks.
    """
    return reduce_sum_async(t)()


def reduce_sum_async(t: torch.Tensor) -> Callable[[], torch.Tensor]:
    """Start summing `t` over all processes; the returned function waits for and returns the sum.

    The collective runs while the caller computes (e.g. a forward pass between the two), so a rank
    rarely waits for it. Every rank must start the same reductions in the same order. In a single
    process the function returns `t` itself.
    """
    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return lambda: t
    work = t.detach().clone()
    if tdist.get_backend() == "nccl" and not work.is_cuda:
        work = work.cuda()
    handle = tdist.all_reduce(work, op=tdist.ReduceOp.SUM, async_op=True)

    def result() -> torch.Tensor:
        handle.wait()
        return work.to(t.device)

    return result


def cosine_value(start: float, end: float, step: int, total: int) -> float:
    """A half cosine from `start` at step 0 to `end` at step `total - 1`: a task-owned schedule's value.

    The shape of the engine's lr schedule after its warm-up. A pure function of `step` and `total` (the
    arguments of `Task.after_optimizer_step`), so a resumed run reads the same values: e.g. a DINO-style
    EMA momentum `cosine_value(0.996, 1.0, step, total_steps)`. Steps outside `[0, total - 1]` are clamped.

    Args:
        start: value at step 0.
        end: value at step `total - 1` (and beyond).
        step: 0-based step index.
        total: number of steps of the schedule (>= 1; a single step gives `start`).
    """
    if total < 1:
        raise ValueError(f"total must be >= 1 (got {total})")
    t = min(max(step, 0), total - 1) / max(total - 1, 1)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


@dataclass(frozen=True)
class TrainedWeights:
    """What a finished `fit` hands to `Task.export`.

    Attributes:
        best: the task's state_dict at its best validation (`checkpoints/best.pt`, on the CPU), None when
            there was none (no validation split or no `train.best_metric`).
        metric: `train.best_metric` (None: not set); mode: "max" | "min".
        value: its best value; step, epoch: the optimiser step and (0-based) epoch it was reached at.
        steps: optimiser steps the run took in all.
    """

    best: dict[str, torch.Tensor] | None
    metric: str | None
    mode: str
    value: float | None
    step: int | None
    epoch: int | None
    steps: int


class Task(nn.Module, abc.ABC):
    """A trainable model plus its loss, metrics and artefacts.

    `forward(batch)` calls `training_step` so that DistributedDataParallel can wrap the task itself.
    Only `training_step` is required; the other hooks have harmless defaults.
    """

    #: Batch entries the engine leaves on the host when it moves a batch to the device: ones the task
    #: reads as Python numbers, which would cost a device-to-host sync if they travelled.
    host_keys: frozenset[str] = frozenset()

    def forward(self, batch: Batch) -> StepOutput:  # type: ignore[override]
        """Alias of `training_step` (DDP calls `forward`)."""
        return self.training_step(batch)

    @abc.abstractmethod
    def training_step(self, batch: Batch) -> StepOutput:
        """Compute the loss of one micro-batch (already on the device, inside autocast)."""

    def validation_step(self, batch: Batch) -> None:
        """Update the validation accumulators with one batch (called under `torch.no_grad`)."""
        return None

    def compute_metrics(self) -> dict[str, float]:
        """Metrics over everything seen since `reset_metrics`, gathered over all ranks.

        Every rank calls this (it may run collectives, e.g. `reduce_sum`); the engine adds the
        `val/` prefix to the names.
        """
        return {}

    def reset_metrics(self) -> None:
        """Clear the validation accumulators (called before each validation pass)."""
        return None

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimiser parameter groups: `weight_decay` on weight matrices, none on biases, norms and tokens.

        Every group gets `lr_scale` and `wd_scale` (1.0) that the engine multiplies into the scheduled
        lr and weight decay, so layer-wise lr decay can split groups and change their scales.

        Args:
            weight_decay: the weight decay of the decaying group.

        Returns:
            A list of dicts with keys `params`, `weight_decay`, `lr_scale`, `wd_scale` (empty groups dropped).
        """
        decay: list[nn.Parameter] = []
        no_decay: list[nn.Parameter] = []
        for name, p in self.named_parameters():
            if not p.requires_grad:
                continue
            leaf = name.rsplit(".", 1)[-1]
            (no_decay if p.ndim <= 1 or leaf in NO_DECAY_NAMES else decay).append(p)
        groups = [
            {"params": decay, "weight_decay": weight_decay, "lr_scale": 1.0, "wd_scale": 1.0},
            {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0, "wd_scale": 1.0},
        ]
        return [g for g in groups if g["params"]]

    def layer_id(self, name: str) -> int | None:
        """Depth of a parameter for layer-wise lr decay: 0 = embeddings, i + 1 = `blocks.i`, None = top.

        Override when a task's parameter names do not follow timm's ViT layout.
        """
        match = _BLOCK_RE.search(name)
        if match:
            return int(match.group(1)) + 1
        if any(part in EMBED_NAMES for part in name.split(".")):
            return 0
        return None

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        """Called by the engine after every optimiser step, on every rank, under `torch.no_grad()`.

        The place for what follows an update: move an EMA teacher towards the student (DINO, BYOL,
        iBOT), advance a momentum or temperature schedule. The engine stays the only loop; a task never
        steps the optimiser itself.

        Schedules: compute their values from `step` and `total_steps` alone (e.g. `cosine_value`), never
        from a counter kept in the task, so that a resumed run reads the same values as an uninterrupted
        one. State the hook updates (an EMA teacher) must live in the task's `state_dict()`: a submodule
        with `requires_grad=False` parameters, or registered buffers. Then `checkpoints/last.pt` holds it
        and resume is exact, and the optimiser (`param_groups`) and DDP's gradient reducer leave it alone.
        Under DDP every rank sees the same, synchronised student, so a teacher derived from it only by
        local arithmetic stays identical on every rank without any communication.

        Called after every step, including a step skipped for a non-finite loss or gradient (the engine
        may only learn of the skip later, on the host): after a skipped step the student is unchanged.
        The hook must not read device values on the host (`.item()`, `float(t)`: a sync per step) and may
        run collectives only when every rank calls the same ones in the same order.

        Args:
            step: 0-based index of the optimiser step just taken (over the whole run, resumes included).
            total_steps: planned optimiser steps of the run (`epochs * steps_per_epoch` under the
                `train.min_steps` floor, the length of the lr schedule; `train.max_steps` does not cut it).
        """
        return None

    def on_epoch_end(self, run_dir: Path, epoch: int) -> None:
        """Rank 0 only, after each epoch's validation: write pictures or other diagnostics."""
        return None

    def export(self, run_dir: Path, trained: TrainedWeights) -> None:
        """Rank 0 only, after training: write the task's deliverable (e.g. the encoder weights).

        `trained` is what the engine ended with: the best validation checkpoint's weights (when there is
        one) and how the run went; tasks never read checkpoints themselves.
        """
        return None

    def batch_size_of(self, batch: Batch) -> int:
        """Number of samples in `batch` (length of its first tensor); used for throughput."""
        for value in batch.values():
            if isinstance(value, torch.Tensor) and value.ndim > 0:
                return int(value.shape[0])
        return 0
