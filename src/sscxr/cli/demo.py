"""`sscxr demo`: the main job on the built-in synthetic cohort, end to end, on a laptop CPU.

The demo is the built-in study `demo` (`sscxr study`, `studies/demo.yaml`) with this command's options
applied, then lung segmentation. Every stage is an ordinary `sscxr` command (printed before it runs, so
it can be repeated by hand) and writes into its own folder under `--out`; the study and the training
stages resume, so an interrupted demo continues where it stopped.

Stages: synthetic cohort -> cache -> GMML pre-training -> probes (raw pixels, random encoder, frozen
GMML encoder) and classifiers fine-tuned on a small labelled subset from scratch and from the GMML
encoder (SS-CXR), five draws of the subset, evaluated on the training distribution, an unseen site and
the pediatric subset -> the study report -> lung segmenters (scratch, SS-CXR) -> segmentation report.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path
from typing import Any

from sscxr.cli.argtypes import int_at_least
from sscxr.errors import SSCXRError

# Encoder starts of the segmentation stage (the study has its own): name -> fine-tuning overrides
# (pre-training folder substituted for {pre}). SS-IN (ImageNet weights) needs a file the user
# downloaded: see the README.
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


def _training(args: argparse.Namespace, seed: bool = True) -> list[str]:
    """Overrides the training stages share: the seed (not for fine-tuning, whose seed is each draw's) and
    the optional epochs / batch size."""
    common = [f"train.seed={args.seed}"] if seed else []
    if args.epochs is not None:
        common.append(f"train.epochs={args.epochs}")
    if args.batch_size is not None:
        common.append(f"train.batch_size={args.batch_size}")
    return common


def demo_study(args: argparse.Namespace) -> dict[str, Any]:
    """The built-in `demo` study with this command's options applied (as a YAML-ready dict)."""
    from sscxr.config import load_yaml
    from sscxr.study.spec import resolve_study_path

    study = load_yaml(resolve_study_path("demo").read_text())
    # options left unset keep the study's values (studies/demo.yaml is the one place they are set)
    synth = study["data"]["synth"]
    given = {"n_adult": args.n_adult, "n_pediatric": args.n_pediatric, "size": args.synth_size}
    synth.update({k: v for k, v in given.items() if v is not None}, seed=args.seed)
    study["data"]["size"] = args.size
    gmml = study["pretrain"]["gmml"]
    gmml["config"] = args.config
    gmml["overrides"] = [*gmml.get("overrides", []), *_training(args), *args.overrides]
    ft = study["finetune"]
    extra = _training(args, seed=False)
    if args.min_steps is not None:
        extra.append(f"train.min_steps={args.min_steps}")
    ft["overrides"] = [*ft.get("overrides", []), *extra]
    if args.task is not None:
        study["tasks"] = [args.task]
    if args.labelled_fraction is not None:
        study["fractions"] = [args.labelled_fraction]
    if args.seeds is not None:
        study["seeds"] = list(range(args.seeds))
    study["n_boot"] = args.n_boot
    return study


def _segmentation(args: argparse.Namespace, out: Path, cache: Path) -> None:
    runs, steps, models = out / "segment", [], []
    for name, start in STARTS.items():
        init = [o.format(key="seg", pre=out / "pretrain" / "gmml") for o in start]
        cfg = ["-c", "segment/tiny", f"data.cache={cache}", f"model.img_size={args.size}"]
        steps.append(["segment", "train", *cfg, *_training(args), *init, "--out", str(runs / name)])
        models += ["--model", f"{name}={runs / name}"]
    steps.append([
        "segment", "evaluate", *models, "--test", f"training distribution={cache}:test",
        "--test", f"unseen site={cache}:test_site", "--postprocess", "--n-boot", str(args.n_boot),
        "--out", str(out / "report_segmentation"),
    ])  # fmt: skip
    _stage("2. lung segmentation (UNETR)", steps)


def run_demo(args: argparse.Namespace) -> int:
    """The whole main job; returns 0 when every stage succeeded."""
    import yaml

    from sscxr.utils import atomic_write_text

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    study_file = out / "demo_study.yaml"
    text = "# `sscxr demo`'s study: the built-in studies/demo.yaml with the demo's options\n"
    text += yaml.safe_dump(demo_study(args), sort_keys=False)
    if not study_file.exists() or study_file.read_text() != text:
        atomic_write_text(study_file, text)
    study = ["study", str(study_file), "--out", str(out)]
    if args.pretrain_only:
        study.append("--pretrain-only")
    _stage("1. the study: cohort, cache, GMML pre-training, probes, fine-tuning, report", [study])
    if not args.pretrain_only:
        _segmentation(args, out, out / "data" / "cache")
    print(
        f"\ndone. Contact sheet: {out / 'data' / 'cohort' / 'contact_sheet.png'}; "
        f"reconstructions: {out / 'pretrain' / 'gmml' / 'recon'}"
    )
    if not args.pretrain_only:
        print(f"reports: {out / 'report.html'}, {out / 'report_segmentation' / 'report.html'}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `demo` subcommand."""
    p = sub.add_parser("demo", help="run the main job end to end on the built-in synthetic cohort")
    p.add_argument("--out", type=Path, default=Path("runs/demo"))
    p.add_argument("-c", "--config", default="tiny", help="pre-training config (default: tiny)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for pre-training")
    p.add_argument("--n-adult", type=int, default=None, help="adult images (default: the study's)")
    p.add_argument("--n-pediatric", type=int, default=None, help="pediatric images (default: the study's)")
    p.add_argument("--synth-size", type=int, default=None, help="size of the generated PNGs (default: 256)")
    p.add_argument("--size", type=int, default=128, help="cache/model image size")
    p.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs of every training stage (default: each config's; 1 = a quick smoke run)",
    )
    p.add_argument(
        "--batch-size", type=int_at_least(1), default=None, help="batch size of every training stage"
    )
    p.add_argument(
        "--min-steps", type=int, default=None, help="fine-tuning step floor (default: the config's)"
    )
    p.add_argument(
        "--seeds", type=int_at_least(1), default=None, help="labelled-subset draws (default: the study's 5)"
    )
    p.add_argument("--task", default=None, help="classification task (default: pneumonia_vs_healthy)")
    p.add_argument("--labelled-fraction", type=float, default=None, help="labelled share (default 0.3)")
    p.add_argument(
        "--n-boot", type=int_at_least(0), default=500, help="bootstrap resamples for the intervals"
    )
    p.add_argument("--pretrain-only", action="store_true", help="stop after pre-training")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=run_demo)
