"""Helpers every importer uses: folder checks and scans, relative paths, patient ids (DICOM pseudonyms,
`--patient-pattern`), and the warn-or-raise report of listed files that are missing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import pydicom

from sscxr.data.io import RASTER_SUFFIXES, is_image_file
from sscxr.errors import DataError

logger = logging.getLogger(__name__)

_SHOWN = 5


# ---------------------------------------------------------------------------------------- helpers
def pseudonym(value: str, key: str = "") -> str:
    """12 hex digits standing for an identifier (sha256, or HMAC-sha256 when `key` is given).

    An unkeyed hash of a short numeric ID can be reversed by trying every ID; pass a secret `key`
    when the manifest leaves the site that holds the DICOMs.
    """
    data = value.encode("utf-8")
    if key:
        return hmac.new(key.encode("utf-8"), data, hashlib.sha256).hexdigest()[:12]
    return hashlib.sha256(data).hexdigest()[:12]


def _listing(items: Sequence[object]) -> str:
    shown = ", ".join(str(i) for i in items[:_SHOWN])
    return shown + (f" and {len(items) - _SHOWN} more" if len(items) > _SHOWN else "")


def _report_missing(
    source: Path | str,
    what: str,
    items: Sequence[object],
    strict: bool,
    fix: str,
    strict_fix: str | None = None,
) -> None:
    """Warn about (or, when strict, raise on) `items` that `source` names but that are not there.

    `fix` ends the warning ("Skipped; ..."); `strict_fix`, when given, ends the error instead, where
    "skipped" would not be true.
    """
    if not items:
        return
    message = f"{source}: {len(items)} {what}: {_listing(items)}. "
    if strict:
        raise DataError(message + (strict_fix or fix))
    logger.warning("%s", message + fix)


def _hidden(path: Path, root: Path) -> bool:
    # macOS '._x.png' resource forks carry image suffixes but are not images.
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def _scan_images(root: Path, recursive: bool = True) -> list[Path]:
    """Image files under `root`, sorted by relative path, hidden files and folders skipped."""
    pattern = root.rglob("*") if recursive else root.glob("*")
    found = [p for p in pattern if p.is_file() and not _hidden(p, root) and is_image_file(p)]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_dir(path: Path, what: str, fix: str = "check the dataset root and its layout") -> Path:
    """`path` made absolute; a file or a missing folder is one line saying which, and `fix`."""
    if path.is_file():
        raise DataError(f"{path}: is a file, not the {what} folder; {fix}.")
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found; {fix}.")
    return Path(os.path.abspath(path))


# ------------------------------------------------------------------------------------ patient ids
def _is_dicom(path: Path) -> bool:
    # Called on files `is_image_file` accepted: anything not raster-suffixed was sniffed as DICOM.
    return path.suffix.lower() not in RASTER_SUFFIXES


def _dicom_patient(path: Path, key: str) -> str | None:
    """Pseudonym of a DICOM's PatientID, or None when it has none or cannot be read."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, force=True, specific_tags=["PatientID"])
    except Exception as e:  # unreadable files are reported by the cache step, not here
        logger.debug("%s: no PatientID read (%s)", path, e)
        return None
    value = str(ds.get("PatientID", "") or "").strip()
    return pseudonym(value, key) if value else None


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
