"""The per-epoch reconstruction picture of GMML pre-training."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from sscxr.viz.recon import filled_in, reconstruction_grid


def test_filled_in_keeps_visible_pixels_and_takes_reconstruction_under_the_mask() -> None:
    rng = np.random.default_rng(0)
    clean = rng.random((2, 8, 8))
    mask = rng.random((2, 8, 8)) > 0.5
    corrupted = np.where(mask, rng.normal(size=(2, 8, 8)), clean)
    recon = rng.random((2, 8, 8))
    out = filled_in(corrupted, recon, mask)
    assert np.array_equal(out[~mask], clean[~mask]) and np.array_equal(out[mask], recon[mask])


def test_grid_writes_one_row_per_image(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    imgs = [rng.random((3, 16, 16)) for _ in range(3)]
    path = reconstruction_grid(*imgs, rng.random((3, 16, 16)) > 0.5, tmp_path / "r" / "grid.png", title="t")
    w, h = Image.open(path).size
    one = reconstruction_grid(*(x[:1] for x in imgs), np.zeros((1, 16, 16), bool), tmp_path / "one.png")
    assert Image.open(one).size[0] == w and h > Image.open(one).size[1]  # 5 columns; rows grow with N
