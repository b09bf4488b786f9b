"""GMML corruption: patch-aligned masks, untouched pixels, target fractions, donors, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sscxr.data.corruption import (
    KIND_NOISE,
    KIND_REPLACE,
    CorruptionConfig,
    corrupt,
    grid_mask,
    in_batch_donors,
)

ALIGN = 8
SIZE = 64  # 8x8 grid: max block side int(0.3 * 8) = 2 cells


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, SIZE, SIZE, generator=g)
    donors = torch.randn(n, 1, SIZE, SIZE, generator=g) + 10.0  # far from x and from N(0, 1)
    return x, donors


def _run(seed: int, cfg: CorruptionConfig | None = None, n: int = 16):
    x, donors = _batch(n)
    return (
        x,
        donors,
        corrupt(x, donors, torch.Generator().manual_seed(seed), cfg or CorruptionConfig(), ALIGN),
    )


def test_shapes_and_dtypes() -> None:
    x, _, out = _run(0)
    assert out.x.shape == x.shape and out.x.dtype == x.dtype
    assert out.mask.shape == x.shape and out.mask.dtype == torch.bool
    assert out.kind.shape == (x.shape[0],) and out.kind.dtype == torch.long


def test_mask_is_snapped_to_patch_grid() -> None:
    for seed in range(10):
        _, _, out = _run(seed)
        cells = out.mask.view(-1, SIZE // ALIGN, ALIGN, SIZE // ALIGN, ALIGN).float()
        per_cell = cells.mean(dim=(2, 4))
        assert torch.all((per_cell == 0) | (per_cell == 1))


def test_pixels_outside_mask_unchanged_and_input_not_modified() -> None:
    for seed in range(10):
        x, _, out = _run(seed)
        x_before = x.clone()
        assert torch.equal(out.x[~out.mask], x[~out.mask])
        assert torch.equal(x, x_before)
        # Inside the mask every pixel was replaced (noise or donor values differ from x almost surely).
        assert bool((out.x[out.mask] != x[out.mask]).all())


def test_corrupted_fraction_within_targets() -> None:
    cfg = CorruptionConfig()
    cells = (SIZE // ALIGN) ** 2
    overshoot = (int(0.3 * SIZE / ALIGN) ** 2) / cells  # one largest block
    lo, hi = cfg.noise_ratio
    for seed in range(40):
        _, _, out = _run(seed, cfg)
        frac = out.mask.float().mean(dim=(1, 2, 3))
        noise = out.kind == KIND_NOISE
        assert bool((frac[noise] >= lo - 1e-6).all()) and bool((frac[noise] < hi + overshoot).all())
        rep = ~noise
        assert bool((frac[rep] >= cfg.replace_ratio - 1e-6).all())
        assert bool((frac[rep] < cfg.replace_ratio + overshoot).all())


def test_grid_mask_at_paper_size_reaches_target_without_big_overshoot() -> None:
    g = torch.Generator().manual_seed(3)
    targets = torch.tensor([0.35, 0.5, 0.7, 0.62] * 8)
    m = grid_mask(targets, (16, 16), 0.3, g)
    frac = m.float().mean(dim=(1, 2))
    assert bool((frac >= targets - 1e-6).all())
    assert bool((frac < targets + 16 / 256 + 1e-6).all())  # largest block: 4x4 cells


def test_replace_fills_with_donor_pixels_and_noise_is_standard_normal() -> None:
    _, donors, out = _run(1, n=64)
    rep = out.kind == KIND_REPLACE
    assert rep.any() and (~rep).any()
    m_rep = out.mask & rep[:, None, None, None]
    assert torch.equal(out.x[m_rep], donors[m_rep])
    m_noise = out.mask & ~rep[:, None, None, None]
    noise = out.x[m_noise]
    assert abs(float(noise.mean())) < 0.05 and abs(float(noise.std()) - 1.0) < 0.05


def test_in_batch_donors_never_self_and_a_permutation() -> None:
    x = torch.arange(7, dtype=torch.float32).view(7, 1, 1, 1).expand(7, 1, 8, 8).contiguous()
    seen = set()
    for seed in range(50):
        donors, idx = in_batch_donors(x, torch.Generator().manual_seed(seed))
        assert bool((idx != torch.arange(7)).all())
        assert sorted(idx.tolist()) == list(range(7))
        assert torch.equal(donors, x[idx])
        seen.add(tuple(idx.tolist()))
    assert len(seen) > 10
    donors, idx = in_batch_donors(x[:2], torch.Generator().manual_seed(0))
    assert idx.tolist() == [1, 0]
    with pytest.raises(ValueError, match="at least 2"):
        in_batch_donors(x[:1], torch.Generator())


def test_same_seed_same_result_different_seed_different() -> None:
    _, _, a = _run(5)
    _, _, b = _run(5)
    _, _, c = _run(6)
    assert torch.equal(a.x, b.x) and torch.equal(a.mask, b.mask) and torch.equal(a.kind, b.kind)
    assert not torch.equal(a.mask, c.mask)


def test_kind_frequency_follows_p_replace() -> None:
    x = torch.zeros(400, 1, 16, 16)
    for p in (0.2, 0.5, 0.8):
        out = corrupt(x, x + 1, torch.Generator().manual_seed(0), CorruptionConfig(p_replace=p), ALIGN)
        assert abs(float(out.kind.float().mean()) - p) < 0.08


def test_single_kind_configs_and_missing_donors() -> None:
    x = torch.zeros(8, 1, 16, 16)
    g = torch.Generator().manual_seed(0)
    out = corrupt(x, None, g, CorruptionConfig(kinds=("noise",)), ALIGN)
    assert bool((out.kind == KIND_NOISE).all())
    out = corrupt(x, x + 1, g, CorruptionConfig(kinds=("replace",), p_replace=0.0), ALIGN)
    assert bool((out.kind == KIND_REPLACE).all())
    with pytest.raises(ValueError, match="donors are required"):
        corrupt(x, None, g, CorruptionConfig(p_replace=1.0), ALIGN)


def test_cfg_align_overrides_argument() -> None:
    x = torch.zeros(4, 1, 32, 32)
    out = corrupt(x, None, torch.Generator().manual_seed(0), CorruptionConfig(kinds=("noise",), align=16), 4)
    per_cell = out.mask.view(4, 2, 16, 2, 16).float().mean(dim=(2, 4))
    assert torch.all((per_cell == 0) | (per_cell == 1))


def test_bad_inputs_raise() -> None:
    g = torch.Generator()
    cfg = CorruptionConfig()
    x = torch.zeros(2, 1, 30, 32)
    with pytest.raises(ValueError, match="divisible by align"):
        corrupt(x, x, g, cfg, ALIGN)
    with pytest.raises(ValueError, match="shape"):
        corrupt(torch.zeros(2, 3, 32, 32), None, g, cfg, ALIGN)
    with pytest.raises(ValueError, match="donors must have the shape"):
        corrupt(torch.zeros(2, 1, 32, 32), torch.zeros(1, 1, 32, 32), g, cfg, ALIGN)
    with pytest.raises(ValueError, match="align must be set"):
        corrupt(torch.zeros(2, 1, 32, 32), None, g, cfg)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"p_replace": 1.5}, "p_replace"),
        ({"noise_ratio": (0.7, 0.5)}, "noise_ratio"),
        ({"replace_ratio": 0.0}, "replace_ratio"),
        ({"align": 0}, "align"),
        ({"max_side_frac": 0.0}, "max_side_frac"),
        ({"kinds": ()}, "kinds"),
        ({"kinds": ("blur",)}, "kinds"),
    ],
)
def test_config_validation(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        CorruptionConfig(**kwargs)


def test_blocks_are_groups_of_connected_patches_up_to_the_side_limit() -> None:
    """One block alone (a target of one cell) is a filled rectangle whose sides are uniform in
    [1, int(0.3 * grid side)] cells: group masking, not single-patch masking."""
    grid = (16, 16)  # 256 px at patch 16: sides 1..4 cells
    targets = torch.full((2000,), 1 / 256)
    cells = grid_mask(targets, grid, 0.3, torch.Generator().manual_seed(0))
    rows, cols = cells.any(dim=2), cells.any(dim=1)  # (B, 16): rows / columns the block touches
    heights, widths = rows.sum(1), cols.sum(1)
    # The mask is exactly its bounding box (one rectangle), and at most 4 x 4 cells.
    assert torch.equal(cells.sum((1, 2)), heights * widths)
    assert int(heights.max()) == int(widths.max()) == 4
    # Sides uniform in 1..4: blocks clipped at the border are a little shorter, so compare loosely.
    for counts in (torch.bincount(heights, minlength=5)[1:], torch.bincount(widths, minlength=5)[1:]):
        share = counts.double() / counts.sum()
        assert float(share.min()) > 0.15 and float(share[0]) < 0.4
    assert float((heights * widths).double().mean()) > 5.0  # (2.5 x 2.5) = 6.25 without clipping


def test_corrupted_regions_at_the_papers_ratios_are_large_connected_groups() -> None:
    """At the 0.35 replace target, the corrupted cells form few large 4-connected regions; single
    patches placed at random to the same area would form many small ones."""
    from scipy import ndimage

    gen = torch.Generator().manual_seed(1)
    cells = grid_mask(torch.full((200,), 0.35), (16, 16), 0.3, gen)
    sizes = [np.bincount(ndimage.label(m.numpy())[0].ravel())[1:].mean() for m in cells]
    scattered = torch.rand(200, 16, 16, generator=gen) < 0.35  # same density, single patches
    scattered_sizes = [np.bincount(ndimage.label(m.numpy())[0].ravel())[1:].mean() for m in scattered]
    assert np.mean(sizes) > 3 * np.mean(scattered_sizes)


@pytest.mark.parametrize(
    "cfg",
    [
        CorruptionConfig(),
        CorruptionConfig(kinds=("noise",), noise_ratio=(0.1, 0.9)),
        # one-cell blocks at a high target: overlap often needs a second chunk of blocks
        CorruptionConfig(kinds=("replace",), replace_ratio=0.9, max_side_frac=0.05),
    ],
    ids=["paper", "noise-wide", "one-cell-many-chunks"],
)
def test_a_batch_drawn_from_one_generator_per_image_equals_the_images_drawn_one_by_one(
    cfg: CorruptionConfig,
) -> None:
    # A loader worker draws a batch's corruption at once (`draw_corruption_each`); each image's must still
    # be what its own generator alone gives, and leave that generator where the one-image draw leaves it
    # (the sample's later draws, and so its independence of the batch, depend on it).
    from sscxr.data.corruption import draw_corruption_each, draw_corruption_numpy

    grid = (16, 16)
    seeds = list(range(40))
    together = [np.random.default_rng(s) for s in seeds]
    alone = [np.random.default_rng(s) for s in seeds]
    got = draw_corruption_each(together, cfg, grid)
    for i, rng in enumerate(alone):
        one = draw_corruption_numpy(rng, cfg, grid)
        assert torch.equal(got.cells[i], one.cells[0]), i
        assert int(got.kind[i]) == int(one.kind[0]) and int(got.noise_seed[i]) == int(one.noise_seed[0])
        assert together[i].integers(0, 2**62) == rng.integers(0, 2**62)
    # the batch is not all alike (each row really comes from its own generator)
    assert len({got.cells[i].numpy().tobytes() for i in range(len(seeds))}) == len(seeds)
