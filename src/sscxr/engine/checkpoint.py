"""Training checkpoints: atomic writes, unwrapped state dicts, safe loading.

A checkpoint is a dict:
`{"model", "optimizer", "scaler", "state", "config", "rng", "format_version"}`. It is written to a
temporary file in the same folder and moved over the old one with `os.replace`, so a crash mid-write
never leaves a broken `last.pt`. It is loaded with `torch.load(weights_only=True)`: no code runs.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sscxr.errors import CheckpointError
from sscxr.utils import atomic_open

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
CHECKPOINT_KEYS = ("model", "optimizer", "scaler", "state", "config", "rng", "format_version")


def unwrap(model: nn.Module) -> nn.Module:
    """The bare module under DistributedDataParallel and `torch.compile` wrappers.

    Saving the bare module's state dict keeps `module.` and `_orig_mod.` prefixes out of checkpoints.
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod  # type: ignore[assignment]
        else:
            return model


def rng_state() -> dict[str, Any]:
    """This process's torch RNG states (CPU, and every CUDA device when CUDA is initialised)."""
    state: dict[str, Any] = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned."""
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
        else:
            log.warning(
                "checkpoint has %d CUDA RNG states, this machine %d devices: CUDA RNG not restored",
                len(cuda_states),
                torch.cuda.device_count(),
            )


def restore_rng(rng: dict[str, Any], rank: int, world_size: int) -> bool:
    """Restore this rank's RNG states from a checkpoint's `rng` entry; False if it has none for it.

    Multi-process checkpoints hold every rank's states under `per_rank` (ranks draw different dropout
    masks); the top-level states are rank 0's.
    """
    per_rank = rng.get("per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        set_rng_state(per_rank[rank])
        return True
    if world_size == 1:
        set_rng_state(rng)
        return True
    return False


def gather_rng_state(world_size: int) -> dict[str, Any]:
    """RNG states to checkpoint: this rank's, plus every rank's under `per_rank` when distributed.

    Every rank must call it (it is a collective when `world_size > 1`).
    """
    own = rng_state()
    if world_size == 1:
        return own
    from sscxr.engine.distributed import gather_objects  # deferred: keeps this module light to import

    return {**own, "per_rank": gather_objects(own)}


def resume_training(
    path: str | os.PathLike[str] | Mapping[str, Any],
    task: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    rank: int = 0,
    world_size: int = 1,
    global_batch: int = 1,
) -> dict[str, Any]:
    """Restore model, optimiser, scaler and this rank's RNG from `path`; return the saved progress.

    Args:
        path: the checkpoint file, or its content already read (`load_checkpoint`; in multi-process
            runs rank 0 reads it and sends it to every rank, whose own folders need not hold it).
        task, optimizer, scaler: built exactly as for the run that wrote it.
        rank, world_size: this process.
        global_batch: samples per optimiser step over all ranks now.

    Returns:
        The checkpoint's `state` dict (a TrainState as a dict), with `sample_in_epoch` and `world_size`
        translated to this run's number of processes.

    Raises:
        CheckpointError: unreadable file, one written for another model / optimiser layout, or a
            mid-epoch stop that is not a whole number of this run's global batches.
    """
    ckpt = load_checkpoint(path, map_location="cpu") if not isinstance(path, Mapping) else path
    path = ckpt.get("path", "the checkpoint") if isinstance(path, Mapping) else path
    try:
        unwrap(task).load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
    except (RuntimeError, ValueError, KeyError) as err:
        raise CheckpointError(
            f"{path}: does not match this model/optimiser ({err}); "
            "resume with the config that wrote it, or start fresh (--resume no)"
        ) from err
    if ckpt["scaler"] and scaler is not None and scaler.is_enabled():
        scaler.load_state_dict(ckpt["scaler"])
    if not restore_rng(ckpt["rng"], rank, world_size):
        log.warning("%s was written by another number of processes: RNG states not restored", path)
    state = dict(ckpt["state"])
    # sample_in_epoch counts one rank's shard. Rank r takes perm[r::N], so the first k samples of every
    # shard are the first k*N of the epoch's permutation: the global count carries over to a new N.
    consumed = int(state.get("sample_in_epoch", 0)) * int(state.get("world_size", 1))
    if consumed % global_batch:
        raise CheckpointError(
            f"{path}: stopped mid-epoch after {consumed} samples, not a whole number of global batches "
            f"of {global_batch}; resume with the same train.batch_size, train.accum_steps and processes"
        )
    state["sample_in_epoch"], state["world_size"] = consumed // world_size, world_size
    return state


def save_checkpoint(
    path: str | os.PathLike[str],
    task: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    scaler: torch.amp.GradScaler | None,
    state: Any,
    config: dict[str, Any],
    rng: dict[str, Any] | None = None,
) -> Path:
    """Write a training checkpoint atomically.

    Args:
        path: destination (`.../checkpoints/last.pt`).
        task: the task, possibly wrapped in DDP / torch.compile (unwrapped here).
        optimizer: its state dict is saved (None -> None).
        scaler: the GradScaler (None -> None).
        state: a dataclass (the trainer's TrainState) or a plain dict.
        config: the resolved run config as a plain dict.
        rng: RNG states to store; default: this process's (`rng_state()`).

    Returns:
        The path written.
    """
    path = Path(path)
    payload = {
        "model": unwrap(task).state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "state": dataclasses.asdict(state) if dataclasses.is_dataclass(state) else dict(state),
        "config": config,
        "rng": rng if rng is not None else rng_state(),
        "format_version": FORMAT_VERSION,
    }
    with atomic_open(path) as f:
        torch.save(payload, f)
    log.debug("checkpoint written: %s", path)
    return path


def copy_checkpoint(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
    """Copy a checkpoint file atomically (e.g. `last.pt` -> `best.pt`) without re-serialising it."""
    with open(src, "rb") as source, atomic_open(dst) as f:
        shutil.copyfileobj(source, f)


def load_checkpoint(path: str | os.PathLike[str], map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by `save_checkpoint`.

    Raises:
        CheckpointError: the file is missing, unreadable, not an sscxr training checkpoint, or of an
            unknown format version.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file; check the path or start without --resume")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises pickle, zip and runtime errors for foreign or broken files
        raise CheckpointError(
            f"{path}: cannot be read as a torch checkpoint ({type(err).__name__}: {err}); "
            "the file may be truncated or not a checkpoint: delete it or point to another one"
        ) from err
    if not isinstance(ckpt, dict) or "format_version" not in ckpt:
        raise CheckpointError(
            f"{path}: not an sscxr training checkpoint (no 'format_version'); to load pre-trained weights "
            "into a model use sscxr.models.loading.load_encoder_weights instead"
        )
    if ckpt["format_version"] != FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: checkpoint format version {ckpt['format_version']!r} is not supported "
            f"(this sscxr reads version {FORMAT_VERSION}); use the sscxr release that wrote it"
        )
    missing = [k for k in CHECKPOINT_KEYS if k not in ckpt]
    if missing:
        raise CheckpointError(f"{path}: checkpoint lacks {missing}; it is incomplete, use another one")
    return ckpt


def find_resume_checkpoint(run_dir: str | os.PathLike[str]) -> Path | None:
    """`run_dir/checkpoints/last.pt` if it exists, else None."""
    path = Path(run_dir) / "checkpoints" / "last.pt"
    return path if path.is_file() else None


def plain_config(obj: Any) -> Any:
    """Config values as YAML/torch-safe plain data (tuples -> lists, paths -> strings)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return plain_config(dataclasses.asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): plain_config(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [plain_config(v) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    return obj


def resolve_resume(run_dir: Path, resume: str | os.PathLike[str] | bool | None) -> Path | None:
    """The checkpoint `fit(resume=...)` asks for: "auto" -> last.pt if present, True -> last.pt (must
    exist), a path -> that path, False/None -> None (fresh start)."""
    if resume is False or resume is None:
        return None
    if resume is True or resume == "auto":
        found = find_resume_checkpoint(run_dir)
        if found is None and resume is True:
            raise CheckpointError(f"{run_dir / 'checkpoints' / 'last.pt'}: nothing to resume from")
        return found
    return Path(resume)


#: Config keys a resumed run may change: how long and how verbosely it runs, not what it trains.
CONTINUATION_KEYS = frozenset({
    "train.epochs", "train.min_steps", "train.max_steps", "train.log_every", "train.checkpoint_every",
    "train.val_every", "train.progress", "train.workers",
})  # fmt: skip


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, Mapping):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def check_run_folder(run_dir: Path, config: Mapping[str, Any], resume_from: Path | None) -> None:
    """Refuse to write a run into a folder that holds another run.

    Another run is a `config.yaml` that differs in anything but `CONTINUATION_KEYS` (resuming it
    would mix two experiments' weights, logs and exports), or a `metrics.jsonl` while this run starts
    fresh (its lines would be appended to the old run's).

    Args:
        run_dir: the run folder (`--out`).
        config: this run's plain config (as saved to config.yaml).
        resume_from: the checkpoint this run resumes from, None for a fresh start.

    Raises:
        CheckpointError: naming the differing keys and the two ways out (another --out, or --force).
    """
    import yaml

    problems = []
    old_path = run_dir / "config.yaml"
    if old_path.is_file():
        try:
            old = _flat(yaml.safe_load(old_path.read_text()) or {})
        except (yaml.YAMLError, UnicodeDecodeError, AttributeError):
            old = {}
        new = _flat(yaml.safe_load(yaml.safe_dump(dict(config), sort_keys=False)) or {})
        keys = (old.keys() | new.keys()) - CONTINUATION_KEYS
        diff = sorted(k for k in keys if old.get(k) != new.get(k))
        if diff:
            shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in diff[:4])
            more = f" and {len(diff) - 4} more" if len(diff) > 4 else ""
            problems.append(f"holds a run with another config ({shown}{more})")
    if resume_from is None and (run_dir / "metrics.jsonl").is_file():
        problems.append("holds another run's metrics.jsonl, and this run starts fresh")
    if problems:
        raise CheckpointError(
            f"{run_dir} {'; '.join(problems)}. Choose another --out, or pass --force to start over in "
            "it (its checkpoints and metrics.jsonl are removed)."
        )


def clear_run_folder(run_dir: Path) -> None:
    """--force: remove a previous run's checkpoints and logs (exports are replaced when this run ends)."""
    removed = [p.name for p in (run_dir / "checkpoints", run_dir / "metrics.jsonl") if p.exists()]
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    if removed:
        log.warning("--force: removed %s from %s", ", ".join(removed), run_dir)


def remove_stale_temp_files(run_dir: Path) -> int:
    """Delete the temporary files a killed run left beside its checkpoints (`atomic_open`'s
    `.NAME.XXXX.tmp`: a kill during a checkpoint write); returns how many. Only the main rank calls it,
    before any checkpoint of this run is written."""
    stale = sorted((run_dir / "checkpoints").glob(".*.tmp")) if (run_dir / "checkpoints").is_dir() else []
    for path in stale:
        path.unlink(missing_ok=True)
    if stale:
        log.info(
            "removed %d temporary file(s) left by an interrupted checkpoint write in %s", len(stale), run_dir
        )
    return len(stale)
