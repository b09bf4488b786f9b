"""`sscxr demo`: the main job on the built-in synthetic cohort, end to end, on a laptop CPU.

Every stage is an ordinary `sscxr` command (printed before it runs, so it can be repeated by hand) and
writes into its own folder under `--out`. Training stages resume from their run folder, so an
interrupted demo continues where it stopped.

Stages: synthetic cohort -> cache -> GMML pre-training (shared) -> classifiers fine-tuned on a small
labelled subset from scratch and from the GMML encoder (SS-CXR) -> evaluation on the training
distribution, an unseen site and the pediatric subset -> lung segmenters (scratch, SS-CXR) -> reports.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

from sscxr.errors import SSCXRError

# Encoder starts compared, as the paper's rows: name -> extra fine-tuning overrides (pre-training folder
# substituted for {pre}). SS-IN (ImageNet weights) needs a file the user downloaded: see the README.
STARTS = {"scratch": ["{key}.init=scratch"], "ss-cxr": ["{key}.init=sscxr", "{key}.init_path={pre}"]}


def _run(argv: list[str]) -> None:
    """Run one `sscxr` command in this process; raise if it fails."""
    from sscxr.cli import main

    print("   $ sscxr " + " ".join(shlex.quote(a) for a in argv), flush=True)
    code = main(argv)
    if code:
        raise SSCXRError(
            f"demo stage failed: sscxr {argv[0]} exited with {code} (fix it, then re-run the demo)"
        )


def _stage(title: str, steps: list[list[str]]) -> None:
    print(f"\n== {title} ==", flush=True)
    t0 = time.perf_counter()
    for argv in steps:
        _run(argv)
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def _common(args: argparse.Namespace, cache: Path) -> list[str]:
    """Overrides every training stage shares: the cache, its image size, the seed, optional epochs/batch."""
    common = [f"data.cache={cache}", f"model.img_size={args.size}", f"train.seed={args.seed}"]
    if args.epochs is not None:
        common.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        common.append(f"train.batch_size={args.batch_size}")
    return common


def _fine_tunings(
    command: list[str], key: str, extra: list[str], args: argparse.Namespace, out: Path, runs: Path
) -> tuple[list[list[str]], list[str]]:
    """One training command per encoder start, and the `--model NAME=RUN` arguments that evaluate them.

    Args:
        command: the subcommand and its config (e.g. `["finetune", "-c", "classify/tiny"]`).
        key: the config section holding `init` / `init_path` (`classify`, `seg`).
        extra: overrides of this stage besides the shared ones.
    """
    cache = out / "cache"
    steps = [
        [*command, *_common(args, cache), *extra, *(o.format(key=key, pre=out / "pretrain") for o in start),
         "--out", str(runs / name)]
        for name, start in STARTS.items()
    ]  # fmt: skip
    models = [a for name in STARTS for a in ("--model", f"{name}={runs / name}")]
    return steps, models


def _classification(args: argparse.Namespace, out: Path, cache: Path) -> None:
    task = [f"classify.task={args.task}", f"classify.labelled_fraction={args.labelled_fraction}"]
    steps, models = _fine_tunings(
        ["finetune", "-c", "classify/tiny"], "classify", task, args, out, out / "classify"
    )
    tests = [
        "--test",
        f"training distribution={cache}:test",
        "--test",
        f"unseen site={cache}:test_site",
        "--test",
        f"pediatric={cache}:test_pediatric",
    ]
    steps.append(
        [
            "evaluate",
            *models,
            *tests,
            "--val",
            f"{cache}:val",
            "--threshold",
            "youden",
            "--n-boot",
            str(args.n_boot),
            "--out",
            str(out / "report_classification"),
        ]
    )
    _stage(f"4. classification ({args.task}, {args.labelled_fraction:.0%} of the labels)", steps)


def _segmentation(args: argparse.Namespace, out: Path, cache: Path) -> None:
    steps, models = _fine_tunings(
        ["segment", "train", "-c", "segment/tiny"], "seg", [], args, out, out / "segment"
    )
    steps.append(
        [
            "segment",
            "evaluate",
            *models,
            "--test",
            f"training distribution={cache}:test",
            "--test",
            f"unseen site={cache}:test_site",
            "--postprocess",
            "--n-boot",
            str(args.n_boot),
            "--out",
            str(out / "report_segmentation"),
        ]
    )
    _stage("5. lung segmentation (UNETR)", steps)


def run_demo(args: argparse.Namespace) -> int:
    """The whole main job; returns 0 when every stage succeeded."""
    out = Path(args.out)
    cohort, cache = out / "cohort", out / "cache"
    _stage(
        "1. synthetic cohort",
        [
            [
                "synth",
                "--out",
                str(cohort),
                "--n-adult",
                str(args.n_adult),
                "--n-pediatric",
                str(args.n_pediatric),
                "--size",
                str(args.synth_size),
                "--seed",
                str(args.seed),
            ]
        ],
    )
    _stage(
        "2. image cache",
        [["prepare", str(cohort / "manifest.csv"), "--out", str(cache), "--size", str(args.size)]],
    )
    pre = [
        "pretrain",
        "-c",
        args.config,
        *_common(args, cache),
        *args.overrides,
        "--out",
        str(out / "pretrain"),
    ]
    _stage("3. GMML pre-training", [pre])
    if not args.pretrain_only:
        _classification(args, out, cache)
        _segmentation(args, out, cache)
    print(
        f"\ndone. Contact sheet: {cohort / 'contact_sheet.png'}; "
        f"reconstructions: {out / 'pretrain' / 'recon'}"
    )
    if not args.pretrain_only:
        print(
            f"reports: {out / 'report_classification' / 'report.html'}, "
            f"{out / 'report_segmentation' / 'report.html'}"
        )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `demo` subcommand."""
    p = sub.add_parser("demo", help="run the main job end to end on the built-in synthetic cohort")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("-c", "--config", default="tiny", help="pre-training config (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for pre-training")
    p.add_argument("--n-adult", type=int, default=600)
    p.add_argument("--n-pediatric", type=int, default=90)
    p.add_argument("--synth-size", type=int, default=256, help="size of the generated PNGs")
    p.add_argument("--size", type=int, default=128, help="cache/model image size")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every training stage (default: each config's; 1 = a quick smoke run)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="batch size of every training stage")
    p.add_argument("--task", default="healthy_vs_pathology", help="classification task")
    p.add_argument("--labelled-fraction", type=float, default=0.3, help="share of training patients labelled")
    p.add_argument("--n-boot", type=int, default=500, help="bootstrap resamples for the intervals")
    p.add_argument("--pretrain-only", action="store_true", help="stop after pre-training")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)
