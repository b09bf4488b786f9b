"""Importers of labelled image collections: class-folder trees (`import_folder`), COVIDx label files
(`import_covidx`) and any CSV metadata file (`import_csv`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path

import pydicom

from sscxr.data.importers.common import _rel, _report_missing, _require_dir, _scan_images, pseudonym
from sscxr.data.io import IMAGE_SUFFIXES, RASTER_SUFFIXES
from sscxr.data.manifest import Manifest, ManifestRow, canonical_label, read_text_any
from sscxr.errors import DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------------------------------- helpers
def _is_dicom(path: Path) -> bool:
    # Called on files `is_image_file` accepted: anything not raster-suffixed was sniffed as DICOM.
    return path.suffix.lower() not in RASTER_SUFFIXES


def _image_id(path: Path, root: Path) -> str:
    """Per-image patient id: the relative path without suffix (stems alone clash across class folders)."""
    # Only image suffixes are dropped: '1.2.840.99' (a UID-named DICOM) has none to drop.
    return _rel(path.with_suffix("") if path.suffix.lower() in IMAGE_SUFFIXES else path, root)


def _dicom_patient(path: Path, key: str) -> str | None:
    """Pseudonym of a DICOM's PatientID, or None when it has none or cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
    except Exception as e:  # unreadable files are reported by the cache step, not here
        logger.debug("%s: no PatientID read (%s)", path, e)
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return pseudonym(value, key) if value else None


# ------------------------------------------------------------------------------------ folder scan
def _layout(rels: list[tuple[str, ...]], class_subfolders: bool | None) -> tuple[bool, bool]:
    """(first folder level is a split, next level is a class) for relative path parts `rels`."""
    has_split = bool(rels) and all(len(p) > 2 and p[0].lower() in SPLIT_NAMES for p in rels)
    level = 1 if has_split else 0
    if class_subfolders is not None:
        return has_split, class_subfolders
    # Auto: every image sits in a class folder and there are at least two classes ('images/' is no class).
    in_folder = bool(rels) and all(len(p) > level + 1 for p in rels)
    return has_split, in_folder and len({p[level] for p in rels}) >= 2


def import_folder(
    root: str | os.PathLike[str],
    class_subfolders: bool | None = None,
    site: str = "",
    pseudonym_key: str = "",
    patient_pattern: str = "",
) -> Manifest:
    """Every image file under `root` (recursive), optionally labelled by its class folder.

    Layouts: `root/<class>/.../x.png`, `root/<split>/<class>/x.png` (split in train/val/test) or flat.

    Args:
        root: dataset folder.
        class_subfolders: the first folder level (after a split level) is the label; None = auto
            (every image lies in such a folder and there are at least two of them).
        site: site written on every row.
        pseudonym_key: secret for keyed DICOM patient pseudonyms (see `pseudonym`).
        patient_pattern: regular expression searched in each file name (without suffix) whose first
            group (or whole match) is the patient, e.g. `^(COVID-[0-9]+)` for `COVID-00015a`,
            `COVID-00015b`; files it does not match keep their own id (counted in a warning).

    Returns:
        Manifest rooted at `root`; patient id = pseudonym of the DICOM PatientID, else the
        `patient_pattern` match, else the image's relative path without suffix.

    Raises:
        DataError: no images; a class folder that holds masks (`*mask*`: use `sscxr import pairs`);
            a `patient_pattern` that is not a regular expression.
    """
    root_path = _require_dir(Path(root), "image")
    images = _scan_images(root_path)
    if not images:
        raise DataError(f"{root_path}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found.")
    rels = [p.relative_to(root_path).parts for p in images]
    has_split, has_class = _layout(rels, class_subfolders)
    level = 1 if has_split else 0
    if has_class:
        mask_dirs = sorted({parts[level] for parts in rels if "mask" in parts[level].lower()})
        if mask_dirs:
            raise DataError(
                f"{root_path}: folder(s) {mask_dirs} hold masks, which would be imported as X-rays "
                "labelled by the folder name; import images and masks with `sscxr import pairs IMAGES "
                "--masks MASKS`, or point `import folder` at the image folder."
            )
    by_name = _patient_matcher(patient_pattern)
    rows, unmatched = [], 0
    for path, parts in zip(images, rels, strict=True):
        patient = _dicom_patient(path, pseudonym_key) if _is_dicom(path) else None
        if patient is None and by_name is not None:
            patient = by_name(path.stem)
            unmatched += patient is None
        rows.append(
            ManifestRow(
                path=_rel(path, root_path),
                label=canonical_label(parts[level]) if has_class and len(parts) > level + 1 else "",
                patient_id=patient or _image_id(path, root_path),
                site=site,
                split=SPLIT_NAMES[parts[0].lower()] if has_split else "",
            )
        )
    if unmatched:
        logger.warning(
            "%s: --patient-pattern %r matched %d of %d file names; the others are each their own patient",
            root_path, patient_pattern, len(rows) - unmatched, len(rows),
        )  # fmt: skip
    return Manifest(rows, root_path)


def _patient_matcher(pattern: str) -> Callable[[str], str | None] | None:
    """name -> patient (the first group, else the whole match; None: no match); None without a pattern."""
    if not pattern:
        return None
    try:
        regex = re.compile(pattern)
    except re.error as e:
        raise DataError(f"--patient-pattern {pattern!r} is not a regular expression ({e})") from None

    def match(name: str) -> str | None:
        m = regex.search(name)
        if m is None:
            return None
        return m.group(1) if regex.groups else m.group(0)

    return match


# ------------------------------------------------------------------------------------------ COVIDx
def _split_of(label_file: Path) -> str:
    stem = label_file.stem.lower()
    for token, split in (("train", "train"), ("val", "val"), ("test", "test")):
        if token in stem:
            return split
    return stem


def _parse_covidx_line(label_file: Path, number: int, line: str) -> tuple[str, str, str, str]:
    """(patient, filename, class, source) from `patient filename class [source]`."""
    tokens = line.split()
    if len(tokens) < 3:
        raise DataError(
            f"{label_file}, line {number}: expected 'patient_id filename class [source]', got {line!r}."
        )
    # 3-column files end with the class; in 4-column ones the class is second to last. Filenames may
    # contain spaces, so the class position decides how many tokens the filename takes.
    if len(tokens) == 3 or canonical_label(tokens[-1]) in {"healthy", "pneumonia", "covid-19", "non-covid"}:
        return tokens[0], " ".join(tokens[1:-1]), tokens[-1], ""
    return tokens[0], " ".join(tokens[1:-2]), tokens[-2], tokens[-1]


def _covidx_rows(label_file: Path, image_dir: Path, root: Path) -> tuple[list[ManifestRow], list[str]]:
    """Rows of one label file, and the filenames it lists that are not in `image_dir`."""
    split = _split_of(label_file)
    rows: dict[str, ManifestRow] = {}
    missing: list[str] = []
    for number, line in enumerate(read_text_any(label_file).splitlines(), start=1):
        if not line.strip():
            continue
        patient, name, cls, source = _parse_covidx_line(label_file, number, line)
        path = image_dir / name
        if not path.is_file():
            missing.append(name)
            continue
        rel = os.path.relpath(path, root).replace(os.sep, "/")
        if rel in rows:
            logger.warning("%s, line %d: %s listed again; the first entry is kept", label_file, number, name)
            continue
        rows[rel] = ManifestRow(rel, canonical_label(cls), patient, source.lower(), split)
    return list(rows.values()), missing


def import_covidx(
    root: str | os.PathLike[str],
    label_files: Sequence[str] = ("train.txt", "test.txt"),
    image_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
    strict: bool = False,
) -> Manifest:
    """COVIDx CXR (-2, -3, 8B, ...) from its label files.

    Args:
        root: dataset folder holding the label files and `train/`, `test/` (`val/`) image folders.
        label_files: label files (relative to `root` or absolute); the split is read from the name.
        image_dirs: split -> image folder, overriding `root/<split>`.
        strict: raise when a listed image is missing instead of warning and skipping it.

    Returns:
        Manifest rooted at `root`; site = the `source` column (lower-cased), split from the file name.
    """
    root_path = _require_dir(Path(root), "COVIDx")
    rows: list[ManifestRow] = []
    for name in label_files:
        label_file = root_path / name
        if not label_file.is_file():
            raise DataError(f"{label_file}: COVIDx label file not found; pass the label_files you have.")
        split = _split_of(label_file)
        image_dir = Path((image_dirs or {}).get(split, root_path / split))
        file_rows, missing = _covidx_rows(label_file, image_dir, root_path)
        _report_missing(
            label_file,
            f"listed image(s) missing from {image_dir}",
            missing,
            strict,
            "Skipped; download them or fix the path.",
        )
        rows.extend(file_rows)
    return Manifest(rows, root_path)


# --------------------------------------------------------------------------------------- CSV files
def _find_image(image_dir: Path, value: str, by_stem: dict[str, Path]) -> Path | None:
    """The file a CSV cell names: as written, or (no suffix given) by stem with any image suffix."""
    path = image_dir / value
    if path.is_file():
        return path
    if Path(value).suffix.lower() in IMAGE_SUFFIXES:
        return None
    if not by_stem:
        # Built lazily: only CSVs that leave out the suffix (fig1's 'patientid') pay for the scan.
        by_stem.update((_rel(p.with_suffix(""), image_dir), p) for p in _scan_images(image_dir))
    return by_stem.get(Path(value).as_posix())


def _patient_of(
    record: dict[str, str], patient_col: str, pattern: re.Pattern[str] | None, fallback: str
) -> str:
    value = record.get(patient_col, "").strip() if patient_col else ""
    value = value or fallback
    if pattern is not None and (m := pattern.search(value)):
        return m.group(1) if m.groups() else m.group(0)
    return value


def _check_columns(csv_path: Path, header: Sequence[str], wanted: Iterable[str]) -> None:
    absent = [c for c in wanted if c and c not in header]
    if absent:
        raise DataError(f"{csv_path}: column(s) {absent} not found; the columns are {list(header)}.")


def import_csv(
    csv_path: str | os.PathLike[str],
    path_col: str,
    label_col: str = "",
    patient_col: str = "",
    *,
    image_dir: str | os.PathLike[str] | None = None,
    site: str = "",
    site_col: str = "",
    split_col: str = "",
    mask_col: str = "",
    patient_pattern: str | None = None,
    extra_cols: Sequence[str] = (),
    strict: bool = False,
) -> Manifest:
    """Any CSV metadata file with one row per image.

    Args:
        csv_path: the CSV (UTF-8, or cp1252 with a warning).
        path_col: column naming the image, relative to `image_dir`; the suffix may be left out.
        label_col, patient_col, site_col, split_col, mask_col: optional columns ("" = none).
        image_dir: folder the image (and mask) names are relative to; None = the CSV's folder.
        site: site for rows without a `site_col` value.
        patient_pattern: regex applied to the patient value (or, without `patient_col`, to the path
            value); group 1 (or the whole match) is the patient id, e.g. r"^(COVID-\\d+)" groups
            fig1's COVID-00003a and COVID-00003b.
        extra_cols: columns copied into the manifest as extra columns.
        strict: raise when a named image is missing instead of warning and skipping it.

    Returns:
        Manifest rooted at `image_dir`, in CSV order.
    """
    csv_file = Path(csv_path)
    folder = _require_dir(Path(image_dir) if image_dir is not None else csv_file.parent, "image")
    reader = csv.DictReader(io.StringIO(read_text_any(csv_file), newline=""))
    header = [h.strip() for h in reader.fieldnames or []]
    reader.fieldnames = header
    cols = [path_col, label_col, patient_col, site_col, split_col, mask_col, *extra_cols]
    _check_columns(csv_file, header, cols)
    pattern = re.compile(patient_pattern) if patient_pattern else None
    rows: dict[str, ManifestRow] = {}
    missing: list[str] = []
    by_stem: dict[str, Path] = {}
    for record in reader:
        cells = {k: (v or "").strip() for k, v in record.items() if k is not None}
        value = cells[path_col]
        image = _find_image(folder, value, by_stem) if value else None
        if image is None:
            missing.append(value or f"(empty {path_col!r}, line {reader.line_num})")
            continue
        rel = os.path.relpath(image, folder).replace(os.sep, "/")
        if rel in rows:
            raise DataError(f"{csv_file}, line {reader.line_num}: {rel} is listed twice; keep one row.")
        rows[rel] = ManifestRow(
            path=rel,
            label=canonical_label(cells.get(label_col, "")) if label_col else "",
            patient_id=_patient_of(cells, patient_col, pattern, Path(value).with_suffix("").as_posix()),
            site=(cells.get(site_col, "") if site_col else "") or site,
            split=cells.get(split_col, "") if split_col else "",
            mask_path=cells.get(mask_col, "") if mask_col else "",
            extra={c: cells.get(c, "") for c in extra_cols},
        )
    _report_missing(
        csv_file,
        f"listed image(s) not found in {folder}",
        missing,
        strict,
        "Skipped; fix the names or image_dir.",
    )
    return Manifest(list(rows.values()), folder)
