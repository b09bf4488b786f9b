"""DICOM radiographs -> float32 ``(H, W)`` in [0, 1], bones bright (the project's image convention).

Pipeline (PS3.3 C.11 grayscale pipeline, first frame only):

1. decode the stored values (any transfer syntax with an installed pydicom decoder);
2. modality transform: Modality LUT Sequence (pydicom ``apply_modality_lut``) or Rescale
   Slope/Intercept (done here in float32 to avoid a float64 copy of the image);
3. intensity policy:

   - VOI LUT Sequence present (first LUT; preferred over a window, as pydicom does): the LUT's own
     output range ``[min(LUT), max(LUT)]`` maps to [0, 1];
   - else Window Center/Width present (first window, VOI LUT Function LINEAR, LINEAR_EXACT or SIGMOID):
     the window's output range maps to [0, 1], i.e. values below the window are 0, above it 1;
   - else the image's own ``[min, max]`` after the modality transform maps to [0, 1], like a viewer's
     default display: Bits Stored is too often wrong (10-bit data in 16) to be trusted as the range;

4. MONOCHROME1 or Presentation LUT Shape INVERSE: ``1 - x``, applied once. In DX files the two say the
   same thing (PS3.3 C.8.11.6.1: INVERSE "shall be used if MONOCHROME1"), so inverting twice would
   give a negative.

A constant image gives zeros. Colour DICOMs (RGB, YBR, PALETTE COLOR) are converted to luma with a
warning. Patient identifiers are never read into the metadata, logs or error messages.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sscxr.data.io import XRay, XRayMeta, XRayReadError, _minmax

__all__ = ["read_dicom"]

logger = logging.getLogger(__name__)

_PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")
# Identifiers that pydicom's own exception texts could echo; scrubbed from any message we build.
_PHI_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "OtherPatientIDs",
    "OtherPatientNames",
    "AccessionNumber",
    "PatientAddress",
    "ReferringPhysicianName",
    "InstitutionName",
)


def _redact(text: str, ds: Dataset | None) -> str:
    """Remove any patient identifier value of ``ds`` from ``text`` (used on third-party messages)."""
    if ds is None:
        return text
    for keyword in _PHI_KEYWORDS:
        try:
            value = ds.get(keyword)
        except Exception:  # a malformed identifier must not mask the real error
            continue
        values = value if isinstance(value, list | tuple | MultiValue) else [value]
        for v in values:
            s = str(v).strip() if v is not None else ""
            if len(s) >= 2:
                text = text.replace(s, "<redacted>")
    return text


def _open_dataset(path: Path) -> Dataset:
    """Read the data set, accepting files without preamble or file meta (ACR-NEMA style).

    Raises:
        XRayReadError: pydicom cannot parse the file.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError, TypeError, OverflowError) as exc:
        raise XRayReadError(
            f"{path}: is not a readable DICOM file ({type(exc).__name__}); the file may be truncated or "
            "not DICOM at all."
        ) from exc
    meta = getattr(ds, "file_meta", None)
    if meta is None or "TransferSyntaxUID" not in meta:
        # No file meta: use the encoding pydicom detected while parsing (ACR-NEMA files are implicit
        # VR little endian), so the pixel decoders know how the bytes are laid out.
        implicit, little = ds.original_encoding
        if implicit is False:
            syntax = ExplicitVRLittleEndian if little is not False else ExplicitVRBigEndian
        else:
            syntax = ImplicitVRLittleEndian
        ds.file_meta = meta if meta is not None else FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = syntax
    return ds


def _check_pixels(ds: Dataset, path: Path) -> UID:
    """Check the data set holds pixel data that an installed decoder can decode.

    Returns:
        The transfer syntax UID.

    Raises:
        XRayReadError: no pixel data, or no (installed) decoder for the transfer syntax.
    """
    if not any(k in ds for k in _PIXEL_KEYWORDS):
        raise XRayReadError(
            f"{path}: DICOM has no Pixel Data (7FE0,0010): it is not an image (a report, presentation "
            "state or truncated header?); remove it from the image list."
        )
    syntax = UID(ds.file_meta.TransferSyntaxUID)
    try:
        compressed = syntax.is_compressed
    except ValueError:  # pydicom: "UID is not a transfer syntax"
        raise XRayReadError(
            f"{path}: transfer syntax UID {str(syntax)!r} is not a DICOM transfer syntax (a damaged or "
            "hand-edited file meta); re-export the file."
        ) from None
    if not compressed:
        return syntax
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise XRayReadError(
            f"{path}: transfer syntax {syntax.name} ({syntax}) has no pixel decoder in pydicom; convert "
            "the file to an uncompressed syntax (e.g. dcmtk `dcmdjpeg` or `gdcmconv --raw`)."
        ) from exc
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies)
        raise XRayReadError(
            f"{path}: transfer syntax {syntax.name} ({syntax}) needs a decoder that is not installed; "
            f"pip install one of: {needs}."
        )
    return syntax


def _decode_first_frame(ds: Dataset, path: Path, syntax: UID) -> np.ndarray:
    """Decode frame 0 of the pixel data (other frames are skipped, with a warning).

    Returns:
        ``(H, W)`` (monochrome) or ``(H, W, 3)`` (colour, RGB) array of stored values.

    Raises:
        XRayReadError: the decoder fails (corrupt or truncated pixel data, inconsistent header).
    """
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        logger.warning("%s: DICOM has %d frames; using the first.", path, frames)
    try:
        # index=0 decodes only the first frame instead of the whole cine.
        ds.pixel_array_options(index=0 if frames > 1 else None)
        arr = ds.pixel_array
    except Exception as exc:  # decoders raise many types (ValueError, RuntimeError, struct.error, ...)
        reason = _redact(f"{type(exc).__name__}: {exc}", ds)
        raise XRayReadError(
            f"{path}: pixel data cannot be decoded ({syntax.name}): {reason}. The file may be truncated "
            "or its image header (rows, columns, bits) inconsistent; re-export it."
        ) from exc
    if arr.ndim == 3 and arr.shape[-1] not in (3, 4):
        arr = arr[0]
    return arr


def _modality(arr: np.ndarray, ds: Dataset, path: Path) -> np.ndarray:
    """Apply the modality transform (Modality LUT Sequence, else Rescale Slope/Intercept).

    Args:
        arr: stored values ``(H, W)``.

    Returns:
        Modality values ``(H, W)``: the LUT's integer output, or float32 when rescaled, or ``arr``.
    """
    if "ModalityLUTSequence" in ds:
        return apply_modality_lut(arr, ds)
    # An empty element means "not given"; a written 0 is a broken header, not a slope of 1.
    raw_slope, raw_intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
    slope = 1.0 if raw_slope is None or raw_slope == "" else float(raw_slope)
    intercept = 0.0 if raw_intercept is None or raw_intercept == "" else float(raw_intercept)
    if not (math.isfinite(slope) and math.isfinite(intercept)) or slope == 0.0:
        raise XRayReadError(
            f"{path}: Rescale Slope/Intercept ({slope}, {intercept}) are not usable numbers; fix the header."
        )
    if slope == 1.0 and intercept == 0.0:
        return arr
    out = arr.astype(np.float32)
    with np.errstate(over="ignore"):  # an overflow is reported below, as the file's problem
        out *= np.float32(slope)
        out += np.float32(intercept)
    if not np.isfinite(out).all():  # overflowed float32: windowing would turn it into a flat image
        raise XRayReadError(
            f"{path}: Rescale Slope/Intercept ({slope}, {intercept}) overflow the pixel values to "
            "infinity; fix the header."
        )
    return out


def _first(value: Any) -> float:
    """First value of a possibly multi-valued DS element, as float."""
    if isinstance(value, list | tuple | MultiValue):
        value = value[0]
    return float(value)


def _window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """Apply a VOI window (PS3.3 C.11.2.1.2-3) with its output range mapped to [0, 1].

    Args:
        values: modality values ``(H, W)``.
        center, width: Window Center / Width.
        function: VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID.

    Returns:
        float32 ``(H, W)`` in [0, 1], or None for an unusable window (the caller falls back).
    """
    x = values.astype(np.float32)
    if function == "SIGMOID":
        if width <= 0:
            return None
        x -= np.float32(center)
        x *= np.float32(-4.0 / width)
        np.exp(x, out=x)
        x += np.float32(1.0)
        np.reciprocal(x, out=x)
        return x
    if function == "LINEAR":
        if width < 1:
            return None
        # The standard's LINEAR window is defined on integer steps: centre - 0.5, width - 1.
        center, width = center - 0.5, width - 1.0
        if width == 0:
            return (x > np.float32(center)).astype(np.float32)
    elif function != "LINEAR_EXACT" or width <= 0:
        return None
    x -= np.float32(center - width / 2.0)
    x *= np.float32(1.0 / width)
    np.clip(x, 0.0, 1.0, out=x)
    return x


def _apply_voi_lut_sequence(values: np.ndarray, ds: Dataset) -> np.ndarray:
    """Apply the first VOI LUT of the VOI LUT Sequence, LUT output range mapped to [0, 1]."""
    # VOI LUT inputs are integers by definition; pydicom indexes the LUT with them.
    ints = values if np.issubdtype(values.dtype, np.integer) else np.rint(values).astype(np.int64)
    out = apply_voi(ints, ds, index=0)
    descriptor = ds.VOILUTSequence[0].LUTDescriptor
    n_entries = int(descriptor[0]) or 1 << 16
    domain = np.arange(int(descriptor[1]), int(descriptor[1]) + n_entries, dtype=np.int64)
    lut = apply_voi(domain, ds, index=0)
    lo, hi = float(lut.min()), float(lut.max())
    if hi <= lo:
        return np.zeros(values.shape, np.float32)
    scaled = out.astype(np.float32)
    scaled -= np.float32(lo)
    scaled *= np.float32(1.0 / (hi - lo))
    return scaled


def _voi(values: np.ndarray, ds: Dataset, path: Path) -> tuple[np.ndarray, bool]:
    """Map modality values to [0, 1] following the module's intensity policy.

    Returns:
        ``(image, window_applied)`` with image float32 ``(H, W)`` in [0, 1].
    """
    if ds.get("VOILUTSequence"):
        return _apply_voi_lut_sequence(values, ds), True
    if "WindowCenter" in ds and "WindowWidth" in ds:
        function = str(ds.get("VOILUTFunction", "LINEAR") or "LINEAR").strip().upper()
        try:
            center, width = _first(ds.WindowCenter), _first(ds.WindowWidth)
        except (TypeError, ValueError, IndexError):
            center = width = float("nan")
        out = None
        if math.isfinite(center) and math.isfinite(width):
            out = _window(values, center, width, function)
        if out is not None:
            return out, True
        logger.warning("%s: unusable window (function %s); mapping the data range instead.", path, function)
    return _minmax(values, path), False


def _colour_to_grey(arr: np.ndarray, ds: Dataset, photometric: str, path: Path) -> np.ndarray:
    """Convert a colour DICOM (RGB after pydicom's YBR conversion, or PALETTE COLOR) to [0, 1] luma."""
    logger.warning("%s: colour DICOM (%s); converting to grey with luma.", path, photometric)
    if photometric == "PALETTE COLOR":
        arr = apply_color_lut(arr, ds)
    rgb = arr[..., :3].astype(np.float32)
    grey = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    bits = int(ds.get("BitsStored", 8) or 8) if photometric != "PALETTE COLOR" else arr.dtype.itemsize * 8
    grey *= np.float32(1.0 / ((1 << bits) - 1))
    return np.clip(grey, 0.0, 1.0, out=grey)


def _pixel_spacing(ds: Dataset) -> tuple[float, float] | None:
    """(row, column) spacing in mm from Pixel Spacing, else Imager Pixel Spacing; None if absent/bad."""
    for keyword in ("PixelSpacing", "ImagerPixelSpacing"):
        try:
            value = ds.get(keyword)
            if value is None or len(value) != 2:
                continue
            row, col = float(value[0]), float(value[1])
        except (TypeError, ValueError):
            continue
        if math.isfinite(row) and math.isfinite(col) and row > 0 and col > 0:
            return (row, col)
    return None


def _optional_int(ds: Dataset, keyword: str) -> int | None:
    """Integer value of ``keyword`` or None when absent or malformed."""
    try:
        value = ds.get(keyword)
        return None if value is None else int(value)
    except (TypeError, ValueError):
        return None


def read_dicom(path: str | Path) -> XRay:
    """Read a DICOM radiograph (first frame) into float32 ``(H, W)`` in [0, 1], bones bright.

    Args:
        path: DICOM file, with or without preamble / file meta, any transfer syntax pydicom decodes.

    Returns:
        :class:`~sscxr.data.io.XRay`; see the module docstring for the intensity policy.

    Raises:
        XRayReadError: unreadable file, no pixel data, missing decoder, corrupt pixel data.
    """
    path = Path(path)
    ds = _open_dataset(path)
    syntax = _check_pixels(ds, path)
    arr = _decode_first_frame(ds, path, syntax)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    inverted = window_applied = False
    if photometric in ("MONOCHROME1", "MONOCHROME2") or arr.ndim == 2:
        values = _modality(arr, ds, path)
        image, window_applied = _voi(values, ds, path)
        shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
        inverted = photometric == "MONOCHROME1" or shape == "INVERSE"
        if inverted:
            np.subtract(np.float32(1.0), image, out=image)
    else:
        image = _colour_to_grey(arr, ds, photometric, path)
    image = np.ascontiguousarray(image, dtype=np.float32)
    meta = XRayMeta(
        source=str(path),
        format="dicom",
        shape=(int(image.shape[0]), int(image.shape[1])),
        pixel_spacing_mm=_pixel_spacing(ds),
        photometric=photometric,
        bits_stored=_optional_int(ds, "BitsStored"),
        inverted=inverted,
        window_applied=window_applied,
    )
    return XRay(image=image, meta=meta)
