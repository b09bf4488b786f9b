"""Training subcommands: `pretrain` (and the later fine-tuning commands) on the one engine.

Heavy modules (torch, the config loader, the engine) are imported inside the functions that run a
command, so building the parser (`sscxr --help`) stays fast.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from sscxr.engine.config import OptimConfig, TrainConfig
    from sscxr.engine.distributed import DistInfo
    from sscxr.engine.trainer import FitResult
    from sscxr.tasks.base import Task

    #: What a task builder returns: the task, its training set and its validation set (or None).
    Built = tuple[Task, Dataset[Any], Dataset[Any] | None]

log = logging.getLogger(__name__)


class TrainingConfig(Protocol):
    """The sections of a command's config that the engine reads (every training config has them)."""

    train: TrainConfig
    optim: OptimConfig


C = TypeVar("C", bound=TrainingConfig)


def add_config_args(p: argparse.ArgumentParser, default_config: str | None) -> None:
    """The options every training command shares: configs, overrides, run folder, resume."""
    p.add_argument(
        "-c",
        "--config",
        action="append",
        default=None,
        help=f"YAML config file or built-in name, repeatable (default: {default_config})",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.blr=1e-3")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, pictures)")
    p.add_argument(
        "--resume",
        default="auto",
        help="'auto' (resume from OUT/checkpoints/last.pt if present), a checkpoint path, or 'no'",
    )
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument(
        "--force",
        action="store_true",
        help="start over in an --out that holds another run (its checkpoints and metrics.jsonl are removed)",
    )


def seed_process(seed: int, rank: int) -> None:
    """The one place the global RNGs are seeded: model initialisation, dropout and drop-path draw from them.

    Rank r uses `seed + r` so stochastic layers differ between processes; DDP broadcasts rank 0's
    initial weights, so every rank (and a single process) starts from the same model.
    """
    import torch

    torch.manual_seed(seed + rank)


def resume_arg(value: str) -> str | bool:
    """Map the --resume option onto the engine's `resume` argument."""
    return False if value in ("no", "none", "false") else value


def run_training(
    args: argparse.Namespace, config_cls: type[C], default_config: str, build: Callable[[C, DistInfo], Built]
) -> FitResult:
    """What every training command does: config -> processes -> logging -> seeds -> build -> fit.

    Args:
        args: `config` (list of configs or None), `overrides`, `out`, `resume`, `device`, `verbose`.
        config_cls: the command's config dataclass.
        default_config: the built-in config used when no `-c` is given.
        build: makes (task, train_set, val_set) from the resolved config and where the process runs;
            it runs after seeding.

    Returns:
        The engine's FitResult.
    """
    from sscxr.config import config_to_dict, load_config
    from sscxr.engine.distributed import cleanup, init_distributed
    from sscxr.engine.logging import setup_logging
    from sscxr.engine.trainer import fit

    cfg = load_config(config_cls, args.config or [default_config], args.overrides)
    dist = init_distributed(args.device)
    setup_logging(dist.rank, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    # timm and MONAI initialise new layers from torch's global RNG: seed it before building the task.
    seed_process(cfg.train.seed, dist.rank)
    try:
        task, train_set, val_set = build(cfg, dist)
        cfg_dict: dict[str, Any] = config_to_dict(cfg)
        return fit(
            task,
            train_set,
            val_set,
            cfg.train,
            cfg.optim,
            args.out,
            dist,
            cfg_dict,
            resume=resume_arg(args.resume),
            force=getattr(args, "force", False),
        )
    finally:
        cleanup()


def run_pretrain(args: argparse.Namespace) -> FitResult:
    """`sscxr pretrain`: self-supervised pre-training (GMML, MAE, ...: `method`) on a prepared cache, in
    one or many processes. Without `-c`, the method named by a `method=...` override (else GMML) brings
    its own built-in config."""
    from sscxr.config import PretrainConfig
    from sscxr.tasks.methods import pretrain_method

    def build(cfg: PretrainConfig, dist: DistInfo) -> Built:
        method = pretrain_method(cfg.method)
        task, train_set, val_set = method.build(cfg, seed=cfg.train.seed, device=dist.device)
        log.info(
            "%s pre-training on %d images (%d for validation)",
            method.name, len(train_set), len(val_set or []),
        )  # fmt: skip
        return task, train_set, val_set

    named = [o.split("=", 1)[1] for o in args.overrides if o.startswith("method=")]
    default = pretrain_method(named[-1] if named else "gmml").default_config
    return run_training(args, PretrainConfig, default, build)


def _pretrain(args: argparse.Namespace) -> int:
    result = run_pretrain(args)
    log.info(
        "done: %d steps; encoder exported to %s", result.state.step, Path(args.out) / "encoder.safetensors"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the training subcommands."""
    p = sub.add_parser(
        "pretrain",
        help="self-supervised pre-training of a ViT on a prepared cache (GMML; MAE with method=mae)",
        description="Self-supervised pre-training: GMML (default) or MAE (method=mae, or "
        "-c pretrain/mae_vit_s16). Launch with torchrun for several processes/GPUs.",
    )
    add_config_args(p, "pretrain/gmml_vit_s16")
    p.set_defaults(func=_pretrain)
