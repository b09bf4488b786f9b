"""Data subcommands: `synth`, `import LAYOUT`, `split`, `prepare`.

`sscxr import` has one sub-subcommand per layout, all built from `LAYOUTS`: each entry names the
function that reads the layout, its help and the options it takes (from `_OPTIONS`), so adding an
importer is one reader and one entry. The data modules are imported inside the functions that run a
command, so building the parser stays fast.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sscxr.cli.argtypes import fractions, int_at_least
from sscxr.errors import DataError

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
@dataclass(frozen=True)
class _Opt:
    """An option of `sscxr import LAYOUT`. `needed` ones are checked after parsing rather than by
    argparse, so that every missing one is named in one line (exit 2), not only the first."""

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    needed: bool = False

    @property
    def dest(self) -> str:
        return self.flags[0].removeprefix("--").replace("-", "_")


def _spec(*flags: str, help: str, **kwargs: Any) -> _Opt:
    return _Opt(flags, {"help": help, **kwargs})


_WHERE_HELP = (
    "keep rows whose COL is one of the values, or drop them with COL!=V1,V2; case-insensitive, '*' and '?' "
    "are wildcards, '\\,' is a comma inside a value; repeatable, all must hold"
)
_LABEL_MAP_HELP = (
    "map a raw label (the whole value, one finding of 'A, B', or one level of 'A/B/C') to a class: healthy, "
    "pneumonia, covid-19, non-covid or tuberculosis; repeatable"
)

# Every option a layout may take, with its general help; a layout may give its own help (`_opt`).
_OPTIONS: dict[str, _Opt] = {
    o.dest: o
    for o in (
        _spec("--site", default="", help="site/source name written on every row"),
        _spec("--masks", "--mask-dir", type=Path, help="folder of masks"),
        _spec("--masks-out", type=Path, help="folder the masks this import makes are written to"),
        _spec(
            "--mask-suffix",
            help="mask stem = image stem + this suffix ('_mask', '-mask', '') or a pattern such as "
            "'mask_{stem}' (default: detected among common suffixes)",
        ),
        _spec("--lung-values", help="label-image grey values that are lung, e.g. 255,128"),
        _spec("--require-masks", action="store_true", help="refuse images without a mask (default: kept)"),
        _spec(
            "--replace-masks", action="store_true", help="rows with a mask get the new one (default: keep)"
        ),
        _spec("--label", default="", help="label written on every row (e.g. healthy)"),
        _spec(
            "--patient-pattern",
            default="",
            help="regex whose first group in a file name is the patient (e.g. '^(COVID-\\d+)'); names it "
            "does not match are each their own patient",
        ),
        _spec(
            "--pseudonym-key-file",
            type=Path,
            help="file holding a secret; DICOM patient ids become keyed (HMAC) pseudonyms",
        ),
        _spec(
            "--meta-csv",
            type=Path,
            help="metadata CSV giving each image's patient (--path-col, --patient-col)",
        ),
        _spec("--path-col", default="", help="column naming each image (the suffix may be left out)"),
        _spec("--label-col", default="", help="column of labels"),
        _spec("--patient-col", default="", help="column of patient ids"),
        _spec("--site-col", default="", help="column of sites (empty cells take --site)"),
        _spec("--split-col", default="", help="column of published splits (--split fills the empty ones)"),
        _spec("--mask-col", default="", help="column of mask paths (relative to --image-dir)"),
        _spec("--extra-col", action="append", default=[], metavar="COL", help="column copied (repeatable)"),
        _spec("--image-dir", type=Path, help="folder the image names are relative to (default: the CSV's)"),
        _spec("--where", action="append", default=[], metavar="COL=V1,V2", help=_WHERE_HELP),
        _spec("--label-map", action="append", default=[], metavar="RAW=CLASS", help=_LABEL_MAP_HELP),
        _spec("--label-map-file", type=Path, help="YAML label map: 'class: [raw value, ...]' per class"),
        _spec("--keep-unmapped", action="store_true", help="keep rows the label map leaves unlabelled"),
        _spec(
            "--dedupe",
            choices=("refuse", "first"),
            default="refuse",
            help="an image listed on several rows: refuse the import (default) or keep its first row",
        ),
        _spec("--strict", action="store_true", help="refuse a listed image that is missing (default: skip)"),
        _spec(
            "--label-file",
            action="append",
            metavar="FILE",
            help="label file, relative to ROOT (repeatable; default: train.txt and test.txt)",
        ),
    )
}


def _opt(name: str, help: str | None = None, needed: bool = False) -> _Opt:
    """The shared option `name`, with this layout's help and whether it must be given."""
    base = _OPTIONS[name]
    kwargs = dict(base.kwargs)
    if help is not None:
        kwargs["help"] = help
    if needed:
        kwargs["help"] = f"{kwargs.get('help', '')} (required)".strip()
    return _Opt(base.flags, kwargs, needed)


@dataclass(frozen=True)
class _Layout:
    """One `sscxr import` layout: its reader (parsed args -> manifest), help, ROOT help and options."""

    name: str
    help: str
    root: str
    read: Callable[[argparse.Namespace], Manifest]
    options: tuple[_Opt, ...] = ()
    splits: bool = True  # take --split / --hold-out-site / --seed / --resplit


def _read_folder(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    key, pattern = _pseudonym_key(args), args.patient_pattern
    return importers.import_folder(args.root, site=args.site, pseudonym_key=key, patient_pattern=pattern)


def _read_kermany(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    return importers.import_kermany(args.root, site=args.site or "kermany")


def _read_covidx(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    files = {"label_files": args.label_file} if args.label_file else {}
    return importers.import_covidx(args.root, strict=args.strict, site=args.site, **files)


def _read_montgomery(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    masks_out = args.masks_out or Path(args.out).parent / "masks"
    return importers.import_montgomery(
        args.root, out_dir=masks_out, require_masks=args.require_masks, site=args.site or "montgomery"
    )


def _read_shenzhen(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    return importers.import_shenzhen(
        args.root, require_masks=args.require_masks, site=args.site or "shenzhen"
    )


def _read_pairs(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers
    from sscxr.errors import ConfigError

    patients = None
    if args.meta_csv is not None:
        absent = [
            flag for flag, v in (("--path-col", args.path_col), ("--patient-col", args.patient_col)) if not v
        ]
        if absent:
            raise ConfigError(
                f"--meta-csv {args.meta_csv} needs {' and '.join(absent)} (image-name, patient columns)"
            )
        patients = importers.read_patient_table(args.meta_csv, args.path_col, args.patient_col)
    elif args.path_col or args.patient_col:
        raise ConfigError(
            "--path-col and --patient-col name columns of a metadata CSV; give it with --meta-csv"
        )
    return importers.import_image_mask_pairs(
        args.root, args.masks, args.mask_suffix, site=args.site, label=args.label,
        require_masks=args.require_masks, patients=patients, patient_pattern=args.patient_pattern,
        pseudonym_key=_pseudonym_key(args),
    )  # fmt: skip


def _read_jsrt(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers
    from sscxr.errors import ConfigError

    try:
        values = [int(v) for v in str(args.lung_values).split(",")]
    except ValueError:
        raise ConfigError(f"--lung-values {args.lung_values!r}: expected grey values, e.g. 255,128") from None
    site = args.site or "jsrt"
    return importers.import_jsrt_masks(
        args.root, args.masks, values, args.masks_out, label_suffix=args.mask_suffix, site=site
    )


def _read_csv(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers
    from sscxr.errors import ConfigError

    label_map = importers.label_map_from(args.label_map, args.label_map_file)
    if args.keep_unmapped and not label_map:
        raise ConfigError(
            "--keep-unmapped keeps rows a label map leaves unlabelled; give --label-map or --label-map-file"
        )
    report = importers.read_csv_metadata(
        args.root, args.path_col, args.label_col, args.patient_col, image_dir=args.image_dir,
        site=args.site, site_col=args.site_col, split_col=args.split_col, mask_col=args.mask_col,
        patient_pattern=args.patient_pattern, extra_cols=args.extra_col, strict=args.strict,
        where=args.where, label_map=label_map, keep_unmapped=args.keep_unmapped, dedupe=args.dedupe,
    )  # fmt: skip
    if report.left_out:
        print(report.summary())
    return report.manifest


def _read_masks(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers
    from sscxr.data.manifest import read_manifest

    return importers.join_masks(
        read_manifest(args.root), args.masks, args.mask_suffix, replace=args.replace_masks,
        require_masks=args.require_masks, source=args.root,
    )  # fmt: skip


LAYOUTS: tuple[_Layout, ...] = (
    _Layout(
        "folder", "every image under a folder; class subfolders (and train/val/test above them) give labels",
        "data set folder", _read_folder,
        (_opt("site"), _opt("patient_pattern"), _opt("pseudonym_key_file")),
    ),
    _Layout(
        "kermany", "Kermany et al. pediatric pneumonia (chest_xray/): patients read from the file names",
        "the chest_xray folder, or one split's folder", _read_kermany,
        (_opt("site", "site written on every row (default: kermany)"),),
    ),
    _Layout(
        "covidx", "COVIDx CXR label files (patient, file, class, source) and their image folders",
        "data set folder (label files and train/, test/)", _read_covidx,
        (_opt("label_file"), _opt("site", "site of rows whose line has no source"), _opt("strict")),
    ),
    _Layout(
        "montgomery", "Montgomery County TB set: left and right lung masks merged into one",
        "the MontgomerySet folder (CXR_png/, ManualMask/)", _read_montgomery,
        (_opt("masks_out", "where the merged masks go (default: masks/ next to --out)"),
         _opt("site", "site written on every row (default: montgomery)"), _opt("require_masks")),
    ),
    _Layout(
        "shenzhen", "Shenzhen TB set: *_mask.png lung masks alongside or in a mask folder",
        "data set folder", _read_shenzhen,
        (_opt("site", "site written on every row (default: shenzhen)"), _opt("require_masks")),
    ),
    _Layout(
        "pairs", "images paired with masks by file stem (x.png + x_mask.png, or a mask folder)",
        "the image folder", _read_pairs,
        (_opt("masks", "mask folder (default: the image folder; masks then need a suffix)"),
         _opt("mask_suffix"), _opt("label"), _opt("site"), _opt("require_masks"),
         _opt("patient_pattern"), _opt("pseudonym_key_file"), _opt("meta_csv"),
         _opt("path_col", "--meta-csv column naming each image (file name, the suffix may be left out)"),
         _opt("patient_col", "--meta-csv column of patient ids")),
    ),
    _Layout(
        "jsrt", "JSRT-style label images (structures coded by grey value) turned into binary lung masks",
        "the image folder", _read_jsrt,
        (_opt("masks", "folder of label images", needed=True), _opt("lung_values", needed=True),
         _opt("masks_out", "where the binary lung masks go", needed=True),
         _opt("mask_suffix", "label stem = image stem + suffix, or a '{stem}' pattern (default: detected)"),
         _opt("site", "site written on every row (default: jsrt)")),
    ),
    _Layout(
        "csv", "any metadata CSV with one row per image: filters, a label map, duplicates refused",
        "the CSV file", _read_csv,
        (_opt("path_col", needed=True), _opt("image_dir"), _opt("label_col"), _opt("label_map"),
         _opt("label_map_file"), _opt("keep_unmapped"), _opt("where"), _opt("dedupe"),
         _opt("patient_col"), _opt("patient_pattern", "regex applied to the patient value (or, without "
                                   "--patient-col, to the image name) whose first group is the patient"),
         _opt("site", "site of rows without a --site-col value"), _opt("site_col"), _opt("split_col"),
         _opt("mask_col"), _opt("extra_col"), _opt("strict")),
    ),
    _Layout(
        "masks", "add mask paths to an existing manifest by image stem, keeping its splits and patients",
        "the manifest CSV", _read_masks,
        (_opt("masks", "folder of masks (searched recursively)", needed=True), _opt("mask_suffix"),
         _opt("replace_masks"), _opt("require_masks")),
        splits=False,
    ),
)  # fmt: skip


def _import(args: argparse.Namespace) -> int:
    from sscxr.data.manifest import write_manifest
    from sscxr.errors import ConfigError

    layout: _Layout = args.importer
    missing = [o.flags[0] for o in layout.options if o.needed and getattr(args, o.dest) in (None, "")]
    if missing:
        raise ConfigError(f"'sscxr import {layout.name}' needs {', '.join(missing)}")
    m = layout.read(args)
    if layout.splits:
        m = _apply_splits(m, args)
    # Paths outside the manifest's folder keep the form the user gave the data in: a relative data
    # folder gives '../data/x.png' (nothing of the machine's layout in a shared manifest), an absolute
    # one absolute paths. `import masks` rewrites a manifest, whose rows keep their own form.
    outside = "as_given" if layout.name == "masks" else "absolute" if os.path.isabs(args.root) else "relative"
    write_manifest(m, args.out, outside=outside)
    masks = f"; masks {sum(bool(r.mask_path) for r in m.rows)} of {len(m)}" if m.has_masks else ""
    print(
        f"wrote {args.out}: {len(m)} images; "
        f"labels {dict(m.counts('label'))}; splits {dict(m.counts('split'))}{masks}"
    )
    return 0


def _register_import(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "import",
        help="write a manifest from a folder or a published data set layout",
        description="Write a manifest CSV from a data set; `sscxr import LAYOUT --help` lists its options.",
    )
    layouts = p.add_subparsers(dest="layout", required=True, metavar="LAYOUT")
    for layout in LAYOUTS:
        lp = layouts.add_parser(layout.name, help=layout.help, description=layout.help)
        lp.add_argument("root", metavar="ROOT", type=Path, help=layout.root)
        for o in layout.options:
            lp.add_argument(*o.flags, **o.kwargs)
        lp.add_argument("--out", type=Path, required=True, help="manifest CSV to write")
        if layout.splits:
            _split_args(lp)
        lp.set_defaults(func=_import, importer=layout)


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
