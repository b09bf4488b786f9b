"""GMML "group masking" corruption: random patch-aligned blocks filled with noise or another image.

Semantics follow Sara-Ahmed/GMML `datasets_utils.py` (see docs/GMML.md), made pure and batched: every
random draw comes from the `torch.Generator` argument (one draw of it seeds numpy, which makes the many
tiny draws of the blocks cheaply), so the same seed gives the same corruption, and
the mask is built on the patch grid (one cell per `align` x `align` pixels) before being expanded to
pixels, which keeps it cheap and guarantees it lines up with the ViT's patches.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

__all__ = [
    "KIND_NOISE",
    "KIND_REPLACE",
    "Corrupted",
    "CorruptionConfig",
    "CorruptionDraw",
    "apply_corruption",
    "corrupt",
    "draw_corruption",
    "draw_corruption_each",
    "draw_corruption_numpy",
    "grid_mask",
    "in_batch_donors",
    "seeded_noise",
]

KIND_NOISE = 0
KIND_REPLACE = 1
_KIND_NAMES = ("noise", "replace")


@dataclass(frozen=True)
class CorruptionConfig:
    """Settings of the GMML corruption.

    Args:
        p_replace: probability that an image is corrupted with another image's pixels (else noise).
        noise_ratio: (low, high) of the uniform draw of the target corrupted fraction for noise.
        replace_ratio: target corrupted fraction for the replace kind.
        align: block grid in pixels; None means "use the encoder's patch size" (passed to `corrupt`).
        max_side_frac: longest block side as a fraction of the image side.
        kinds: which kinds are enabled, a non-empty subset of ("noise", "replace").
    """

    p_replace: float = 0.5
    noise_ratio: tuple[float, float] = (0.5, 0.7)
    replace_ratio: float = 0.35
    align: int | None = None
    max_side_frac: float = 0.3
    kinds: tuple[str, ...] = ("noise", "replace")

    def __post_init__(self) -> None:
        # Configs loaded from YAML give lists; store tuples so the dataclass stays hashable.
        object.__setattr__(self, "noise_ratio", tuple(float(v) for v in self.noise_ratio))
        object.__setattr__(self, "kinds", tuple(self.kinds))
        if not 0.0 <= self.p_replace <= 1.0:
            raise ValueError(f"p_replace must be in [0, 1], got {self.p_replace}")
        if len(self.noise_ratio) != 2:
            raise ValueError(f"noise_ratio must be a (low, high) pair, got {self.noise_ratio}")
        lo, hi = self.noise_ratio
        if not 0.0 < lo <= hi <= 1.0:
            raise ValueError(f"noise_ratio must satisfy 0 < low <= high <= 1, got {self.noise_ratio}")
        if not 0.0 < self.replace_ratio <= 1.0:
            raise ValueError(f"replace_ratio must be in (0, 1], got {self.replace_ratio}")
        if self.align is not None and self.align < 1:
            raise ValueError(f"align must be a positive number of pixels or None, got {self.align}")
        if not 0.0 < self.max_side_frac <= 1.0:
            raise ValueError(f"max_side_frac must be in (0, 1], got {self.max_side_frac}")
        if not self.kinds or any(k not in _KIND_NAMES for k in self.kinds):
            raise ValueError(f"kinds must be a non-empty subset of {_KIND_NAMES}, got {self.kinds}")

    @property
    def uses_donors(self) -> bool:
        """Whether `corrupt` may need donor images."""
        return "replace" in self.kinds and (self.p_replace > 0.0 or "noise" not in self.kinds)


class Corrupted(NamedTuple):
    """Output of `corrupt`.

    x: (B, 1, H, W) corrupted images; mask: (B, 1, H, W) bool, True where a pixel was manipulated;
    kind: (B,) long, 0 = noise, 1 = replace.
    """

    x: torch.Tensor
    mask: torch.Tensor
    kind: torch.Tensor


def _numpy_rng(generator: torch.Generator) -> np.random.Generator:
    """A numpy generator seeded with one draw of `generator`.

    The draws of one image's corruption are a few dozen tiny arrays: as numpy calls they cost about a
    tenth of what the same torch calls cost, which is most of a loader worker's time per sample.
    """
    seed = torch.randint(0, 2**63 - 1, (1,), generator=generator, device=generator.device)
    return np.random.default_rng(int(seed))


def _draw_kinds(batch: int, rng: np.random.Generator, cfg: CorruptionConfig) -> np.ndarray:
    """(B,) int64 kinds. The uniform draw always happens so the random stream does not depend on `kinds`."""
    u = rng.random(batch)
    if cfg.kinds == ("noise",):
        return np.zeros(batch, dtype=np.int64)
    if cfg.kinds == ("replace",):
        return np.ones(batch, dtype=np.int64)
    return (u < cfg.p_replace).astype(np.int64)


def _draw_targets(kind: np.ndarray, rng: np.random.Generator, cfg: CorruptionConfig) -> np.ndarray:
    """(B,) target corrupted fraction per image: U[noise_ratio] for noise, replace_ratio for replace."""
    lo, hi = cfg.noise_ratio
    noise_t = lo + (hi - lo) * rng.random(kind.size)
    return np.where(kind == KIND_REPLACE, cfg.replace_ratio, noise_t)


def _first_covers(corners: np.ndarray, grid: tuple[int, int]) -> np.ndarray:
    """Per cell, the index of the first of K blocks covering it.

    Args:
        corners: (B, 1, K, 4) int64 blocks per image: top row, left column, height, width in cells. A
            block running past the border is clipped, as in the reference code; one of height or width
            0 covers nothing (the padding of `_grid_mask_each`).
        grid: (gh, gw) cells.

    Returns:
        (B, gh * gw) int64 in [0, K]; K where no block of the K covers the cell.
    """
    batch, k = corners.shape[0], corners.shape[2]
    rows, cols = _grid_indices(*grid)
    r0, c0, h, w = corners[..., 0], corners[..., 1], corners[..., 2], corners[..., 3]  # each (B, 1, K)
    in_rows = (rows >= r0) & (rows < r0 + h)  # (B, gh, K)
    in_cols = (cols >= c0) & (cols < c0 + w)  # (B, gw, K)
    blocks = (in_rows[:, :, None, :] & in_cols[:, None, :, :]).reshape(batch, grid[0] * grid[1], k)
    first = blocks.argmax(axis=2)  # the block index is the last, contiguous axis: a fast reduction
    # argmax is 0 both where block 0 covers the cell and where no block does: tell them apart by block 0.
    return np.where((first > 0) | blocks[:, :, 0], first, k)


@functools.lru_cache(maxsize=64)
def _grid_indices(gh: int, gw: int) -> tuple[np.ndarray, np.ndarray]:
    """Row and column indices (gh, 1) and (gw, 1), read-only: made once per grid, where building them
    per one-image draw was a tenth of its time."""
    arrays = (np.arange(gh)[:, None], np.arange(gw)[:, None])
    for a in arrays:
        a.flags.writeable = False
    return arrays


@functools.lru_cache(maxsize=64)
def _corner_bounds(gh: int, gw: int, max_h: int, max_w: int) -> tuple[np.ndarray, np.ndarray]:
    """Low and high bounds (read-only) of the draw of (top, left, height, width): corners anywhere on
    the grid, sides in [1, max]."""
    arrays = (np.array([0, 0, 1, 1]), np.array([gh, gw, max_h + 1, max_w + 1]))
    for a in arrays:
        a.flags.writeable = False
    return arrays


def _max_cells(grid: tuple[int, int], max_side_frac: float) -> tuple[int, int]:
    """Longest block sides in cells (at least one)."""
    return max(1, int(max_side_frac * grid[0])), max(1, int(max_side_frac * grid[1]))


def _blocks_per_chunk(target_cells: np.ndarray, max_cells: tuple[int, int]) -> np.ndarray:
    """(B,) blocks drawn at once for targets of `target_cells`: enough that one chunk almost always
    suffices, three times the blocks needed without overlap (overlap and border clipping waste much of
    each block)."""
    mean_area = (1 + max_cells[0]) / 2 * (1 + max_cells[1]) / 2
    k = np.ceil(3.0 * target_cells.astype(np.float64) / mean_area) + 4
    return np.minimum(k, 4096).astype(np.int64)


def _add_blocks(
    corners: np.ndarray, union: np.ndarray, target_cells: np.ndarray, grid: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray]:
    """Add blocks to each image's union in order, up to the first that brings it to its target.

    The cells covered after block j are those whose first block is <= j (-1: already in the union), so
    one cumulative histogram gives the covered count after every block at once, without building the
    union block by block.

    Args:
        corners: (B, 1, K, 4) blocks (see `_first_covers`).
        union: (B, gh * gw) bool, the cells covered so far.
        target_cells: (B,) float32 cells to cover.
        grid: (gh, gw).

    Returns:
        The new (B, gh * gw) union (all K blocks added where the target is not reached) and (B,) bool,
        whether the target was reached.
    """
    batch, k = corners.shape[0], corners.shape[2]
    first = _first_covers(corners, grid)
    first[union] = -1
    offsets = (k + 2) * np.arange(batch)[:, None]
    histogram = np.bincount((first + 1 + offsets).ravel(), minlength=batch * (k + 2))
    counts = histogram.reshape(batch, k + 2).cumsum(axis=1)[:, 1 : k + 1]  # (B, K): after block j
    reached = counts >= target_cells[:, None]
    hit = reached.any(axis=1)
    stop = np.where(hit, reached.argmax(axis=1), k - 1)
    return first <= stop[:, None], hit


def _grid_mask(
    targets: np.ndarray, grid: tuple[int, int], max_side_frac: float, rng: np.random.Generator
) -> np.ndarray:
    """`grid_mask` on numpy arrays: (B,) targets -> (B, gh, gw) bool."""
    gh, gw = grid
    batch = targets.size
    max_cells = _max_cells(grid, max_side_frac)
    target_cells = targets.astype(np.float32) * np.float32(gh * gw)
    k = int(_blocks_per_chunk(target_cells, max_cells).max())
    low, high = _corner_bounds(gh, gw, *max_cells)
    union = np.zeros((batch, gh * gw), dtype=bool)
    done = np.zeros(batch, dtype=bool)
    while not done.all():
        corners = rng.integers(low, high, (batch, 1, k, 4))  # all 4 x K numbers in one draw
        new, hit = _add_blocks(corners, union, target_cells, grid)
        union = np.where(done[:, None], union, new)
        done |= hit
    return union.reshape(batch, gh, gw)


def _grid_mask_each(
    targets: np.ndarray, grid: tuple[int, int], max_side_frac: float, rngs: Sequence[np.random.Generator]
) -> np.ndarray:
    """`_grid_mask(targets[i:i+1], grid, max_side_frac, rngs[i])` for every i, stacked: (B, gh, gw) bool.

    Generator i makes exactly the draws of that one-image call, and the union of each image is the
    same; the geometry of all images is computed at once (blocks past an image's own chunk size are
    zero-sized padding), which is what a loader worker assembling a batch saves over B small calls.
    """
    gh, gw = grid
    max_cells = _max_cells(grid, max_side_frac)
    target_cells = targets.astype(np.float32) * np.float32(gh * gw)
    ks = _blocks_per_chunk(target_cells, max_cells)
    low, high = _corner_bounds(gh, gw, *max_cells)
    union = np.zeros((len(rngs), gh * gw), dtype=bool)
    pending = np.arange(len(rngs))
    while pending.size:
        corners = np.zeros((pending.size, 1, int(ks[pending].max()), 4), dtype=np.int64)
        for j, i in enumerate(pending.tolist()):
            corners[j, :, : ks[i]] = rngs[i].integers(low, high, (1, 1, int(ks[i]), 4))
        union[pending], hit = _add_blocks(corners, union[pending], target_cells[pending], grid)
        pending = pending[~hit]
    return union.reshape(len(rngs), gh, gw)


def grid_mask(
    targets: torch.Tensor, grid: tuple[int, int], max_side_frac: float, generator: torch.Generator
) -> torch.Tensor:
    """Union of random blocks per image until each covers its target fraction of the grid.

    Blocks are drawn in chunks of K for the whole batch; a running union along K gives the cells
    covered after each block, and each image keeps the union up to the first block that reaches its
    target, so the result is exactly "add blocks until the target is met" (the last may overshoot)
    without a Python loop per block. Images not finished after a chunk continue from their union with
    the next chunk.

    Args:
        targets: (B,) target fractions in (0, 1].
        grid: (gh, gw) cells.
        max_side_frac: longest block side as a fraction of the grid side (at least one cell).
        generator: source of all randomness (one draw seeds the block draws).

    Returns:
        (B, gh, gw) bool on `targets`' device.
    """
    cells = _grid_mask(targets.detach().cpu().numpy(), grid, max_side_frac, _numpy_rng(generator))
    return torch.from_numpy(cells).to(targets.device)


def _expand_cells(cells: torch.Tensor, align: int) -> torch.Tensor:
    """(B, gh, gw) cell mask -> (B, 1, gh*align, gw*align) pixel mask."""
    b, gh, gw = cells.shape
    full = cells[:, None, :, None, :, None].expand(b, 1, gh, align, gw, align)
    return full.reshape(b, 1, gh * align, gw * align)


def _check_inputs(x: torch.Tensor, donors: torch.Tensor | None, align: int) -> None:
    if x.ndim != 4 or x.shape[1] != 1:
        raise ValueError(f"x must have shape (B, 1, H, W), got {tuple(x.shape)}")
    if x.shape[0] < 1:
        raise ValueError("x must hold at least one image")
    if align < 1:
        raise ValueError(f"align must be a positive number of pixels, got {align}")
    h, w = x.shape[-2:]
    if h % align or w % align:
        raise ValueError(f"image size {h}x{w} must be divisible by align={align}")
    if donors is not None and donors.shape != x.shape:
        raise ValueError(f"donors must have the shape of x {tuple(x.shape)}, got {tuple(donors.shape)}")


class CorruptionDraw(NamedTuple):
    """The random part of the corruption of B images, drawn where it is cheap (a loader worker, from
    each sample's generator) and applied where the pixels are (`apply_corruption`, e.g. on the GPU).

    kind: (B,) long, 0 = noise, 1 = replace; cells: (B, gh, gw) bool block mask on the `align` grid;
    noise_seed: (B,) int64, the seed of each image's N(0, 1) fill (drawn for every image, used by the
    noise ones), so the fill is a function of the sample, not of the batch it lands in.
    """

    kind: torch.Tensor
    cells: torch.Tensor
    noise_seed: torch.Tensor


def draw_corruption(
    generator: torch.Generator, cfg: CorruptionConfig, grid: tuple[int, int], batch: int = 1
) -> CorruptionDraw:
    """Draw the kind, the target and the blocks of `batch` images (in that order), then a noise seed each.

    Returns CPU tensors (`apply_corruption` moves them). One draw of `generator` seeds a numpy
    generator that makes the rest (see `_numpy_rng`).

    Args:
        generator: the only source of randomness.
        cfg: corruption settings.
        grid: (gh, gw) cells of the block grid (image side // align).
        batch: images to draw for.
    """
    return draw_corruption_numpy(_numpy_rng(generator), cfg, grid, batch)


def draw_corruption_numpy(
    rng: np.random.Generator, cfg: CorruptionConfig, grid: tuple[int, int], batch: int = 1
) -> CorruptionDraw:
    """`draw_corruption` from a numpy generator (what a loader worker uses per sample: cheap draws)."""
    kind = _draw_kinds(batch, rng, cfg)
    cells = _grid_mask(_draw_targets(kind, rng, cfg), grid, cfg.max_side_frac, rng)
    seeds = rng.integers(0, 2**62, batch)
    return CorruptionDraw(torch.from_numpy(kind), torch.from_numpy(cells), torch.from_numpy(seeds))


def draw_corruption_each(
    rngs: Sequence[np.random.Generator], cfg: CorruptionConfig, grid: tuple[int, int]
) -> CorruptionDraw:
    """One image per generator: row i is `draw_corruption_numpy(rngs[i], cfg, grid)`, and generator i
    is left where that call leaves it, so each image's corruption is still a function of its own
    generator alone (a sample's, independent of its batch). What a loader worker uses for a batch: the
    geometry of all images is computed at once instead of in B small calls."""
    kind = np.concatenate([_draw_kinds(1, rng, cfg) for rng in rngs])
    targets = np.concatenate([_draw_targets(kind[i : i + 1], rng, cfg) for i, rng in enumerate(rngs)])
    cells = _grid_mask_each(targets, grid, cfg.max_side_frac, rngs)
    seeds = np.concatenate([rng.integers(0, 2**62, 1) for rng in rngs])
    return CorruptionDraw(torch.from_numpy(kind), torch.from_numpy(cells), torch.from_numpy(seeds))


def seeded_noise(
    seeds: list[int], shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(len(seeds), *shape) N(0, 1), row i drawn from a generator on `device` seeded with seeds[i].

    One draw per image (not one for the batch) keeps each image's noise independent of its batch, rank
    and position. The seeds are host integers: reading them from the device would stall it. The same
    seed gives the same noise on the same kind of device (CPU and CUDA generators differ).
    """
    out = torch.empty((len(seeds), *shape), device=device, dtype=dtype)
    generator = torch.Generator(device=device)
    for i, seed in enumerate(seeds):
        torch.randn(shape, generator=generator.manual_seed(int(seed)), out=out[i])
    return out


def apply_corruption(
    x: torch.Tensor,
    donors: torch.Tensor | None,
    draw: CorruptionDraw,
    align: int,
    kind_on_host: list[int] | None = None,
    seeds_on_host: list[int] | None = None,
) -> Corrupted:
    """Corrupt a batch with drawn blocks: N(0, 1) from each image's seed, or its donor's pixels.

    Args:
        x: (B, 1, H, W) standardised clean images; not modified.
        donors: (B, 1, H, W) donor images (row i fills image i), or None when no image is of the replace kind.
        draw: the batch's `CorruptionDraw` (on any device; cells are moved to `x`'s device).
        align: pixels per cell of `draw.cells`.
        kind_on_host, seeds_on_host: `draw.kind` / `draw.noise_seed` as host lists when those tensors
            live on an accelerator (reading them back would stall it); None reads the tensors.

    Returns:
        `Corrupted(x, mask, kind)` on `x`'s device.
    """
    _check_inputs(x, donors, align)
    kinds = kind_on_host if kind_on_host is not None else draw.kind.tolist()
    seeds = seeds_on_host if seeds_on_host is not None else draw.noise_seed.tolist()
    noise_rows = [i for i, k in enumerate(kinds) if k != KIND_REPLACE]
    if donors is None and len(noise_rows) < len(kinds):
        raise ValueError("donors are required: some images drew the replace kind")
    if draw.cells.shape[-2:] != (x.shape[-2] // align, x.shape[-1] // align):
        raise ValueError(f"cells {tuple(draw.cells.shape)} do not cover {tuple(x.shape)} at align={align}")
    mask = _expand_cells(draw.cells.to(x.device, non_blocking=True), align)
    noise = seeded_noise([seeds[i] for i in noise_rows], tuple(x.shape[1:]), x.device, x.dtype)
    if donors is None:
        fill = noise
    elif not noise_rows:
        fill = donors
    else:
        fill = donors.clone()
        fill[torch.tensor(noise_rows, device=x.device)] = noise
    kind = draw.kind.to(x.device, non_blocking=True)
    return Corrupted(torch.where(mask, fill, x), mask, kind)


def corrupt(
    x: torch.Tensor,
    donors: torch.Tensor | None,
    generator: torch.Generator,
    cfg: CorruptionConfig,
    align: int | None = None,
) -> Corrupted:
    """GMML corruption of a batch: per image, noise blocks or another image's blocks.

    Args:
        x: (B, 1, H, W) standardised clean images; not modified.
        donors: (B, 1, H, W) images whose pixels fill the blocks of replace-kind images (row i serves
            image i; the caller guarantees it is a different image). May be None when replace is off.
        generator: the only source of randomness; its device is where draws are made.
        cfg: corruption settings.
        align: block grid in pixels, used when `cfg.align` is None (pass the encoder's patch size).

    Returns:
        `Corrupted(x, mask, kind)`: corrupted (B, 1, H, W), bool mask (B, 1, H, W), kind (B,) long.

    Raises:
        ValueError: bad shapes, H or W not divisible by align, or donors missing while needed.
    """
    eff_align = cfg.align if cfg.align is not None else align
    if eff_align is None:
        raise ValueError("align must be set in CorruptionConfig or passed to corrupt (the patch size)")
    _check_inputs(x, donors, eff_align)
    grid = (x.shape[-2] // eff_align, x.shape[-1] // eff_align)
    return apply_corruption(x, donors, draw_corruption(generator, cfg, grid, x.shape[0]), eff_align)


def in_batch_donors(x: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick, for each image, another image of the batch as donor (a random derangement).

    A random permutation is read as one cycle, each image giving to the next, so no image is its own
    donor and every image is a donor exactly once.

    Args:
        x: (B, 1, H, W) with B >= 2.
        generator: source of randomness.

    Returns:
        (donors (B, 1, H, W), donor_index (B,) long) with donors = x[donor_index].
    """
    batch = x.shape[0]
    if batch < 2:
        raise ValueError(f"in-batch donors need a batch of at least 2 images, got {batch}")
    perm = torch.randperm(batch, generator=generator, device=generator.device)
    donor_index = torch.empty_like(perm)
    donor_index[perm] = perm.roll(-1)
    donor_index = donor_index.to(x.device)
    return x[donor_index], donor_index
