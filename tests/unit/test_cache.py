"""`sscxr prepare` and `ImageCache`: values, failures, resume after interrupt, refusal, masks, stats."""

from __future__ import annotations

import csv
import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from crafted import crafted_dicom
from sscxr.data.cache import (
    ImageCache,
    PrepareInterrupted,
    fit_geometry,
    prepare,
    resize_mask,
    resize_to_cache,
)
from sscxr.data.io import read_mask, read_xray
from sscxr.data.manifest import manifest_hash
from sscxr.errors import DataError

SIZE = 32
CACHE_FILES = ("images.npy", "masks.npy", "hashes.npy", "index.json", "failures.csv")


def _smooth(h: int, w: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    img = 0.5 + 0.3 * np.sin(6 * xx + seed) * np.cos(4 * yy) + 0.05 * rng.standard_normal((h, w))
    return np.clip(img, 0, 1)


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    pytest.importorskip("pydicom")
    crafted_dicom(path, pixels)


def _folder(tmp: Path, with_masks: bool = True, corrupt: bool = True) -> Path:
    """Images of several kinds and sizes (+ masks on two rows, + one corrupt file) and their manifest."""
    img_dir = tmp / "imgs"
    img_dir.mkdir(parents=True)
    rows = []
    for i, (h, w) in enumerate([(40, 50), (64, 64), (37, 81), (100, 70)]):
        arr = _smooth(h, w, i)
        if i % 2:
            Image.fromarray((arr * 255).round().astype(np.uint8)).save(img_dir / f"a{i}.png")
        else:
            Image.fromarray((arr * 65535).round().astype(np.uint16)).save(img_dir / f"a{i}.png")
        mask = ""
        if with_masks and i < 2:
            m = np.zeros((h, w), np.uint8)
            m[h // 4 : 3 * h // 4, w // 5 : w // 2] = 255
            Image.fromarray(m).save(img_dir / f"m{i}.png")
            mask = f"imgs/m{i}.png"
        rows.append([f"imgs/a{i}.png", "healthy" if i % 2 else "covid-19", f"p{i // 2}", "s1", "train", mask])
    _write_dicom(img_dir / "d.dcm", (_smooth(60, 48, 9) * 4095).round())
    rows.append(["imgs/d.dcm", "pneumonia", "p9", "s2", "test", ""])
    if corrupt:
        (img_dir / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
        rows.append(["imgs/bad.png", "healthy", "p8", "s2", "test", ""])
    path = tmp / "manifest.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split", "mask_path"])
        w.writerows(rows)
    return path


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    tmp = tmp_path_factory.mktemp("cache")
    manifest = _folder(tmp)
    prepare(manifest, tmp / "ref", size=SIZE, workers=0, progress=False)
    return manifest, tmp / "ref"


def test_values_match_direct_read_and_resize(built: tuple[Path, Path]) -> None:
    _, out = built
    cache = ImageCache.open(out)
    assert len(cache) == 6 and cache.images.shape == (6, SIZE, SIZE) and cache.images.dtype == np.uint16
    assert cache.ok.tolist() == [True] * 5 + [False]
    for i in range(5):
        src = read_xray(cache.manifest.resolve(cache.rows[i]))
        expected = resize_to_cache(src.image, SIZE, "stretch")
        np.testing.assert_allclose(cache.image_float(i), expected, atol=0.5 / 65535 + 1e-7)
        assert cache.original_shape(i) == src.image.shape
    assert cache.pixel_spacing(4) == pytest.approx((0.15, 0.2))
    assert cache.pixel_spacing(0) is None


def test_resize_is_antialiased_and_pad_letterboxes() -> None:
    checker = (np.indices((64, 64)).sum(0) % 2).astype(np.float32)
    # A 1-pixel checkerboard has no content at 16 px: antialiasing gives flat grey, not stripes.
    np.testing.assert_allclose(resize_to_cache(checker, 16), 0.5, atol=0.02)
    # Same filter as PIL's (independent implementation) antialiased bilinear resize.
    img = _smooth(90, 70, 3).astype(np.float32)
    pil = np.asarray(Image.fromarray(img, mode="F").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    np.testing.assert_allclose(resize_to_cache(img, SIZE), pil, atol=1e-5)
    assert fit_geometry((50, 100), 32, "pad") == (16, 32, 8, 0)
    out = resize_to_cache(np.ones((50, 100), np.float32), 32, "pad")
    assert out[:8].max() == 0 and out[24:].max() == 0 and out[8:24].min() == pytest.approx(1.0)


def test_corrupt_file_reported_and_others_processed(built: tuple[Path, Path]) -> None:
    _, out = built
    with open(out / "failures.csv") as f:
        failures = list(csv.DictReader(f))
    assert len(failures) == 1 and failures[0]["path"].endswith("bad.png") and failures[0]["reason"]
    index = json.loads((out / "index.json").read_text())
    assert index["n_ok"] == 5 and index["n_failed"] == 1
    assert ImageCache.open(out).image(5).max() == 0


def test_masks_stay_binary_and_match_their_resize(built: tuple[Path, Path]) -> None:
    _, out = built
    cache = ImageCache.open(out)
    assert cache.has_masks and cache.mask_available.tolist() == [True, True, False, False, False, False]
    raw = np.load(out / "masks.npy")
    assert set(np.unique(raw).tolist()) <= {0, 1}
    m0 = read_mask(cache.manifest.resolve_mask(cache.rows[0]))
    np.testing.assert_array_equal(cache.mask(0), resize_mask(m0, SIZE).astype(bool))
    assert 0 < cache.mask(0).mean() < 1
    with pytest.raises(DataError, match="no mask"):
        cache.mask(2)


def test_stats_over_ok_training_images(built: tuple[Path, Path]) -> None:
    cache = ImageCache.open(built[1])
    train = [i for i in np.flatnonzero(cache.ok) if cache.rows[i].split == "train"]  # not the test DICOM
    pixels = np.stack([cache.image_float(i) for i in train]).astype(np.float64)
    mean, std = cache.stats
    assert mean == pytest.approx(pixels.mean(), abs=1e-9) and std == pytest.approx(pixels.std(), abs=1e-7)


def test_indices_filters(built: tuple[Path, Path]) -> None:
    cache = ImageCache.open(built[1])
    assert cache.indices().tolist() == [0, 1, 2, 3, 4]
    assert cache.indices(split="test").tolist() == [4]
    assert cache.indices(split="test", only_ok=False).tolist() == [4, 5]
    assert cache.indices(labels=["healthy"], sites=["s1"]).tolist() == [1, 3]


def _stop_after(k: int) -> Callable[[int], None]:
    def hook(n: int) -> None:
        if n >= k:
            raise KeyboardInterrupt

    return hook


def test_interrupt_then_resume_gives_identical_bytes(built: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, ref = built
    out = tmp_path / "c"
    with pytest.raises(PrepareInterrupted, match="Resume with: sscxr prepare"):
        prepare(manifest, out, size=SIZE, workers=0, progress=False, chunk=2, _after_row=_stop_after(3))
    with pytest.raises(DataError, match="unfinished, 3 of 6 rows remain"):
        ImageCache.open(out)
    # A run killed mid-write leaves a torn last line: it must be ignored, not break the resume.
    with open(out / "progress.jsonl", "ab") as f:
        f.write(b'{"i": 4, "status": "o')
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    assert (report.n_done, report.n_skipped_already_done, report.n_failed) == (3, 3, 1)
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_rerun_skips_done_work_and_workers_agree(built: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, ref = built
    out = tmp_path / "c"
    first = prepare(manifest, out, size=SIZE, workers=2, chunk=1, progress=False)
    assert first.n_done == 6 and first.n_skipped_already_done == 0 and len(first.failures) == 1
    for name in CACHE_FILES:  # parallel, unordered decoding writes the same bytes
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    again = prepare(manifest, out, size=SIZE, workers=2, progress=False)
    assert again.n_done == 0 and again.n_skipped_already_done == 6


def test_other_manifest_or_size_refused(built: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, _ = built
    out = tmp_path / "c"
    prepare(manifest, out, size=SIZE, workers=0, progress=False, _after_row=None)
    other = _folder(tmp_path / "other", with_masks=False, corrupt=False)
    with pytest.raises(DataError, match="another output folder"):
        prepare(other, out, size=SIZE, workers=0, progress=False)
    with pytest.raises(DataError, match="overwrite"):
        prepare(manifest, out, size=SIZE * 2, workers=0, progress=False)
    prepare(other, out, size=SIZE, workers=0, progress=False, overwrite=True)
    cache = ImageCache.open(out)
    assert len(cache) == 5 and not cache.has_masks and not (out / "masks.npy").exists()
    assert cache.manifest_hash == manifest_hash(other)


def test_pickled_cache_reopens_lazily(built: tuple[Path, Path]) -> None:
    import pickle

    cache = ImageCache.open(built[1])
    _ = cache.images
    clone = pickle.loads(pickle.dumps(cache))
    assert len(pickle.dumps(cache)) < 50_000  # the pixels are not shipped to workers
    np.testing.assert_array_equal(clone.image(3), cache.image(3))


# ------------------------------------------------------------------------------------- cache integrity
def _copy_cache(src: Path, dst: Path) -> Path:
    import shutil

    shutil.copytree(src, dst)
    return dst


def _data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        np.lib.format.read_magic(f)
        np.lib.format.read_array_header_1_0(f)
        return f.tell()


def test_truncated_images_refused_on_open_and_repaired_by_prepare(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, ref = built
    out = _copy_cache(ref, tmp_path / "c")
    path = out / "images.npy"
    row_bytes = SIZE * SIZE * 2
    os_size = _data_offset(path) + 2 * row_bytes + 10  # rows 0-1 intact, row 2 cut mid-way
    with open(path, "r+b") as f:
        f.truncate(os_size)
    with pytest.raises(DataError, match=r"images\.npy is .* bytes, expected .*repair it with: sscxr prepare"):
        ImageCache.open(out)
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    # rows 2.. were zero-filled by the repair and failed their checksums; 0-1 were kept
    assert report.n_rebuilt == 3 and report.n_done == 3 and report.n_skipped_already_done == 3
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_zeroed_or_flipped_rows_are_found_and_rebuilt(built: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, ref = built
    out = _copy_cache(ref, tmp_path / "c")
    images = np.load(out / "images.npy", mmap_mode="r+")
    images[3] = 0  # a row zeroed (what a sparse file or a bad copy leaves)
    images[1, 5, 7] ^= 1  # one bit flipped
    images.flush()
    masks = np.load(out / "masks.npy", mmap_mode="r+")
    masks[0, 10, 10] ^= 1
    masks.flush()
    del images, masks
    cache = ImageCache.__new__(ImageCache)  # bypass open()'s sample check to reach verify()
    ImageCache.__init__(
        cache, out, json.loads((out / "index.json").read_text()), ImageCache.open(ref).manifest
    )
    assert cache.verify() == [0, 1, 3]
    with pytest.raises(DataError, match="no longer hold the pixels"):
        ImageCache.open(out)  # the sample of 16 rows covers all 6
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    assert report.n_rebuilt == 3 and report.n_done == 3
    assert ImageCache.open(out).verify() == []
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_missing_masks_or_garbage_index_are_rebuilt(built: tuple[Path, Path], tmp_path: Path) -> None:
    manifest, ref = built
    out = _copy_cache(ref, tmp_path / "c")
    (out / "masks.npy").unlink()
    with pytest.raises(DataError, match=r"masks\.npy is missing; repair it with"):
        ImageCache.open(out)
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    assert report.n_done == 6  # a file made anew: every row decoded again
    (out / "index.json").write_text("{ this is not json")
    with pytest.raises(DataError, match=r"index\.json is damaged .*repair it with"):
        ImageCache.open(out)
    prepare(manifest, out, size=SIZE, workers=0, progress=False)
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name


def test_size_bounds_and_disk_room_checked_before_any_allocation(
    built: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil
    from collections import namedtuple

    manifest, _ = built
    for size in (0, 7, 100_000):
        with pytest.raises(DataError, match="between 8 and 4096"):
            prepare(manifest, tmp_path / f"s{size}", size=size, workers=0, progress=False)
        assert not (tmp_path / f"s{size}").exists()
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda _: usage(10**6, 10**6 - 1000, 1000))
    with pytest.raises(DataError, match=r"needs .* GiB, the disk has .* free"):
        prepare(manifest, tmp_path / "full", size=SIZE, workers=0, progress=False)
    assert not (tmp_path / "full" / "images.npy").exists()


def test_stats_come_from_training_splits_only(tmp_path: Path) -> None:
    """A white test image must not move the normalisation every model trains with."""
    rows = []
    for i, value in enumerate([0.2, 0.4, 1.0]):
        Image.fromarray(np.full((20, 20), round(value * 255), np.uint8)).save(tmp_path / f"x{i}.png")
        rows.append([f"x{i}.png", "healthy", f"p{i}", "s", ["train", "val", "test_site"][i], ""])
    path = tmp_path / "m.csv"
    with open(path, "w", newline="") as f:
        csv.writer(f).writerows([["path", "label", "patient_id", "site", "split", "mask_path"], *rows])
    prepare(path, tmp_path / "c", size=16, workers=0, progress=False)
    cache = ImageCache.open(tmp_path / "c")
    mean, std = cache.stats
    assert mean == pytest.approx(0.3, abs=1e-3) and std == pytest.approx(0.1, abs=1e-3)
    assert cache.index["stats"]["splits"] == ["train", "val"] and cache.index["stats"]["n_images"] == 2


def test_tiny_images_are_named_in_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    Image.fromarray(np.zeros((1, 1), np.uint8)).save(tmp_path / "icon.png")
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "ok.png")
    (tmp_path / "m.csv").write_text(
        "path,label,patient_id,site,split,mask_path\nicon.png,,a,,,\nok.png,,b,,,\n"
    )
    with caplog.at_level("WARNING"):
        prepare(tmp_path / "m.csv", tmp_path / "c", size=16, workers=0, progress=False)
    assert "1 image(s) smaller than 32 px" in caplog.text and "icon.png, 1x1" in caplog.text


# ---------------------------------------------------------------------------------- perceptual hashes
def test_hashes_are_written_with_each_row(built: tuple[Path, Path]) -> None:
    from sscxr.data.near_duplicates import HASH_WORDS, hash_row

    cache = ImageCache.open(built[1])
    assert cache.has_hashes and cache.hashes.shape == (6, HASH_WORDS)
    assert cache.hashed.tolist() == [True] * 5 + [False]  # the corrupt file has none
    for i in range(5):  # the hashes of the row as cached (the resumed and repaired runs above agree)
        np.testing.assert_array_equal(
            cache.hashes[i], hash_row(cache.images[i], cache.original_shape(i), "stretch")
        )
    assert not cache.hashes[5].any() and "hash_crc" not in cache.index["rows"][5]


def test_damaged_hashes_are_refused_then_recomputed_without_decoding(
    built: tuple[Path, Path], tmp_path: Path
) -> None:
    manifest, ref = built
    out = _copy_cache(ref, tmp_path / "c")
    hashes = np.load(out / "hashes.npy", mmap_mode="r+")
    hashes[2, 7] ^= np.uint64(1)
    hashes.flush()
    del hashes
    with pytest.raises(
        DataError, match=r"no longer hold the pixels or hashes .*repair it with: sscxr prepare"
    ):
        ImageCache.open(out)
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    assert (report.n_done, report.n_rebuilt, report.n_hashed) == (0, 0, 1)  # rehashed, not decoded
    with open(out / "hashes.npy", "r+b") as f:  # a truncated file: refused, then made anew
        f.truncate(200)
    with pytest.raises(DataError, match=r"hashes\.npy is .* bytes, expected .*repair it with"):
        ImageCache.open(out)
    report = prepare(manifest, out, size=SIZE, workers=0, progress=False)
    assert (report.n_done, report.n_hashed) == (0, 5)
    for name in CACHE_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
