"""The decoded-radiograph types every reader shares (`io` for rasters, `dicom` for DICOM), the bound on
decoded pixels and the [min, max] scaling of images without a fixed range: one module both readers
import, so neither imports the other's internals."""

from __future__ import annotations

import logging
import operator
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sscxr.errors import ConfigError, DataError

__all__ = [
    "MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "XRay",
    "XRayMeta",
    "XRayReadError",
    "check_pixel_count",
    "max_pixels_limit",
    "minmax_scale",
    "too_large_message",
]

# The readers' logger: messages keep the name users filter on.
logger = logging.getLogger("sscxr.data.io")

#: Default bound on decoded pixels (H x W) per image (see `sscxr.data.io`).
MAX_PIXELS = 50_000_000
#: Environment variable that replaces :data:`MAX_PIXELS` (a positive integer).
MAX_PIXELS_ENV = "SSCXR_MAX_PIXELS"
# Value spans that minmax_scale scales in float32; outside them (tiny or huge values) it uses float64.
_SAFE_SPAN = (1e-30, 1e30)


class XRayReadError(DataError):
    """A file cannot be read as an X-ray or mask; the message names the file, the reason and a fix."""


@dataclass(frozen=True)
class XRayMeta:
    """What the reader learned about an image (never any patient identifier).

    Attributes:
        source: the path that was read.
        format: ``"dicom"`` or the raster format in lower case (``"png"``, ``"jpeg"``, ``"tiff"``, ...).
        shape: ``(H, W)`` of the returned image.
        pixel_spacing_mm: ``(row, column)`` spacing in mm from DICOM Pixel Spacing (or Imager Pixel
            Spacing); ``None`` for rasters and DICOMs without it.
        photometric: DICOM Photometric Interpretation, or the raster's Pillow mode (``"L"``, ``"I;16"``,
            ``"RGB"``, ``"P"``, ...).
        bits_stored: DICOM Bits Stored, or for rasters the bit depth used for scaling (8, or e.g. 12 for
            a 12-bit image saved as 16-bit); ``None`` for float rasters.
        inverted: the stored values were inverted (MONOCHROME1 or Presentation LUT Shape INVERSE).
        window_applied: a DICOM VOI LUT or window was applied.
    """

    source: str
    format: str
    shape: tuple[int, int]
    pixel_spacing_mm: tuple[float, float] | None
    photometric: str
    bits_stored: int | None
    inverted: bool
    window_applied: bool


@dataclass(frozen=True, eq=False)
class XRay:
    """A decoded radiograph.

    Attributes:
        image: float32 ``(H, W)`` in [0, 1], bones bright.
        meta: see :class:`XRayMeta`.
    """

    image: np.ndarray
    meta: XRayMeta


def max_pixels_limit(max_pixels: int | None = None) -> int:
    """The bound on decoded pixels per image that a read uses.

    Args:
        max_pixels: an explicit bound (wins); None reads ``SSCXR_MAX_PIXELS``, else :data:`MAX_PIXELS`.

    Returns:
        A positive integer.

    Raises:
        ConfigError: the argument or the environment variable is not a positive integer.
    """
    if max_pixels is not None:
        try:
            value = operator.index(max_pixels)  # ints, numpy ints; not floats or strings
        except TypeError:
            value = 0
        if isinstance(max_pixels, bool) or value < 1:
            raise ConfigError(f"max_pixels must be a positive integer, got {max_pixels!r}")
        return value
    raw = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not raw:
        return MAX_PIXELS
    try:
        value = int(raw.replace("_", ""))
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(
            f"{MAX_PIXELS_ENV}={raw!r}: expected a positive number of pixels, e.g. "
            f"{MAX_PIXELS_ENV}=200000000; unset it to use the default."
        )
    return value


def check_pixel_count(path: Path | str, width: int, height: int, limit: int) -> None:
    """Raise XRayReadError when a ``width`` x ``height`` image exceeds ``limit`` pixels (from its header).

    The message names the file, its size, the limit and how to raise it.
    """
    if width * height > limit:
        raise XRayReadError(too_large_message(path, f"{width} x {height} = {width * height:,} pixels", limit))


def too_large_message(path: Path | str, size: str, limit: int) -> str:
    return (
        f"{path}: image is {size}, more than the {limit:,} pixels sscxr decodes per image (a guard against "
        f"corrupt headers and memory exhaustion); if it really is one radiograph, raise the limit with "
        f"the environment variable {MAX_PIXELS_ENV}=<pixels> (or read_xray(..., max_pixels=...)), or "
        "downscale the file."
    )


def minmax_scale(arr: np.ndarray, source: Path | str) -> np.ndarray:
    """Map finite values to [0, 1] by their [min, max]; NaN/inf become the minimum; constant images zeros.

    Args:
        arr: any real array ``(H, W)``.
        source: file named in log messages.

    Returns:
        float32 ``(H, W)`` in [0, 1].
    """
    out = arr.astype(np.float32, copy=True)
    finite = np.isfinite(out)
    if not finite.any():
        # e.g. a DICOM whose rescale overflows float32, or an all-NaN TIFF: no measurement at all,
        # which must not become a valid-looking black image
        raise XRayReadError(f"{source}: every pixel is NaN or infinite; the file holds no usable image.")
    if not finite.all():
        logger.warning("%s: %d non-finite pixels set to the image's minimum.", source, int((~finite).sum()))
        out[~finite] = out[finite].min()
    lo, hi = float(out.min()), float(out.max())
    if hi <= lo:
        logger.warning("%s: image is constant (value %g); returning zeros.", source, lo)
        return np.zeros(out.shape, np.float32)
    span = hi - lo
    if not _SAFE_SPAN[0] < span < _SAFE_SPAN[1]:
        # 1 / span (or x - lo) would leave float32's range: 0 * inf = NaN, or everything 0 or 1
        out = ((out.astype(np.float64) - lo) / span).astype(np.float32)
    else:
        out -= np.float32(lo)
        out /= np.float32(span)  # a division, not * (1 / span): the maximum lands on 1.0 exactly
    np.clip(out, 0.0, 1.0, out=out)
    return out
