"""Manifests: the CSV list of images (with label, patient, site, split, mask) every later step reads.

A manifest file has the columns `path,label,patient_id,site,split,mask_path`, then any extra columns
(kept verbatim). Relative paths are relative to the folder that holds the manifest file, so a dataset
folder and its manifest can move together.
"""

from __future__ import annotations

import csv
import hashlib
import io
import logging
import os
import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from sscxr.errors import DataError
from sscxr.utils import atomic_write_text

logger = logging.getLogger(__name__)

CORE_COLUMNS: tuple[str, ...] = ("path", "label", "patient_id", "site", "split", "mask_path")
COUNT_KEYS: tuple[str, ...] = ("label", "site", "split")
# Rows with no patient id get this prefix + their path: each image is then its own patient.
IMAGE_PATIENT_PREFIX = "image:"

# Dataset spellings -> canonical labels. Keys are lower-cased with '_' and runs of spaces folded to ' '.
_LABEL_ALIASES: dict[str, str] = {
    "normal": "healthy",
    "healthy": "healthy",
    "health": "healthy",
    "no finding": "healthy",
    "nofinding": "healthy",
    "pneumonia": "pneumonia",
    "viral pneumonia": "pneumonia",
    "bacterial pneumonia": "pneumonia",
    "covid-19": "covid-19",
    "covid19": "covid-19",
    "covid 19": "covid-19",
    "covid": "covid-19",
    "sars-cov-2": "covid-19",
    # COVIDx CXR-3 label files give the covid test result, not a diagnosis.
    "positive": "covid-19",
    "negative": "non-covid",
    "non-covid": "non-covid",
    "non covid": "non-covid",
    "noncovid": "non-covid",
    "covid-negative": "non-covid",
    "tuberculosis": "tuberculosis",
    "tb": "tuberculosis",
}


def canonical_label(label: str) -> str:
    """Map a dataset's spelling of a label to the canonical one.

    Args:
        label: a label as a dataset writes it ("NORMAL", "COVID-19", "No finding", "positive", ...).

    Returns:
        `healthy`, `pneumonia`, `covid-19`, `non-covid` or `tuberculosis` for known spellings; any other
        string stripped and lower-cased; "" stays "" (unlabelled).
    """
    cleaned = label.strip().lower()
    key = re.sub(r"[\s_]+", " ", cleaned)
    return _LABEL_ALIASES.get(key, cleaned)


# Split spellings -> the names every command uses (compared lower-cased).
_SPLIT_ALIASES: dict[str, str] = {
    "train": "train",
    "training": "train",
    "val": "val",
    "valid": "val",
    "validation": "val",
    "dev": "val",
    "test": "test",
    "testing": "test",
}


def canonical_split(split: str) -> str:
    """`TRAINING`, `Validation`, `Test` ... -> train / val / test; other names kept as written (stripped)."""
    cleaned = split.strip()
    return _SPLIT_ALIASES.get(cleaned.lower(), cleaned)


@dataclass(frozen=True)
class ManifestRow:
    """One image of a manifest. Paths are as written (relative to `Manifest.root` or absolute)."""

    path: str
    label: str = ""
    patient_id: str = ""
    site: str = ""
    split: str = ""
    mask_path: str = ""
    # hash=False: a dict cannot be hashed, and rows are still usable as dict keys / in sets.
    extra: dict[str, str] = field(default_factory=dict, hash=False)


@dataclass
class Manifest:
    """Rows plus the folder that relative paths resolve against."""

    rows: list[ManifestRow]
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(os.path.abspath(self.root))

    def __len__(self) -> int:
        return len(self.rows)

    def __iter__(self) -> Iterator[ManifestRow]:
        return iter(self.rows)

    def __getitem__(self, index: int) -> ManifestRow:
        return self.rows[index]

    def resolve(self, row: ManifestRow) -> Path:
        """Absolute path of a row's image."""
        return _resolve(self.root, row.path)

    def resolve_mask(self, row: ManifestRow) -> Path | None:
        """Absolute path of a row's mask, or None when the row has none."""
        return _resolve(self.root, row.mask_path) if row.mask_path else None

    @property
    def has_masks(self) -> bool:
        """True when at least one row has a mask path."""
        return any(row.mask_path for row in self.rows)

    def with_rows(self, rows: Iterable[ManifestRow]) -> Manifest:
        """A manifest with the same root and other rows."""
        return Manifest(list(rows), self.root)

    def filter(
        self,
        split: str | Iterable[str] | None = None,
        labels: Iterable[str] | None = None,
        sites: Iterable[str] | None = None,
    ) -> Manifest:
        """Rows whose split, label and site are all among those given (None = any).

        Args:
            split: one split name or several.
            labels: canonical labels to keep.
            sites: sites to keep.
        """
        splits = {split} if isinstance(split, str) else _as_set(split)
        label_set, site_set = _as_set(labels), _as_set(sites)
        return self.with_rows(
            r
            for r in self.rows
            if (splits is None or r.split in splits)
            and (label_set is None or r.label in label_set)
            and (site_set is None or r.site in site_set)
        )

    def labels(self) -> list[str]:
        """Sorted distinct non-empty labels."""
        return sorted({r.label for r in self.rows if r.label})

    def counts(self, by: str = "label") -> dict[str, int]:
        """Number of rows per value of `by` ("label", "site" or "split"), sorted by value."""
        if by not in COUNT_KEYS:
            raise ValueError(f"counts(by={by!r}): by must be one of {COUNT_KEYS}")
        return dict(sorted(Counter(getattr(r, by) for r in self.rows).items()))

    def patients(self) -> dict[str, list[int]]:
        """Patient id -> indices of that patient's rows, in first-appearance order."""
        out: dict[str, list[int]] = {}
        for i, row in enumerate(self.rows):
            out.setdefault(row.patient_id, []).append(i)
        return out

    def extra_columns(self) -> list[str]:
        """Names of the extra columns, in first-appearance order."""
        seen: dict[str, None] = {}
        for row in self.rows:
            seen.update(dict.fromkeys(row.extra))
        return list(seen)


def _as_set(values: Iterable[str] | None) -> set[str] | None:
    return None if values is None else set(values)


def _resolve(root: Path, path: str) -> Path:
    # abspath normalises '..' without following symlinks (a data folder may be a link on purpose).
    return Path(os.path.abspath(root / path))


def read_text_any(path: Path) -> str:
    """Read a text file as UTF-8 (BOM allowed), falling back to cp1252 with a warning.

    Spreadsheet exports (fig1's metadata.csv, for one) are often cp1252; failing on them helps nobody.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read ({e.strerror}); check the path.") from e
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        logger.warning("%s is not UTF-8; reading it as cp1252 (Windows Latin-1)", path)
        return raw.decode("cp1252", errors="replace")


def read_manifest(path: str | os.PathLike[str]) -> Manifest:
    """Read and validate a manifest CSV.

    Checks: the `path` column exists, no row has an empty or duplicate path, no row has more cells
    than the header. Rows with no patient id are given a per-image id (`image:<path>`) so patient-level
    splitting still works; a warning says how many.

    Args:
        path: the manifest file.

    Returns:
        The manifest, with `root` = the folder holding the file.
    """
    path = Path(path)
    reader = csv.DictReader(io.StringIO(read_text_any(path), newline=""))
    try:
        header = [h.strip() for h in (reader.fieldnames or [])]
        if "path" not in header:
            raise DataError(
                f"{path}: no 'path' column (header: {header or 'empty file'}); a manifest needs at least "
                f"'path', usually {', '.join(CORE_COLUMNS)}. Write one with an importer (`sscxr import`)."
            )
        reader.fieldnames = header
        rows = [_parse_row(path, reader.line_num, record) for record in reader]
    except csv.Error as e:  # e.g. a cell over csv's field size limit (an unclosed quote swallowing the file)
        raise DataError(
            f'{path}, line {reader.line_num}: not a readable CSV ({e}); check for an unclosed quote (").'
        ) from None
    _check_duplicates(path, rows)
    return Manifest(_fill_patients(path, _canonical(path, rows)), path.parent)


def _canonical(path: Path, rows: list[ManifestRow]) -> list[ManifestRow]:
    """Labels and splits in the names the tasks use (`COVID` -> covid-19, `TRAINING` -> train), saying
    what was renamed, and warning about rows no command will read (no split while others have one)."""
    out = [replace(r, label=canonical_label(r.label), split=canonical_split(r.split)) for r in rows]
    renamed = Counter(
        f"{a.label!r} -> {b.label!r}" for a, b in zip(rows, out, strict=True) if a.label != b.label
    )
    renamed.update(
        f"split {a.split!r} -> {b.split!r}" for a, b in zip(rows, out, strict=True) if a.split != b.split
    )
    if renamed:
        logger.info("%s: renamed %s", path, ", ".join(f"{k} ({n} rows)" for k, n in sorted(renamed.items())))
    unsplit = sum(not r.split for r in out)
    if 0 < unsplit < len(out):
        logger.warning(
            "%s: %d of %d rows have no split, so no training or evaluation command reads them; "
            "`sscxr split %s --split 0.7,0.15,0.15` assigns them (by patient).",
            path, unsplit, len(out), path,
        )  # fmt: skip
    return out


def _parse_row(path: Path, line: int, record: dict[str | None, Any]) -> ManifestRow:
    if None in record:
        raise DataError(f"{path}, line {line}: more cells than header columns; quote cells with commas.")
    # A short row gives None for its missing cells: treat them as empty.
    cells = {str(k): (v or "").strip() for k, v in record.items()}
    if not cells["path"]:
        raise DataError(f"{path}, line {line}: empty 'path'; every row needs an image path.")
    core = {k: cells.get(k, "") for k in CORE_COLUMNS}
    extra = {k: v for k, v in cells.items() if k not in CORE_COLUMNS}
    return ManifestRow(**core, extra=extra)


def _check_duplicates(path: Path, rows: list[ManifestRow]) -> None:
    # Compare resolved paths so that 'a/x.png', './a/x.png' and an absolute spelling count as one.
    counts = Counter(os.path.normpath(path.parent / r.path) for r in rows)
    dups = [p for p, n in counts.items() if n > 1]
    if dups:
        shown = ", ".join(dups[:5]) + (f" and {len(dups) - 5} more" if len(dups) > 5 else "")
        raise DataError(
            f"{path}: {len(dups)} image path(s) listed more than once: {shown}. "
            "Each image must appear once; remove the repeated rows."
        )


def _fill_patients(path: Path, rows: list[ManifestRow]) -> list[ManifestRow]:
    missing = sum(not r.patient_id for r in rows)
    if not missing:
        return rows
    logger.warning(
        "%s: %d of %d rows have no patient_id; each is treated as its own patient (%s<path>). "
        "Fill the column so that one patient's images stay in one split.",
        path,
        missing,
        len(rows),
        IMAGE_PATIENT_PREFIX,
    )
    return [r if r.patient_id else replace(r, patient_id=IMAGE_PATIENT_PREFIX + r.path) for r in rows]


OUTSIDE_FORMS = ("as_given", "relative", "absolute")


def _path_cell(target: Path, given: str, folder: Path, outside: str) -> str:
    """How a row's path is written into a manifest in `folder` (posix separators).

    Inside `folder`: relative to it, so the manifest moves with its data. Outside: relative (`../x.png`)
    or absolute as `outside` says; "as_given" keeps the form of the row's path as it was read or
    imported (`given`), so rewriting a manifest never turns a relative path into the user's absolute one.
    """
    try:
        return target.relative_to(folder).as_posix()
    except ValueError:
        pass
    relative = not os.path.isabs(given) if outside == "as_given" else outside == "relative"
    return Path(os.path.relpath(target, folder)).as_posix() if relative else target.as_posix()


def write_manifest(manifest: Manifest, path: str | os.PathLike[str], outside: str = "as_given") -> Path:
    """Write `manifest` to `path` atomically (temp file + os.replace).

    Paths inside the new manifest's folder are written relative to it. Paths outside it follow
    `outside`: "as_given" (relative rows stay relative, recomputed for the new folder; absolute ones stay
    absolute), "relative" or "absolute" (importers choose from how the user named the data folder).

    Args:
        manifest: rows to write; their relative paths are resolved against `manifest.root`.
        path: the CSV file to write.
        outside: "as_given" | "relative" | "absolute".

    Returns:
        The absolute path written.
    """
    if outside not in OUTSIDE_FORMS:
        raise ValueError(f"outside must be one of {OUTSIDE_FORMS}, got {outside!r}")
    path = Path(os.path.abspath(path))
    folder = path.parent
    extras = manifest.extra_columns()
    buf = io.StringIO(newline="")
    plain = csv.writer(buf, lineterminator="\n")
    # csv quotes cells holding the line terminator ("\n") but not a lone "\r", which readers take for a
    # line end: rows with one are written fully quoted so that they read back unchanged.
    quoted = csv.writer(buf, lineterminator="\n", quoting=csv.QUOTE_ALL)

    def writerow(cells: list[str]) -> None:
        (quoted if any("\r" in c for c in cells) else plain).writerow(cells)

    writerow([*CORE_COLUMNS, *extras])
    for row in manifest.rows:
        mask = manifest.resolve_mask(row)
        writerow(
            [
                _path_cell(manifest.resolve(row), row.path, folder, outside),
                row.label,
                row.patient_id,
                row.site,
                row.split,
                _path_cell(mask, row.mask_path, folder, outside) if mask else "",
                *(row.extra.get(k, "") for k in extras),
            ]
        )
    atomic_write_text(path, buf.getvalue())
    return path


def manifest_hash(path: str | os.PathLike[str]) -> str:
    """sha256 of the manifest file's bytes, first 16 hex digits (identifies what a cache was built from)."""
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise DataError(f"{path}: cannot be read to hash it ({e.strerror}).") from e
    return hashlib.sha256(data).hexdigest()[:16]
