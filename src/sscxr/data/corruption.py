"""GMML "group masking" corruption: random patch-aligned blocks filled with noise or another image.

Semantics follow Sara-Ahmed/GMML `datasets_utils.py` (see docs/GMML.md), made pure and batched: every
random draw comes from the `torch.Generator` argument, so the same seed gives the same corruption, and
the mask is built on the patch grid (one cell per `align` x `align` pixels) before being expanded to
pixels, which keeps it cheap and guarantees it lines up with the ViT's patches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "KIND_NOISE",
    "KIND_REPLACE",
    "Corrupted",
    "CorruptionConfig",
    "corrupt",
    "grid_mask",
    "in_batch_donors",
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


def _rand(generator: torch.Generator, *size: int) -> torch.Tensor:
    """Uniform [0, 1) draws on the generator's device (a generator only draws on its own device)."""
    return torch.rand(size, generator=generator, device=generator.device)


def _draw_kinds(batch: int, generator: torch.Generator, cfg: CorruptionConfig) -> torch.Tensor:
    """(B,) long kinds. The uniform draw always happens so the random stream does not depend on `kinds`."""
    u = _rand(generator, batch)
    if cfg.kinds == ("noise",):
        return torch.zeros(batch, dtype=torch.long, device=u.device)
    if cfg.kinds == ("replace",):
        return torch.ones(batch, dtype=torch.long, device=u.device)
    return (u < cfg.p_replace).long()


def _draw_targets(kind: torch.Tensor, generator: torch.Generator, cfg: CorruptionConfig) -> torch.Tensor:
    """(B,) target corrupted fraction per image: U[noise_ratio] for noise, replace_ratio for replace."""
    lo, hi = cfg.noise_ratio
    noise_t = lo + (hi - lo) * _rand(generator, kind.numel())
    return torch.where(kind == KIND_REPLACE, torch.full_like(noise_t, cfg.replace_ratio), noise_t)


def _draw_blocks(
    batch: int, k: int, grid: tuple[int, int], max_cells: tuple[int, int], generator: torch.Generator
) -> torch.Tensor:
    """K random blocks per image on the cell grid, as (B, gh * gw, K) bool (block index last).

    Top-left corners are anywhere on the grid and sides in [1, max_cells]; a block running past the
    border is clipped, as in the reference code. The block index is the last, contiguous dimension
    because the caller accumulates along it.
    """
    gh, gw = grid
    dev = generator.device
    r0 = torch.randint(0, gh, (batch, 1, k), generator=generator, device=dev)
    c0 = torch.randint(0, gw, (batch, 1, k), generator=generator, device=dev)
    h = torch.randint(1, max_cells[0] + 1, (batch, 1, k), generator=generator, device=dev)
    w = torch.randint(1, max_cells[1] + 1, (batch, 1, k), generator=generator, device=dev)
    rows = torch.arange(gh, device=dev)[None, :, None]
    cols = torch.arange(gw, device=dev)[None, :, None]
    in_rows = (rows >= r0) & (rows < r0 + h)  # (B, gh, K)
    in_cols = (cols >= c0) & (cols < c0 + w)  # (B, gw, K)
    return (in_rows[:, :, None, :] & in_cols[:, None, :, :]).view(batch, gh * gw, k)


def grid_mask(
    targets: torch.Tensor, grid: tuple[int, int], max_side_frac: float, generator: torch.Generator
) -> torch.Tensor:
    """Union of random blocks per image until each covers its target fraction of the grid.

    Blocks are drawn in chunks of K for the whole batch; a running count along K gives the union after
    each block, and each image keeps the union up to the first block that reaches its target, so the
    result is exactly "add blocks until the target is met" (the last may overshoot) without a Python
    loop per block. Images not finished after a chunk continue from their union with the next chunk.

    Args:
        targets: (B,) target fractions in (0, 1], on the generator's device.
        grid: (gh, gw) cells.
        max_side_frac: longest block side as a fraction of the grid side (at least one cell).
        generator: source of all randomness.

    Returns:
        (B, gh, gw) bool.
    """
    gh, gw = grid
    batch = targets.numel()
    max_cells = (max(1, int(max_side_frac * gh)), max(1, int(max_side_frac * gw)))
    target_cells = targets.to(torch.float32) * (gh * gw)
    # Enough blocks per chunk that one chunk almost always suffices: three times the blocks needed
    # without overlap at the largest target (overlap and border clipping waste much of each block).
    # Capped so the int16 running count below cannot overflow.
    mean_area = (1 + max_cells[0]) / 2 * (1 + max_cells[1]) / 2
    k = min(math.ceil(3.0 * float(target_cells.max()) / mean_area) + 4, 4096)
    rows = torch.arange(batch, device=targets.device)
    union = torch.zeros(batch, gh * gw, dtype=torch.bool, device=targets.device)
    done = torch.zeros(batch, dtype=torch.bool, device=targets.device)
    while not bool(done.all()):
        blocks = _draw_blocks(batch, k, grid, max_cells, generator)
        blocks[:, :, 0] |= union  # continue from the previous chunk's union
        cum = torch.cumsum(blocks, dim=2, dtype=torch.int16) > 0  # (B, G, K): union after each block
        reached = cum.sum(dim=1, dtype=torch.int32).to(torch.float32) >= target_cells[:, None]  # (B, K)
        first = torch.where(reached.any(dim=1), reached.int().argmax(dim=1), k - 1)
        union = torch.where(done[:, None], union, cum[rows, :, first])
        done = done | reached.any(dim=1)
    return union.view(batch, gh, gw)


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


def _fill(
    x: torch.Tensor,
    donors: torch.Tensor | None,
    mask: torch.Tensor,
    kind: torch.Tensor,
    generator: torch.Generator,
) -> torch.Tensor:
    """Replace masked pixels: N(0, 1) for noise images, the donor's pixels for replace images."""
    is_rep = kind == KIND_REPLACE
    noise_idx = (~is_rep).nonzero().flatten()
    # Noise is drawn only for the noise images: drawing it is the costliest step of the corruption.
    noise = torch.randn(
        (noise_idx.numel(), *x.shape[1:]), generator=generator, device=generator.device, dtype=x.dtype
    ).to(x.device)
    if donors is None:
        fill = noise
    elif noise_idx.numel() == 0:
        fill = donors
    else:
        fill = donors.clone()
        fill[noise_idx] = noise
    return torch.where(mask, fill, x)


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
    batch = x.shape[0]
    kind = _draw_kinds(batch, generator, cfg)
    targets = _draw_targets(kind, generator, cfg)
    grid = (x.shape[-2] // eff_align, x.shape[-1] // eff_align)
    cells = grid_mask(targets, grid, cfg.max_side_frac, generator)
    kind, cells = kind.to(x.device), cells.to(x.device)
    if donors is None and bool((kind == KIND_REPLACE).any()):
        raise ValueError("donors are required: some images drew the replace kind")
    mask = _expand_cells(cells, eff_align)
    return Corrupted(_fill(x, donors, mask, kind, generator), mask, kind)


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
