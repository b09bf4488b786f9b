"""`sscxr probe`: frozen-encoder linear / k-NN probes over labelled fractions and subset seeds.

The probe and model modules are imported inside `run_probe_command`, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import shlex
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sscxr.cli.argtypes import int_at_least
from sscxr.cli.evaluate_cmds import named
from sscxr.errors import ConfigError

if TYPE_CHECKING:
    from sscxr.data.cache import ImageCache
    from sscxr.evaluation.probe import FeatureSource, ProbeOptions

log = logging.getLogger(__name__)


def command_line(args: argparse.Namespace) -> str:
    """The `sscxr probe` command that reproduces this probe."""
    parts = ["sscxr", "probe"]
    for name, path in args.encoder:
        parts += ["--encoder", f"{name}={path}"]
    parts += ["--random" if args.random else "--no-random", "--random-arch", args.random_arch]
    parts += ["--arch", args.arch, "--pixels", str(args.pixels), "--cache", str(args.cache)]
    parts += ["--task", args.task, "--train-split", args.train_split, "--val-split", args.val_split]
    for name, spec in args.test:
        parts += ["--test", f"{name}={spec}"]
    parts += ["--fractions", args.fractions, "--seeds", args.seeds, "--features", args.features]
    parts += [*(["--no-knn"] if args.no_knn else []), "--threshold", args.threshold]
    parts += ["--n-boot", str(args.n_boot), "--boot-seed", str(args.boot_seed), "--out", str(args.out)]
    return shlex.join(parts)


def _print_row(row: dict[str, Any], reused: bool) -> None:
    hyper = ", ".join(f"{k}={v:g}" for k, v in row["hyper"].items())
    tests = "  ".join(
        f"{name} {'n/a' if t['auc_roc'] is None else format(t['auc_roc'], '.3f')}"
        for name, t in row["tests"].items()
    )
    when = "done before" if reused else f"{row['seconds']:.2f} s"
    print(
        f"f={row['fraction']:<5g} s={row['seed']:<3d} {row['name']:<28} {hyper:<10} "
        f"val {row['val']['auc_roc']:.3f}  {tests}  ({when})",
        flush=True,
    )


def build_sources(args: argparse.Namespace, cache: ImageCache, options: ProbeOptions) -> list[FeatureSource]:
    """The encoders of --encoder, then the reference rows (--random, --pixels) unless switched off."""
    from sscxr.evaluation.probe import encoder_source, pixel_source, random_source
    from sscxr.models.loading import Normalization
    from sscxr.models.vit import VIT_PRESETS

    if args.random_arch not in VIT_PRESETS:
        raise ConfigError(f"--random-arch {args.random_arch!r}: choose one of {', '.join(VIT_PRESETS)}")
    norm = Normalization(*cache.stats)
    sources, cfgs = [], []
    for name, path in args.encoder:  # loaded first: a wrong path fails before any work
        source, cfg = encoder_source(name, path, cache.size, norm, options, args.arch)
        sources.append(source)
        cfgs.append(cfg)
    if args.random:
        try:
            cfg = cfgs[0] if cfgs else dataclasses.replace(VIT_PRESETS[args.random_arch], img_size=cache.size)
        except ValueError as e:
            raise ConfigError(f"--random-arch {args.random_arch} on {cache.size} px images: {e}") from e
        sources.append(random_source(cfg, norm, options))
    if args.pixels:
        pixels = min(args.pixels, cache.size)
        if pixels != args.pixels:
            log.warning("--pixels %d: the cache has %d px images; using %d", args.pixels, cache.size, pixels)
        sources.append(pixel_source(pixels, cache.size))
    if not sources:
        raise ConfigError("nothing to probe: give --encoder NAME=PATH, or keep --random or --pixels K")
    return sources


def run_probe_command(args: argparse.Namespace) -> dict[str, Any]:
    """`sscxr probe`: build the feature sources (pixels, random, encoders), run the grid, write OUT.

    Returns:
        The probe.json document.
    """
    from sscxr.data.cache import ImageCache
    from sscxr.data.near_duplicates import require_no_leakage
    from sscxr.evaluation import parse_split_spec, parse_threshold
    from sscxr.evaluation.probe import ProbeOptions, parse_fractions, parse_seeds, run_probe
    from sscxr.tasks.labels import resolve_task

    if not args.test:
        raise ConfigError("give at least one --test NAME=CACHE_DIR:SPLIT (e.g. held-out=cache/x:test)")
    fractions, seeds = parse_fractions(args.fractions), parse_seeds(args.seeds)
    options = ProbeOptions(
        features=args.features, knn=not args.no_knn, threshold=parse_threshold(args.threshold),
        n_boot=args.n_boot, boot_seed=args.boot_seed, batch_size=args.batch_size, device=args.device,
    )  # fmt: skip
    task = resolve_task(args.task)
    tests = [(name, parse_split_spec(spec)) for name, spec in args.test]
    cache = ImageCache.open(args.cache)
    # The probes fit on this cache's train / val rows and score the test sets: refuse what leaks between
    # them (patients in two splits, near-duplicate images) as training and `evaluate` do.
    for path in dict.fromkeys([Path(args.cache), *(spec.cache_dir for _, spec in tests)]):
        leak_cache = cache if path == Path(args.cache) else ImageCache.open(path)
        require_no_leakage(leak_cache, args.allow_leakage, "pass --allow-leakage")
    sources = build_sources(args, cache, options)
    grid = (fractions, seeds, args.out, options, (args.train_split, args.val_split), command_line(args))
    return run_probe(sources, cache, task, tests, *grid, _print_row)


def _probe(args: argparse.Namespace) -> int:
    from sscxr.evaluation.probe import report_markdown

    doc = run_probe_command(args)
    print()
    print(report_markdown(doc), end="")
    cells = doc["cells"]
    print(
        f"\n{cells['computed']} cells computed, {cells['reused']} reused; "
        f"{doc['seconds']['total']:.1f} s (features {sum(doc['seconds']['features'].values()):.1f} s)\n"
        f"probe: {Path(args.out) / 'probe.json'}\nreport: {Path(args.out) / 'report.md'}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `probe` subcommand."""
    p = sub.add_parser(
        "probe",
        help="frozen-encoder linear / k-NN probes (with pixel and random-encoder references)",
        description=(
            "Linear (logistic regression, C chosen on validation) and k-NN probes on frozen features, "
            "for each labelled fraction and subset seed (the subsets of `sscxr finetune "
            "classify.labelled_fraction=F classify.subset_seed=S`). Example: sscxr probe --encoder "
            "SS-CXR=runs/gmml --cache cache --task pneumonia_vs_healthy --test held-out=cache:test --out OUT"
        ),
    )
    p.add_argument(
        "--encoder", action="append", type=named, default=[], metavar="NAME=PATH",
        help="GMML export / pre-training run folder / checkpoint / timm file, repeatable",
    )  # fmt: skip
    p.add_argument(
        "--random", action=argparse.BooleanOptionalAction, default=True,
        help="add a seeded random encoder of the first --encoder's architecture (default: on)",
    )  # fmt: skip
    p.add_argument("--random-arch", default="tiny_cpu", help="ViT preset of --random without --encoder")
    p.add_argument("--arch", default="vit_small", help="ViT preset of timm / DeiT weight files")
    p.add_argument("--pixels", type=int, default=64, help="logistic regression on K x K pixels (0: none)")
    p.add_argument("--cache", required=True, type=Path, help="cache with the train and validation splits")
    p.add_argument("--task", required=True, help="covid_vs_noncovid, pneumonia_vs_healthy, three_class, ...")
    p.add_argument("--train-split", default="train")
    p.add_argument("--val-split", default="val", help="split C, k and the thresholds are chosen on")
    p.add_argument(
        "--test", action="append", type=named, default=[], metavar="NAME=CACHE_DIR:SPLIT",
        help="a named test set, repeatable",
    )  # fmt: skip
    p.add_argument("--fractions", default="0.01,0.1,1", help="labelled fractions in (0, 1]")
    p.add_argument("--seeds", default="0,1,2,3,4", help="subset seeds")
    p.add_argument("--features", default="avg4", choices=("avg4", "avg", "cls", "grid4"))
    p.add_argument("--no-knn", action="store_true", help="linear probes only")
    p.add_argument(
        "--allow-leakage",
        action="store_true",
        help="probe even when a patient or a near-duplicate image is in two splits (a warning says so)",
    )
    p.add_argument("--threshold", default="youden", help="youden | sensitivity:0.95 | a number | default")
    p.add_argument(
        "--n-boot", type=int_at_least(0), default=500, help="patient-bootstrap resamples (0: no intervals)"
    )
    p.add_argument("--boot-seed", type=int, default=0, help="bootstrap seed")
    p.add_argument("--batch-size", type=int_at_least(1), default=64)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--out", required=True, type=Path, help="output folder (re-run to resume)")
    p.set_defaults(func=_probe)
