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

Images whose Rows x Columns exceed the pixel bound (:data:`sscxr.data.io.MAX_PIXELS`, or
``max_pixels`` / ``SSCXR_MAX_PIXELS``) are refused from the header, before the pixel data is decoded.

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
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi, get_decoder
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

from sscxr.data.xray import XRay, XRayMeta, XRayReadError, check_pixel_count, max_pixels_limit, minmax_scale

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


def _reason(exc: BaseException, ds: Dataset | None) -> str:
    """A third-party exception as one short line, patient identifiers removed."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return _redact(text[:300], ds)


def _open_dataset(path: Path) -> Dataset:
    """Read the data set, accepting files without preamble or file meta (ACR-NEMA style).

    Raises:
        XRayReadError: pydicom cannot parse the file.
    """
    try:
        ds = pydicom.dcmread(path, force=True)
        _fill_transfer_syntax(ds)
    except MemoryError:
        raise
    except Exception as exc:  # InvalidDicomError, EOFError, BytesLengthException, struct.error, ...
        raise XRayReadError(
            f"{path}: is not a readable DICOM file ({type(exc).__name__}); the file may be truncated or "
            "not DICOM at all."
        ) from exc
    return ds


def _fill_transfer_syntax(ds: Dataset) -> None:
    """Give a data set without file meta (or without its Transfer Syntax UID) the one it was read with."""
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
    frames = _optional_int(ds, "NumberOfFrames") or 1  # malformed: the decoder checks the data's length
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
    # Frames first: (F, H, W) or (F, H, W, 3). pydicom also returns frames beyond Number of Frames when
    # the pixel data holds more (a warning), so the shape, not the header, says whether frames are there;
    # the last axis of a grey (F, H, 3) must not be taken for colour.
    samples = _optional_int(ds, "SamplesPerPixel") or 1
    if arr.ndim == (3 if samples == 1 else 4):
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
        try:
            return apply_modality_lut(arr, ds)
        except Exception as exc:  # an item without LUT Descriptor / Data, a descriptor of the wrong length
            raise XRayReadError(
                f"{path}: Modality LUT Sequence (0028,3000) is malformed ({_reason(exc, ds)}); fix or remove "
                'it (e.g. dcmodify -e "(0028,3000)").'
            ) from exc
    # An empty element means "not given"; a written 0 is a broken header, not a slope of 1.
    try:
        raw_slope, raw_intercept = ds.get("RescaleSlope"), ds.get("RescaleIntercept")
        slope = 1.0 if raw_slope is None or raw_slope == "" else float(raw_slope)
        intercept = 0.0 if raw_intercept is None or raw_intercept == "" else float(raw_intercept)
    except (TypeError, ValueError, OverflowError):  # "abc": pydicom converts DS values on access
        raise XRayReadError(
            f"{path}: Rescale Slope/Intercept (0028,1053)/(0028,1052) are not numbers; fix the header."
        ) from None
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
        center, width: Window Center / Width (finite).
        function: VOI LUT Function: LINEAR, LINEAR_EXACT or SIGMOID.

    Returns:
        float32 ``(H, W)`` in [0, 1], or None for an unusable window (the caller falls back).
    """
    if function == "LINEAR":
        if width < 1:
            return None
        # The standard's LINEAR window is defined on integer steps: centre - 0.5, width - 1.
        center, width = center - 0.5, width - 1.0
        if width == 0:
            return (values > center).astype(np.float32)
    elif function not in ("LINEAR_EXACT", "SIGMOID") or width <= 0:
        return None
    # float32 unless the window's numbers leave its range (a header's 1e39 or 1e-40 would give inf - inf
    # or 0 * inf = NaN). Divisions, not multiplications by 1 / width: a finite value over a positive
    # width is never NaN, at worst +-inf, which the clip / exp below turn into 0 or 1.
    dtype = np.float32 if 1e-30 < width < 1e30 and abs(center) < 1e30 else np.float64
    x = values.astype(dtype)
    with np.errstate(over="ignore"):
        if function == "SIGMOID":
            x -= dtype(center)
            x /= dtype(width)
            x *= dtype(-4.0)
            np.exp(x, out=x)
            x += dtype(1.0)
            np.reciprocal(x, out=x)
        else:
            x -= dtype(center - width / 2.0)
            x /= dtype(width)
            np.clip(x, 0.0, 1.0, out=x)
    return x.astype(np.float32, copy=False)


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
        try:
            return _apply_voi_lut_sequence(values, ds), True
        except Exception as exc:  # an item without LUT Descriptor / Data, a descriptor of the wrong length
            raise XRayReadError(
                f"{path}: VOI LUT Sequence (0028,3010) is malformed ({_reason(exc, ds)}); fix or remove it "
                '(e.g. dcmodify -e "(0028,3010)").'
            ) from exc
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
    return minmax_scale(values, path), False


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


def _check_size(ds: Dataset, path: Path, limit: int) -> None:
    """Refuse, from Rows and Columns, an image larger than ``limit`` pixels before it is decoded."""
    rows, columns = _optional_int(ds, "Rows"), _optional_int(ds, "Columns")
    if rows is not None and columns is not None:  # absent or malformed: the decoder reports it
        check_pixel_count(path, columns, rows, limit)


def read_dicom(path: str | Path, max_pixels: int | None = None) -> XRay:
    """Read a DICOM radiograph (first frame) into float32 ``(H, W)`` in [0, 1], bones bright.

    Args:
        path: DICOM file, with or without preamble / file meta, any transfer syntax pydicom decodes.
        max_pixels: refuse images of more than this many pixels (Rows x Columns) before decoding;
            None: ``SSCXR_MAX_PIXELS`` from the environment, else :data:`sscxr.data.io.MAX_PIXELS`.

    Returns:
        :class:`~sscxr.data.io.XRay`; see the module docstring for the intensity policy.

    Raises:
        XRayReadError: unreadable file, no pixel data, missing decoder, corrupt pixel data, too many
            pixels.
    """
    path = Path(path)
    limit = max_pixels_limit(max_pixels)
    ds = _open_dataset(path)
    try:
        return _read_dataset(ds, path, limit)
    except (XRayReadError, MemoryError):
        raise
    except Exception as exc:  # pydicom raises many types on malformed headers: still this file's problem
        raise XRayReadError(
            f"{path}: DICOM header cannot be interpreted ({_reason(exc, ds)}); the file is damaged or "
            "non-standard: re-export it."
        ) from exc


def _read_dataset(ds: Dataset, path: Path, limit: int) -> XRay:
    """`read_dicom` once the data set is parsed (see there)."""
    syntax = _check_pixels(ds, path)
    _check_size(ds, path, limit)
    arr = _decode_first_frame(ds, path, syntax)
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2") or "MONOCHROME2").strip().upper()
    inverted = window_applied = False
    # Palette images decode to 2-D indices: they are grey only through their palette, not as values.
    if photometric in ("MONOCHROME1", "MONOCHROME2") or (arr.ndim == 2 and photometric != "PALETTE COLOR"):
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
