"""Property-based tests (hypothesis) of the image reader and the manifest parser.

Each property runs a bounded number of small examples (see ``FAST``), so the module stays a few seconds
in CI. What they pin down:

- the reader, on arbitrary small arrays written as 8/16-bit PNG, 32-bit int / float TIFF and DICOM
  (random bit depths, signedness, Rescale Slope/Intercept, MONOCHROME1/2, Presentation LUT Shape,
  excess frames, any window, palettes), returns float32 ``(H, W)``, finite, in [0, 1] with the expected
  values -- or raises ``XRayReadError`` when there is no measurement at all (an all-NaN / infinite
  float TIFF), never NaN and never a silent black image;
- damaged files (valid DICOM / PNG / TIFF with bytes overwritten or cut off) are an ``XRayReadError``
  naming the file or a valid image, never another exception;
- the pixel bound is checked from the header (PNG size, DICOM Rows x Columns): refused exactly when
  the image has more pixels than the bound, with a message naming the file, its size and the limit;
- the manifest parser, on arbitrary CSV text and arbitrary cell strings, returns a manifest whose rows
  round-trip through ``write_manifest`` / ``read_manifest`` unchanged, or raises ``DataError`` (the
  project's one-line error type), never another exception.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from crafted import crafted_png
from sscxr.data.io import MAX_PIXELS, XRay, XRayReadError, read_mask, read_xray
from sscxr.data.manifest import CORE_COLUMNS, Manifest, read_manifest, write_manifest
from sscxr.errors import ConfigError, DataError

# Bounded for CI: ~50 small examples per property, a generous per-example deadline for a shared
# CPU, no example database written into the working tree.
FAST = settings(
    max_examples=50,
    deadline=2000,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)

shapes = st.tuples(st.integers(1, 12), st.integers(1, 12))


@pytest.fixture(autouse=True)
def _quiet_logs() -> Iterator[None]:
    # The reader and the parser warn about constant images, missing patient ids, ...: thousands of
    # lines across the examples, and formatting them is most of the run time.
    logging.disable(logging.CRITICAL)
    yield
    logging.disable(logging.NOTSET)


@contextmanager
def scratch() -> Iterator[Path]:
    """A fresh folder per example (pytest's tmp_path is per test, not per hypothesis example)."""
    with tempfile.TemporaryDirectory(prefix="sscxr-prop-") as d:
        yield Path(d)


def assert_convention(x: XRay, shape: tuple[int, int]) -> None:
    assert isinstance(x, XRay)
    assert x.image.dtype == np.float32 and x.image.shape == shape == x.meta.shape
    assert np.isfinite(x.image).all(), "NaN or inf in a decoded image"
    assert x.image.min() >= 0.0 and x.image.max() <= 1.0


# ------------------------------------------------------------------------------------------- rasters
@FAST
@given(arrays(np.uint8, shapes))
def test_png_8bit_is_value_over_255(arr: np.ndarray) -> None:
    with scratch() as d:
        Image.fromarray(arr).save(d / "a.png")
        x = read_xray(d / "a.png")
    assert_convention(x, arr.shape)
    np.testing.assert_allclose(x.image, arr / 255.0, atol=1e-6)


@FAST
@given(arrays(np.uint16, shapes))
def test_png_16bit_is_scaled_by_the_bits_it_uses(arr: np.ndarray) -> None:
    with scratch() as d:
        Image.fromarray(arr).save(d / "a.png")
        x = read_xray(d / "a.png")
    assert_convention(x, arr.shape)
    bits = next((b for b in (8, 10, 12, 14, 16) if int(arr.max()) < 1 << b), 16)
    assert x.meta.bits_stored == bits
    np.testing.assert_allclose(x.image, arr / ((1 << bits) - 1), atol=1e-6)


@FAST
@given(arrays(np.int32, shapes))
def test_int32_tiff_is_finite_in_unit_range(arr: np.ndarray) -> None:
    with scratch() as d:
        Image.fromarray(arr, mode="I").save(d / "a.tif")
        x = read_xray(d / "a.tif")
    assert_convention(x, arr.shape)
    if arr.max() > arr.min():  # a measurement with contrast never comes out flat
        assert x.image.max() > x.image.min()


@FAST
@given(arrays(np.float32, shapes, elements=st.floats(width=32, allow_nan=True, allow_infinity=True)))
@example(np.full((3, 4), np.nan, np.float32))
@example(np.array([[np.inf, -np.inf], [np.nan, np.inf]], np.float32))
@example(np.array([[-1e-45, 0.0]], np.float32))  # a span too small for 1 / span in float32
@example(np.array([[-3.4e38, 3.4e38, 0.0]], np.float32))  # a span that overflows float32
def test_float_tiff_never_gives_nan_or_a_silent_black_image(arr: np.ndarray) -> None:
    with scratch() as d:
        Image.fromarray(arr, mode="F").save(d / "a.tif")
        finite = arr[np.isfinite(arr)]
        if finite.size == 0:  # no measurement at all: an error, not a valid-looking black image
            with pytest.raises(XRayReadError, match=r"a\.tif.*NaN or infinite"):
                read_xray(d / "a.tif")
            return
        x = read_xray(d / "a.tif")
    assert_convention(x, arr.shape)
    if finite.size == arr.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        np.testing.assert_array_equal(x.image, arr)  # already in [0, 1]: kept as is
    elif finite.max() > finite.min():  # stretched by its finite [min, max]
        assert x.image.min() == 0.0 and x.image.max() == 1.0
    else:
        assert not x.image.any()  # constant: zeros (logged)


# --------------------------------------------------------------------------------------------- DICOM
def write_dicom(
    path: Path, stored: np.ndarray, bits_stored: int, signed: bool, excess: int = 0, **tags: object
) -> Path:
    """Write ``stored`` ((H, W) of (u)int8/16/32) as an explicit-VR little-endian CR DICOM.

    ``excess``: frames of noise appended to the pixel data without a Number of Frames (pydicom returns
    them too, with a warning; the reader must still take the first frame).
    """
    ds = Dataset()
    ds.SOPClassUID = uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.2"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.BitsAllocated = stored.dtype.itemsize * 8
    ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits_stored, bits_stored - 1, int(signed)
    frames = np.concatenate([stored[None], np.zeros((excess, *stored.shape), stored.dtype) + 1])
    ds.PixelData = frames.astype(stored.dtype.newbyteorder("<")).tobytes()
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    FileDataset(str(path), ds, file_meta=meta, preamble=b"\0" * 128).save_as(path, enforce_file_format=True)
    return path


@st.composite
def dicom_cases(draw: st.DrawFn) -> dict[str, object]:
    allocated = draw(st.sampled_from([8, 16, 32]))
    bits = draw(st.integers(1, allocated))
    signed = draw(st.booleans())
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    dtype = np.dtype(f"{'i' if signed else 'u'}{allocated // 8}")
    stored = draw(arrays(dtype, shapes, elements=st.integers(lo, hi)))
    rescale = draw(st.booleans())
    slope = draw(st.sampled_from([1.0, -1.0]) | st.floats(1e-3, 1e3).map(lambda v: float(f"{v:.6g}")))
    slope *= draw(st.sampled_from([1.0, -1.0]))
    intercept = float(f"{draw(st.floats(-1e4, 1e4)):.6g}")
    lut_shape = draw(st.sampled_from([None, "IDENTITY", "INVERSE"]))
    excess = draw(st.sampled_from([0, 0, 0, 1, 2]))
    return {"stored": stored, "bits": bits, "signed": signed, "rescale": rescale, "slope": slope,
            "intercept": intercept, "lut_shape": lut_shape, "excess": excess}  # fmt: skip


def _reference(case: dict[str, object]) -> tuple[np.ndarray, float]:
    """float64 min-max of the modality values, and the tolerance float32 arithmetic allows."""
    stored = np.asarray(case["stored"], np.float64)
    slope, intercept = (case["slope"], case["intercept"]) if case["rescale"] else (1.0, 0.0)
    values = stored * float(slope) + float(intercept)  # type: ignore[arg-type]
    span = values.max() - values.min()
    if span == 0:
        return np.zeros_like(values), 1e-6
    # float32 keeps ~7 digits of the largest magnitude; relative to the span that is the error bound
    tol = 1e-5 + 8 * float(np.finfo(np.float32).eps) * float(np.abs(values).max()) / span
    return (values - values.min()) / span, tol


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data is sufficient")  # excess frames
@FAST
@given(dicom_cases())
def test_dicom_is_finite_in_unit_range_and_monochrome1_is_inverted(case: dict[str, object]) -> None:
    stored = np.asarray(case["stored"])
    tags: dict[str, object] = {}
    if case["rescale"]:
        tags = {"RescaleSlope": f"{case['slope']:.6g}", "RescaleIntercept": f"{case['intercept']:.6g}"}
    if case["lut_shape"]:
        tags["PresentationLUTShape"] = case["lut_shape"]
    inverse = case["lut_shape"] == "INVERSE"
    with scratch() as d:
        args = (stored, int(case["bits"]), bool(case["signed"]), int(case["excess"]))  # type: ignore[call-overload]
        mono2 = read_xray(write_dicom(d / "m2.dcm", *args, PhotometricInterpretation="MONOCHROME2", **tags))
        mono1 = read_xray(write_dicom(d / "m1.dcm", *args, PhotometricInterpretation="MONOCHROME1", **tags))
    for x in (mono1, mono2):
        assert_convention(x, stored.shape)
    assert mono1.meta.inverted and mono2.meta.inverted == inverse
    expected, tol = _reference(case)
    if expected.any():
        # INVERSE inverts MONOCHROME2; with MONOCHROME1 both say the same thing: inverted once, not twice
        np.testing.assert_allclose(mono2.image, 1.0 - expected if inverse else expected, atol=tol)
        np.testing.assert_allclose(mono1.image, 1.0 - expected, atol=tol)
    else:  # constant image: a constant (zeros, inverted or not)
        assert np.ptp(mono2.image) == 0 and np.ptp(mono1.image) == 0


@FAST
@given(st.data(), st.integers(1, 16), shapes)
def test_palette_dicom_is_read_through_its_palette(
    data: st.DataObject, n: int, shape: tuple[int, int]
) -> None:
    # Grey palettes (R = G = B): the image is the palette's value at each index, not the index.
    lut = data.draw(arrays(np.uint16, n))
    index = data.draw(arrays(np.uint16, shape, elements=st.integers(0, n - 1)))
    tags: dict[str, object] = {"PhotometricInterpretation": "PALETTE COLOR"}
    for colour in ("Red", "Green", "Blue"):
        tags[f"{colour}PaletteColorLookupTableDescriptor"] = [n, 0, 16]
        tags[f"{colour}PaletteColorLookupTableData"] = lut.astype("<u2").tobytes()
    with scratch() as d:
        x = read_xray(write_dicom(d / "p.dcm", index, 16, False, **tags))
    assert_convention(x, shape)
    np.testing.assert_allclose(x.image, lut[index] / 65535.0, atol=1e-4)


ds_numbers = st.floats(allow_nan=False, allow_infinity=False).map(lambda v: f"{v:.6g}")


@FAST
@given(
    arrays(np.uint16, shapes, elements=st.integers(0, 4095)),
    st.sampled_from(["LINEAR", "LINEAR_EXACT", "SIGMOID", "BOGUS"]),
    ds_numbers | st.sampled_from(["2048", "1e39", "-1e39", "1e308"]),
    ds_numbers | st.sampled_from(["1", "0", "-5", "1e-40", "4.9e-324", "1e39", "1e308"]),
)
def test_any_window_gives_finite_unit_range(
    stored: np.ndarray, function: str, center: str, width: str
) -> None:
    with scratch() as d:
        path = write_dicom(
            d / "w.dcm", stored, 12, False, WindowCenter=center, WindowWidth=width, VOILUTFunction=function
        )
        x = read_xray(path)
    assert_convention(x, stored.shape)


# A valid file with some bytes overwritten or cut off: a read error or a valid image, nothing else.
mutations = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), min_size=1, max_size=6)


def _mutated(data: bytes, changes: list[tuple[int, int]], cut: int | None) -> bytes:
    buf = bytearray(data)
    for pos, value in changes:
        buf[pos % len(buf)] = value
    return bytes(buf[: cut % len(buf)] if cut is not None else buf)


def _read_damaged(path: Path) -> None:
    try:
        x = read_xray(path)
    except XRayReadError as e:
        assert path.name in str(e)
        return
    assert x.image.dtype == np.float32 and x.image.ndim == 2
    assert np.isfinite(x.image).all() and x.image.min() >= 0.0 and x.image.max() <= 1.0


def _reference_bytes(kind: str) -> bytes:
    rng = np.random.default_rng(0)
    with scratch() as d:
        if kind == "dcm":
            write_dicom(d / "a.dcm", rng.integers(0, 4096, (6, 7), dtype=np.uint16), 12, False,
                        RescaleSlope="2", RescaleIntercept="-10", WindowCenter="2000", WindowWidth="3000",
                        PhotometricInterpretation="MONOCHROME1")  # fmt: skip
        else:
            Image.fromarray(rng.integers(0, 65535, (6, 7), dtype=np.uint16)).save(d / f"a.{kind}")
        return (d / f"a.{kind}").read_bytes()


REFERENCE = {kind: _reference_bytes(kind) for kind in ("dcm", "png", "tif")}


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on corrupt TIFF tags
@FAST
@given(st.sampled_from(sorted(REFERENCE)), mutations, st.none() | st.integers(0, 10**6))
def test_damaged_files_are_read_errors_or_valid_images(kind: str, changes: list, cut: int | None) -> None:
    with scratch() as d:
        path = d / f"damaged.{kind}"
        path.write_bytes(_mutated(REFERENCE[kind], changes, cut))
        if path.stat().st_size:
            _read_damaged(path)


# ---------------------------------------------------------------------------------------- pixel bound
def _assert_bound(read: Callable[[], object], path: Path, pixels: int, limit: int) -> None:
    """``read`` refuses the file as too large exactly when ``pixels`` exceeds ``limit``."""
    try:
        read()
    except XRayReadError as e:
        too_large = "pixels sscxr decodes per image" in str(e)
        assert too_large == (pixels > limit), str(e)
        if too_large:
            assert path.name in str(e) and f"{limit:,}" in str(e) and "SSCXR_MAX_PIXELS" in str(e)
        return
    assert pixels <= limit


@FAST
@given(st.integers(1, 300), st.integers(1, 300), st.integers(1, 90_000))
def test_pixel_bound_is_checked_from_the_png_header(width: int, height: int, limit: int) -> None:
    with scratch() as d:
        path = crafted_png(d / "big.png", width, height)
        _assert_bound(lambda: read_xray(path, max_pixels=limit), path, width * height, limit)
        _assert_bound(lambda: read_mask(path, max_pixels=limit), path, width * height, limit)


@pytest.mark.filterwarnings("ignore:The number of bytes of pixel data is sufficient")
@FAST
@given(st.integers(1, 65535), st.integers(1, 65535), st.integers(1, 10**9))
def test_pixel_bound_is_checked_from_dicom_rows_and_columns(rows: int, columns: int, limit: int) -> None:
    # Pixel data for 2 x 2 only: when the bound lets the header through, decoding fails on the length.
    with scratch() as d:
        path = write_dicom(d / "big.dcm", np.zeros((2, 2), np.uint16), 12, False)
        ds = pydicom.dcmread(path)
        ds.Rows, ds.Columns = rows, columns
        ds.save_as(path)
        _assert_bound(lambda: read_xray(path, max_pixels=limit), path, rows * columns, limit)


# ------------------------------------------------------------------------------------------ manifests
def _fields(m: Manifest) -> list[tuple[object, ...]]:
    """Everything a row means: resolved paths, canonical fields, extra cells."""
    return [
        (m.resolve(r), m.resolve_mask(r), r.label, r.patient_id, r.site, r.split, r.extra) for r in m.rows
    ]


def _check_round_trip(manifest: Manifest, folder: Path) -> None:
    out = write_manifest(manifest, folder / "written.csv")
    back = read_manifest(out)
    assert _fields(back) == _fields(manifest)
    again = write_manifest(back, folder / "again.csv")
    assert again.read_bytes() == out.read_bytes()  # writing is a fixed point after one read


def _read_or_data_error(text: str | bytes, folder: Path) -> Manifest | None:
    path = folder / "m.csv"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    try:
        return read_manifest(path)
    except DataError as e:
        assert str(e).strip() and str(path) in str(e)  # one message, naming the file
        return None


# Cells: anything, with the characters that matter to CSV (quotes, separators, line ends) made common.
cells = st.text(
    st.sampled_from([*'a,"\r\n ./\t', "\x00", "é", "\ufeff", "\u2028"]) | st.characters(codec="utf-8"),
    max_size=8,
)


@FAST
@given(st.text(max_size=200) | st.binary(max_size=200))
@example("path\n" + "x" * 200_000)  # a cell over csv's field size limit (an unclosed quote, in practice)
@example('path,label\n"unclosed,normal\nb.png,normal\n')
@example("path\n\x00\n")
def test_any_text_is_a_manifest_or_a_data_error(text: str | bytes) -> None:
    with scratch() as d:
        manifest = _read_or_data_error(text, d)
        if manifest is not None:
            _check_round_trip(manifest, d)


@FAST
@given(
    st.lists(cells, max_size=4),
    st.lists(st.lists(cells, min_size=1, max_size=9), max_size=5),
    st.sampled_from([csv.QUOTE_MINIMAL, csv.QUOTE_ALL]),
)
@example(["note"], [["a.png", "", "", "", "", "", "x\ry"]], csv.QUOTE_ALL)  # a lone \r inside a cell
def test_any_cells_round_trip_or_are_a_data_error(
    extra_header: list[str], records: list[list[str]], quoting: int
) -> None:
    header = [*CORE_COLUMNS, *extra_header]
    buf = io.StringIO(newline="")
    csv.writer(buf, lineterminator="\n", quoting=quoting).writerows([header, *records])
    with scratch() as d:
        manifest = _read_or_data_error(buf.getvalue(), d)
        if manifest is None:
            return
        # csv's own writer leaves a lone \r unquoted under QUOTE_MINIMAL, which splits the row on reading
        clean = quoting == csv.QUOTE_ALL or not any("\r" in c for r in [header, *records] for c in r)
        if clean:  # what was written is what is read: the (last) path column's cell, stripped
            where = max(i for i, h in enumerate(header) if h.strip() == "path")
            assert [r.path for r in manifest.rows] == [r[where].strip() for r in records]
        _check_round_trip(manifest, d)


@settings(FAST, max_examples=25)
@given(
    st.lists(st.sampled_from(["a.png", "./a.png", "b/../a.png", "b.png", "b/c.png", "b//c.png"]), max_size=5)
)
def test_duplicate_paths_in_any_spelling_are_refused(paths: list[str]) -> None:
    assume(paths)
    text = "path\n" + "\n".join(paths) + "\n"
    with scratch() as d:
        manifest = _read_or_data_error(text, d)
        distinct = {os.path.normpath(d / p) for p in paths}
        assert (manifest is not None) == (len(distinct) == len(paths))


def test_default_bound_refuses_a_9000_square_png_before_decoding(tmp_path: Path) -> None:
    path = crafted_png(tmp_path / "huge.png", 9000, 9000)  # 81 MP claimed, ~100 bytes on disk
    assert path.stat().st_size < 1000 and MAX_PIXELS < 9000 * 9000
    with pytest.raises(
        XRayReadError, match=r"huge\.png: image is 9000 x 9000 = 81,000,000 pixels.*50,000,000"
    ):
        read_xray(path)


def test_pillow_decompression_bomb_error_is_the_same_one_line_error(tmp_path: Path) -> None:
    # 400 MP: Pillow's own DecompressionBombError (over 2 x MAX_IMAGE_PIXELS) fires inside Image.open
    path = crafted_png(tmp_path / "bomb.png", 20000, 20000)
    for read in (read_xray, read_mask):
        with pytest.raises(
            XRayReadError, match=r"bomb\.png: image is 400,000,000 pixels.*SSCXR_MAX_PIXELS"
        ) as e:
            read(path)
        assert "\n" not in str(e.value)
    # 100 MP with the bound raised: Pillow's DecompressionBombWarning must not stop (or escape) the read
    path = crafted_png(tmp_path / "warn.png", 10000, 10000)
    with _no_bomb_warning(), pytest.raises(XRayReadError, match="truncated or corrupt"):
        read_xray(path, max_pixels=200_000_000)  # 8 x 8 data for 10000 x 10000: the decoder fails


@contextmanager
def _no_bomb_warning() -> Iterator[None]:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def test_bound_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(tmp_path / "a.png")
    monkeypatch.setenv("SSCXR_MAX_PIXELS", "119")
    with pytest.raises(XRayReadError, match=r"10 = 120 pixels, more than the 119"):
        read_xray(tmp_path / "a.png")
    assert read_xray(tmp_path / "a.png", max_pixels=120).image.shape == (10, 12)  # the argument wins
    monkeypatch.setenv("SSCXR_MAX_PIXELS", "120")
    assert read_xray(tmp_path / "a.png").image.shape == (10, 12)
    monkeypatch.setenv("SSCXR_MAX_PIXELS", "lots")
    with pytest.raises(ConfigError, match="SSCXR_MAX_PIXELS='lots'"):
        read_xray(tmp_path / "a.png")
