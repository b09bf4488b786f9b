"""Training subcommands: `pretrain` (and the later fine-tuning commands) on the one engine."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

import torch

from sscxr.config import PretrainConfig, config_to_dict, load_config
from sscxr.engine.distributed import cleanup, init_distributed
from sscxr.engine.logging import setup_logging
from sscxr.engine.trainer import FitResult, fit

log = logging.getLogger(__name__)


def add_config_args(p: argparse.ArgumentParser, default_config: str | None) -> None:
    """The options every training command shares: configs, overrides, run folder, resume."""
    p.add_argument(
        "-c", "--config", action="append", default=None,
        help=f"YAML config file or built-in name, repeatable (default: {default_config})",
    )
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.epochs=5 optim.blr=1e-3")
    p.add_argument("--out", required=True, type=Path, help="run folder (checkpoints, logs, pictures)")
    p.add_argument("--resume", default="auto",
                   help="'auto' (resume from OUT/checkpoints/last.pt if present), a checkpoint path, or 'no'")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")


def seed_process(seed: int, rank: int) -> None:
    """The one place the global RNGs are seeded: model initialisation, dropout and drop-path draw from them.

    Rank r uses `seed + r` so stochastic layers differ between processes; DDP broadcasts rank 0's
    initial weights, so every rank (and a single process) starts from the same model.
    """
    torch.manual_seed(seed + rank)


def resume_arg(value: str) -> str | bool:
    """Map the --resume option onto the engine's `resume` argument."""
    return False if value in ("no", "none", "false") else value


def run_pretrain(args: argparse.Namespace) -> FitResult:
    """`sscxr pretrain`: GMML pre-training on a prepared cache (one or many processes)."""
    from sscxr.tasks.gmml import build_pretraining

    cfg = load_config(PretrainConfig, args.config or ["pretrain/gmml_vit_s16"], args.overrides)
    dist = init_distributed(args.device)
    setup_logging(dist.rank, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    seed_process(cfg.train.seed, dist.rank)
    try:
        task, train_set, val_set = build_pretraining(cfg, seed=cfg.train.seed)
        log.info("pre-training on %d images (%d for validation)", len(train_set), len(val_set or []))
        cfg_dict: dict[str, Any] = config_to_dict(cfg)
        return fit(task, train_set, val_set, cfg.train, cfg.optim, args.out, dist, cfg_dict,
                   resume=resume_arg(args.resume))
    finally:
        cleanup()


def _pretrain(args: argparse.Namespace) -> int:
    result = run_pretrain(args)
    log.info("done: %d steps; encoder exported to %s", result.state.step, Path(args.out) / "encoder.safetensors")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the training subcommands."""
    p = sub.add_parser("pretrain", help="GMML self-supervised pre-training of a ViT on a prepared cache",
                       description="GMML pre-training. Launch with torchrun for several processes/GPUs.")
    add_config_args(p, "pretrain/gmml_vit_s16")
    p.set_defaults(func=_pretrain)
