"""The image cache's on-disk format, shared by its writer (`prepare.py`) and its reader (`cache.py`).

Holds the format version, the fit modes, the pixel scale and the cache's file names; the geometry and
antialiased resizing of images into the S x S frame; the reader of progress.jsonl, the resume command
that error messages quote, and the writer of index.json (whose fields `ImageCache` reads). The folder
layout itself is described in `cache.py`.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from sscxr.data.manifest import Manifest
from sscxr.utils import atomic_write_json

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FITS = ("stretch", "pad")
_MAX = 65535.0
_FILES = ("index.json", "images.npy", "masks.npy", "progress.jsonl", "failures.csv", "manifest.csv")


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


def resume_command(header: dict[str, Any], out_dir: Path) -> str:
    """The shell command that continues (or re-checks) the cache described by `header`."""
    return (
        f"sscxr prepare {header['manifest_path']} --out {out_dir} --size {header['size']} "
        f"--fit {header['fit']}"
    )


# --------------------------------------------------------------------------------------------- index.json
def _write_index(
    out_dir: Path, header: dict[str, Any], manifest: Manifest, records: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    ok = [records[i] for i in range(header["n"]) if records[i]["status"] == "ok"]
    n_pix = len(ok) * header["size"] ** 2
    mean = sum(r["sum"] for r in ok) / n_pix if ok else None
    var = sum(r["sumsq"] for r in ok) / n_pix - mean**2 if mean is not None else None
    index = {
        **{k: v for k, v in header.items() if k != "n"},
        "manifest_root": str(manifest.root),
        "n_total": header["n"],
        "n_ok": len(ok),
        "n_failed": header["n"] - len(ok),
        "n_with_mask": sum(bool(r.get("mask")) for r in ok),
        "stats": {"mean": mean, "std": None if var is None else math.sqrt(max(var, 0.0))},
        "rows": [_row_summary(records[i]) for i in range(header["n"])],
    }
    atomic_write_json(out_dir / "index.json", index)
    return index


def _row_summary(rec: dict[str, Any]) -> dict[str, Any]:
    ok = rec["status"] == "ok"
    return {"ok": ok, "shape": rec.get("shape"), "spacing": rec.get("spacing"), "mask": bool(rec.get("mask"))}
