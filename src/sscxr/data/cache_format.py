"""The image cache's on-disk format, shared by its writer (`prepare.py`) and its reader (`cache.py`).

Holds the format version, the fit modes, the pixel scale and the cache's file names; the geometry and
antialiased resizing of images into the S x S frame; the per-row checksums (pixels, mask, perceptual
hashes) and the check of an array file's length; the reader of progress.jsonl, the resume command
that error messages quote, and the writer of index.json (whose fields `ImageCache` reads). The folder
layout itself is described in `cache.py`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sscxr.data.manifest import Manifest
from sscxr.utils import atomic_write_json, display_path

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FITS = ("stretch", "pad")
_MAX = 65535.0
#: (N, HASH_WORDS) uint64 perceptual hashes of the rows (`near_duplicates.hash_image`); derived from
#: images.npy, so a damaged one is recomputed from the rows, never decoded again.
HASH_FILE = "hashes.npy"
_FILES = (
    "index.json", "images.npy", "masks.npy", HASH_FILE, "progress.jsonl", "failures.csv", "manifest.csv"
)  # fmt: skip
# Training splits are the ones the intensity statistics come from: every split whose name does not
# start with one of these (test, test_site, test_pediatric, holdout...) is a training split.
EVAL_SPLIT_PREFIXES = ("test", "holdout")


def is_eval_split(split: str) -> bool:
    """True for splits that hold evaluation data (never used for statistics or training)."""
    return split.lower().startswith(EVAL_SPLIT_PREFIXES)


# ------------------------------------------------------------------------------------------- integrity
def array_files(has_masks: bool) -> list[tuple[str, type]]:
    """(file name, dtype) of the cache's array files: images.npy, and masks.npy when there are masks."""
    return [("images.npy", np.uint16)] + ([("masks.npy", np.uint8)] if has_masks else [])


def crc(array: np.ndarray) -> int:
    """CRC-32 of an array's bytes (a row of images.npy or masks.npy): what a row's record stores, so a
    row zeroed, truncated or overwritten after it was written is found (zlib's C CRC, ~1 GB/s)."""
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8))


def npy_data_offset(path: Path) -> tuple[int, tuple[int, ...], np.dtype] | None:
    """(byte offset of the data, shape, dtype) from a .npy file's header; None if the header is unreadable."""
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(f)
            return f.tell(), tuple(shape), np.dtype(dtype)
    except (OSError, ValueError, EOFError):
        return None


def npy_problem(path: Path, shape: Sequence[int], dtype: np.dtype | type) -> str | None:
    """What is wrong with the array file at `path` for an array of `shape` / `dtype`, or None if it is whole:
    missing, unreadable header, another shape or dtype, or a file shorter or longer than its data."""
    if not path.is_file():
        return "is missing"
    layout = npy_data_offset(path)
    if layout is None:
        return "has an unreadable header"
    offset, found_shape, found_dtype = layout
    if found_shape != tuple(shape) or found_dtype != np.dtype(dtype):
        return f"holds {found_shape} {found_dtype}, expected {tuple(shape)} {np.dtype(dtype)}"
    expected = offset + int(np.prod(shape)) * np.dtype(dtype).itemsize
    size = path.stat().st_size
    if size != expected:
        return f"is {size:,} bytes, expected {expected:,} (truncated or overwritten)"
    return None


# ----------------------------------------------------------------------------------------------- resizing
def fit_geometry(shape: tuple[int, int], size: int, fit: str) -> tuple[int, int, int, int]:
    """Where an image of `shape` lands in the `size` x `size` cache frame.

    Returns:
        `(height, width, top, left)` of the resized image inside the frame: the whole frame for
        "stretch"; aspect-preserving and centred (letterbox, zero padding) for "pad". Invert it to
        write predictions back at the original size.
    """
    if fit == "stretch":
        return size, size, 0, 0
    if fit != "pad":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    scale = size / max(shape)
    h, w = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    return h, w, (size - h) // 2, (size - w) // 2


def resize_to_cache(image: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """Antialiased bilinear resize of a `(H, W)` float32 image into the `(size, size)` frame.

    torch's `interpolate(antialias=True)` is the same filter as PIL's BILINEAR resize (a triangle whose
    support widens with the reduction factor, so no aliasing of film grain or text), about twice as
    fast as PIL without `reducing_gap`, and exact where `reducing_gap` approximates.
    """
    h, w, top, left = fit_geometry(image.shape, size, fit)
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(src, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + h, left : left + w] = resized[0, 0].numpy()
    return out


def resize_mask(mask: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """Resize a `(H, W)` bool mask like its image: area-weighted, then thresholded at 0.5 (stays binary).

    Returns:
        `(size, size)` uint8 array of 0/1.
    """
    return (resize_to_cache(mask.astype(np.float32), size, fit) > 0.5).astype(np.uint8)


# ------------------------------------------------------------------------------------------- progress log
def _read_progress(out_dir: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(header or None, finished rows by index). Cuts off a torn final line so appends stay aligned."""
    path = out_dir / "progress.jsonl"
    if not path.exists():
        return None, {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line was being written when the run died: it never counted
        with open(path, "r+b") as f:
            f.truncate(end)
    lines = data[:end].splitlines()
    try:
        header = json.loads(lines[0])["header"] if lines else None
    except (ValueError, KeyError, TypeError):
        header = None
    done: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            done[int(rec["i"])] = rec
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: skipping an unreadable line; that row will be redone", path)
    return header, done


def stored_path(target: Path, out_dir: Path, relative: bool) -> str:
    """How the cache records a path of the user's (the manifest, its folder): relative to the cache
    folder when the user named the manifest by a relative path (nothing of the machine's layout in a
    cache that is shared, and the pair still works when moved together), else absolute."""
    return Path(os.path.relpath(target, out_dir)).as_posix() if relative else str(target)


def resolve_stored(out_dir: Path, stored: str) -> Path:
    """The absolute path of a `stored_path` record (absolute records, as older caches hold, as they are)."""
    return Path(os.path.normpath(Path(out_dir) / stored))


def resume_command(header: dict[str, Any], out_dir: Path) -> str:
    """The shell command that continues (or re-checks) the cache described by `header`, with paths as
    seen from the working folder."""
    manifest = display_path(resolve_stored(out_dir, header["manifest_path"]))
    return (
        f"sscxr prepare {manifest} --out {display_path(out_dir)} --size {header['size']} "
        f"--fit {header['fit']}"
    )


# --------------------------------------------------------------------------------------------- index.json
def _stats(header: dict[str, Any], manifest: Manifest, records: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """Mean and std of the [0, 1] pixels over the ok rows of the training splits (see `is_eval_split`):
    test rows and held-out sites never enter a model's normalisation. A cache of evaluation rows only
    (e.g. an external test set) falls back to all its ok rows and says so in `from`."""
    ok = [i for i in range(header["n"]) if records[i]["status"] == "ok"]
    train = [i for i in ok if not is_eval_split(manifest.rows[i].split)]
    rows, source = (train, "training splits") if train else (ok, "all rows (the cache has no training rows)")
    n_pix = len(rows) * header["size"] ** 2
    mean = sum(records[i]["sum"] for i in rows) / n_pix if rows else None
    var = sum(records[i]["sumsq"] for i in rows) / n_pix - mean**2 if mean is not None else None
    return {
        "mean": mean,
        "std": None if var is None else math.sqrt(max(var, 0.0)),
        "n_images": len(rows),
        "from": source,
        "splits": sorted({manifest.rows[i].split for i in rows}),
    }


def _write_index(
    out_dir: Path,
    header: dict[str, Any],
    manifest: Manifest,
    records: dict[int, dict[str, Any]],
    near_duplicates: dict[str, Any],
) -> dict[str, Any]:
    """Write index.json; `near_duplicates` is `near_duplicates.search_info` of the rows' hashes."""
    ok = [records[i] for i in range(header["n"]) if records[i]["status"] == "ok"]
    index = {
        **{k: v for k, v in header.items() if k != "n"},
        "manifest_root": stored_path(manifest.root, out_dir, not os.path.isabs(header["manifest_path"])),
        "n_total": header["n"],
        "n_ok": len(ok),
        "n_failed": header["n"] - len(ok),
        "n_with_mask": sum(bool(r.get("mask")) for r in ok),
        "stats": _stats(header, manifest, records),
        "n_hashed": sum("hash_crc" in r and not r.get("blank") for r in ok),
        "near_duplicates": near_duplicates,
        "rows": [_row_summary(records[i]) for i in range(header["n"])],
    }
    atomic_write_json(out_dir / "index.json", index)
    return index


def _row_summary(rec: dict[str, Any]) -> dict[str, Any]:
    ok = rec["status"] == "ok"
    out = {"ok": ok, "shape": rec.get("shape"), "spacing": rec.get("spacing"), "mask": bool(rec.get("mask"))}
    for key in ("crc", "mask_crc", "hash_crc", "blank"):  # absent in caches written before them
        if key in rec:
            out[key] = rec[key]
    return out


def has_hash(rec: dict[str, Any]) -> bool:
    """Whether row record `rec` (progress.jsonl or index.json) has a usable perceptual hash."""
    ok = rec["ok"] if "ok" in rec else rec.get("status") == "ok"  # index.json row / progress record
    return bool(ok) and "hash_crc" in rec and not rec.get("blank")


def hash_intact(hashes: np.ndarray, i: int, rec: dict[str, Any]) -> bool:
    """Whether row `i` of hashes.npy holds the hashes its record's checksum describes (False when the
    record has none: a row written before hashes existed)."""
    return "hash_crc" in rec and crc(hashes[i]) == rec["hash_crc"]


def row_intact(images: np.ndarray, masks: np.ndarray | None, i: int, rec: dict[str, Any]) -> bool | None:
    """Whether row `i` still holds the bytes its record's checksums describe; None when the record has
    no checksum to compare (a failed row, or a cache written before checksums)."""
    if "crc" not in rec:
        return None
    if crc(images[i]) != rec["crc"]:
        return False
    return not (masks is not None and "mask_crc" in rec and crc(masks[i]) != rec["mask_crc"])
