"""Read one chest X-ray (PNG/JPEG/TIFF/BMP or DICOM) or one mask into the project's image convention.

Every reader returns float32 ``(H, W)`` in [0, 1] with higher = more attenuation (bones bright, air
dark). DICOM decoding lives in :mod:`sscxr.data.dicom`; this module holds the shared types, the raster
(Pillow) path, mask reading and file sniffing.

Intensity policy for rasters (DICOM: see :mod:`sscxr.data.dicom`):

- 8-bit images (``L``, ``P``, ``RGB``, ...) are divided by 255.
- 16-bit images are divided by ``2**b - 1`` where ``b`` is the smallest of 8, 10, 12, 14, 16 bits that
  holds the image's maximum: a 12-bit detector saved as 16-bit PNG (max <= 4095) is divided by 4095,
  not by 65535 (which would leave it almost black). Rounding to even depths keeps sibling images from
  the same detector on the same scale even when their maxima differ a little.
- Grey saved as RGB/RGBA/palette becomes one channel exactly; a truly coloured image is converted with
  ITU-R 601 luma and logged as a warning. A non-opaque alpha channel is composited over black (no
  signal), since transparent pixels carry no measurement.
- 32-bit integer images in [0, 65535] follow the 16-bit rule; other integer or float images are
  mapped by their own [min, max] (float images already inside [0, 1] are kept). A constant image
  becomes zeros (logged), never NaN.

Size bound: an image of more than :data:`MAX_PIXELS` pixels (50 megapixels; the largest chest
detector, 43 x 43 cm at 0.1 mm, is ~18.5) is refused from its header, before any pixel is decoded, so a
corrupt or hostile header cannot make a loader worker allocate gigabytes. Raise it per call
(``max_pixels=``) or for every process, data-loader workers included, with the environment variable
``SSCXR_MAX_PIXELS``. Pillow's own decompression-bomb check gives the same error.
"""

from __future__ import annotations

import logging
import re
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sscxr.data.xray import (
    MAX_PIXELS,
    MAX_PIXELS_ENV,
    XRay,
    XRayMeta,
    XRayReadError,
    check_pixel_count,
    max_pixels_limit,
    minmax_scale,
    too_large_message,
)

__all__ = [
    "IMAGE_SUFFIXES",
    "MAX_PIXELS",
    "MAX_PIXELS_ENV",
    "XRay",
    "XRayMeta",
    "XRayReadError",
    "check_pixel_count",
    "is_image_file",
    "looks_like_dicom",
    "max_pixels_limit",
    "read_mask",
    "read_xray",
]

logger = logging.getLogger(__name__)

RASTER_SUFFIXES: frozenset[str] = frozenset({".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"})
DICOM_SUFFIXES: frozenset[str] = frozenset({".dcm", ".dicom"})
IMAGE_SUFFIXES: frozenset[str] = RASTER_SUFFIXES | DICOM_SUFFIXES

# Candidate bit depths for 16-bit rasters (see the module docstring).
_BIT_DEPTHS = (8, 10, 12, 14, 16)
# An RGB image counts as "clearly coloured" when more than this fraction of (sub-sampled) pixels
# has a channel spread above _COLOUR_SPREAD grey levels; JPEG chroma noise stays well below both.
_COLOUR_SPREAD = 24
_COLOUR_FRACTION = 0.01
# Signatures of the raster formats Pillow reads, so content (not the suffix) picks the decoder.
_RASTER_MAGIC = (b"\x89PNG", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"BM", b"GIF8")
_EXPLICIT_VRS = frozenset(
    b"AE AS AT CS DA DS DT FL FD IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM".split()
    + b"UC UI UL UN UR US UT UV".split()
)


def _read_head(path: Path, n: int = 132) -> bytes:
    """Return the first ``n`` bytes of ``path`` (fewer if the file is shorter)."""
    with path.open("rb") as fh:
        return fh.read(n)


def _head_is_dicom(head: bytes) -> bool:
    """Tell whether the first bytes of a file look like DICOM (Part 10 or bare ACR-NEMA data set).

    Args:
        head: at least the first 132 bytes of the file (fewer for short files).

    Returns:
        True for the ``DICM`` magic at byte 128, or (files without preamble) a first element in group
        0002 or 0008, little endian, with either an explicit VR or a plausible implicit length.
    """
    if len(head) >= 132 and head[128:132] == b"DICM":
        return True
    if len(head) < 8 or head[:2] not in (b"\x02\x00", b"\x08\x00"):
        return False
    if head[4:6] in _EXPLICIT_VRS:
        return True
    # Implicit VR: a 4-byte length follows the tag; header elements are short.
    return int.from_bytes(head[4:8], "little") < 1 << 16


def looks_like_dicom(path: str | Path) -> bool:
    """Sniff whether a file is DICOM, whatever its name.

    Args:
        path: file to test; unreadable or missing files give False.

    Returns:
        True when the file has the ``DICM`` magic at byte 128, or starts like a DICOM data set
        without preamble (ACR-NEMA style, e.g. ``CR-MONO1-10-chest``).
    """
    try:
        return _head_is_dicom(_read_head(Path(path)))
    except OSError:
        return False


def is_image_file(path: str | Path) -> bool:
    """Tell whether ``read_xray`` should be tried on ``path``.

    Args:
        path: a file path.

    Returns:
        True for a suffix in :data:`IMAGE_SUFFIXES` (case-insensitive), or for any other existing
        file that :func:`looks_like_dicom` (DICOMs are often named by UID, e.g. ``1.2.840.3``).
    """
    p = Path(path)
    if p.suffix.lower() in IMAGE_SUFFIXES:
        return True
    return p.is_file() and looks_like_dicom(p)


def _check_file(path: Path) -> bytes:
    """Raise XRayReadError unless ``path`` is a readable, non-empty file; return its first bytes."""
    if not path.exists():
        raise XRayReadError(
            f"{path}: file not found; check the path (relative paths in a manifest are "
            "relative to the manifest's folder)."
        )
    if not path.is_file():
        raise XRayReadError(f"{path}: is not a regular file (a folder?); give the path of one image file.")
    try:
        head = _read_head(path)
    except OSError as exc:
        raise XRayReadError(f"{path}: cannot be opened ({exc.strerror}); check its permissions.") from exc
    if not head:
        raise XRayReadError(f"{path}: file is empty (0 bytes); re-copy or re-download it.")
    return head


def read_xray(path: str | Path, max_pixels: int | None = None) -> XRay:
    """Read one radiograph into float32 ``(H, W)`` in [0, 1], bones bright.

    The decoder is chosen from the file's content (then its suffix): DICOM (any transfer syntax
    pydicom can decode, with or without preamble) or a raster Pillow reads (PNG, JPEG, TIFF, BMP).

    Args:
        path: image file.
        max_pixels: refuse images of more pixels (H x W, read from the header before decoding); None:
            ``SSCXR_MAX_PIXELS`` from the environment, else :data:`MAX_PIXELS`.

    Returns:
        An :class:`XRay` (image ``(H, W)`` float32 in [0, 1], meta without patient identifiers).

    Raises:
        XRayReadError: missing, empty, truncated or non-image files, DICOMs without pixel data or
            with a transfer syntax no installed decoder handles, images larger than the pixel bound.
        ConfigError: ``max_pixels`` / ``SSCXR_MAX_PIXELS`` is not a positive integer.
    """
    path = Path(path)
    limit = max_pixels_limit(max_pixels)
    head = _check_file(path)
    if not head.startswith(_RASTER_MAGIC) and (_head_is_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES):
        # Imported here: pydicom costs ~0.2 s to import and PNG-only datasets never need it.
        from sscxr.data.dicom import read_dicom

        return read_dicom(path, max_pixels=limit)
    return _read_raster(path, limit)


def _bomb_error(path: Path, exc: Exception, limit: int) -> XRayReadError:
    """Pillow's DecompressionBombError as the project's too-many-pixels error."""
    found = re.search(r"\((\d+) pixels\)", str(exc))
    n = int(found.group(1)) if found else None
    pil = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else None
    if n is not None and n <= limit and pil is not None:  # only when our bound was raised above Pillow's
        return XRayReadError(
            f"{path}: image is {n:,} pixels, more than Pillow's decompression-bomb limit of {pil:,} (sscxr's "
            f"bound is {limit:,}); raise PIL.Image.MAX_IMAGE_PIXELS as well, or downscale the file."
        )
    also = f" (Pillow refuses more than {pil:,}: raise PIL.Image.MAX_IMAGE_PIXELS too)" if pil else ""
    return XRayReadError(too_large_message(path, f"{n:,} pixels" if n else "too many pixels", limit) + also)


def _open_raster(path: Path, limit: int) -> Image.Image:
    """Open and fully decode the first frame of a raster, upright per its EXIF orientation.

    The size is checked against ``limit`` from the header (Pillow opens lazily) before decoding.

    Raises:
        XRayReadError: not an image Pillow reads, truncated/corrupt, or more than ``limit`` pixels.
    """
    try:
        with warnings.catch_warnings():
            # Pillow warns above its own bound; ours (checked just below) decides, with a better message.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise XRayReadError(
            f"{path}: neither DICOM nor an image format Pillow can read; expected PNG, JPEG, TIFF, BMP "
            "or DICOM (remove the file or convert it)."
        ) from exc
    except Image.DecompressionBombError as exc:
        raise _bomb_error(path, exc, limit) from None
    except MemoryError:
        raise
    except Exception as exc:  # OSError, SyntaxError, ... and on damaged TIFFs TypeError, KeyError, ...
        raise XRayReadError(
            f"{path}: cannot be opened as an image ({_brief(exc)}); the file may be corrupt."
        ) from exc
    try:
        width, height = img.size
        check_pixel_count(path, width, height, limit)
    except XRayReadError:
        img.close()
        raise
    try:
        if getattr(img, "n_frames", 1) > 1:
            logger.warning("%s: has %d frames/pages; using the first.", path, img.n_frames)
        img.load()
        # Viewers show JPEGs rotated by their EXIF tag; reading them the same way keeps hand-drawn
        # masks aligned. A no-op (no copy) without the tag.
        ImageOps.exif_transpose(img, in_place=True)
    except Image.DecompressionBombError as exc:  # a later TIFF page / GIF frame larger than the first
        img.close()
        raise _bomb_error(path, exc, limit) from None
    except MemoryError:
        img.close()
        raise
    except Exception as exc:  # Pillow's decoders raise many types on damaged data (OSError, TypeError, ...)
        img.close()
        raise XRayReadError(
            f"{path}: image data is truncated or corrupt ({_brief(exc)}); re-copy or re-export the file."
        ) from exc
    return img


def _brief(exc: BaseException) -> str:
    """A third-party exception on one line: its text, or its type when it has none."""
    text = " ".join(str(exc).split())[:300]
    return (
        text
        if isinstance(exc, OSError | SyntaxError | ValueError) and text
        else f"{type(exc).__name__}: {text}"
    )


def _bits_used(max_value: int) -> int:
    """Smallest depth in (8, 10, 12, 14, 16) whose range holds ``max_value`` (16 if none)."""
    for bits in _BIT_DEPTHS:
        if max_value < 1 << bits:
            return bits
    return 16


def _scale_uint(arr: np.ndarray, denom: float) -> np.ndarray:
    """Return ``arr / denom`` as float32 with one conversion (no float64 temporaries)."""
    out = arr.astype(np.float32)
    out *= np.float32(1.0 / denom)
    return out


def _rgb_to_grey(rgb: np.ndarray, source: Path) -> np.ndarray:
    """Turn ``(H, W, 3)`` uint8 into grey ``(H, W)``: exact for grey-as-RGB, luma otherwise.

    Args:
        rgb: uint8 ``(H, W, 3)``.
        source: file named in the warning for coloured images.

    Returns:
        uint8 ``(H, W)`` when the channels are equal, else float32 ``(H, W)`` in [0, 255].
    """
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    if np.array_equal(r, g) and np.array_equal(r, b):
        return r
    sub = rgb[::4, ::4].astype(np.int16)
    spread = sub.max(axis=-1) - sub.min(axis=-1)
    if float((spread > _COLOUR_SPREAD).mean()) > _COLOUR_FRACTION:
        logger.warning("%s: is a colour image, not grey saved as RGB; converting with luma.", source)
    grey = r.astype(np.float32) * np.float32(0.299)
    grey += g.astype(np.float32) * np.float32(0.587)
    grey += b.astype(np.float32) * np.float32(0.114)
    return grey


def _with_alpha(grey: np.ndarray, alpha: np.ndarray, source: Path) -> np.ndarray:
    """Composite grey over black with ``alpha`` (uint8); unchanged when fully opaque."""
    if alpha.min() == 255:
        return grey
    logger.warning("%s: has transparent pixels; compositing over black.", source)
    return grey.astype(np.float32) * (alpha.astype(np.float32) * np.float32(1.0 / 255.0))


def _eight_bit_grey(img: Image.Image, path: Path) -> np.ndarray:
    """Grey ``(H, W)`` (uint8 or float32 in [0, 255]) from any 8-bit-per-channel mode."""
    if img.mode == "L":
        return np.asarray(img)
    if img.mode in ("LA", "La"):
        la = np.asarray(img.convert("LA"))
        return _with_alpha(la[..., 0], la[..., 1], path)
    has_alpha = "A" in img.mode or "transparency" in img.info
    # Palette indices are not intensities, and CMYK/YCbCr/... need Pillow's colour conversion.
    rgba = np.asarray(img.convert("RGBA" if has_alpha else "RGB"))
    grey = _rgb_to_grey(rgba[..., :3], path)
    return _with_alpha(grey, rgba[..., 3], path) if has_alpha else grey


def _raster_pixels(img: Image.Image, path: Path) -> tuple[np.ndarray, int | None]:
    """Convert a decoded Pillow image into the [0, 1] float32 convention.

    Args:
        img: loaded Pillow image.
        path: file named in messages.

    Returns:
        ``(image, bits)``: float32 ``(H, W)`` in [0, 1] and the bit depth used for scaling (None when
        scaled by min/max).
    """
    mode = img.mode
    if mode == "1":
        return np.asarray(img, dtype=np.float32), 1
    if mode.startswith("I;16"):
        arr = np.asarray(img)
        bits = _bits_used(int(arr.max()))
        return _scale_uint(arr, (1 << bits) - 1), bits
    if mode == "I":
        arr = np.asarray(img)
        lo, hi = int(arr.min()), int(arr.max())
        if lo >= 0 and hi <= 0xFFFF:
            bits = _bits_used(hi)
            return _scale_uint(arr, (1 << bits) - 1), bits
        return minmax_scale(arr, path), None
    if mode == "F":
        arr = np.asarray(img)
        if np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float32, copy=True), None
        return minmax_scale(arr, path), None
    grey = _eight_bit_grey(img, path)
    out = _scale_uint(grey, 255.0)
    if grey.dtype != np.uint8:
        np.clip(out, 0.0, 1.0, out=out)
    return out, 8


def _read_raster(path: Path, limit: int) -> XRay:
    """Read a PNG/JPEG/TIFF/BMP radiograph (see the module docstring for the intensity rules)."""
    img = _open_raster(path, limit)
    with img:
        fmt = (img.format or path.suffix.lstrip(".") or "raster").lower()
        mode = img.mode
        image, bits = _raster_pixels(img, path)
    meta = XRayMeta(
        source=str(path),
        format=fmt,
        shape=(int(image.shape[0]), int(image.shape[1])),
        pixel_spacing_mm=None,
        photometric=mode,
        bits_stored=bits,
        inverted=False,
        window_applied=False,
    )
    return XRay(image=image, meta=meta)


def _mask_full_scale(arr: np.ndarray, mode: str) -> float:
    """Value that ``threshold`` is a fraction of: the dtype's range, or 1 for 0/1 label masks."""
    if mode == "F":
        return 1.0
    if np.issubdtype(arr.dtype, np.integer) and int(arr.max()) <= 1:
        # Masks saved as 0/1 labels: a threshold of 127 would silently empty them.
        return 1.0
    if arr.dtype == np.uint8:
        return 255.0
    return 65535.0


def read_mask(path: str | Path, threshold: float = 0.5, max_pixels: int | None = None) -> np.ndarray:
    """Read a binary mask (PNG/JPEG/TIFF/BMP) as bool ``(H, W)``.

    A pixel is foreground when its value is above ``threshold`` times the full scale: 255 for 8-bit
    (so 0.5 means > 127, right for masks interpolated upstream), 65535 for 16-bit, 1 for float masks
    and for integer masks whose values are only 0/1. Colour masks are foreground where any RGB channel
    is (and, with an alpha channel, where alpha is too); palette masks are read through the palette.

    Args:
        path: mask file.
        threshold: fraction of full scale in [0, 1).
        max_pixels: pixel bound, as for :func:`read_xray`.

    Returns:
        bool ``(H, W)``.

    Raises:
        ValueError: threshold outside [0, 1).
        XRayReadError: missing, unreadable, truncated, too large or DICOM files.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"read_mask: threshold must be in [0, 1), got {threshold}")
    limit = max_pixels_limit(max_pixels)
    path = Path(path)
    head = _check_file(path)
    if not head.startswith(_RASTER_MAGIC) and _head_is_dicom(head):
        raise XRayReadError(
            f"{path}: is DICOM; read_mask reads raster masks (PNG/JPEG/TIFF/BMP), export the mask as PNG."
        )
    with _open_raster(path, limit) as img:
        if img.mode in ("P", "PA", "CMYK", "YCbCr", "LAB", "HSV", "RGBX", "RGBa"):
            img = img.convert("RGBA" if "A" in img.mode or "transparency" in img.info else "RGB")
        arr = np.asarray(img)
        mode = img.mode
    if arr.ndim == 2:
        return arr > threshold * _mask_full_scale(arr, mode)
    colour, alpha = (arr[..., :-1], arr[..., -1]) if arr.shape[-1] in (2, 4) else (arr, None)
    cut = threshold * _mask_full_scale(colour, mode)
    fg = (colour > cut).any(axis=-1)
    if alpha is not None and alpha.min() < alpha.max():
        fg &= alpha > threshold * 255.0
    return fg
