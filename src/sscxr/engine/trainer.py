"""The one training loop: every task (GMML pre-training, classification, segmentation) runs through `fit`.

A Task supplies the loss and the metrics; this module supplies the rest: sharded data order, AdamW with
per-iteration lr / weight-decay schedules, mixed precision, gradient accumulation, DDP, a finite-loss
guard, validation, best-model selection, early stopping and exact resume from `checkpoints/last.pt`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from sscxr.engine.checkpoint import (
    check_run_folder,
    clear_run_folder,
    copy_checkpoint,
    find_resume_checkpoint,
    gather_rng_state,
    load_checkpoint,
    plain_config,
    remove_stale_temp_files,
    resolve_resume,
    resume_training,
    save_checkpoint,
)
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.distributed import (
    DistInfo,
    all_true,
    all_true_tensor,
    autocast,
    barrier,
    broadcast_object,
    gather_objects,
    resolve_amp,
    to_device,
)
from sscxr.engine.logging import MetricsLogger, StepMeter
from sscxr.engine.sampler import ShardedSampler, build_eval_loader, build_loader
from sscxr.engine.schedule import (
    build_optimizer,
    build_schedules,
    plan_epochs,
    resolve_lr,
    set_optim_values,
)
from sscxr.errors import ConfigError, DataError, SSCXRError
from sscxr.tasks.base import Task, TrainedWeights
from sscxr.utils import atomic_write_text, derive_seed

log = logging.getLogger(__name__)

MAX_CONSECUTIVE_NONFINITE = 5
Collate = Callable[[list[Any]], Any]
_AMP_NAMES = {None: "off", torch.bfloat16: "bf16", torch.float16: "fp16"}
_AMP_DTYPES = {name: dtype for dtype, name in _AMP_NAMES.items()}


class NonFiniteLossError(SSCXRError):
    """Training produced non-finite losses or gradients several steps in a row."""


@dataclass
class TrainState:
    """Progress of a run; saved in every checkpoint.

    Attributes:
        epoch: current epoch (0-based; after an epoch ends it points at the next one).
        step: optimiser steps done (skipped non-finite steps count: they consumed their data).
        sample_in_epoch: samples of this rank's shard already consumed in `epoch`.
        best_metric: best value of `train.best_metric` so far.
        best_step: step at which it was reached.
        bad_epochs: validations since the last improvement (early stopping).
        nonfinite_steps: skipped updates in total.
        world_size: processes that wrote the state (to translate `sample_in_epoch` on resume).
        amp: the precision the run trains in ("off", "bf16", "fp16"); with `train.amp: auto` it is
            measured on CPUs, and a resumed run keeps the one it started with (exact resume).
    """

    epoch: int = 0
    step: int = 0
    sample_in_epoch: int = 0
    best_metric: float | None = None
    best_step: int | None = None
    bad_epochs: int = 0
    nonfinite_steps: int = 0
    world_size: int = 1
    amp: str = ""


@dataclass
class FitResult:
    """What `fit` returns."""

    state: TrainState
    run_dir: Path
    best_metric: float | None
    last_checkpoint: Path | None


def fit(
    task: Task,
    train_set: Dataset[Any],
    val_set: Dataset[Any] | None,
    train_cfg: TrainConfig,
    optim_cfg: OptimConfig,
    run_dir: str | os.PathLike[str],
    dist: DistInfo | None,
    config_dict: Mapping[str, Any] | None,
    collate_fn: Collate | None = None,
    resume: str | os.PathLike[str] | bool = "auto",
    force: bool = False,
) -> FitResult:
    """Train `task` on `train_set`, validating on `val_set`; the only training loop of sscxr.

    Args:
        task: the Task to train (moved to `dist.device`).
        train_set: map-style dataset of dicts of tensors; `set_epoch(epoch)` is called if it has one.
        val_set: validation dataset or None (no validation, no best.pt).
        train_cfg: loop settings.
        optim_cfg: optimiser settings.
        run_dir: run folder: `config.yaml`, `metrics.jsonl`, `checkpoints/{last,best}.pt`, task artefacts.
        dist: from `init_distributed()`; None = single process on the CPU.
        config_dict: the resolved run config (plain dict), saved as `config.yaml` and in checkpoints;
            None saves the train and optim settings.
        collate_fn: DataLoader collate function (default: torch's).
        resume: "auto" (resume from `run_dir/checkpoints/last.pt` when it exists), True (it must exist),
            a checkpoint path, or False (start fresh).
        force: start fresh even when `run_dir` holds another run (its checkpoints and metrics.jsonl are
            removed); without it such a folder is refused (`check_run_folder`).

    Returns:
        FitResult with the final TrainState, the run folder, the best metric and `last.pt`'s path.
    """
    dist = dist if dist is not None else DistInfo()
    run_dir = Path(run_dir)
    if config_dict is None:
        config_dict = {"train": train_cfg, "optim": optim_cfg}
    config = plain_config(config_dict)
    resume_from, saved = _agree_on_resume(run_dir, config, resume, force, dist)
    if dist.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        if force:
            clear_run_folder(run_dir)
        remove_stale_temp_files(run_dir)
        atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    loop = _Loop(task, train_set, val_set, train_cfg, optim_cfg, run_dir, dist, config, collate_fn)
    loop.restore(resume_from, saved)
    return loop.run()


def _agree_on_resume(
    run_dir: Path, config: dict[str, Any], resume: str | os.PathLike[str] | bool, force: bool, dist: DistInfo
) -> tuple[Path | None, dict[str, Any] | None]:
    """Rank 0 decides whether and from what to resume, reads the checkpoint and sends it to every rank.

    The other ranks never look at their own `--out`: nodes without a shared file system resume from rank
    0's checkpoint like the rest (DDP needs every rank at the same step with the same weights), and a
    refusal (another run's folder, a damaged checkpoint) is raised on every rank rather than leaving the
    others waiting at a collective.

    Returns:
        (the checkpoint's path on rank 0, its content) or (None, None) for a fresh start.
    """
    outcome: tuple[Path | None, dict[str, Any] | None, Exception | None] = (None, None, None)
    if dist.is_main:
        try:
            path = None if force else resolve_resume(run_dir, resume)
            if not force:
                check_run_folder(run_dir, config, path)
            ckpt = load_checkpoint(path) if path is not None else None
            outcome = (path, ckpt, None)
        except SSCXRError as err:
            outcome = (None, None, err)
    if dist.world_size > 1:
        local = find_resume_checkpoint(run_dir)
        outcome = broadcast_object(outcome)
        if outcome[0] is not None and local is None:
            log.info("resuming from rank 0's checkpoint %s (this rank's --out does not hold it)", outcome[0])
    if outcome[2] is not None:
        raise outcome[2]
    return outcome[0], outcome[1]


@torch.no_grad()
def evaluate(
    task: Task,
    dataset: Dataset[Any],
    dist: DistInfo,
    *,
    batch_size: int,
    amp_dtype: torch.dtype | None = None,
    workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Collate | None = None,
    loader: Iterable[Any] | None = None,
) -> dict[str, float]:
    """Run `task.validation_step` over this rank's unpadded shard and return `task.compute_metrics()`.

    Every rank must call it (the task gathers its accumulators across ranks in `compute_metrics`).
    `validation_step` itself must not run collectives: with uneven shards ranks see different batch counts.
    `loader`: a loader from `build_eval_loader` to reuse (its workers may persist); None builds one.
    """
    if loader is None:
        kw = {"workers": workers, "pin_memory": pin_memory, "collate_fn": collate_fn}
        loader = build_eval_loader(dataset, dist.world_size, dist.rank, batch_size, **kw)
    was_training = task.training
    task.eval()
    task.reset_metrics()
    with autocast(dist.device, amp_dtype):
        for batch in loader:
            task.validation_step(to_device(batch, dist.device, keep=task.host_keys))
    metrics = task.compute_metrics()
    task.train(was_training)
    return {k: float(v) for k, v in metrics.items()}


def update_best(state: TrainState, metrics: Mapping[str, float], name: str | None, mode: str) -> bool:
    """Update `state`'s best metric and early-stopping count from one validation; True if improved."""
    if name is None or not metrics:
        return False
    if name not in metrics:
        raise ConfigError(
            f"train.best_metric={name!r} is not a validation metric of this task; "
            f"choose one of {sorted(metrics)}"
        )
    value = float(metrics[name])
    best = state.best_metric
    better = math.isfinite(value) and (best is None or (value > best if mode == "max" else value < best))
    if better:
        state.best_metric, state.best_step, state.bad_epochs = value, state.step, 0
    else:
        state.bad_epochs += 1
    return better


class _Loop:
    """State and steps of one `fit` call (a class only to avoid passing a dozen arguments around)."""

    def __init__(
        self,
        task: Task,
        train_set: Dataset[Any],
        val_set: Dataset[Any] | None,
        tcfg: TrainConfig,
        ocfg: OptimConfig,
        run_dir: Path,
        dist: DistInfo,
        config: dict[str, Any],
        collate_fn: Collate | None,
    ) -> None:
        self.task, self.train_set, self.val_set, self.tcfg = task.to(dist.device), train_set, val_set, tcfg
        self.run_dir, self.dist, self.config = run_dir, dist, config
        self.loader_kw: dict[str, Any] = {
            "workers": tcfg.workers,
            "pin_memory": dist.device.type == "cuda",
            "collate_fn": collate_fn,
        }
        self.ckpt_dir = run_dir / "checkpoints"
        self.sampler = ShardedSampler(len(train_set), dist.world_size, dist.rank, tcfg.seed)  # type: ignore[arg-type]
        self.per_step = tcfg.batch_size * tcfg.accum_steps  # samples per rank per optimiser step
        self.steps_per_epoch = self.sampler.shard_size() // self.per_step
        self.global_batch = self.per_step * dist.world_size
        if self.steps_per_epoch == 0:
            raise DataError(
                f"the training set has {self.sampler.n} samples, fewer than one global batch of "
                f"{self.global_batch}: lower train.batch_size or train.accum_steps"
            )
        # The run's length under train.min_steps: a pure function of the config and the data size, so a
        # resumed run plans (and schedules) exactly the same.
        self.plan = plan_epochs(tcfg, self.steps_per_epoch, self.sampler.n)
        self.epochs = self.plan.epochs
        lr = resolve_lr(ocfg, self.global_batch)
        self.lr_at, self.wd_at = build_schedules(ocfg, lr, self.steps_per_epoch, self.epochs)
        self.total_steps = len(self.lr_at)  # the planned run, for task-owned schedules
        self.optimizer, self.wd_mults = build_optimizer(self.task, ocfg, lr, dist.device)
        self.clip = ocfg.clip_grad
        # Rank 0's choice for every rank: a measured choice (CPU, amp auto) could differ between ranks.
        self.amp_dtype = gather_objects(resolve_amp(tcfg.amp, dist.device))[0]
        self.scaler = torch.amp.GradScaler(dist.device.type, enabled=self.amp_dtype == torch.float16)
        self._wrap_model()
        self.state = TrainState(world_size=dist.world_size, amp=_AMP_NAMES[self.amp_dtype])
        self.metrics = MetricsLogger(run_dir, enabled=dist.is_main, tensorboard=tcfg.tensorboard)
        self.meter = StepMeter()
        self._bad_run = 0
        # Fused AdamW skips a step on the device when handed `found_inf`, as torch's GradScaler does:
        # no host sync per step. fp16 keeps the GradScaler's own skipping, which syncs in `scaler.step`
        # anyway, and a non-fused AdamW cannot skip on the device: both decide on the host (`all_true`).
        self._skip_on_device = not self.scaler.is_enabled() and all(
            g.get("fused") for g in self.optimizer.param_groups
        )
        # (step, ok) of the device-skipped steps whose outcome the host has not read yet (`_resolve`): a
        # streak is noticed at the next log, save or epoch end, and the skipped steps meanwhile change
        # nothing but the step count (the weights, moments and last.pt stay healthy).
        self._pending: list[tuple[int, torch.Tensor]] = []
        self._persistent_loader: Any = None
        self._val_loader: Any = None
        self._announce(lr, ocfg)

    def _announce(self, lr: float, ocfg: OptimConfig) -> None:
        # The derived values are logged, never written back into the config.
        t = self.tcfg
        how = "optim.lr" if ocfg.lr is not None else f"blr {ocfg.blr:g} x {self.global_batch} / 256"
        log.info(
            f"global batch {self.global_batch} ({t.batch_size} per process x {t.accum_steps} "
            f"accumulation x {self.dist.world_size} processes); peak lr {lr:.4g} ({how}); "
            f"{self.steps_per_epoch} steps per epoch x {self.epochs} epochs; amp {_AMP_NAMES[self.amp_dtype]}"
        )
        if t.best_metric and self.val_set is None:
            log.warning(
                "train.best_metric=%s is set but there is no validation set: no best.pt", t.best_metric
            )

    def _wrap_model(self) -> None:
        # DDP wraps the task itself (Task.forward = training_step); validation uses the bare task.
        self.ddp: nn.parallel.DistributedDataParallel | None = None
        self.model: nn.Module = self.task
        if self.dist.world_size > 1:
            ids = [self.dist.device.index] if self.dist.device.type == "cuda" else None
            # Gradients as views of the all-reduce buckets: no second copy of every gradient.
            # Not static_graph: a trial (GMMLTask, 2 gloo processes) moved every weight by about one
            # AdamW step away from the single-process run.
            self.ddp = nn.parallel.DistributedDataParallel(
                self.task, device_ids=ids, gradient_as_bucket_view=True
            )
            self.model = self.ddp
        if self.tcfg.compile:
            self.model = torch.compile(self.model)  # type: ignore[assignment]

    def restore(self, path: Path | None, ckpt: dict[str, Any] | None = None) -> None:
        """Load model, optimiser, scaler, progress and RNG from a checkpoint (no-op for None): its
        content when rank 0 read it for every rank, else the file."""
        if path is None:
            return
        d = self.dist
        source: Any = {**ckpt, "path": str(path)} if ckpt is not None else path
        saved = resume_training(
            source, self.task, self.optimizer, self.scaler, d.rank, d.world_size, self.global_batch
        )
        known = {f.name for f in dataclasses.fields(TrainState)}
        self.state = TrainState(**{k: v for k, v in saved.items() if k in known})
        started = self.state.amp
        if self.tcfg.amp == "auto" and started in _AMP_DTYPES and _AMP_DTYPES[started] != self.amp_dtype:
            log.info(
                "amp auto: keeping %s, the precision this run started with (measured now: %s)",
                started, _AMP_NAMES[self.amp_dtype],
            )  # fmt: skip
            self.amp_dtype = _AMP_DTYPES[started]
        self.state.amp = _AMP_NAMES[self.amp_dtype]
        log.info("resumed from %s: epoch %d, step %d", path, self.state.epoch, self.state.step)

    def run(self) -> FitResult:
        """Train until the epochs, `max_steps` or early stopping end the run; export on rank 0."""
        self.task.train()
        try:
            stop = self._should_stop()
            while not stop:
                if self._train_epoch():
                    stop = self._end_epoch()
                else:  # cut by max_steps mid-epoch: keep where we are for a later resume
                    self._save()
                    stop = True
                stop = stop or self._should_stop()
        finally:
            self.metrics.close()
        if self.dist.is_main:
            self.task.export(self.run_dir, self._trained())
        barrier()
        return FitResult(
            self.state, self.run_dir, self.state.best_metric, find_resume_checkpoint(self.run_dir)
        )

    def _trained(self) -> TrainedWeights:
        """The best validation checkpoint's weights (read once, here) and how the run went."""
        s, t = self.state, self.tcfg
        best = self.ckpt_dir / "best.pt"
        if not best.is_file():
            return TrainedWeights(None, t.best_metric, t.best_mode, s.best_metric, s.best_step, None, s.step)
        ckpt = load_checkpoint(best)
        epoch = int(ckpt["state"].get("epoch", 0)) - 1  # saved after the epoch's counter moved on
        best_state = ckpt["state"]
        value, step = best_state.get("best_metric"), best_state.get("best_step")
        return TrainedWeights(ckpt["model"], t.best_metric, t.best_mode, value, step, epoch, s.step)

    def _should_stop(self) -> bool:
        s, t = self.state, self.tcfg
        early = t.early_stop_patience is not None and s.bad_epochs >= t.early_stop_patience
        return s.epoch >= self.epochs or (t.max_steps is not None and s.step >= t.max_steps) or early

    def _epoch_batches(self) -> Iterator[Any]:
        s, t = self.state, self.tcfg
        # Before the iterator exists: loader workers get a copy of the dataset when it is created.
        if callable(getattr(self.train_set, "set_epoch", None)):
            self.train_set.set_epoch(s.epoch)  # type: ignore[attr-defined]
        self.sampler.set_epoch(s.epoch)
        self.sampler.set_start(s.sample_in_epoch)
        # Workers that persist across epochs, where the dataset's epoch reaches them (`shares_epoch`):
        # no process start-up and no re-opened cache per epoch. The sampler runs in this process, so
        # its epoch and resume position need no sharing. Samples never depend on worker seeds.
        if self._persistent_loader is not None:
            return iter(self._persistent_loader)
        persistent = t.workers > 0 and bool(getattr(self.train_set, "shares_epoch", False))
        seed = derive_seed(t.seed, s.epoch, self.dist.rank, s.sample_in_epoch)
        loader = build_loader(
            self.train_set, self.sampler, t.batch_size, seed=seed, drop_last=True, persistent=persistent,
            **self.loader_kw,
        )  # fmt: skip
        if persistent:
            self._persistent_loader = loader
        return iter(loader)

    def _train_epoch(self) -> bool:
        """Run the rest of the current epoch; True when it ran to its end."""
        s, t = self.state, self.tcfg
        batches = self._epoch_batches()
        done = s.sample_in_epoch // self.per_step
        show = self.dist.is_main and t.progress
        bar = tqdm(
            total=self.steps_per_epoch, initial=done, desc=f"epoch {s.epoch}", leave=False, disable=not show
        )
        self.meter.restart_clock()
        try:
            for i in range(done, self.steps_per_epoch):
                self._optimizer_step(batches)
                bar.update(1)
                # The skip outcomes are read where the host syncs anyway: logging, saving, the end.
                if s.step % t.log_every == 0:
                    self._resolve()
                    bar.set_postfix(self._log_train(), refresh=False)
                if t.max_steps is not None and s.step >= t.max_steps:
                    self._resolve()
                    return i + 1 == self.steps_per_epoch
                if t.checkpoint_every and s.step % t.checkpoint_every == 0 and i + 1 < self.steps_per_epoch:
                    self._resolve()
                    # No mid-epoch save during a non-finite streak: last.pt keeps the last healthy state.
                    if self._bad_run == 0:
                        self._save()
        finally:
            bar.close()
        self._resolve()
        return True

    def _optimizer_step(self, batches: Iterator[Any]) -> None:
        """Accumulate `accum_steps` micro-batches, then one AdamW update unless the loss is non-finite,
        then the task's `after_optimizer_step`."""
        s, accum = self.state, self.tcfg.accum_steps
        i = min(s.step, len(self.lr_at) - 1)
        set_optim_values(self.optimizer, float(self.lr_at[i]), float(self.wd_at[i]), self.wd_mults)
        logs: dict[str, torch.Tensor] = {}
        for k in range(accum):
            batch = to_device(next(batches), self.dist.device, keep=self.task.host_keys)
            # DDP all-reduces gradients once, in the backward of the last micro-batch.
            last = k == accum - 1
            sync = self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()
            with sync:
                with autocast(self.dist.device, self.amp_dtype):
                    out = self.model(batch)
                self.scaler.scale(out.loss / accum).backward()
            for name, value in {"loss": out.loss, **out.logs}.items():
                value = value.detach().float() / accum
                logs[name] = logs[name] + value if name in logs else value
        self.scaler.unscale_(self.optimizer)  # clip the true gradients, not the scaled ones
        logs["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.task.parameters(), self.clip or math.inf)
        finite = torch.isfinite(logs["loss"])
        if not self.scaler.is_enabled():  # with fp16 the scaler itself skips steps with inf gradients
            finite = finite & torch.isfinite(logs["grad_norm"])
        if self._skip_on_device:
            # Every rank must agree on skipping: the all-reduce stays on the device, like the skip.
            self._skip_on_device_step(all_true_tensor(finite), logs)
        else:
            # One host sync per step: every rank must agree on skipping before the optimiser runs.
            self._apply_update(all_true(finite), logs)
        with torch.no_grad():  # e.g. an EMA teacher follows the student; on every rank, skipped or not
            self.task.after_optimizer_step(s.step - 1, self.total_steps)

    def _skip_on_device_step(self, ok: torch.Tensor, logs: dict[str, torch.Tensor]) -> None:
        """One fused AdamW update that the device itself skips unless `ok`; the host learns later.

        Fused Adam(W) reads the `found_inf` attribute (the protocol of optimisers with
        `_step_supports_amp_scaling`, which GradScaler uses): where it is 1 the kernel leaves the
        parameters and moments alone and the step counters are put back.
        """
        self.optimizer.found_inf = (~ok).float()  # type: ignore[attr-defined]
        try:
            self.optimizer.step()
        finally:
            del self.optimizer.found_inf  # type: ignore[attr-defined]  # GradScaler removes it too
        self.meter.add(logs, weight=ok.float())
        self._pending.append((self.state.step, ok))
        self._advance()

    def _resolve(self) -> None:
        """Read the pending skip outcomes (one host sync) and replay them in order on the host."""
        if not self._pending:
            return
        steps = [step for step, _ in self._pending]
        oks = torch.stack([ok for _, ok in self._pending]).cpu().tolist()
        self._pending = []
        for step, ok in zip(steps, oks, strict=True):
            self._record_outcome(step, bool(ok))

    def _apply_update(self, ok: bool, logs: dict[str, torch.Tensor]) -> None:
        """One update the host decided on (`ok` already read): the scaler's step, or a skip."""
        if ok:
            self.scaler.step(self.optimizer)
        self.scaler.update()  # also after a skip: it resets the scaler's per-step bookkeeping
        self.meter.add(logs if ok else None)
        self._advance()
        self._record_outcome(self.state.step - 1, ok)

    def _advance(self) -> None:
        """What every optimiser step ends with, taken or skipped: gradients cleared, the step and the
        sampler position moved on (both are what a resume continues from)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.state.step += 1
        self.state.sample_in_epoch += self.per_step

    def _record_outcome(self, step: int, ok: bool) -> None:
        """Count step `step`'s outcome: warn on a skip, raise after MAX_CONSECUTIVE_NONFINITE in a row."""
        if ok:
            self._bad_run = 0
            return
        self._bad_run += 1
        self.state.nonfinite_steps += 1
        log.warning("step %d: non-finite loss or gradient, update skipped (%d in a row)", step, self._bad_run)
        if self._bad_run >= MAX_CONSECUTIVE_NONFINITE:
            raise NonFiniteLossError(
                f"{self._bad_run} optimiser steps in a row had a non-finite loss or gradient (last: step "
                f"{step}); training stopped. {self.ckpt_dir / 'last.pt'} holds the last good state: "
                "lower optim.blr, set optim.clip_grad or train.amp=off, check the data, then resume"
            )

    def _log_train(self) -> dict[str, str]:
        """Write the train record of the last `log_every` steps; returns the progress-bar fields."""
        s = self.state
        i = min(s.step - 1, len(self.lr_at) - 1)  # the values the last update used
        values = {
            "lr": float(self.lr_at[i]),
            "wd": float(self.wd_at[i]),
            **self.meter.summary(self.global_batch),
        }
        self.metrics.log("train", {f"train/{k}": v for k, v in values.items()}, s.step, s.epoch)
        loss = values.get("loss", math.nan)
        return {"loss": f"{loss:.4f}", "lr": f"{values['lr']:.2e}", "img/s": f"{values['img_per_s']:.0f}"}

    def _end_epoch(self) -> bool:
        """Validate, pick best.pt, call `on_epoch_end`, save last.pt; True when early stopping fires."""
        s, t = self.state, self.tcfg
        metrics: dict[str, float] = {}
        every = self.plan.val_every
        if self.val_set is not None and ((s.epoch + 1) % every == 0 or s.epoch + 1 == self.epochs):
            if self._val_loader is None:
                # Built once: with workers, they persist between validations (the samples do not change).
                self._val_loader = build_eval_loader(
                    self.val_set, self.dist.world_size, self.dist.rank, t.batch_size, **self.loader_kw,
                    persistent=t.workers > 0,
                )  # fmt: skip
            raw = evaluate(
                self.task, self.val_set, self.dist, batch_size=t.batch_size, amp_dtype=self.amp_dtype,
                loader=self._val_loader,
            )  # fmt: skip
            metrics = {f"val/{k}": v for k, v in raw.items()}
            self.metrics.log("val", metrics, s.step, s.epoch)
            log.info("epoch %d: %s", s.epoch, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
        improved = update_best(s, metrics, t.best_metric, t.best_mode)
        if self.dist.is_main:
            self.task.on_epoch_end(self.run_dir, s.epoch)
        s.epoch += 1
        s.sample_in_epoch = 0
        last = self._save()
        if improved and self.dist.is_main:
            copy_checkpoint(last, self.ckpt_dir / "best.pt")
            log.info("new best %s = %.4g at step %d", t.best_metric, s.best_metric, s.step)
        stop = t.early_stop_patience is not None and s.bad_epochs >= t.early_stop_patience
        if stop:
            log.info("early stopping: %s did not improve for %d validations", t.best_metric, s.bad_epochs)
        return stop

    def _save(self) -> Path:
        """Write `last.pt` on rank 0 (every rank takes part: the RNG states are gathered)."""
        self._resolve()  # a checkpoint holds resolved counts (a no-op where the caller resolved)
        rng = gather_rng_state(self.dist.world_size)
        path = self.ckpt_dir / "last.pt"
        if self.dist.is_main:
            save_checkpoint(path, self.task, self.optimizer, self.scaler, self.state, self.config, rng)
        return path
