"""`sscxr study`: run a whole comparison from a YAML file (resumable), then write one report.

Heavy modules are imported inside the run function, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from sscxr.cli.argtypes import int_at_least

log = logging.getLogger(__name__)


def _study(args: argparse.Namespace) -> int:
    import yaml

    from sscxr.config import load_yaml
    from sscxr.errors import ConfigError
    from sscxr.reports.study import write_study_report
    from sscxr.study.results import collect
    from sscxr.study.run import plan, run_steps, write_commands
    from sscxr.study.spec import load_study, resolve_study_path
    from sscxr.utils import atomic_write_text

    overrides = {}
    for item in args.set:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} is not KEY=VALUE (e.g. --set 'seeds=[0,1]')")
        overrides[key] = load_yaml(raw)
    spec = load_study(args.study, overrides)
    out = Path(args.out or f"runs/study_{spec.name}")
    text = resolve_study_path(args.study).read_text()
    saved = out / "study.yaml"
    if saved.exists() and load_yaml(saved.read_text()) != {**(load_yaml(text) or {}), **overrides}:
        raise ConfigError(
            f"{out} holds the results of another study ({saved} differs from {args.study}): results of "
            "different studies must not be mixed; choose another --out, or delete that folder"
        )
    out.mkdir(parents=True, exist_ok=True)
    if not saved.exists():
        header = f"# sscxr study {args.study}" + "".join(f" --set {s!r}" for s in args.set) + "\n"
        body = (
            text
            if not overrides
            else yaml.safe_dump({**(load_yaml(text) or {}), **overrides}, sort_keys=False)
        )
        atomic_write_text(saved, header + body)
    steps = plan(spec, out)
    write_commands(steps, out / "commands.sh")
    t0 = time.perf_counter()
    if args.pretrain_only:
        steps = [s for s in steps if s.title.startswith(("data", "pre-training"))]
    from sscxr.cli import main as sscxr_main  # each step is an ordinary `sscxr` command, run in-process

    timings = {} if args.report_only else run_steps(steps, sscxr_main, dry_run=args.dry_run)
    if args.dry_run or args.pretrain_only:
        return 0
    print("\n== report ==", flush=True)
    results = collect(spec, out, n_boot=args.n_boot)
    report = write_study_report(spec, results, out, (out / "commands.sh").read_text(), timings)
    others = f"{report.html.name}, {report.json.name}, {report.csv.name}"
    print(f"study {spec.name}: {time.perf_counter() - t0:.0f} s; report {report.markdown} (+ {others})")
    _print_headline(results)
    return 0


def _print_headline(results) -> None:  # type: ignore[no-untyped-def]
    from sscxr.reports.study import fmt_estimate

    for cell in results.cells:
        if cell.comparison is None:
            continue
        print(
            f"\n{cell.task}, {cell.fraction:.0%} labels, {cell.test} (draws {list(cell.comparison.seeds)}):"
        )
        for r, rr in sorted(cell.comparison.rows.items(), key=lambda kv: -kv[1].metrics["auc_roc"].mean):
            print(f"  {r:<28} AUC-ROC {fmt_estimate(rr.metrics['auc_roc'])}")


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `study` subcommand."""
    p = sub.add_parser(
        "study",
        help="run a whole comparison (pre-training, probes, fine-tuning, evaluation) and write its report",
        description=(
            "Runs every step a study YAML needs that is not done yet (each an ordinary sscxr command, "
            "printed before it runs), then writes one report: the reference rows (raw pixels, random "
            "encoder), the probes and the fine-tunings at every label fraction, with intervals over "
            "labelled-subset draws and test patients, and paired differences. Built-in studies: demo, "
            "kermany. Example: sscxr study kermany --out runs/study_kermany"
        ),
    )
    p.add_argument("study", help="a study YAML file, or a built-in study name (demo, kermany)")
    p.add_argument("--out", type=Path, help="output folder (default runs/study_NAME)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="replace a top-level key of the study, e.g. --set 'seeds=[0,1]'")  # fmt: skip
    p.add_argument("--dry-run", action="store_true", help="print the steps that would run, run nothing")
    p.add_argument("--report-only", action="store_true", help="only (re)write the report from what is done")
    p.add_argument("--pretrain-only", action="store_true", help="stop after the data and pre-training steps")
    p.add_argument(
        "--n-boot", type=int_at_least(0), default=None, help="bootstrap resamples (default: the study's)"
    )
    p.set_defaults(func=_study)
