"""Fixtures for end-to-end tests: a tiny synthetic cohort and its cache, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest

from sscxr.data.cache import prepare
from sscxr.synthetic import SynthConfig, generate_cohort

# A ViT small enough for CPU tests (STYLE.md's tiny model) on 32 px images.
TINY_OVERRIDES = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
    "gmml.decoder_hidden=64",
    "gmml.decoder_bottleneck=32",
    "gmml.recon_blocks=[2,3,4]",
    "gmml.n_vis=2",
    "train.workers=0",
    "train.progress=false",
]


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """Dotted overrides that shrink the `tiny` config to a test-sized ViT on 32 px images."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_cohort(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Manifest of a 40-image synthetic cohort (64 px PNGs, with masks and splits)."""
    root = tmp_path_factory.mktemp("cohort")
    cfg = SynthConfig(n_adult=40, n_pediatric=8, size=64, seed=3)
    return generate_cohort(cfg, root / "cohort", workers=1, progress=False)


@pytest.fixture(scope="session")
def tiny_cache(tiny_cohort: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny cohort prepared at 32 px."""
    out = tmp_path_factory.mktemp("cache") / "cache"
    prepare(tiny_cohort, out, size=32, workers=1, progress=False)
    return out
