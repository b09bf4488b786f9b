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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from sscxr.errors import DataError

__all__ = [
    "IMAGE_SUFFIXES",
    "XRay",
    "XRayMeta",
    "XRayReadError",
    "is_image_file",
    "looks_like_dicom",
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


def read_xray(path: str | Path) -> XRay:
    """Read one radiograph into float32 ``(H, W)`` in [0, 1], bones bright.

    The decoder is chosen from the file's content (then its suffix): DICOM (any transfer syntax
    pydicom can decode, with or without preamble) or a raster Pillow reads (PNG, JPEG, TIFF, BMP).

    Args:
        path: image file.

    Returns:
        An :class:`XRay` (image ``(H, W)`` float32 in [0, 1], meta without patient identifiers).

    Raises:
        XRayReadError: missing, empty, truncated or non-image files, DICOMs without pixel data or
            with a transfer syntax no installed decoder handles.
    """
    path = Path(path)
    head = _check_file(path)
    if not head.startswith(_RASTER_MAGIC) and (_head_is_dicom(head) or path.suffix.lower() in DICOM_SUFFIXES):
        # Imported here: pydicom costs ~0.2 s to import and PNG-only datasets never need it.
        from sscxr.data.dicom import read_dicom

        return read_dicom(path)
    return _read_raster(path)


def _open_raster(path: Path) -> Image.Image:
    """Open and fully decode the first frame of a raster, upright per its EXIF orientation.

    Raises:
        XRayReadError: not an image Pillow reads, or truncated/corrupt.
    """
    try:
        img = Image.open(path)
    except UnidentifiedImageError as exc:
        raise XRayReadError(
            f"{path}: neither DICOM nor an image format Pillow can read; expected PNG, JPEG, TIFF, BMP "
            "or DICOM (remove the file or convert it)."
        ) from exc
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise XRayReadError(
            f"{path}: cannot be opened as an image ({exc}); the file may be corrupt."
        ) from exc
    try:
        if getattr(img, "n_frames", 1) > 1:
            logger.warning("%s: has %d frames/pages; using the first.", path, img.n_frames)
        img.load()
        # Viewers show JPEGs rotated by their EXIF tag; reading them the same way keeps hand-drawn
        # masks aligned. A no-op (no copy) without the tag.
        ImageOps.exif_transpose(img, in_place=True)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        img.close()
        raise XRayReadError(
            f"{path}: image data is truncated or corrupt ({exc}); re-copy or re-export the file."
        ) from exc
    return img


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


def _minmax(arr: np.ndarray, source: Path | str) -> np.ndarray:
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
    out -= np.float32(lo)
    out *= np.float32(1.0 / (hi - lo))
    np.clip(out, 0.0, 1.0, out=out)
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
        return _minmax(arr, path), None
    if mode == "F":
        arr = np.asarray(img)
        if np.isfinite(arr).all() and arr.min() >= 0.0 and arr.max() <= 1.0:
            return arr.astype(np.float32, copy=True), None
        return _minmax(arr, path), None
    grey = _eight_bit_grey(img, path)
    out = _scale_uint(grey, 255.0)
    if grey.dtype != np.uint8:
        np.clip(out, 0.0, 1.0, out=out)
    return out, 8


def _read_raster(path: Path) -> XRay:
    """Read a PNG/JPEG/TIFF/BMP radiograph (see the module docstring for the intensity rules)."""
    img = _open_raster(path)
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


def read_mask(path: str | Path, threshold: float = 0.5) -> np.ndarray:
    """Read a binary mask (PNG/JPEG/TIFF/BMP) as bool ``(H, W)``.

    A pixel is foreground when its value is above ``threshold`` times the full scale: 255 for 8-bit
    (so 0.5 means > 127, right for masks interpolated upstream), 65535 for 16-bit, 1 for float masks
    and for integer masks whose values are only 0/1. Colour masks are foreground where any RGB channel
    is (and, with an alpha channel, where alpha is too); palette masks are read through the palette.

    Args:
        path: mask file.
        threshold: fraction of full scale in [0, 1).

    Returns:
        bool ``(H, W)``.

    Raises:
        ValueError: threshold outside [0, 1).
        XRayReadError: missing, unreadable, truncated or DICOM files.
    """
    if not 0.0 <= threshold < 1.0:
        raise ValueError(f"read_mask: threshold must be in [0, 1), got {threshold}")
    path = Path(path)
    head = _check_file(path)
    if not head.startswith(_RASTER_MAGIC) and _head_is_dicom(head):
        raise XRayReadError(
            f"{path}: is DICOM; read_mask reads raster masks (PNG/JPEG/TIFF/BMP), export the mask as PNG."
        )
    with _open_raster(path) as img:
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
