"""Classification subcommands: `finetune` (on the one engine, like `pretrain`).

Heavy modules are imported inside `run_finetune`, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from sscxr.cli.train_cmds import add_config_args, run_training

if TYPE_CHECKING:
    from sscxr.cli.train_cmds import Built
    from sscxr.engine.distributed import DistInfo
    from sscxr.engine.trainer import FitResult

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

    def build(cfg: FinetuneConfig, _dist: DistInfo) -> Built:
        task, train_set, val_set = build_finetuning(cfg, seed=cfg.train.seed, command=command_line(args))
        info = task.export_info
        log.info(
            "fine-tuning %r (%s) on %d images (%d for validation); init %s; left out %s",
            task.label_task.name, ", ".join(task.label_task.class_names), len(train_set),
            len(val_set or []), info["init"]["mode"], info["excluded"],
        )  # fmt: skip
        return task, train_set, val_set

    return run_training(args, FinetuneConfig, DEFAULT_CONFIG, build)


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
