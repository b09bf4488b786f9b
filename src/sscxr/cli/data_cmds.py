"""Data subcommands: `synth`, `import LAYOUT`, `split`, `prepare`.

`sscxr import` has one sub-subcommand per importer in the registry (`sscxr.data.importers.registry`):
each entry brings its summary, ROOT help and options, and the function that reads the layout, so adding
an importer is one `register_importer` call and no change here. The registry is light; the data modules
are imported inside the functions that run a command, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

from sscxr.cli.argtypes import fractions, int_at_least
from sscxr.data.importers import Importer, registered_importers
from sscxr.errors import DataError

if TYPE_CHECKING:
    from sscxr.data.manifest import Manifest

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from sscxr.errors import ConfigError
    from sscxr.synthetic import SynthConfig, generate_cohort
    from sscxr.viz.contact_sheet import cohort_contact_sheet

    try:
        cfg = SynthConfig(
            n_adult=args.n_adult,
            n_pediatric=args.n_pediatric,
            size=args.size,
            seed=args.seed,
            acquisition_jitter=args.acquisition_jitter,
        )
    except ValueError as e:
        raise ConfigError(f"sscxr synth: {e}") from None

    manifest = generate_cohort(cfg, args.out, workers=args.workers, force=args.force)
    sheet = Path(args.out) / "contact_sheet.png"
    if args.force or not sheet.is_file():
        cohort_contact_sheet(manifest, sheet)
    print(f"synthetic cohort: {manifest} (contact sheet: {sheet})")
    return 0


def _apply_splits(m: Manifest, args: argparse.Namespace) -> Manifest:
    from dataclasses import replace

    from sscxr.data import splits
    from sscxr.errors import ConfigError

    if args.resplit and not args.split:
        # Alone, --resplit would erase every split and assign none: a manifest no command can train on.
        raise ConfigError(
            "--resplit assigns every row a new split; give the fractions with --split (e.g. 0.7,0.15,0.15)"
        )
    if args.resplit:  # clear first, so held-out sites are assigned again before the patient split
        m = m.with_rows(replace(r, split="") for r in m.rows)
    if args.hold_out_site:
        m = splits.hold_out_sites(m, args.hold_out_site)
    if args.split:
        fr = args.split  # three fractions summing to 1 (argtypes.fractions)
        shares = {"train": fr[0], "val": fr[1], "test": fr[2]}
        m = splits.patient_split(m, shares, seed=args.seed)
        splits.check_no_leak(m)
    return m


def _split(args: argparse.Namespace) -> int:
    from sscxr.data.manifest import read_manifest, write_manifest
    from sscxr.errors import ConfigError

    if not (args.split or args.hold_out_site or args.resplit):
        raise ConfigError(
            f"nothing to do for {args.manifest}: give --split train,val,test fractions (e.g. 0.7,0.15,0.15) "
            "and/or --hold-out-site SITE"
        )
    m = _apply_splits(read_manifest(args.manifest), args)
    write_manifest(m, args.out or args.manifest)
    print(f"splits: {dict(m.counts('split'))}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from sscxr.data.cache import prepare

    if args.verify:
        return _verify(args.out)
    report = prepare(
        args.manifest, args.out, size=args.size, fit=args.fit, workers=args.workers, overwrite=args.overwrite
    )
    rebuilt = f", {report.n_rebuilt} damaged rows decoded again" if report.n_rebuilt else ""
    print(
        f"cache {args.out}: {report.n_total} images, {report.n_ok} ok, {report.n_failed} failed; this run "
        f"decoded {report.n_done} ({report.n_skipped_already_done} were already done{rebuilt}), "
        f"{report.images_per_s:.1f} images/s"
    )
    if report.n_failed:
        print(f"unreadable files are listed in {Path(args.out) / 'failures.csv'}")
    if report.n_total and not report.n_ok:
        # A cache of nothing cannot train anything: say so here, not at the next command.
        raise DataError(
            f"{args.manifest}: none of the {report.n_total} images could be read (reasons in "
            f"{Path(args.out) / 'failures.csv'}); fix the paths or files and run prepare again"
        )
    return 0


def _verify(out: Path) -> int:
    """`prepare --verify`: check every row of a finished cache against its checksums."""
    import time

    from sscxr.data.cache import ImageCache

    cache = ImageCache.open(out)  # lengths and a sample of rows; raises with the fix
    t0 = time.perf_counter()
    damaged = cache.verify()
    ms = (time.perf_counter() - t0) * 1000
    per_1000 = ms / max(len(cache), 1) * 1000
    print(f"cache {out}: {len(cache)} rows checked in {ms:.0f} ms ({per_1000:.1f} ms per 1,000)")
    if damaged:
        print(
            f"{len(damaged)} rows no longer match their checksums (first: {damaged[:10]}); run the same "
            "`sscxr prepare` without --verify to decode them again"
        )
        return 1
    print("every row matches its checksum")
    return 0


# ------------------------------------------------------------------------------------------ import
def _import(args: argparse.Namespace) -> int:
    from sscxr.data.manifest import write_manifest
    from sscxr.errors import ConfigError

    entry: Importer = args.importer
    missing = entry.missing(args)
    if missing:
        raise ConfigError(f"'sscxr import {entry.name}' needs {', '.join(missing)}")
    m = entry.run(args)
    if entry.splits:
        m = _apply_splits(m, args)
    # Paths outside the manifest's folder keep the form the user gave the data in: a relative data
    # folder gives '../data/x.png' (nothing of the machine's layout in a shared manifest), an absolute
    # one absolute paths. An importer that rewrites a manifest (`import masks`) keeps its rows' form.
    if entry.paths == "as_given":
        outside = "as_given"
    else:
        outside = "absolute" if os.path.isabs(args.root) else "relative"
    write_manifest(m, args.out, outside=outside)
    masks = f"; masks {sum(bool(r.mask_path) for r in m.rows)} of {len(m)}" if m.has_masks else ""
    print(
        f"wrote {args.out}: {len(m)} images; "
        f"labels {dict(m.counts('label'))}; splits {dict(m.counts('split'))}{masks}"
    )
    return 0


def _register_import(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """`sscxr import NAME` for every registered importer, each with only its own options."""
    p = sub.add_parser(
        "import",
        help="write a manifest from a folder or a published data set layout",
        description="Write a manifest CSV from a data set; `sscxr import LAYOUT --help` lists its options.",
    )
    layouts = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    for entry in registered_importers():
        lp = layouts.add_parser(entry.name, help=entry.summary, description=entry.summary)
        lp.add_argument("root", metavar="ROOT", type=Path, help=entry.root_help)
        entry.add_options(lp)
        lp.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
        if entry.splits:
            _split_args(lp)
        lp.set_defaults(func=_import, importer=entry)


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--split", type=fractions, help="patient-level split fractions train,val,test (e.g. 0.7,0.15,0.15)"
    )
    p.add_argument(
        "--hold-out-site", action="append", default=[], help="site kept out of training (test_site)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--resplit",
        action="store_true",
        help="assign every row a new split (default: only rows without one, keeping existing splits)",
    )


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the data subcommands."""
    p = sub.add_parser("synth", help="generate the built-in synthetic chest X-ray cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-adult", type=int, default=600)
    p.add_argument("--n-pediatric", type=int, default=90)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--acquisition-jitter",
        type=float,
        default=1.0,
        help="how much a site's images vary in exposure, tone curve and window: 1 = as much as real "
        "single-hospital sets (the default), 0.333 = generator version 1's phantoms, 0 = not at all",
    )
    p.add_argument("--workers", type=int_at_least(0), default=None)
    p.add_argument("--force", action="store_true", help="overwrite a cohort made with another config")
    p.set_defaults(func=_synth)

    _register_import(sub)

    p = sub.add_parser("split", help="assign patient-level splits / held-out sites in a manifest")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, help="write here instead of in place")
    _split_args(p)
    p.set_defaults(func=_split)

    p = sub.add_parser("prepare", help="decode and resize a manifest's images into a memory-mapped cache")
    p.add_argument("manifest", type=Path)
    p.add_argument("--out", type=Path, required=True, help="cache folder")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--fit", choices=["stretch", "pad"], default="stretch")
    p.add_argument(
        "--workers", type=int_at_least(0), default=None, help="decoding processes (default: all cores)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a cache built from another manifest")
    p.add_argument(
        "--verify", action="store_true", help="check every cached row against its checksum; change nothing"
    )
    p.set_defaults(func=_prepare)
