"""Importers of labelled image collections: class-folder trees (`import_folder`), COVIDx label files
(`import_covidx`) and any CSV metadata file (`import_csv`, with row filters, a label map and a
duplicate policy; `read_csv_metadata` also says what it left out).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sscxr.data.importers.common import (
    _dicom_patient,
    _is_dicom,
    _listing,
    _patient_matcher,
    _rel,
    _report_missing,
    _require_dir,
    _scan_images,
)
from sscxr.data.importers.rules import LabelMap, RowFilter, label_map_from, parse_filters
from sscxr.data.io import IMAGE_SUFFIXES
from sscxr.data.manifest import Manifest, ManifestRow, canonical_label, canonical_split, read_text_any
from sscxr.errors import ConfigError, DataError

logger = logging.getLogger(__name__)

SPLIT_NAMES = {"train": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


# ---------------------------------------------------------------------------------------- helpers
def _image_id(path: Path, root: Path) -> str:
    """Per-image patient id: the relative path without suffix (stems alone clash across class folders)."""
    # Only image suffixes are dropped: '1.2.840.99' (a UID-named DICOM) has none to drop.
    return _rel(path.with_suffix("") if path.suffix.lower() in IMAGE_SUFFIXES else path, root)


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
    fix = "pass the folder that holds the images (a CSV listing them is read by `sscxr import csv`)"
    root_path = _require_dir(Path(root), "image", fix)
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
    rows, tried, unmatched = [], 0, 0
    for path, parts in zip(images, rels, strict=True):
        patient = _dicom_patient(path, pseudonym_key) if _is_dicom(path) else None
        if patient is None and by_name is not None:
            patient = by_name(path.stem)
            tried, unmatched = tried + 1, unmatched + (patient is None)
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
            root_path, patient_pattern, tried - unmatched, tried,
        )  # fmt: skip
    return Manifest(rows, root_path)


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


def _covidx_rows(
    label_file: Path, image_dir: Path, root: Path, site: str
) -> tuple[list[ManifestRow], list[str]]:
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
        rows[rel] = ManifestRow(rel, canonical_label(cls), patient, source.lower() or site, split)
    return list(rows.values()), missing


def import_covidx(
    root: str | os.PathLike[str],
    label_files: Sequence[str] = ("train.txt", "test.txt"),
    image_dirs: Mapping[str, str | os.PathLike[str]] | None = None,
    strict: bool = False,
    site: str = "",
) -> Manifest:
    """COVIDx CXR (-2, -3, 8B, ...) from its label files.

    Args:
        root: dataset folder holding the label files and `train/`, `test/` (`val/`) image folders.
        label_files: label files (relative to `root` or absolute); the split is read from the name.
        image_dirs: split -> image folder, overriding `root/<split>`.
        strict: raise when a listed image is missing instead of warning and skipping it.
        site: site of the rows whose line has no `source` column (3-column label files).

    Returns:
        Manifest rooted at `root`; site = the `source` column (lower-cased), split from the file name.
    """
    root_path = _require_dir(Path(root), "COVIDx")
    rows: list[ManifestRow] = []
    for name in label_files:
        label_file = root_path / name
        if not label_file.is_file():
            raise DataError(
                f"{label_file}: COVIDx label file not found; name the label files you have with "
                "--label-file (e.g. --label-file train_COVIDx9A.txt --label-file test_COVIDx9A.txt)."
            )
        split = _split_of(label_file)
        image_dir = Path((image_dirs or {}).get(split, root_path / split))
        file_rows, missing = _covidx_rows(label_file, image_dir, root_path, site)
        _report_missing(
            label_file,
            f"listed image(s) missing from {image_dir}",
            missing,
            strict,
            "Skipped; download them or fix the path (--strict refuses the import instead).",
            "Download them or fix the path, or drop --strict to skip them.",
        )
        rows.extend(file_rows)
    return Manifest(rows, root_path)


# --------------------------------------------------------------------------------------- CSV files
DEDUPE_POLICIES = ("refuse", "first")


@dataclass
class CsvImport:
    """What `read_csv_metadata` made of a CSV: the manifest, and every row it left out and why."""

    manifest: Manifest
    csv_path: Path
    label_col: str = ""
    n_rows: int = 0
    filtered: Counter[str] = field(default_factory=Counter)  # --where text -> rows it dropped, in order
    missing: list[str] = field(default_factory=list)
    no_label: int = 0
    unmapped: Counter[str] = field(default_factory=Counter)  # raw label -> rows
    ambiguous: Counter[str] = field(default_factory=Counter)
    keep_unmapped: bool = False
    duplicates: int = 0
    conflicting: int = 0  # dropped duplicates whose label differs from the row kept

    def summary(self) -> str:
        """One line: rows read and imported, then what was left out (only what happened)."""
        parts = []
        if self.filtered.total():
            each = ", ".join(f"{k}: {n}" for k, n in self.filtered.items())
            parts.append(f"{self.filtered.total()} dropped by --where ({each})")
        if self.missing:
            parts.append(f"{len(self.missing)} listed image(s) not found")
        fate = "kept unlabelled" if self.keep_unmapped else "dropped"
        if self.no_label:
            parts.append(f"{self.no_label} with an empty {self.label_col!r} {fate}")
        if self.unmapped:
            fix = (
                ""
                if self.keep_unmapped
                else "; map them with --label-map 'RAW=CLASS' or keep them with --keep-unmapped"
            )
            parts.append(
                f"{self.unmapped.total()} whose label maps to no class {fate} ({_top(self.unmapped)}){fix}"
            )
        if self.ambiguous:
            parts.append(
                f"{self.ambiguous.total()} whose findings map to several classes {fate} "
                f"({_top(self.ambiguous)}); map the whole value with --label-map to decide"
            )
        if self.duplicates:
            differ = f", {self.conflicting} with another label than the row kept" if self.conflicting else ""
            parts.append(f"{self.duplicates} repeated row(s) dropped (--dedupe first{differ})")
        head = f"{self.csv_path}: {len(self.manifest)} of {self.n_rows} rows imported"
        return head + ("; " + "; ".join(parts) if parts else "")

    @property
    def left_out(self) -> bool:
        """Some rows were dropped or left unlabelled (the summary is worth a warning)."""
        counts = (self.filtered.total(), self.missing, self.no_label, self.unmapped, self.ambiguous)
        return any(counts) or bool(self.duplicates)


def _top(counts: Counter[str], shown: int = 5) -> str:
    items = counts.most_common()
    text = ", ".join(f"{raw!r}: {n}" for raw, n in items[:shown])
    return text + (f" and {len(items) - shown} more values" if len(items) > shown else "")


@dataclass
class _Candidate:
    """A CSV row that passed the filters and names an existing image."""

    line: int
    row: ManifestRow
    label: str | None  # None: unlabelled by the label map, and dropped unless kept
    why: str = ""  # "empty", "unmapped" or "ambiguous" when the label map gave no label
    raw: str = ""


def _csv_records(csv_file: Path) -> tuple[list[str], list[tuple[int, dict[str, str]]]]:
    """Header and (first line number, cells) of each record; a quoted cell may span several lines."""
    reader = csv.reader(io.StringIO(read_text_any(csv_file), newline=""))
    records = []
    try:
        header = [h.strip() for h in next(reader, [])]
        start = reader.line_num + 1
        for cells in reader:
            if cells:  # blank lines are no records (as for csv.DictReader)
                padded = [*cells, *[""] * (len(header) - len(cells))]
                records.append((start, {h: padded[i].strip() for i, h in enumerate(header)}))
            start = reader.line_num + 1
    except csv.Error as e:  # e.g. an unclosed quote swallowing the rest of the file into one cell
        raise DataError(
            f'{csv_file}, line {reader.line_num}: not a readable CSV ({e}); check for an unclosed quote (").'
        ) from None
    return header, records


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
    record: Mapping[str, str], patient_col: str, by_pattern: Callable[[str], str | None] | None, fallback: str
) -> str:
    value = record.get(patient_col, "").strip() if patient_col else ""
    value = value or fallback
    return (by_pattern(value) if by_pattern is not None else None) or value


def _check_columns(
    csv_path: Path, header: Sequence[str], wanted: Iterable[str], what: str = "column(s)"
) -> None:
    absent = [c for c in wanted if c and c not in header]
    if absent:
        raise DataError(f"{csv_path}: {what} {absent} not found; the columns are {list(header)}.")


def _labelled(raw: str, label_map: LabelMap | None) -> tuple[str | None, str]:
    """(label, "") or, when the map gives none, (None, why: "empty" / "ambiguous" / "unmapped")."""
    if not label_map:
        return canonical_label(raw), ""
    match = label_map.lookup(raw)
    if match.label:
        return match.label, ""
    return None, "empty" if not raw.strip() else "ambiguous" if match.ambiguous else "unmapped"


def _dedupe(csv_file: Path, found: list[_Candidate], policy: str) -> tuple[list[_Candidate], int, int]:
    """The first row of each image (refusing repeats unless `policy` is "first"), dropped, conflicting."""
    lines: dict[str, list[int]] = {}
    for c in found:
        lines.setdefault(c.row.path, []).append(c.line)
    repeated = {path: ls for path, ls in lines.items() if len(ls) > 1}
    if repeated and policy != "first":
        path, ls = next(iter(repeated.items()))
        more = f" ({len(repeated) - 1} more image(s) are listed more than once)" if len(repeated) > 1 else ""
        raise DataError(
            f"{csv_file}: {path} is listed on lines {_listing(ls)}{more}; keep one row per image, or pass "
            "--dedupe first to keep each image's first row."
        )
    first: dict[str, _Candidate] = {}
    for c in found:
        first.setdefault(c.row.path, c)
    dropped = [c for c in found if first[c.row.path] is not c]
    conflicting = sum(c.label != first[c.row.path].label for c in dropped)
    return list(first.values()), len(dropped), conflicting


def _no_row_passes(
    csv_file: Path, filters: Sequence[RowFilter], records: list[tuple[int, dict[str, str]]]
) -> str:
    """The error when the filters drop every row: each filter with a few of its column's values."""
    seen = []
    for f in filters:
        values = Counter(cells[f.column] for _, cells in records).most_common(5)
        seen.append(f"{f.column!r} holds " + ", ".join(repr(v) for v, _ in values))
    shown = " ".join(f"--where {f}" for f in filters)
    return f"{csv_file}: no row passes {shown} ({'; '.join(seen)}); check the column names and values."


def read_csv_metadata(
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
    where: Sequence[str | RowFilter] = (),
    label_map: LabelMap | Mapping[str, Sequence[str]] | None = None,
    keep_unmapped: bool = False,
    dedupe: str = "refuse",
) -> CsvImport:
    """`import_csv`, returning also what was left out and why (`CsvImport.summary`); same arguments."""
    if dedupe not in DEDUPE_POLICIES:
        raise ValueError(f"dedupe={dedupe!r}: expected one of {DEDUPE_POLICIES}")
    if not path_col:
        raise ValueError("read_csv_metadata: path_col must name the column of image names")
    csv_file = Path(csv_path)
    header, records = _csv_records(csv_file)
    filters = parse_filters(where)
    lmap = label_map if isinstance(label_map, LabelMap | None) else label_map_from(classes=label_map)
    _check_columns(
        csv_file, header, [path_col, label_col, patient_col, site_col, split_col, mask_col, *extra_cols]
    )
    _check_columns(csv_file, header, [f.column for f in filters], "--where column(s)")
    if lmap and not label_col:
        raise ConfigError(f"{csv_file}: a label map needs --label-col, the column of raw labels it maps")
    if not records:
        raise DataError(f"{csv_file}: no rows under the header; is this the metadata file?")
    fix = f"pass --image-dir with the folder that the {path_col!r} names are relative to"
    folder = _require_dir(Path(image_dir) if image_dir is not None else csv_file.parent, "image", fix)
    by_pattern = _patient_matcher(patient_pattern or "")
    report = CsvImport(Manifest([], folder), csv_file, label_col, len(records), keep_unmapped=keep_unmapped)
    report.filtered.update(dict.fromkeys(map(str, filters), 0))  # the summary lists them in the given order
    found: list[_Candidate] = []
    by_stem: dict[str, Path] = {}
    for line, cells in records:
        failed = next((f for f in filters if not f.keeps(cells[f.column])), None)
        if failed is not None:
            report.filtered[str(failed)] += 1
            continue
        value = cells[path_col]
        image = _find_image(folder, value, by_stem) if value else None
        if image is None:
            report.missing.append(value or f"(empty {path_col!r}, line {line})")
            continue
        raw = cells.get(label_col, "") if label_col else ""
        label, why = _labelled(raw, lmap)
        row = ManifestRow(
            path=os.path.relpath(image, folder).replace(os.sep, "/"),
            label=label or "",
            patient_id=_patient_of(cells, patient_col, by_pattern, Path(value).with_suffix("").as_posix()),
            site=(cells.get(site_col, "") if site_col else "") or site,
            split=canonical_split(cells.get(split_col, "")) if split_col else "",
            mask_path=cells.get(mask_col, "") if mask_col else "",
            extra={c: cells.get(c, "") for c in extra_cols},
        )
        found.append(_Candidate(line, row, label, why, raw))
    if filters and report.filtered.total() == len(records):
        raise DataError(_no_row_passes(csv_file, filters, records))
    if report.missing and not found:
        first = ", ".join(str(folder / m) for m in report.missing[:3])
        raise DataError(
            f"{csv_file}: none of the {len(report.missing)} listed images was found under {folder} "
            f"(first missing: {first}); {fix}."
        )
    _report_missing(
        csv_file,
        f"listed image(s) not found in {folder}",
        report.missing,
        strict,
        "Skipped; fix the names or --image-dir (--strict refuses the import instead).",
        "Fix the names or --image-dir, or drop --strict to skip them.",
    )
    labelled = [c for c in found if c.label is not None or keep_unmapped]
    kept, report.duplicates, report.conflicting = _dedupe(csv_file, labelled, dedupe)
    for c in [*kept, *(c for c in found if c.label is None and not keep_unmapped)]:
        if c.why == "empty":
            report.no_label += 1
        elif c.why:
            (report.ambiguous if c.why == "ambiguous" else report.unmapped)[c.raw] += 1
    report.manifest = Manifest([c.row for c in kept], folder)
    if not kept:
        raise DataError(f"{report.summary()}. No row is left: check the label map and the filters.")
    return report


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
    where: Sequence[str | RowFilter] = (),
    label_map: LabelMap | Mapping[str, Sequence[str]] | None = None,
    keep_unmapped: bool = False,
    dedupe: str = "refuse",
) -> Manifest:
    """Any CSV metadata file with one row per image (what was left out is logged as a warning).

    Args:
        csv_path: the CSV (UTF-8, or cp1252 with a warning); quoted cells may span lines.
        path_col: column naming the image, relative to `image_dir`; the suffix may be left out.
        label_col, patient_col, site_col, split_col, mask_col: optional columns ("" = none).
        image_dir: folder the image (and mask) names are relative to; None = the CSV's folder.
        site: site for rows without a `site_col` value.
        patient_pattern: regex applied to the patient value (or, without `patient_col`, to the path
            value); group 1 (or the whole match) is the patient id, e.g. r"^(COVID-\\d+)" groups
            fig1's COVID-00003a and COVID-00003b.
        extra_cols: columns copied into the manifest as extra columns.
        strict: raise when a named image is missing instead of warning and skipping it.
        where: row filters, `COLUMN=V1,V2` (keep) or `COLUMN!=V1,V2` (drop); see `rules.RowFilter`.
        label_map: raw label -> canonical label (`rules.LabelMap`, or class -> list of raw values);
            None = `canonical_label` of every value, all rows kept. With a map, rows it gives no
            label (empty, unmapped, ambiguous: see `rules`) are dropped, or kept unlabelled when
            `keep_unmapped`.
        dedupe: "refuse" an image listed on several (kept) rows, or keep its "first" row.

    Returns:
        Manifest rooted at `image_dir`, in CSV order.

    Raises:
        DataError: a column not in the CSV; no rows; no listed image exists under `image_dir`; the
            filters or the label map leave no row; a repeated image (dedupe="refuse").
        ConfigError: a malformed filter, or a label map without `label_col`.
    """
    report = read_csv_metadata(
        csv_path, path_col, label_col, patient_col, image_dir=image_dir, site=site, site_col=site_col,
        split_col=split_col, mask_col=mask_col, patient_pattern=patient_pattern, extra_cols=extra_cols,
        strict=strict, where=where, label_map=label_map, keep_unmapped=keep_unmapped, dedupe=dedupe,
    )  # fmt: skip
    if report.left_out:
        logger.warning("%s", report.summary())
    return report.manifest


def read_patient_table(csv_path: str | os.PathLike[str], path_col: str, patient_col: str) -> dict[str, str]:
    """Image file name -> patient from a metadata CSV (`import pairs --meta-csv`).

    Keys are the file names of `path_col` (folders dropped; the suffix may be left out, then the image's
    stem is looked up). Rows with an empty patient are skipped.

    Raises:
        DataError: a missing column, or one image given two different patients.
    """
    csv_file = Path(csv_path)
    header, records = _csv_records(csv_file)
    _check_columns(csv_file, header, [path_col, patient_col])
    table: dict[str, str] = {}
    lines: dict[str, int] = {}
    for line, cells in records:
        name, patient = Path(cells[path_col]).name, cells[patient_col]
        if not name or not patient:
            continue
        if table.get(name, patient) != patient:
            raise DataError(
                f"{csv_file}, lines {lines[name]} and {line}: {name} is given the patients {table[name]!r} "
                f"and {patient!r}; keep one."
            )
        table[name], lines[name] = patient, line
    return table
