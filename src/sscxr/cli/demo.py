"""`sscxr demo`: the main job on the built-in synthetic cohort, end to end, on a laptop CPU.

Each stage writes into its own folder under `--out` and is skipped when its output is already complete,
so an interrupted demo resumes where it stopped.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

log = logging.getLogger(__name__)


def _stage(name: str) -> float:
    print(f"\n== {name} ==", flush=True)
    return time.perf_counter()


def _done(t0: float) -> None:
    print(f"   ({time.perf_counter() - t0:.0f} s)", flush=True)


def run_demo(args: argparse.Namespace) -> int:
    """Synthetic cohort -> cache -> GMML pre-training (-> fine-tuning and reports, see later stages)."""
    from sscxr.cli.train_cmds import run_pretrain
    from sscxr.data.cache import prepare
    from sscxr.data.synth import SynthConfig, generate_cohort

    out = Path(args.out)
    t0 = _stage("1. synthetic cohort")
    cfg = SynthConfig(n_adult=args.n_adult, n_pediatric=args.n_pediatric, size=args.synth_size, seed=args.seed)
    manifest = generate_cohort(cfg, out / "cohort")
    print(f"   manifest {manifest}; contact sheet {out / 'cohort' / 'contact_sheet.png'}")
    _done(t0)

    t0 = _stage("2. image cache")
    report = prepare(manifest, out / "cache", size=args.size)
    print(f"   {report.n_done} images ready at {args.size} px in {out / 'cache'} ({report.n_failed} failed)")
    _done(t0)

    t0 = _stage("3. GMML pre-training")
    overrides = [f"data.cache={out / 'cache'}", f"model.img_size={args.size}", f"train.seed={args.seed}"]
    if args.epochs is not None:
        overrides.append(f"train.epochs={args.epochs}")
    pre_args = argparse.Namespace(
        config=[args.config], overrides=overrides + list(args.overrides), out=out / "pretrain",
        resume="auto", device=args.device, verbose=False,
    )
    result = run_pretrain(pre_args)
    print(f"   {result.state.step} steps; reconstructions in {out / 'pretrain' / 'recon'}; "
          f"encoder {out / 'pretrain' / 'encoder.safetensors'}")
    _done(t0)
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
    p.add_argument("--epochs", type=int, default=None, help="pre-training epochs (default: the config's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=run_demo)
