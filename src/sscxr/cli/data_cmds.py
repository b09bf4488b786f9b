"""Data subcommands: `synth`, `import`, `split`, `prepare`.

The data modules are imported inside the functions that run a command, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from sscxr.data.manifest import Manifest

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from sscxr.data.synth import SynthConfig, generate_cohort

    cfg = SynthConfig(n_adult=args.n_adult, n_pediatric=args.n_pediatric, size=args.size, seed=args.seed)
    manifest = generate_cohort(cfg, args.out, workers=args.workers, force=args.force)
    print(f"synthetic cohort: {manifest} (contact sheet: {Path(args.out) / 'contact_sheet.png'})")
    return 0


def _import(args: argparse.Namespace) -> int:
    from sscxr.data import importers
    from sscxr.data.manifest import write_manifest

    layout = args.layout
    if layout == "folder":
        m = importers.import_folder(args.root, site=args.site)
    elif layout == "covidx":
        m = importers.import_covidx(args.root)
    elif layout == "montgomery":
        m = importers.import_montgomery(args.root, out_dir=args.masks_out or Path(args.out).parent / "masks")
    elif layout == "shenzhen":
        m = importers.import_shenzhen(args.root)
    elif layout == "pairs":
        m = importers.import_image_mask_pairs(args.root, args.masks, site=args.site)
    else:
        raise AssertionError(layout)
    m = _apply_splits(m, args)
    write_manifest(m, args.out)
    print(
        f"wrote {args.out}: {len(m)} images; "
        f"labels {dict(m.counts('label'))}; splits {dict(m.counts('split'))}"
    )
    return 0


def _apply_splits(m: Manifest, args: argparse.Namespace) -> Manifest:
    from sscxr.data import splits

    if args.hold_out_site:
        m = splits.hold_out_sites(m, args.hold_out_site)
    if args.split:
        fr = [float(x) for x in args.split.split(",")]
        if len(fr) != 3:
            raise SystemExit("--split takes three fractions: train,val,test (e.g. 0.7,0.15,0.15)")
        m = splits.patient_split(m, {"train": fr[0], "val": fr[1], "test": fr[2]}, seed=args.seed)
        splits.check_no_leak(m)
    return m


def _split(args: argparse.Namespace) -> int:
    from sscxr.data.manifest import read_manifest, write_manifest

    m = _apply_splits(read_manifest(args.manifest), args)
    write_manifest(m, args.out or args.manifest)
    print(f"splits: {dict(m.counts('split'))}")
    return 0


def _prepare(args: argparse.Namespace) -> int:
    from sscxr.data.cache import prepare

    report = prepare(
        args.manifest, args.out, size=args.size, fit=args.fit, workers=args.workers, overwrite=args.overwrite
    )
    print(
        f"cache {args.out}: {report.n_done} ready ({report.n_skipped_already_done} were already done), "
        f"{report.n_failed} failed, {report.images_per_s:.1f} images/s"
    )
    if report.n_failed:
        print(f"unreadable files are listed in {Path(args.out) / 'failures.csv'}")
    return 0


def _split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--split", help="patient-level split fractions train,val,test (e.g. 0.7,0.15,0.15)")
    p.add_argument(
        "--hold-out-site", action="append", default=[], help="site kept out of training (test_site)"
    )
    p.add_argument("--seed", type=int, default=0)


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the data subcommands."""
    p = sub.add_parser("synth", help="generate the built-in synthetic chest X-ray cohort")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n-adult", type=int, default=600)
    p.add_argument("--n-pediatric", type=int, default=90)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--force", action="store_true", help="overwrite a cohort made with another config")
    p.set_defaults(func=_synth)

    p = sub.add_parser("import", help="write a manifest from a folder or a published data set layout")
    p.add_argument("layout", choices=["folder", "covidx", "montgomery", "shenzhen", "pairs"])
    p.add_argument("root", type=Path, help="data set folder (for 'pairs': the image folder)")
    p.add_argument("--masks", type=Path, help="mask folder (layout 'pairs')")
    p.add_argument("--masks-out", type=Path, help="where merged Montgomery masks are written")
    p.add_argument("--site", default="", help="site/source name for every image")
    p.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
    _split_args(p)
    p.set_defaults(func=_import)

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
    p.add_argument("--workers", type=int, default=None, help="decoding processes (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace a cache built from another manifest")
    p.set_defaults(func=_prepare)
