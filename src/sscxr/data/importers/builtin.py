"""The built-in importers, one block each: the function that reads the parsed arguments into a
manifest, and its `register_importer` entry (summary, ROOT help, options). `OPTIONS` holds the options
several of them share, with their general help; `option(name, help)` takes one with an importer's own.

Kept light like `registry.py` (the CLI parser is built from these entries without importing torch or
the image libraries): every reader imports the importer modules when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sscxr.data.importers.registry import Importer, Option, register_importer

if TYPE_CHECKING:
    from sscxr.data.manifest import Manifest

__all__ = ["OPTIONS", "option"]


def _spec(*flags: str, help: str, **kwargs: Any) -> Option:
    return Option(flags, {"help": help, **kwargs})


_WHERE_HELP = (
    "keep rows whose COL is one of the values, or drop them with COL!=V1,V2; case-insensitive, '*' and '?' "
    "are wildcards, '\\,' is a comma inside a value; repeatable, all must hold"
)
_LABEL_MAP_HELP = (
    "map a raw label (the whole value, one finding of 'A, B', or one level of 'A/B/C') to a class: healthy, "
    "pneumonia, covid-19, non-covid or tuberculosis; repeatable"
)

# Options several importers take, with their general help; an importer may give its own (`option`).
OPTIONS: dict[str, Option] = {
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


def option(name: str, help: str | None = None, needed: bool = False) -> Option:
    """The shared option `name` (a key of `OPTIONS`), with an importer's own help and whether it must
    be given."""
    base = OPTIONS[name]
    kwargs = dict(base.kwargs)
    if help is not None:
        kwargs["help"] = help
    if needed:
        kwargs["help"] = f"{kwargs.get('help', '')} (required)".strip()
    return Option(base.flags, kwargs, needed)


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


# ------------------------------------------------------------------------------------------ folder
def _read_folder(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    key, pattern = _pseudonym_key(args), args.patient_pattern
    return importers.import_folder(args.root, site=args.site, pseudonym_key=key, patient_pattern=pattern)


register_importer(Importer(
    "folder", "every image under a folder; class subfolders (and train/val/test above them) give labels",
    _read_folder, root_help="data set folder",
    options=(option("site"), option("patient_pattern"), option("pseudonym_key_file")),
))  # fmt: skip


# ----------------------------------------------------------------------------------------- kermany
def _read_kermany(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    return importers.import_kermany(args.root, site=args.site or "kermany")


register_importer(Importer(
    "kermany", "Kermany et al. pediatric pneumonia (chest_xray/): patients read from the file names",
    _read_kermany, root_help="the chest_xray folder, or one split's folder",
    options=(option("site", "site written on every row (default: kermany)"),),
))  # fmt: skip


# ------------------------------------------------------------------------------------------ covidx
def _read_covidx(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    files = {"label_files": args.label_file} if args.label_file else {}
    return importers.import_covidx(args.root, strict=args.strict, site=args.site, **files)


register_importer(Importer(
    "covidx", "COVIDx CXR label files (patient, file, class, source) and their image folders",
    _read_covidx, root_help="data set folder (label files and train/, test/)",
    options=(option("label_file"), option("site", "site of rows whose line has no source"), option("strict")),
))  # fmt: skip


# -------------------------------------------------------------------------------------- montgomery
def _read_montgomery(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    masks_out = args.masks_out or Path(args.out).parent / "masks"
    return importers.import_montgomery(
        args.root, out_dir=masks_out, require_masks=args.require_masks, site=args.site or "montgomery"
    )


register_importer(Importer(
    "montgomery", "Montgomery County TB set: left and right lung masks merged into one",
    _read_montgomery, root_help="the MontgomerySet folder (CXR_png/, ManualMask/)",
    options=(option("masks_out", "where the merged masks go (default: masks/ next to --out)"),
             option("site", "site written on every row (default: montgomery)"), option("require_masks")),
))  # fmt: skip


# ---------------------------------------------------------------------------------------- shenzhen
def _read_shenzhen(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers

    return importers.import_shenzhen(
        args.root, require_masks=args.require_masks, site=args.site or "shenzhen"
    )


register_importer(Importer(
    "shenzhen", "Shenzhen TB set: *_mask.png lung masks alongside or in a mask folder",
    _read_shenzhen, root_help="data set folder",
    options=(option("site", "site written on every row (default: shenzhen)"), option("require_masks")),
))  # fmt: skip


# ------------------------------------------------------------------------------------------- pairs
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


register_importer(Importer(
    "pairs", "images paired with masks by file stem (x.png + x_mask.png, or a mask folder)",
    _read_pairs, root_help="the image folder",
    options=(option("masks", "mask folder (default: the image folder; masks then need a suffix)"),
             option("mask_suffix"), option("label"), option("site"), option("require_masks"),
             option("patient_pattern"), option("pseudonym_key_file"), option("meta_csv"),
             option("path_col",
                    "--meta-csv column naming each image (file name, the suffix may be left out)"),
             option("patient_col", "--meta-csv column of patient ids")),
))  # fmt: skip


# -------------------------------------------------------------------------------------------- jsrt
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


register_importer(Importer(
    "jsrt", "JSRT-style label images (structures coded by grey value) turned into binary lung masks",
    _read_jsrt, root_help="the image folder",
    options=(option("masks", "folder of label images", needed=True), option("lung_values", needed=True),
             option("masks_out", "where the binary lung masks go", needed=True),
             option("mask_suffix",
                    "label stem = image stem + suffix, or a '{stem}' pattern (default: detected)"),
             option("site", "site written on every row (default: jsrt)")),
))  # fmt: skip


# --------------------------------------------------------------------------------------------- csv
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


register_importer(Importer(
    "csv", "any metadata CSV with one row per image: filters, a label map, duplicates refused",
    _read_csv, root_help="the CSV file",
    options=(option("path_col", needed=True), option("image_dir"), option("label_col"), option("label_map"),
             option("label_map_file"), option("keep_unmapped"), option("where"), option("dedupe"),
             option("patient_col"), option("patient_pattern", "regex applied to the patient value (or, "
                                           "without --patient-col, to the image name) whose first group is "
                                           "the patient"),
             option("site", "site of rows without a --site-col value"), option("site_col"),
             option("split_col"), option("mask_col"), option("extra_col"), option("strict")),
))  # fmt: skip


# ------------------------------------------------------------------------------------------- masks
def _read_masks(args: argparse.Namespace) -> Manifest:
    from sscxr.data import importers
    from sscxr.data.manifest import read_manifest

    return importers.join_masks(
        read_manifest(args.root), args.masks, args.mask_suffix, replace=args.replace_masks,
        require_masks=args.require_masks, source=args.root,
    )  # fmt: skip


# `import masks` rewrites a manifest: no new splits, and its rows keep the form of their paths.
register_importer(Importer(
    "masks", "add mask paths to an existing manifest by image stem, keeping its splits and patients",
    _read_masks, root_help="the manifest CSV",
    options=(option("masks", "folder of masks (searched recursively)", needed=True), option("mask_suffix"),
             option("replace_masks"), option("require_masks")),
    splits=False, paths="as_given",
))  # fmt: skip
