"""X-ray plausible augmentation of one image (and optionally its mask) with an explicit generator.

What is drawn and why (chest radiographs, not natural photos):

- **Random resized crop** (`scale` = fraction of the image area kept, `ratio` = crop width / height):
  patients are framed differently and at different magnifications, so a moderate zoom (keep 70-100 % of
  the area by default) and a small aspect change mimic that without cutting the lungs out of view. The
  crop centre moves freely as long as the (unrotated) crop stays inside the image, which is the
  translation part.
- **Small rotation** (+-`rotate_deg`, default 10 degrees): patient tilt on the detector. Larger angles do
  not occur in upright PA/AP films and would teach the model orientations it never sees.
- **No horizontal flip** by default: a flip moves the heart to the right (situs inversus is rare), and
  laterality markers become mirrored text.
- **Brightness / contrast / gamma**: exposure (kVp, mAs), detector response and post-processing curves
  differ between sites; these are the main site-to-site differences of CXRs, so jitter them mildly.

Crop, rotation and (optional) flip are composed into ONE affine matrix and resampled once with
`F.affine_grid` + `F.grid_sample`: one interpolation instead of several (less blur), and the mask gets
exactly the same geometry (nearest-neighbour, so it stays binary). Pixels that come from outside the
image are 0 (dark), as around a collimated or rotated film. Intensity jitter touches the image only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentConfig", "augment", "identity_config"]

# How many uniform numbers one call draws. Always the same, so that the stream a generator yields after
# `augment` does not depend on which augmentations are switched on (donor choice etc. stays stable).
_N_DRAWS = 9


@dataclass(frozen=True)
class AugmentConfig:
    """Parameters of `augment` (defaults are the ones used for GMML pre-training and fine-tuning).

    Args:
        enabled: False returns inputs unchanged (still consuming the same random numbers).
        scale: range of the crop area as a fraction of the image area.
        ratio: range of the crop aspect (width / height), sampled log-uniformly.
        rotate_deg: rotation drawn uniformly from [-rotate_deg, rotate_deg] degrees.
        brightness: additive offset drawn from [-brightness, brightness] (in [0, 1] intensity units).
        contrast: multiplicative factor around the image mean, drawn from [1 - contrast, 1 + contrast].
        gamma: exponent range applied as `x ** gamma` before contrast and brightness.
        hflip: if True, flip left-right with probability 0.5 (off: flips swap the heart side).
    """

    enabled: bool = True
    scale: tuple[float, float] = (0.7, 1.0)
    ratio: tuple[float, float] = (0.85, 1.18)
    rotate_deg: float = 10.0
    brightness: float = 0.1
    contrast: float = 0.15
    gamma: tuple[float, float] = (0.85, 1.15)
    hflip: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.scale[0] <= self.scale[1] <= 1.0:
            raise ValueError(f"scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
        if not 0.0 < self.ratio[0] <= self.ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < lo <= hi, got {self.ratio}")
        if not 0.0 < self.gamma[0] <= self.gamma[1]:
            raise ValueError(f"gamma must satisfy 0 < lo <= hi, got {self.gamma}")
        if self.rotate_deg < 0 or self.brightness < 0 or not 0 <= self.contrast < 1:
            raise ValueError("rotate_deg and brightness must be >= 0 and contrast in [0, 1)")


def identity_config() -> AugmentConfig:
    """A config whose every draw is the identity (useful in tests and for evaluation pipelines)."""
    return AugmentConfig(
        scale=(1.0, 1.0),
        ratio=(1.0, 1.0),
        rotate_deg=0.0,
        brightness=0.0,
        contrast=0.0,
        gamma=(1.0, 1.0),
        hflip=False,
    )


def _lerp(u: float, lo: float, hi: float) -> float:
    return lo + (hi - lo) * u


def _affine_theta(u: list[float], cfg: AugmentConfig, height: int, width: int) -> torch.Tensor:
    """The (2, 3) matrix mapping output to input coordinates in `affine_grid`'s normalised [-1, 1] space.

    Built in an isotropic frame (normalised x scaled by the aspect W/H) so that a rotation stays a rotation
    on non-square images, then converted back.
    """
    area = _lerp(u[0], *cfg.scale)
    log_r = _lerp(u[1], math.log(cfg.ratio[0]), math.log(cfg.ratio[1]))
    # Crop side lengths as fractions of the image sides; clipped so the crop fits.
    w = min(1.0, math.sqrt(area * math.exp(log_r)))
    h = min(1.0, math.sqrt(area / math.exp(log_r)))
    cx = (2 * u[2] - 1) * (1 - w)  # centre anywhere that keeps the unrotated crop inside
    cy = (2 * u[3] - 1) * (1 - h)
    angle = math.radians(_lerp(u[4], -cfg.rotate_deg, cfg.rotate_deg))
    flip = -1.0 if cfg.hflip and u[5] < 0.5 else 1.0
    a = width / height  # isotropic frame: x' = a * x
    cos, sin = math.cos(angle), math.sin(angle)
    # input = D^-1 R D S out + c, with D = diag(a, 1), S = diag(flip * w, h).
    theta = torch.tensor(
        [
            [cos * flip * w, -sin * h / a, cx],
            [sin * a * flip * w, cos * h, cy],
        ],
        dtype=torch.float32,
    )
    return theta


def _jitter_intensity(image: torch.Tensor, u: list[float], cfg: AugmentConfig) -> torch.Tensor:
    """Gamma, then contrast around the mean, then brightness; all on [0, 1] intensities."""
    gamma = _lerp(u[6], *cfg.gamma)
    contrast = _lerp(u[7], 1.0 - cfg.contrast, 1.0 + cfg.contrast)
    brightness = _lerp(u[8], -cfg.brightness, cfg.brightness)
    if gamma != 1.0:
        image = image.clamp_min(0.0).pow_(gamma)  # new tensor first: the caller's image is never modified
    # Contrast around the mean and brightness fold into one affine map: x * c + (mean * (1 - c) + b).
    shift = brightness + (float(image.mean()) * (1.0 - contrast) if contrast != 1.0 else 0.0)
    if contrast == 1.0 and shift == 0.0:
        return image.clamp(0.0, 1.0)
    return image.mul(contrast).add_(shift).clamp_(0.0, 1.0)  # mul copies; the rest works in place


def augment(
    image: torch.Tensor,
    generator: torch.Generator,
    cfg: AugmentConfig,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment one image (and its mask with the same geometry).

    Args:
        image: `(1, H, W)` float32 in [0, 1] (any channel count works).
        generator: source of every random number (exactly `_N_DRAWS` uniforms are drawn per call).
        cfg: what to draw; see `AugmentConfig` and the module docstring for the choices.
        mask: optional `(1, H, W)` bool or float 0/1 mask; resampled nearest-neighbour.

    Returns:
        `(image, mask)`: image `(1, H, W)` float32 in [0, 1]; mask with the input's dtype (or None).
    """
    if image.dim() != 3:
        raise ValueError(f"augment expects an image of shape (C, H, W), got {tuple(image.shape)}")
    if mask is not None and mask.shape[-2:] != image.shape[-2:]:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match image shape {tuple(image.shape)}")
    u = torch.rand(_N_DRAWS, generator=generator, dtype=torch.float64).tolist()
    if not cfg.enabled:
        return image, mask
    _, height, width = image.shape
    theta = _affine_theta(u, cfg, height, width)
    if not torch.equal(theta, torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])):
        grid = F.affine_grid(theta[None], [1, 1, height, width], align_corners=False)
        image = F.grid_sample(
            image[None].float(), grid, mode="bilinear", padding_mode="zeros", align_corners=False
        )[0]
        if mask is not None:
            warped = F.grid_sample(
                mask[None].float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
            )[0]
            mask = warped > 0.5 if mask.dtype == torch.bool else warped.to(mask.dtype)
    return _jitter_intensity(image.float(), u, cfg), mask
