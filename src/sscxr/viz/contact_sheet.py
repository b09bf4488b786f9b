"""Contact sheets: a grid of images (optionally with lung-mask contours) written as one PNG."""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from PIL import Image


def contact_sheet(
    images: Sequence[np.ndarray],
    titles: Sequence[str],
    path: str | os.PathLike[str],
    ncols: int = 8,
    masks: Sequence[np.ndarray | None] | None = None,
) -> Path:
    """Write a grid of grey images to a PNG.

    Uses a bare `Figure` on the Agg canvas rather than pyplot, so no global figure state or GUI backend
    is touched (safe in workers and headless runs).

    Args:
        images: `(H, W)` arrays in [0, 1] (shown with a fixed 0..1 grey scale, so sites can be compared).
        titles: one per image.
        path: output PNG (parent folders are created).
        ncols: images per row.
        masks: optional `(H, W)` bool masks (or None per entry) drawn as red contours.

    Returns:
        The written path.
    """
    if len(titles) != len(images) or (masks is not None and len(masks) != len(images)):
        raise ValueError("images, titles and masks must have the same length")
    if ncols < 1 or not images:
        raise ValueError("need ncols >= 1 and at least one image")
    ncols = min(ncols, len(images))
    nrows = math.ceil(len(images) / ncols)
    fig = Figure(figsize=(2.0 * ncols, 2.2 * nrows))
    FigureCanvasAgg(fig)
    for i, (img, title) in enumerate(zip(images, titles, strict=True)):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        ax.imshow(img, cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
        mask = masks[i] if masks is not None else None
        if mask is not None and mask.any() and not mask.all():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors="red", linewidths=0.6)
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    fig.tight_layout(pad=0.3)
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    return out


def _read_png(path: Path) -> np.ndarray:
    """A PNG as float32 in [0, 1] (8-bit / 255, 16-bit / 65535)."""
    with Image.open(path) as im:
        arr = np.asarray(im)
    return arr.astype(np.float32) / (255.0 if arr.dtype == np.uint8 else 65535.0)


def cohort_contact_sheet(
    manifest_path: str | os.PathLike[str], path: str | os.PathLike[str], per_cell: int = 2
) -> Path:
    """Contact sheet of a labelled cohort: `per_cell` images per site (rows) and class (columns), with
    lung contours where the manifest has masks; empty cells (no pediatric pneumonia) are grey."""
    root = Path(manifest_path).parent
    with open(manifest_path, newline="") as f:
        rows = list(csv.DictReader(f))
    labels = [c for c in ("healthy", "pneumonia", "covid-19") if any(r["label"] == c for r in rows)]
    sites = sorted({r["site"] for r in rows}, key=lambda s: (s == "pediatric", s))
    images: list[np.ndarray] = []
    titles: list[str] = []
    masks: list[np.ndarray | None] = []
    for site in sites:
        for label in labels:
            picked = [r for r in rows if r["site"] == site and r["label"] == label][:per_cell]
            for k in range(per_cell):
                row = picked[k] if k < len(picked) else None
                images.append(_read_png(root / row["path"]) if row else np.full((8, 8), 0.5, np.float32))
                masks.append(_read_png(root / row["mask_path"]) > 0.5 if row and row["mask_path"] else None)
                titles.append(f"{site} {label}" + ("" if row else ": none"))
    return contact_sheet(images, titles, path, ncols=per_cell * len(labels), masks=masks)
