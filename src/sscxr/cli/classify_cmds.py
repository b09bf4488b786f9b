"""Classification subcommands: `finetune` (on the one engine, like `pretrain`)."""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import Any

import torch

from sscxr.cli.train_cmds import add_config_args, resume_arg
from sscxr.config import config_to_dict, load_config
from sscxr.engine.distributed import cleanup, init_distributed
from sscxr.engine.logging import setup_logging
from sscxr.engine.trainer import FitResult, fit

log = logging.getLogger(__name__)

DEFAULT_CONFIG = "classify/vit_s16"


def command_line(args: argparse.Namespace) -> str:
    """The `sscxr finetune` command that reproduces this run (whoever called `run_finetune`)."""
    parts = ["sscxr", "finetune"]
    for c in args.config or [DEFAULT_CONFIG]:
        parts += ["-c", str(c)]
    parts += [*map(str, args.overrides), "--out", str(args.out)]
    return shlex.join(parts)


def run_finetune(args: argparse.Namespace) -> FitResult:
    """`sscxr finetune`: fine-tune a ViT classifier on a prepared cache (one or many processes).

    Args:
        args: `config` (list of configs or None), `overrides`, `out`, `resume`, `device`, `verbose`.

    Returns:
        The engine's FitResult; `args.out` then holds `model.safetensors` + `model.json` (best
        validation weights), `metrics.jsonl`, `config.yaml` and `checkpoints/`.
    """
    from sscxr.tasks.classification import FinetuneConfig, build_finetuning

    cfg = load_config(FinetuneConfig, args.config or [DEFAULT_CONFIG], args.overrides)
    dist = init_distributed(args.device)
    setup_logging(dist.rank, logging.DEBUG if getattr(args, "verbose", False) else logging.INFO)
    # timm initialises new layers from torch's global RNG: the CLI seeds it once (style guide).
    torch.manual_seed(cfg.train.seed + dist.rank)
    try:
        task, train_set, val_set = build_finetuning(cfg, seed=cfg.train.seed, command=command_line(args))
        info = task.export_info
        log.info(
            "fine-tuning %r (%s) on %d images (%d for validation); init %s; left out %s",
            task.label_task.name, ", ".join(task.label_task.class_names), len(train_set),
            len(val_set or []), info["init"]["mode"], info["excluded"],
        )  # fmt: skip
        cfg_dict: dict[str, Any] = config_to_dict(cfg)
        return fit(task, train_set, val_set, cfg.train, cfg.optim, args.out, dist, cfg_dict,
                   resume=resume_arg(args.resume))  # fmt: skip
    finally:
        cleanup()


def _finetune(args: argparse.Namespace) -> int:
    result = run_finetune(args)
    best = "n/a" if result.best_metric is None else f"{result.best_metric:.4f}"
    print(f"done: {result.state.step} steps; best validation metric {best}; "
          f"classifier {Path(args.out) / 'model.safetensors'} (+ model.json)")  # fmt: skip
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `finetune` subcommand."""
    p = sub.add_parser(
        "finetune",
        help="fine-tune a ViT classifier (scratch / GMML / timm start) on a prepared cache",
        description=(
            "Classification fine-tuning on the same engine as pre-training; the best checkpoint is chosen "
            "on the validation split. Example: sscxr finetune -c classify/vit_s16 data.cache=cache "
            "classify.task=covid_vs_noncovid classify.init=sscxr classify.init_path=runs/gmml "
            "--out runs/cls_sscxr"
        ),
    )
    add_config_args(p, DEFAULT_CONFIG)
    p.set_defaults(func=_finetune)
