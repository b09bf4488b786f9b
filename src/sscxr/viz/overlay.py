"""Segmentation overlays in the style of the paper's Figure 3: contours on the X-ray.

Ground truth is drawn as a green contour and the prediction as a yellow one, on the grey image; where
the two lines part, the model and the annotation disagree. Contours (not filled masks) keep the lung
edges visible, which is where HD95 is decided.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sscxr.viz.figure import figure_png

__all__ = ["GT_COLOR", "PRED_COLOR", "OverlayCase", "draw_overlay", "overlay_figure"]

GT_COLOR = "#00e000"  # green, as in Figure 3
PRED_COLOR = "#ffe000"  # yellow, as in Figure 3


@dataclass
class OverlayCase:
    """One panel: an image, its ground truth and a prediction.

    Attributes:
        image: (H, W) float in [0, 1] (display window applied by `draw_overlay`).
        gt: (H, W) bool ground truth, or None (prediction only, e.g. `segment predict`).
        pred: (H, W) bool prediction.
        title: panel title (case name, Dice, HD95...).
    """

    image: np.ndarray
    gt: np.ndarray | None
    pred: np.ndarray
    title: str = ""


def _contour(ax: Axes, mask: np.ndarray, color: str) -> None:
    m = np.asarray(mask, dtype=np.float32)
    if m.any() and not m.all():  # contour() of a constant field warns and draws nothing
        # Pad so that lungs touching the border still get a closed line.
        padded = np.pad(m, 1)
        ys, xs = np.arange(-1, m.shape[0] + 1), np.arange(-1, m.shape[1] + 1)
        ax.contour(xs, ys, padded, levels=[0.5], colors=[color], linewidths=1.2)


def draw_overlay(ax: Axes, case: OverlayCase) -> None:
    """Draw one case on `ax`: the image (1st-99th percentile window), GT green, prediction yellow."""
    image = np.asarray(case.image, dtype=np.float32)
    lo, hi = np.percentile(image, [1, 99])
    ax.imshow(image, cmap="gray", vmin=lo, vmax=hi if hi > lo else lo + 1.0, interpolation="bilinear")
    if case.gt is not None:
        _contour(ax, case.gt, GT_COLOR)
    _contour(ax, case.pred, PRED_COLOR)
    ax.set_xticks([])
    ax.set_yticks([])
    if case.title:
        ax.set_title(case.title, fontsize=8)


def overlay_figure(
    rows: Sequence[Sequence[OverlayCase]],
    path: str | Path | None = None,
    title: str = "",
    panel_inches: float = 2.6,
    dpi: int = 90,
) -> bytes:
    """A grid of overlays (rows x columns of cases); returns the PNG bytes and writes them to `path`.

    Args:
        rows: cases per row (rows may differ in length; empty cells are left blank).
        path: PNG file to write (folders created), or None to only return the bytes (e.g. for HTML).
        title: figure title; a legend line (GT green, prediction yellow) is always added.
        panel_inches: size of one panel.
        dpi: resolution.
    """
    n_rows, n_cols = len(rows), max((len(r) for r in rows), default=0)
    if n_rows == 0 or n_cols == 0:
        raise ValueError("overlay_figure needs at least one case")
    fig = Figure(figsize=(panel_inches * n_cols, panel_inches * n_rows + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(n_rows, n_cols, squeeze=False)
    for i, row in enumerate(rows):
        for j in range(n_cols):
            if j < len(row):
                draw_overlay(axes[i, j], row[j])
            else:
                axes[i, j].axis("off")
    legend = "ground truth: green, prediction: yellow"
    fig.suptitle(f"{title}\n{legend}" if title else legend, fontsize=9)
    fig.tight_layout()
    return figure_png(fig, dpi, path)
