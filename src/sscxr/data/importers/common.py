"""Helpers every importer uses: folder checks and scans, relative paths, patient pseudonyms, and the
warn-or-raise report of listed files that are missing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from sscxr.data.io import is_image_file
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


def _report_missing(source: Path | str, what: str, items: Sequence[object], strict: bool, fix: str) -> None:
    """Warn about (or, when strict, raise on) `items` that `source` names but that are not there."""
    if not items:
        return
    message = f"{source}: {len(items)} {what}: {_listing(items)}. {fix}"
    if strict:
        raise DataError(message)
    logger.warning("%s", message)


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


def _require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise DataError(f"{path}: {what} folder not found; check the dataset root and its layout.")
    return Path(os.path.abspath(path))
