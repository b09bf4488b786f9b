"""Tests of the X-ray reader (sscxr.data.io / sscxr.data.dicom).

Synthetic DICOMs and rasters are written to ``tmp_path`` with pydicom and Pillow; the real samples in
``../shared/data`` are only used by tests marked ``realdata`` (skipped when the folder is absent).
"""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.encaps import encapsulate

import sscxr.data.dicom as dicom_mod
from sscxr.data.io import (
    IMAGE_SUFFIXES,
    XRay,
    XRayReadError,
    is_image_file,
    looks_like_dicom,
    read_mask,
    read_xray,
)
from sscxr.errors import DataError

PATIENT_NAME = "Zyxwvu^Qponm"
PATIENT_ID = "PID-918273"
BIRTH_DATE = "19310704"
SECRETS = ("Zyxwvu", "Qponm", PATIENT_ID, BIRTH_DATE)
H, W = 48, 64


# ----------------------------------------------------------------------------------------- helpers
def anatomy(h: int = H, w: int = W) -> np.ndarray:
    """Chest-like float image (h, w) in [0, 1]: bright spine band, two dark lungs, vertical gradient."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    v, u = yy / (h - 1), xx / (w - 1) * 2 - 1
    img = 0.35 + 0.2 * v
    img[((np.abs(u) - 0.5) / 0.3) ** 2 + ((v - 0.45) / 0.3) ** 2 < 1] -= 0.25
    img[np.abs(u) < 0.1] += 0.4
    return np.clip(img, 0.0, 1.0)


def lung_and_spine(img: np.ndarray) -> tuple[float, float]:
    """Mean of a lung region and of the spine band of an ``anatomy`` image."""
    h, w = img.shape
    lung = img[int(h * 0.35) : int(h * 0.55), int(w * 0.2) : int(w * 0.3)]
    spine = img[:, int(w * 0.48) : int(w * 0.52)]
    return float(lung.mean()), float(spine.mean())


def write_dicom(
    path: Path,
    stored: np.ndarray,
    *,
    photometric: str = "MONOCHROME2",
    bits_stored: int = 12,
    file_meta: bool = True,
    pixels: bool = True,
    **tags: Any,
) -> Path:
    """Write ``stored`` (uint16 (H, W) or (F, H, W)) as a CR DICOM carrying patient identifiers."""
    ds = Dataset()
    ds.SOPClassUID = uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.1"
    ds.PatientName = PATIENT_NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = BIRTH_DATE
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape[-2:]
    if stored.ndim == 3:
        ds.NumberOfFrames = stored.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, bits_stored, bits_stored - 1, 0
    ds.PixelSpacing = [0.2, 0.25]
    if pixels:
        ds.PixelData = stored.astype("<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    if not file_meta:
        pydicom.dcmwrite(path, ds, implicit_vr=True, little_endian=True, enforce_file_format=False)
        return path
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    FileDataset(str(path), ds, file_meta=meta, preamble=b"\0" * 128).save_as(path, enforce_file_format=True)
    return path


def stored_values(bits: int) -> np.ndarray:
    """``anatomy()`` quantised to ``bits`` (uint16)."""
    return np.rint(anatomy() * ((1 << bits) - 1)).astype(np.uint16)


def minmax(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return (a - a.min()) / (a.max() - a.min())


def linear_window(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """PS3.3 C.11.2.1.2.1 LINEAR window, output range mapped to [0, 1]."""
    return np.clip((x - (center - 0.5)) / (width - 1) + 0.5, 0.0, 1.0)


def assert_convention(x: XRay) -> None:
    """float32 (H, W) in [0, 1], finite, meta shape matching."""
    assert isinstance(x, XRay)
    assert x.image.dtype == np.float32 and x.image.ndim == 2
    assert np.isfinite(x.image).all()
    assert x.image.min() >= 0.0 and x.image.max() <= 1.0
    assert x.meta.shape == x.image.shape


# ------------------------------------------------------------------------------------ DICOM: synthetic
@pytest.mark.parametrize("bits", [10, 12, 16])
def test_monochrome1_twin_reads_like_monochrome2(tmp_path: Path, bits: int) -> None:
    s = stored_values(bits)
    mono2 = read_xray(write_dicom(tmp_path / "m2.dcm", s, bits_stored=bits))
    mono1 = read_xray(
        write_dicom(tmp_path / "m1.dcm", (1 << bits) - 1 - s, photometric="MONOCHROME1", bits_stored=bits)
    )
    for x in (mono1, mono2):
        assert_convention(x)
        lung, spine = lung_and_spine(x.image)
        assert spine > lung + 0.3, "bones must come out bright"
    np.testing.assert_allclose(mono1.image, mono2.image, atol=1e-6)
    np.testing.assert_allclose(mono2.image, minmax(s), atol=1e-6)  # no window: data range -> [0, 1]
    assert mono1.meta.inverted and not mono2.meta.inverted
    assert (mono1.meta.photometric, mono2.meta.photometric) == ("MONOCHROME1", "MONOCHROME2")
    assert mono2.meta.bits_stored == bits and mono2.meta.format == "dicom"
    assert mono2.meta.pixel_spacing_mm == (0.2, 0.25)
    assert not mono2.meta.window_applied


def test_window_center_width_applied(tmp_path: Path) -> None:
    s = stored_values(12)
    x = read_xray(write_dicom(tmp_path / "w.dcm", s, WindowCenter=[1500, 900], WindowWidth=[1000, 300]))
    assert_convention(x)
    assert x.meta.window_applied
    np.testing.assert_allclose(x.image, linear_window(s.astype(np.float64), 1500, 1000), atol=1e-5)
    assert (x.image == 0).any() and (x.image == 1).any()  # the window clips both ends of this image
    inv = read_xray(
        write_dicom(tmp_path / "w1.dcm", s, photometric="MONOCHROME1", WindowCenter=1500, WindowWidth=1000)
    )
    np.testing.assert_allclose(inv.image, 1.0 - x.image, atol=1e-6)


@pytest.mark.parametrize("function", ["LINEAR_EXACT", "SIGMOID"])
def test_window_functions(tmp_path: Path, function: str) -> None:
    s = stored_values(12).astype(np.float64)
    x = read_xray(
        write_dicom(tmp_path / "f.dcm", s, WindowCenter=1500, WindowWidth=1000, VOILUTFunction=function)
    )
    if function == "SIGMOID":
        expected = 1.0 / (1.0 + np.exp(-4.0 * (s - 1500) / 1000))
    else:
        expected = np.clip((s - 1500) / 1000 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(x.image, expected, atol=1e-5)


def test_rescale_slope_intercept(tmp_path: Path) -> None:
    s = stored_values(12)
    # The window is in modality units (HU-like); it only matches the image if the rescale is applied.
    x = read_xray(
        write_dicom(
            tmp_path / "r.dcm", s, RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=2000, WindowWidth=2000
        )
    )
    np.testing.assert_allclose(x.image, linear_window(2.0 * s - 1000.0, 2000, 2000), atol=1e-5)
    # A negative slope flips the modality values, so the image must flip too.
    plain = read_xray(write_dicom(tmp_path / "p.dcm", s))
    flipped = read_xray(write_dicom(tmp_path / "n.dcm", s, RescaleSlope=-1, RescaleIntercept=4095))
    np.testing.assert_allclose(flipped.image, 1.0 - plain.image, atol=1e-6)


def test_modality_lut_sequence_applied(tmp_path: Path) -> None:
    s = stored_values(12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 16]
    item.ModalityLUTType = "US"
    lut = (4095 - np.arange(4096)) ** 2 // 4095  # decreasing and non-linear
    item.add_new(0x00283006, "US", [int(v) for v in lut])  # LUT Data; US, as the default OW needs bytes
    x = read_xray(write_dicom(tmp_path / "lut.dcm", s, ModalityLUTSequence=[item]))
    np.testing.assert_allclose(x.image, minmax((4095 - s.astype(np.int64)) ** 2 // 4095), atol=1e-6)


def test_voi_lut_sequence_preferred_over_window(tmp_path: Path) -> None:
    s = stored_values(12)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 12]
    item.add_new(0x00283006, "US", [int(v) for v in np.sqrt(np.arange(4096) / 4095) * 4000 + 10])
    x = read_xray(write_dicom(tmp_path / "voi.dcm", s, VOILUTSequence=[item], WindowCenter=10, WindowWidth=2))
    assert x.meta.window_applied
    lut = np.asarray(item.LUTData, dtype=np.float64)
    np.testing.assert_allclose(x.image, (lut[s] - lut.min()) / (lut.max() - lut.min()), atol=1e-6)


def test_no_preamble_no_file_meta(tmp_path: Path) -> None:
    s = stored_values(10)
    bare = write_dicom(tmp_path / "IM0001", s, photometric="MONOCHROME1", bits_stored=10, file_meta=False)
    assert bare.read_bytes()[128:132] != b"DICM"
    assert looks_like_dicom(bare) and is_image_file(bare)
    x = read_xray(bare)
    ref = read_xray(write_dicom(tmp_path / "ref.dcm", s, photometric="MONOCHROME1", bits_stored=10))
    assert_convention(x)
    np.testing.assert_array_equal(x.image, ref.image)
    assert x.meta.inverted and x.meta.bits_stored == 10


def test_multiframe_takes_first_frame(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    s = stored_values(12)
    frames = np.stack([s, 4095 - s, np.zeros_like(s)])
    with caplog.at_level(logging.WARNING):
        x = read_xray(write_dicom(tmp_path / "mf.dcm", frames))
    np.testing.assert_allclose(x.image, minmax(s), atol=1e-6)
    assert "3 frames" in caplog.text and "mf.dcm" in caplog.text


def test_constant_dicom_gives_zeros(tmp_path: Path) -> None:
    x = read_xray(write_dicom(tmp_path / "c.dcm", np.full((H, W), 700, np.uint16)))
    assert_convention(x)
    assert not x.image.any()


def test_non_finite_images_are_errors_not_black_images(tmp_path: Path) -> None:
    """A rescale that overflows float32, or a float TIFF of NaNs, holds no measurement: reading it must
    fail (so `prepare` reports the row), never return a valid-looking flat image."""
    s = stored_values(12)
    with pytest.raises(XRayReadError, match="overflow the pixel values to infinity"):
        read_xray(write_dicom(tmp_path / "inf.dcm", s, RescaleSlope=1e38, WindowCenter=0, WindowWidth=10))
    Image.fromarray(np.full((H, W), np.nan, np.float32), mode="F").save(tmp_path / "nan.tif")
    with pytest.raises(XRayReadError, match="every pixel is NaN or infinite"):
        read_xray(tmp_path / "nan.tif")
    partly = np.linspace(0.0, 5.0, H * W, dtype=np.float32).reshape(H, W)
    partly[0, :3] = np.nan  # a few bad pixels: the image is still read, they take its minimum
    Image.fromarray(partly, mode="F").save(tmp_path / "partly.tif")
    x = read_xray(tmp_path / "partly.tif")
    assert np.isfinite(x.image).all() and x.image[0, 0] == 0.0 and x.image.max() == pytest.approx(1.0)


def test_missing_pixel_data_raises(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "nopix.dcm", stored_values(12), pixels=False)
    with pytest.raises(XRayReadError, match=r"nopix\.dcm") as info:
        read_xray(path)
    assert isinstance(info.value, DataError)
    assert "Pixel Data" in str(info.value)


def test_truncated_dicom_raises(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "cut.dcm", stored_values(12))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 2000])
    with pytest.raises(XRayReadError, match=r"cut\.dcm"):
        read_xray(path)


def _encapsulated(path: Path, syntax: str) -> Path:
    """A DICOM whose file meta announces the compressed ``syntax`` (pixel bytes are dummies)."""
    write_dicom(path, stored_values(12))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rescale_slope_zero_is_an_error_not_ignored(tmp_path: Path) -> None:
    with pytest.raises(XRayReadError, match=r"Rescale Slope/Intercept \(0\.0, 0\.0\)"):
        read_xray(write_dicom(tmp_path / "z.dcm", stored_values(12), RescaleSlope=0))


def test_bogus_transfer_syntax_uid_is_a_read_error(tmp_path: Path) -> None:
    path = write_dicom(tmp_path / "bogus.dcm", stored_values(12))
    ds = pydicom.dcmread(path)
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5.6.7.8.9"
    ds.save_as(path, enforce_file_format=True)
    with pytest.raises(XRayReadError, match=r"bogus\.dcm: transfer syntax UID '1\.2\.3\.4\.5\.6\.7\.8\.9'"):
        read_xray(path)


def test_transfer_syntax_without_decoder_raises(tmp_path: Path) -> None:
    path = _encapsulated(tmp_path / "mpeg.dcm", uid.MPEG2MPML)
    with pytest.raises(XRayReadError, match=r"mpeg\.dcm.*no pixel decoder"):
        read_xray(path)


def test_missing_decoder_package_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = _encapsulated(tmp_path / "jpeg.dcm", uid.JPEGBaseline8Bit)
    missing = SimpleNamespace(
        is_available=False, missing_dependencies=["pylibjpeg - requires pylibjpeg-libjpeg"]
    )
    monkeypatch.setattr(dicom_mod, "get_decoder", lambda syntax: missing)
    with pytest.raises(XRayReadError, match=r"jpeg\.dcm.*pip install.*pylibjpeg-libjpeg"):
        read_xray(path)


def test_patient_identifiers_never_leak(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    s = stored_values(12)
    messages = [repr(read_xray(write_dicom(tmp_path / "a.dcm", np.stack([s, s]))).meta)]
    nopix = write_dicom(tmp_path / "b.dcm", s, pixels=False)
    cut = write_dicom(tmp_path / "c.dcm", s)
    cut.write_bytes(cut.read_bytes()[:-2000])
    for bad in (nopix, cut):
        with pytest.raises(XRayReadError) as info:
            read_xray(bad)
        messages.append(str(info.value))
    assert caplog.text  # the multi-frame warning was logged, so logs were really captured
    for text in [*messages, caplog.text]:
        for secret in SECRETS:
            assert secret not in text


# --------------------------------------------------------------------------------------- rasters
def test_png_8bit(tmp_path: Path) -> None:
    arr = np.rint(anatomy() * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = read_xray(tmp_path / "a.png")
    assert_convention(x)
    np.testing.assert_allclose(x.image, arr / 255.0, atol=1e-6)
    assert (x.meta.format, x.meta.photometric, x.meta.bits_stored) == ("png", "L", 8)
    assert x.meta.pixel_spacing_mm is None and not x.meta.inverted


@pytest.mark.parametrize(
    ("max_value", "denominator", "bits"), [(4000, 4095, 12), (60000, 65535, 16), (1000, 1023, 10)]
)
def test_png_16bit_scaled_by_bits_used(tmp_path: Path, max_value: int, denominator: int, bits: int) -> None:
    arr = np.rint(anatomy() / anatomy().max() * max_value).astype(np.uint16)
    Image.fromarray(arr).save(tmp_path / "a.png")
    x = read_xray(tmp_path / "a.png")
    assert_convention(x)
    assert x.meta.bits_stored == bits
    np.testing.assert_allclose(x.image, arr / denominator, atol=1e-6)


def test_tiff_16bit(tmp_path: Path) -> None:
    arr = stored_values(12)
    Image.fromarray(arr).save(tmp_path / "a.tif")
    x = read_xray(tmp_path / "a.tif")
    assert x.meta.format == "tiff"
    np.testing.assert_allclose(x.image, arr / 4095.0, atol=1e-6)


def test_jpeg_8bit(tmp_path: Path) -> None:
    arr = np.rint(anatomy() * 255).astype(np.uint8)
    Image.fromarray(arr).save(tmp_path / "a.jpg", quality=95)
    x = read_xray(tmp_path / "a.jpg")
    assert x.meta.format == "jpeg"
    assert np.abs(x.image - arr / 255.0).mean() < 0.02


def test_grey_saved_as_rgb_rgba_palette(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    arr = np.rint(anatomy() * 255).astype(np.uint8)
    ref = arr / 255.0
    Image.fromarray(arr).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(arr).convert("RGBA").save(tmp_path / "rgba.png")
    # Palette whose indices are NOT the grey levels: reading indices as intensities would fail.
    levels = np.unique(arr)
    index = len(levels) - 1 - np.searchsorted(levels, arr)
    pal = Image.frombytes("P", (W, H), index.astype(np.uint8).tobytes())
    pal.putpalette([int(v) for lvl in levels[::-1] for v in (lvl, lvl, lvl)])
    pal.save(tmp_path / "pal.png")
    with caplog.at_level(logging.WARNING):
        for name in ("rgb.png", "rgba.png", "pal.png"):
            x = read_xray(tmp_path / name)
            assert_convention(x)
            np.testing.assert_allclose(x.image, ref, atol=1e-6, err_msg=name)
    assert "colour" not in caplog.text


def test_coloured_rgb_warns_and_transparent_alpha_composites(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[..., 0] = 200
    Image.fromarray(rgb).save(tmp_path / "red.png")
    with caplog.at_level(logging.WARNING):
        x = read_xray(tmp_path / "red.png")
    assert "colour" in caplog.text and "red.png" in caplog.text
    np.testing.assert_allclose(x.image, 0.299 * 200 / 255, atol=1e-4)
    rgba = np.full((H, W, 4), 255, np.uint8)
    rgba[:, : W // 2, 3] = 0
    Image.fromarray(rgba).save(tmp_path / "alpha.png")
    y = read_xray(tmp_path / "alpha.png").image
    assert not y[:, : W // 2].any() and (y[:, W // 2 :] == 1).all()


def test_constant_png_gives_zeros_or_level(tmp_path: Path) -> None:
    Image.fromarray(np.full((H, W), 77, np.uint8)).save(tmp_path / "c.png")
    x = read_xray(tmp_path / "c.png")
    np.testing.assert_allclose(x.image, 77 / 255.0, atol=1e-6)  # 8-bit: fixed scale, no stretching
    Image.fromarray(np.full((H, W), 2.5, np.float32)).save(tmp_path / "f.tif")
    f = read_xray(tmp_path / "f.tif")
    assert_convention(f)
    assert not f.image.any()


def test_truncated_png_raises(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (256, 256), dtype=np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(XRayReadError, match=r"t\.png.*truncated"):
        read_xray(tmp_path / "t.png")


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [("gone.png", None, "not found"), ("empty.png", b"", "empty"), ("notes.png", b"hello world", "Pillow")],
)
def test_unreadable_files_raise(tmp_path: Path, name: str, content: bytes | None, reason: str) -> None:
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(XRayReadError, match=rf"{name}.*{reason}"):
        read_xray(path)


def test_is_image_file_and_suffixes(tmp_path: Path) -> None:
    assert {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"} == set(IMAGE_SUFFIXES)
    assert is_image_file("x/A.PNG") and is_image_file("b.dcm") and not is_image_file(tmp_path / "m.csv")
    uid_named = write_dicom(tmp_path / "1.2.840.3", stored_values(12))
    (tmp_path / "notes").write_text("x" * 200)
    assert is_image_file(uid_named) and looks_like_dicom(uid_named)
    assert not is_image_file(tmp_path / "notes") and not looks_like_dicom(tmp_path / "missing")


# ------------------------------------------------------------------------------------------ masks
def test_read_mask_thresholds(tmp_path: Path) -> None:
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    Image.fromarray(ramp).save(tmp_path / "m.png")
    m = read_mask(tmp_path / "m.png")
    assert m.dtype == bool and m.shape == (4, 256)
    np.testing.assert_array_equal(m[0], np.arange(256) > 127)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png", threshold=0.9)[0], np.arange(256) > 229.5)
    with pytest.raises(ValueError, match="threshold"):
        read_mask(tmp_path / "m.png", threshold=1.5)


def test_read_mask_colour_labels_and_palette(tmp_path: Path) -> None:
    truth = anatomy() < 0.3
    rgb = np.zeros((H, W, 3), np.uint8)
    rgb[truth, 1] = 255  # foreground drawn in green only
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(truth.astype(np.uint8)).save(tmp_path / "labels.png")  # 0/1 label mask
    # Index 0 is white and index 1 black: the palette, not the index, says what is foreground.
    pal = Image.frombytes("P", (W, H), (~truth).astype(np.uint8).tobytes())
    pal.putpalette([255, 255, 255, 0, 0, 0])
    pal.save(tmp_path / "pal.png")
    for name in ("rgb.png", "labels.png", "pal.png"):
        np.testing.assert_array_equal(read_mask(tmp_path / name), truth, err_msg=name)


def test_read_mask_rejects_dicom_and_missing(tmp_path: Path) -> None:
    with pytest.raises(XRayReadError, match=r"m\.dcm"):
        read_mask(write_dicom(tmp_path / "m.dcm", stored_values(12)))
    with pytest.raises(XRayReadError, match=r"nope\.png"):
        read_mask(tmp_path / "nope.png")


# -------------------------------------------------------------------------------------- real data
SIIM = "dicom/chest/1.2.276.0.7230010.3.1.4.8323329.6904.1517875201.850819.dcm"
REAL_DICOMS = [
    SIIM,
    "dicom/chest/1.3.6.1.4.1.11129.5.5.110503645592756492463169821050252582267888.dcm",
    "dicom/chest/CR-MONO1-10-chest",
    "dicom/chest/Fake_MONOHR1.dcm",
    "dicom/other/CR-ModalitySequenceLUT.dcm",
    "dicom/other/dx_image.dcm",
]


def region(img: np.ndarray, rows: tuple[float, float], cols: tuple[float, float]) -> float:
    """Mean of a region given as fractions of the image height and width."""
    h, w = img.shape
    return float(img[int(h * rows[0]) : int(h * rows[1]), int(w * cols[0]) : int(w * cols[1])].mean())


@pytest.mark.realdata
def test_every_real_dicom_reads(shared_data: Path) -> None:
    found = sorted(p for p in (shared_data / "dicom").rglob("*") if p.is_file() and is_image_file(p))
    assert {p.relative_to(shared_data).as_posix() for p in found} == set(REAL_DICOMS)
    for path in found:
        assert_convention(read_xray(path))


@pytest.mark.realdata
def test_real_monochrome1_chest_has_bright_bones(shared_data: Path) -> None:
    x = read_xray(shared_data / "dicom/chest/CR-MONO1-10-chest")
    assert (x.meta.photometric, x.meta.bits_stored, x.meta.inverted) == ("MONOCHROME1", 10, True)
    img = x.image
    lungs = max(region(img, (0.3, 0.6), (0.15, 0.35)), region(img, (0.3, 0.6), (0.65, 0.85)))
    assert region(img, (0.3, 0.7), (0.45, 0.55)) > lungs + 0.15  # mediastinum/spine
    assert region(img, (0.9, 1.0), (0.1, 0.4)) > lungs + 0.15  # below the diaphragm


@pytest.mark.realdata
def test_real_jpeg_baseline_and_fake_monochrome1_twin(shared_data: Path) -> None:
    twin = read_xray(shared_data / SIIM)
    assert twin.meta.shape == (1024, 1024) and twin.meta.pixel_spacing_mm == pytest.approx((0.168, 0.168))
    lungs = region(twin.image, (0.35, 0.6), (0.2, 0.4))
    assert region(twin.image, (0.35, 0.6), (0.45, 0.55)) > lungs + 0.2  # MONOCHROME2: bones bright as stored
    # Same stored pixels, tagged MONOCHROME1: the tag says "min is white", so it must come out inverted.
    fake = read_xray(shared_data / "dicom/chest/Fake_MONOHR1.dcm")
    assert fake.meta.inverted and not twin.meta.inverted
    np.testing.assert_allclose(fake.image, 1.0 - twin.image, atol=1e-6)


@pytest.mark.realdata
def test_real_presentation_lut_inverse_inverts_once(shared_data: Path) -> None:
    path = shared_data / "dicom/other/dx_image.dcm"
    x = read_xray(path)
    ds = pydicom.dcmread(path)
    assert ds.PresentationLUTShape == "INVERSE" and ds.PhotometricInterpretation == "MONOCHROME1"
    expected = 1.0 - linear_window(
        ds.pixel_array.astype(np.float64), float(ds.WindowCenter), float(ds.WindowWidth)
    )
    np.testing.assert_allclose(x.image, expected, atol=1e-5)
    assert region(x.image, (0.0, 0.05), (0.3, 1.0)) < 0.1  # air above the animal's back is dark


@pytest.mark.realdata
def test_real_jpeg_lossless_with_modality_lut_sequence(shared_data: Path) -> None:
    x = read_xray(shared_data / "dicom/other/CR-ModalitySequenceLUT.dcm")
    assert x.meta.shape == (1576, 1976) and x.meta.inverted and x.meta.pixel_spacing_mm == (0.15, 0.15)
    assert region(x.image, (0.0, 0.3), (0.0, 1.0)) < 0.05  # unexposed area (MONOCHROME1 max) is dark
    assert region(x.image, (0.6, 0.75), (0.3, 0.7)) > 0.3  # teeth and jaw are bright


@pytest.mark.realdata
@pytest.mark.parametrize("folder", ["shenzhen_mini", "imlab_lung", "nih_tbx_samples", "fig1"])
def test_real_rasters_read(shared_data: Path, folder: str) -> None:
    paths = sorted(
        p for p in (shared_data / folder).rglob("*") if p.suffix in (".png", ".jpg") and "mask" not in p.name
    )
    assert paths
    for path in paths:
        x = read_xray(path)
        assert_convention(x)
        with Image.open(path) as img:
            assert x.image.shape == (img.height, img.width)
            ref = np.asarray(img.convert("L"))[::7, ::7]  # all these are grey (RGB ones exactly so)
        # Sub-sampled: the full-size comparison of 55 multi-megapixel images costs seconds.
        np.testing.assert_array_equal(np.rint(x.image[::7, ::7] * 255), ref, err_msg=str(path))
        assert x.image[::7, ::7].std() > 0.05, f"{path} decoded nearly flat"


@pytest.mark.realdata
def test_real_masks_match_their_images(shared_data: Path) -> None:
    pairs = [
        (p, shared_data / "shenzhen_mini/train_images" / p.name.replace("_mask", ""))
        for p in sorted((shared_data / "shenzhen_mini/train_masks").glob("*_mask.png"))
    ] + [(shared_data / f"imlab_lung/{i}-mask.png", shared_data / f"imlab_lung/{i}.jpg") for i in range(1, 5)]
    for mask_path, image_path in pairs:
        mask = read_mask(mask_path)
        assert mask.shape == read_xray(image_path).image.shape
        assert 0.1 < mask.mean() < 0.6, mask_path
