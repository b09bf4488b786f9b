"""Evaluation subcommands: `evaluate` (models x test sets -> report) and `report` (rebuild / combine).

The evaluation and report modules are imported inside the functions that run a command, so building
the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING

from sscxr.cli.argtypes import int_at_least
from sscxr.errors import ConfigError

if TYPE_CHECKING:
    from sscxr.evaluation import ModelSpec
    from sscxr.reports.classification import ReportFiles

log = logging.getLogger(__name__)


def named(text: str) -> tuple[str, str]:
    """Parse ``NAME=VALUE`` (argparse type of --model / --test)."""
    name, sep, value = text.partition("=")
    if not sep or not name.strip() or not value.strip():
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=VALUE, e.g. ss-cxr=runs/ft_sscxr")
    return name.strip(), value.strip()


def command_line(args: argparse.Namespace) -> str:
    """The `sscxr evaluate` command that reproduces this evaluation."""
    parts = ["sscxr", "evaluate"]
    for flag, pairs in (("--model", args.model), ("--test", args.test)):
        for name, value in pairs:
            parts += [flag, f"{name}={value}"]
    if args.val:
        parts += ["--val", args.val]
    parts += ["--threshold", args.threshold, "--n-boot", str(args.n_boot), "--seed", str(args.seed)]
    return shlex.join([*parts, "--out", str(args.out)])


def load_models(pairs: list[tuple[str, str]], device: str) -> list[ModelSpec]:
    """Load each fine-tuned run (model.safetensors + model.json) with its config.yaml, if any."""
    from sscxr.evaluation import ModelSpec
    from sscxr.evaluation.predict import resolve_device
    from sscxr.models.classifier import load_classifier

    specs = []
    for name, path in pairs:
        model, meta = load_classifier(path, device=resolve_device(device))
        run_dir = Path(path) if Path(path).is_dir() else Path(path).parent
        cfg = run_dir / "config.yaml"
        specs.append(ModelSpec(name, model, meta, run_dir, cfg.read_text() if cfg.is_file() else None))
    return specs


def _print_files(files: ReportFiles) -> None:
    print(f"report: {files.markdown}\n        {files.html}\nmetrics: {files.csv}\n         {files.json}")


def _evaluate(args: argparse.Namespace) -> int:
    from sscxr.evaluation import EvalOptions, TestSpec, evaluate_models, parse_split_spec, parse_threshold
    from sscxr.reports.classification import write_report

    if not args.test:
        raise ConfigError("give at least one --test NAME=CACHE_DIR:SPLIT")
    opts = EvalOptions(
        parse_threshold(args.threshold),
        args.n_boot,
        seed=args.seed,
        batch_size=args.batch_size,
        device=args.device,
        precision=args.precision,
        allow_leakage=args.allow_leakage,
    )
    tests = [TestSpec(name, parse_split_spec(spec)) for name, spec in args.test]
    val = parse_split_spec(args.val) if args.val else None
    doc = evaluate_models(
        load_models(args.model, args.device), tests, val, opts, args.out, command_line(args), args.run_name
    )
    _print_files(write_report(doc, args.out))
    return 0


def _report(args: argparse.Namespace) -> int:
    from sscxr.reports.classification import load_evaluations, write_report

    _print_files(write_report(load_evaluations(args.inputs), args.out, figures=not args.no_figures))
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `evaluate` and `report` subcommands."""
    p = sub.add_parser(
        "evaluate",
        help="evaluate fine-tuned classifiers on named test sets; write a report",
        description="Every --model on every --test; thresholds frozen on --val first.",
    )
    p.add_argument(
        "--model",
        action="append",
        type=named,
        required=True,
        metavar="NAME=RUN_DIR",
        help="a fine-tuning run folder (model.safetensors + model.json), repeatable",
    )
    p.add_argument(
        "--test",
        action="append",
        type=named,
        default=[],
        metavar="NAME=CACHE_DIR:SPLIT",
        help="a named test set, e.g. 'unseen sites=cache/x:test_site' (split '*' or 'all' = all rows)",
    )
    p.add_argument("--val", metavar="CACHE_DIR:SPLIT", help="validation split the threshold is chosen on")
    p.add_argument(
        "--allow-leakage",
        action="store_true",
        help="evaluate even when a patient is in two splits of a test cache (flagged in the report)",
    )
    p.add_argument(
        "--threshold",
        default="default",
        help="default (the model's, 0.5) | a number | youden | sensitivity:0.95 (binary tasks)",
    )
    p.add_argument(
        "--n-boot", type=int_at_least(0), default=1000, help="bootstrap resamples of patients (0: no CIs)"
    )
    p.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"))
    p.add_argument("--run-name", help="name of this evaluation in cross-run summaries (default: OUT's name)")
    p.add_argument("--out", required=True, type=Path, help="report folder")
    p.set_defaults(func=_evaluate)
    r = sub.add_parser(
        "report",
        help="rebuild / combine reports from saved metrics.json files",
        description="One report (with a Table 6-style summary) from several evaluations.",
    )
    r.add_argument("inputs", nargs="+", help="metrics.json files or report folders of `sscxr evaluate`")
    r.add_argument("--out", required=True, type=Path, help="report folder")
    r.add_argument("--no-figures", action="store_true", help="tables only (quick summaries of many runs)")
    r.set_defaults(func=_report)
