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
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "AugmentConfig",
    "AugmentParams",
    "apply_augment",
    "augment",
    "augment_arrays",
    "augment_params",
    "draw_augment",
    "draw_augment_arrays",
    "draw_augment_numpy",
    "identity_config",
]

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


def _affine_theta(u: Sequence[float], cfg: AugmentConfig, height: int, width: int) -> np.ndarray:
    """The (2, 3) float32 matrix mapping output to input coordinates in `affine_grid`'s [-1, 1] space.

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
    return np.array(
        [
            [cos * flip * w, -sin * h / a, cx],
            [sin * a * flip * w, cos * h, cy],
        ],
        dtype=np.float32,
    )


class AugmentParams(NamedTuple):
    """The random draws of `augment` for a batch of images, so they can be drawn in one place (a loader
    worker, from each sample's generator) and applied in another (the training step, on the device).

    theta: (B, 2, 3) float32, the affine map from output to input coordinates (`F.affine_grid`'s
    normalised space); intensity: (B, 3) float32, per image (gamma, contrast, brightness).
    """

    theta: torch.Tensor
    intensity: torch.Tensor

    @staticmethod
    def stack(params: Sequence[AugmentParams]) -> AugmentParams:
        """Concatenate per-image draws (each with B = 1, or any B) along the batch."""
        return AugmentParams(torch.cat([p.theta for p in params]), torch.cat([p.intensity for p in params]))


_IDENTITY_THETA = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
_IDENTITY_INTENSITY = torch.tensor([1.0, 1.0, 0.0])


def draw_augment(generator: torch.Generator, cfg: AugmentConfig, height: int, width: int) -> AugmentParams:
    """One image's augmentation draws (B = 1): exactly `_N_DRAWS` uniforms from `generator`, whatever
    `cfg` switches on, so the stream after this call is stable.

    Returns:
        `AugmentParams` with theta (1, 2, 3) and intensity (1, 3); the identity when `cfg.enabled` is off.
    """
    u = torch.rand(_N_DRAWS, generator=generator, dtype=torch.float64).tolist()
    return augment_params(u, cfg, height, width)


def draw_augment_numpy(
    rng: np.random.Generator, cfg: AugmentConfig, height: int, width: int
) -> AugmentParams:
    """`draw_augment` from a numpy generator (`_N_DRAWS` uniforms): a loader worker's cheap draws."""
    theta, intensity = draw_augment_arrays(rng, cfg, height, width)
    return AugmentParams(torch.from_numpy(theta[None]), torch.from_numpy(intensity[None]))


def draw_augment_arrays(
    rng: np.random.Generator, cfg: AugmentConfig, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """`draw_augment_numpy` as numpy arrays, theta (2, 3) and intensity (3,) float32, for a loader that
    writes many samples' draws into one batch."""
    return augment_arrays(rng.random(_N_DRAWS).tolist(), cfg, height, width)


def augment_params(u: Sequence[float], cfg: AugmentConfig, height: int, width: int) -> AugmentParams:
    """The augmentation that `_N_DRAWS` uniforms in [0, 1) select (B = 1; identity when disabled)."""
    theta, intensity = augment_arrays(u, cfg, height, width)
    return AugmentParams(torch.from_numpy(theta[None]), torch.from_numpy(intensity[None]))


def augment_arrays(
    u: Sequence[float], cfg: AugmentConfig, height: int, width: int
) -> tuple[np.ndarray, np.ndarray]:
    """`augment_params` as numpy arrays: theta (2, 3) and intensity (3,) float32.

    numpy builds these small arrays in a third of torch.tensor's time (a loader worker makes two per
    sample); it is the same float32 rounding of the same doubles, so the values do not change.
    """
    if not cfg.enabled:
        return _IDENTITY_THETA.numpy().copy(), _IDENTITY_INTENSITY.numpy().copy()
    gamma = _lerp(u[6], *cfg.gamma)
    contrast = _lerp(u[7], 1.0 - cfg.contrast, 1.0 + cfg.contrast)
    brightness = _lerp(u[8], -cfg.brightness, cfg.brightness)
    intensity = np.array([gamma, contrast, brightness], dtype=np.float32)
    return _affine_theta(u, cfg, height, width), intensity


def _jitter_intensity(images: torch.Tensor, intensity: torch.Tensor) -> torch.Tensor:
    """Gamma, then contrast around each image's mean, then brightness; (B, C, H, W) in [0, 1] intensities.

    Contrast around the mean and brightness fold into one affine map per image:
    x * c + (mean * (1 - c) + b). Never modifies `images`.
    """
    gamma, contrast, brightness = (v.to(images.device).view(-1, 1, 1, 1) for v in intensity.unbind(1))
    out = images.clamp_min(0.0).pow_(gamma)  # clamp_min copies: the caller's images stay as they are
    shift = brightness + out.mean(dim=(1, 2, 3), keepdim=True) * (1.0 - contrast)
    return out.mul_(contrast).add_(shift).clamp_(0.0, 1.0)


def _affine_grid(theta: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """`F.affine_grid(theta, (B, C, H, W), align_corners=False)`: (B, H, W, 2) sampling coordinates.

    The same pixel-centre coordinates mapped by theta, as two broadcast multiply-adds. On CPUs
    `F.affine_grid`'s (B, H*W, 3) x (B, 3, 2) batched matmul runs a slow path: 5 ms of the 6 ms that
    a batch of 8 images of 32 px took in all (torch 2.14, profiled), more than the resampling itself.
    """
    dev = theta.device
    xs = torch.linspace(-1.0, 1.0, width, device=dev) * ((width - 1) / width)  # pixel centres
    ys = torch.linspace(-1.0, 1.0, height, device=dev) * ((height - 1) / height)
    t = theta[:, :, :, None, None]  # (B, 2, 3, 1, 1)
    coords = t[:, :, 0] * xs[None, None, None, :] + t[:, :, 1] * ys[None, None, :, None] + t[:, :, 2]
    return coords.permute(0, 2, 3, 1)  # (B, 2, H, W) -> (B, H, W, 2): (x, y) last, as grid_sample reads


def apply_augment(
    images: torch.Tensor, params: AugmentParams, masks: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Apply drawn augmentations to a batch, on whatever device the images are.

    One `affine_grid` + `grid_sample` for the whole batch (skipped when every map is the identity),
    then the intensity jitter. The same function serves one image in a loader worker and a whole batch
    in the training step, so both give the same pixels.

    Args:
        images: (B, C, H, W) float in [0, 1].
        params: B images' draws (`draw_augment`, stacked).
        masks: optional (B, 1, H, W) bool or float 0/1, warped with the same geometry (nearest).

    Returns:
        `(images, masks)`: float32 (B, C, H, W) in [0, 1]; masks with their input dtype (or None).
    """
    theta = params.theta.to(images.device, torch.float32)
    images = images.float()
    if not torch.equal(theta, _IDENTITY_THETA.to(theta.device).expand_as(theta)):
        grid = _affine_grid(theta, *images.shape[-2:])
        images = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        if masks is not None:
            warped = F.grid_sample(
                masks.float(), grid, mode="nearest", padding_mode="zeros", align_corners=False
            )
            masks = warped > 0.5 if masks.dtype == torch.bool else warped.to(masks.dtype)
    return _jitter_intensity(images, params.intensity), masks


def augment(
    image: torch.Tensor,
    generator: torch.Generator,
    cfg: AugmentConfig,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment one image (and its mask with the same geometry): `draw_augment` then `apply_augment`.

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
    params = draw_augment(generator, cfg, *image.shape[-2:])
    if not cfg.enabled:
        return image, mask
    out, out_mask = apply_augment(image[None], params, None if mask is None else mask[None])
    return out[0], None if out_mask is None else out_mask[0]
