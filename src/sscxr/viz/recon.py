"""The reconstruction grid people look at to see that GMML pre-training works."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np


def filled_in(corrupted: np.ndarray, recon: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """The corrupted image with its corrupted pixels (mask True) replaced by the reconstruction.

    Args:
        corrupted, recon: (..., H, W) images; mask: (..., H, W) bool.
    """
    return np.where(mask, recon, corrupted)


def reconstruction_grid(
    clean: np.ndarray,
    corrupted: np.ndarray,
    recon: np.ndarray,
    mask: np.ndarray,
    path: str | Path,
    title: str = "",
) -> Path:
    """Save a grid: one row per image, columns clean / corrupted / reconstruction / filled in / mask.

    "filled in" is the corrupted image with its corrupted pixels replaced by the reconstruction: what the
    model recovered, in context (the loss only ever sees those pixels).

    Args:
        clean, corrupted, recon: (N, H, W) images in display units (any range; each panel is shown
            with the clean image's 1st-99th percentile window so the columns are comparable).
        mask: (N, H, W) bool, True where pixels were corrupted.
        path: PNG to write (folders are created).
        title: figure title (e.g. the epoch).

    Returns:
        The path written.
    """
    n = clean.shape[0]
    fig, axes = plt.subplots(n, 5, figsize=(10, 2.0 * n + 0.4), squeeze=False)
    names = ("clean", "corrupted", "reconstruction", "filled in", "mask")
    filled = filled_in(corrupted, recon, mask)
    for i in range(n):
        lo, hi = np.percentile(clean[i], [1, 99])
        hi = hi if hi > lo else lo + 1.0
        panels = (clean[i], corrupted[i], recon[i], filled[i], mask[i].astype(np.float32))
        for j, img in enumerate(panels):
            ax = axes[i, j]
            if j == 4:
                ax.imshow(img, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax.imshow(img, cmap="gray", vmin=lo, vmax=hi)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(names[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
