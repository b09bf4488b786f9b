"""Settings of the optimiser and of the training loop (plain dataclasses; `sscxr.config` composes them)."""

from __future__ import annotations

from dataclasses import dataclass

from sscxr.errors import ConfigError

AMP_MODES = ("auto", "bf16", "fp16", "off")


@dataclass
class OptimConfig:
    """AdamW with a warm-up + cosine lr schedule and a cosine weight-decay schedule (GMML defaults).

    Attributes:
        blr: base learning rate per 256 images of global batch (lr = blr * global_batch / 256).
        lr: absolute learning rate; overrides `blr` when given.
        min_lr: learning rate at the end of the cosine decay.
        warmup_epochs: linear warm-up length (fractions allowed).
        warmup_max_fraction: cap on the warm-up as a share of the run's optimiser steps, in (0, 1];
            None = no cap. A short run (few labels: 2 steps per epoch) would otherwise spend most of
            its steps warming up; fine-tuning sets 0.1. Off by default so that pre-training schedules
            (and the resume of runs started before the cap existed) stay exactly as they were.
        weight_decay: weight decay at the start of training.
        weight_decay_end: weight decay at the end (cosine schedule); None keeps it constant.
        betas: AdamW betas.
        clip_grad: max global gradient norm; None disables clipping.
        fused: fused AdamW kernel; None = use it where the device supports it.
        layer_decay: layer-wise lr decay factor for fine-tuning (e.g. 0.75); None disables it.
    """

    blr: float = 5e-4
    lr: float | None = None
    min_lr: float = 1e-6
    warmup_epochs: float = 10.0
    warmup_max_fraction: float | None = None
    weight_decay: float = 0.04
    weight_decay_end: float | None = 0.4
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float | None = 3.0
    fused: bool | None = None
    layer_decay: float | None = None

    def __post_init__(self) -> None:
        if self.blr <= 0 or (self.lr is not None and self.lr <= 0):
            raise ConfigError(f"optim.blr and optim.lr must be > 0 (got blr={self.blr}, lr={self.lr})")
        if self.min_lr < 0 or self.warmup_epochs < 0 or self.weight_decay < 0:
            raise ConfigError("optim.min_lr, optim.warmup_epochs and optim.weight_decay must be >= 0")
        if self.warmup_max_fraction is not None and not 0.0 < self.warmup_max_fraction <= 1.0:
            raise ConfigError(
                f"optim.warmup_max_fraction must be in (0, 1] or null (got {self.warmup_max_fraction})"
            )
        if self.weight_decay_end is not None and self.weight_decay_end < 0:
            raise ConfigError(f"optim.weight_decay_end must be >= 0 or null (got {self.weight_decay_end})")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1) (got {self.betas})")
        if self.clip_grad is not None and self.clip_grad <= 0:
            raise ConfigError(f"optim.clip_grad must be > 0 or null (got {self.clip_grad})")
        if self.layer_decay is not None and not 0.0 < self.layer_decay <= 1.0:
            raise ConfigError(f"optim.layer_decay must be in (0, 1] or null (got {self.layer_decay})")


@dataclass
class TrainConfig:
    """Settings of the training loop.

    Attributes:
        epochs: number of passes over the training set (the lr schedule spans them all).
        min_steps: floor on the optimiser steps of the run; when `epochs` gives fewer, the run trains
            `ceil(min_steps / steps_per_epoch)` epochs instead (logged; the schedule spans them), and
            validates at most about 25 times (`val_every` is raised). A pure function of the config
            and the training-set size, so resume stays exact. None = no floor.
        batch_size: micro-batch size per process; global batch = batch_size * accum_steps * world_size.
        accum_steps: micro-batches accumulated per optimiser step.
        amp: "auto" (bf16 where the device supports it, else fp16 + GradScaler on CUDA, else off),
            "bf16", "fp16" or "off".
        seed: seed of the data order (the sampler) and of the loader workers.
        workers: DataLoader worker processes per training process.
        log_every: optimiser steps between train logs (the only host-device sync besides the
            finite-loss check).
        checkpoint_every: optimiser steps between `last.pt` saves; 0 = only at the end of each epoch.
        val_every: epochs between validation passes (raised automatically when `min_steps` raised
            the epoch count, see `engine.schedule.plan_epochs`).
        best_metric: validation metric that selects `best.pt`, with its prefix (e.g. "val/auc_roc").
        best_mode: "max" or "min".
        early_stop_patience: validations without improvement of `best_metric` before stopping.
        max_steps: stop after this many optimiser steps (the schedule still spans `epochs`).
        tensorboard: also write TensorBoard scalars (needs the `tensorboard` package).
        progress: show a progress bar on rank 0.
        compile: `torch.compile` the training forward/backward.
    """

    epochs: int = 100
    min_steps: int | None = None
    batch_size: int = 16
    accum_steps: int = 1
    amp: str = "auto"
    seed: int = 0
    workers: int = 2
    log_every: int = 10
    checkpoint_every: int = 200
    val_every: int = 1
    best_metric: str | None = None
    best_mode: str = "max"
    early_stop_patience: int | None = None
    max_steps: int | None = None
    tensorboard: bool = False
    progress: bool = True
    compile: bool = False

    def __post_init__(self) -> None:
        positive = {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "accum_steps": self.accum_steps,
            "log_every": self.log_every,
            "val_every": self.val_every,
        }
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"train.{name} must be >= 1 (got {value})")
        if self.amp not in AMP_MODES:
            raise ConfigError(f"train.amp must be one of {AMP_MODES} (got {self.amp!r})")
        if self.best_mode not in ("max", "min"):
            raise ConfigError(f"train.best_mode must be 'max' or 'min' (got {self.best_mode!r})")
        if self.workers < 0 or self.checkpoint_every < 0:
            raise ConfigError("train.workers and train.checkpoint_every must be >= 0")
        if self.early_stop_patience is not None and self.early_stop_patience < 1:
            raise ConfigError(
                f"train.early_stop_patience must be >= 1 or null (got {self.early_stop_patience})"
            )
        if self.min_steps is not None and self.min_steps < 1:
            raise ConfigError(f"train.min_steps must be >= 1 or null (got {self.min_steps})")
        if self.max_steps is not None and self.max_steps < 0:
            raise ConfigError(f"train.max_steps must be >= 0 or null (got {self.max_steps})")
