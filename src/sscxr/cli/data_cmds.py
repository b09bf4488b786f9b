"""Data subcommands: `synth`, `import`, `split`, `prepare`.

The data modules are imported inside the functions that run a command, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sscxr.cli.argtypes import fractions, int_at_least

if TYPE_CHECKING:
    from sscxr.data.manifest import Manifest

log = logging.getLogger(__name__)


def _synth(args: argparse.Namespace) -> int:
    from sscxr.data.synth import SynthConfig, generate_cohort
    from sscxr.errors import ConfigError
    from sscxr.viz.contact_sheet import cohort_contact_sheet

    try:
        cfg = SynthConfig(n_adult=args.n_adult, n_pediatric=args.n_pediatric, size=args.size, seed=args.seed)
    except ValueError as e:
        raise ConfigError(f"sscxr synth: {e}") from None

    manifest = generate_cohort(cfg, args.out, workers=args.workers, force=args.force)
    sheet = Path(args.out) / "contact_sheet.png"
    if args.force or not sheet.is_file():
        cohort_contact_sheet(manifest, sheet)
    print(f"synthetic cohort: {manifest} (contact sheet: {sheet})")
    return 0


def _read_layout(args: argparse.Namespace) -> Manifest:
    """The manifest of `args.root` in the layout the user named."""
    from sscxr.data import importers
    from sscxr.errors import ConfigError

    layout = args.layout
    needs = {"pairs": ("masks",), "jsrt": ("masks", "lung_values", "masks_out"), "csv": ("path_col",)}
    missing = [f"--{n.replace('_', '-')}" for n in needs.get(layout, ()) if getattr(args, n) in (None, "")]
    if missing:
        raise ConfigError(f"'sscxr import {layout}' needs {', '.join(missing)}")
    if layout == "folder":
        key, pattern = _pseudonym_key(args), args.patient_pattern
        return importers.import_folder(args.root, site=args.site, pseudonym_key=key, patient_pattern=pattern)
    if layout == "kermany":
        return importers.import_kermany(args.root, site=args.site or "kermany")
    if layout == "covidx":
        return importers.import_covidx(args.root)
    if layout == "montgomery":
        masks_out = args.masks_out or Path(args.out).parent / "masks"
        return importers.import_montgomery(args.root, out_dir=masks_out)
    if layout == "shenzhen":
        return importers.import_shenzhen(args.root)
    if layout == "pairs":
        return importers.import_image_mask_pairs(args.root, args.masks, site=args.site)
    if layout == "jsrt":
        try:
            values = [int(v) for v in str(args.lung_values).split(",")]
        except ValueError:
            raise ConfigError(
                f"--lung-values {args.lung_values!r}: expected grey values, e.g. 255,128"
            ) from None
        site = args.site or "jsrt"
        return importers.import_jsrt_masks(args.root, args.masks, values, args.masks_out, site=site)
    return importers.import_csv(
        args.root,
        args.path_col,
        args.label_col,
        args.patient_col,
        image_dir=args.image_dir,
        site=args.site,
        site_col=args.site_col,
    )


def _pseudonym_key(args: argparse.Namespace) -> str:
    """The secret of keyed patient pseudonyms, read from the file the user named ("" = unkeyed)."""
    from sscxr.errors import ConfigError

    if args.pseudonym_key_file is None:
        return ""
    try:
        key = Path(args.pseudonym_key_file).read_text().strip()
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--pseudonym-key-file {args.pseudonym_key_file}: unreadable ({e})") from None
    if len(key) < 16:
        raise ConfigError(
            f"--pseudonym-key-file {args.pseudonym_key_file}: the secret is {len(key)} characters; use "
            "at least 16 (e.g. `python -c 'import secrets; print(secrets.token_hex(32))' > key.txt`)"
        )
    return key


def _import(args: argparse.Namespace) -> int:
    from sscxr.data.manifest import write_manifest

    m = _apply_splits(_read_layout(args), args)
    write_manifest(m, args.out)
    print(
        f"wrote {args.out}: {len(m)} images; "
        f"labels {dict(m.counts('label'))}; splits {dict(m.counts('split'))}"
    )
    return 0


def _apply_splits(m: Manifest, args: argparse.Namespace) -> Manifest:
    from dataclasses import replace

    from sscxr.data import splits

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
    p.add_argument("--workers", type=int_at_least(0), default=None)
    p.add_argument("--force", action="store_true", help="overwrite a cohort made with another config")
    p.set_defaults(func=_synth)

    p = sub.add_parser("import", help="write a manifest from a folder or a published data set layout")
    p.add_argument(
        "layout", choices=["folder", "kermany", "covidx", "montgomery", "shenzhen", "pairs", "jsrt", "csv"]
    )
    p.add_argument(
        "root", type=Path, help="data set folder (pairs, jsrt: the image folder; csv: the CSV file)"
    )
    p.add_argument("--masks", type=Path, help="mask folder (pairs) or label-image folder (jsrt)")
    p.add_argument("--masks-out", type=Path, help="where merged (montgomery) or binary (jsrt) masks go")
    p.add_argument("--lung-values", help="jsrt: label values that are lung, e.g. 255,128")
    p.add_argument("--path-col", help="csv: column of image paths")
    p.add_argument("--label-col", default="", help="csv: column of labels")
    p.add_argument("--patient-col", default="", help="csv: column of patient ids")
    p.add_argument("--site-col", default="", help="csv: column of sites")
    p.add_argument("--image-dir", type=Path, help="csv: folder the image paths are relative to")
    p.add_argument("--site", default="", help="site/source name for every image")
    p.add_argument(
        "--patient-pattern",
        default="",
        help="folder: regex whose first group in a file name is the patient (e.g. '^(COVID-\\d+)')",
    )
    p.add_argument(
        "--pseudonym-key-file",
        type=Path,
        help="folder: file holding a secret; DICOM patient ids become keyed (HMAC) pseudonyms",
    )
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
    p.add_argument(
        "--workers", type=int_at_least(0), default=None, help="decoding processes (default: all cores)"
    )
    p.add_argument("--overwrite", action="store_true", help="replace a cache built from another manifest")
    p.add_argument(
        "--verify", action="store_true", help="check every cached row against its checksum; change nothing"
    )
    p.set_defaults(func=_prepare)
