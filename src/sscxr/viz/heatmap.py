"""Attention heat maps over an X-ray, in the style of the paper's Figure 4: the image, then each map
overlaid in a perceptually uniform colour map, the prediction in the caption."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sscxr.viz.figure import figure_png

__all__ = ["heatmap_figure"]

_TITLES = {"last_block": "last block, class-token attention", "rollout": "attention rollout"}


def heatmap_figure(
    image: np.ndarray,
    maps: Mapping[str, np.ndarray],
    caption: str,
    path: str | Path | None = None,
    panel_inches: float = 3.0,
    dpi: int = 90,
    alpha: float = 0.45,
) -> bytes:
    """One row: the X-ray, then each heat map over it; returns the PNG bytes (written to `path` too).

    Args:
        image: (H, W) float in [0, 1].
        maps: name -> (H, W) map in [0, 1] (names "last_block" and "rollout" get descriptive titles).
        caption: figure title (file and predicted class).
        path: PNG to write (folders created), or None.
        alpha: opacity of the heat maps.
    """
    image = np.asarray(image, dtype=np.float32)
    lo, hi = np.percentile(image, [1, 99])
    vmax = hi if hi > lo else lo + 1.0
    fig = Figure(figsize=(panel_inches * (1 + len(maps)), panel_inches + 0.5))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 1 + len(maps), squeeze=False)[0]
    for ax, (name, heat) in zip(axes, [("image", None), *maps.items()], strict=True):
        ax.imshow(image, cmap="gray", vmin=lo, vmax=vmax, interpolation="bilinear")
        if heat is not None:
            ax.imshow(np.asarray(heat, dtype=np.float32), cmap="inferno", vmin=0.0, vmax=1.0, alpha=alpha)
        ax.set_title(_TITLES.get(name, name), fontsize=8)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(caption, fontsize=9)
    fig.tight_layout()
    return figure_png(fig, dpi, path)
