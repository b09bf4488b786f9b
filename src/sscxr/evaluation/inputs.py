"""The images a prediction command runs on: files, folders (searched recursively) and manifests.

Every input keeps the path the user gave (relative stays relative), which is how the outputs name it,
and gets an output name relative to the output folder that keeps the sub-folder layout of a folder
input and never collides with another input's (`x.png` of two folders: `x_mask.png`, `x_mask_2.png`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from sscxr.data.io import is_image_file
from sscxr.errors import DataError

__all__ = ["collect_inputs"]


def collect_inputs(
    inputs: Sequence[str | os.PathLike[str]], suffix: str = "_mask.png"
) -> list[tuple[Path, Path]]:
    """Image files to run on, each with its output name relative to the output folder.

    Folders are searched recursively (files that `is_image_file` accepts; the sub-folder layout is kept
    in the output names); a `.csv` file is read as a manifest (its rows' images, paths resolved against
    the manifest's folder); other files are taken as given (even with an unknown suffix: reading
    decides, and an unreadable file is reported by the caller).

    Args:
        inputs: files, folders and manifests, as the user gave them.
        suffix: appended to each image's stem to name its output (`<stem><suffix>`).

    Returns:
        (input path, relative output path) pairs in the order given, without duplicates.

    Raises:
        DataError: an input does not exist, or nothing to run on was found.
    """
    from sscxr.data.manifest import read_manifest

    found: dict[Path, Path] = {}
    taken: set[Path] = set()
    for item in map(Path, inputs):
        if item.is_dir():
            files = sorted(p for p in item.rglob("*") if p.is_file() and not p.name.startswith("."))
            pairs = [(f, f.relative_to(item)) for f in files if is_image_file(f)]
        elif item.suffix.lower() == ".csv" and item.is_file():
            manifest = read_manifest(item)
            # Row paths joined to the manifest's folder as given: relative inputs stay relative.
            rows = [Path(r.path) for r in manifest.rows]
            pairs = [(Path(os.path.normpath(item.parent / r)), _inside(r)) for r in rows]
        elif item.exists():
            pairs = [(item, Path(item.name))]
        else:
            raise DataError(f"{item}: no such file or folder")
        for src, rel in pairs:
            if src not in found:
                found[src] = _free_name(rel.parent / f"{rel.stem}{suffix}", taken)
                taken.add(found[src])
    if not found:
        raise DataError(f"no image files found in {', '.join(map(str, inputs))}")
    return list(found.items())


def _inside(path: Path) -> Path:
    """`path` without its root and `..` parts, so that an output name never leaves the output folder."""
    parts = [p for p in path.parts if p not in ("..", ".", path.anchor)]
    return Path(*parts) if parts else Path(path.name)


def _free_name(name: Path, taken: set[Path]) -> Path:
    """`name`, or `<stem>_2<ext>`, `_3`... when another input already writes there (same stem)."""
    k, out = 2, name
    while out in taken:
        out, k = name.with_name(f"{name.stem}_{k}{name.suffix}"), k + 1
    return out
