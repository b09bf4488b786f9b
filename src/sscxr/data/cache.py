"""The image cache that `sscxr prepare` builds, and `ImageCache`, its reader.

Layout of a cache folder (see docs/design.md, "Cache layout"):

    index.json       format_version, manifest path + hash, size, fit, counts, stats, per-row facts
    images.npy       (N, S, S) uint16 (np.lib.format memmap); value / 65535 = [0, 1] intensity
    masks.npy        (N, S, S) uint8 0/1, only when some manifest row has a mask
    hashes.npy       (N, 240) uint64 perceptual hashes of the rows (`near_duplicates`); caches prepared
                     before them have none, and `prepare` on such a cache adds them without decoding
    progress.jsonl   a header line, then one line per finished row, written after its pixels were flushed
    failures.csv     path,reason of every row that could not be decoded
    manifest.csv     byte copy of the manifest the cache was built from

Crash safety: a row's progress line is appended only after the memmap holding its pixels was flushed,
so whatever stops the run (Ctrl-C, kill, power cut), every logged row is complete; unlogged rows are
redone by the next `prepare`. `index.json` appears (atomically) only when every row is logged, and
`ImageCache.open` refuses a folder without it.

Integrity: every row's record (progress.jsonl and index.json) holds the CRC-32 of its pixels, mask
and hashes. `prepare` on an existing folder checks every finished row and decodes again the ones that
no longer match (a truncated array file is first brought back to its length; damaged hashes are
recomputed from the pixels); `ImageCache.open` checks the files' lengths and a sample of rows, so a
damaged cache is refused with the command that repairs it instead of being read as black images;
`ImageCache.verify` (`sscxr prepare --verify`) checks all.

The writer (`prepare`, `PrepareReport`, `PrepareInterrupted`) lives in `prepare.py` and the format
shared by writer and reader (`FITS`, `FORMAT_VERSION`, `fit_geometry`, `resize_to_cache`,
`resize_mask`) in `cache_format.py`; both are re-exported here, so `sscxr.data.cache` stays the one
place to import them from.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from sscxr.data.cache_format import (
    _MAX,
    FITS,
    FORMAT_VERSION,
    HASH_FILE,
    _read_progress,
    array_files,
    fit_geometry,
    has_hash,
    hash_intact,
    npy_problem,
    resize_mask,
    resize_to_cache,
    resolve_stored,
    resume_command,
    row_intact,
)
from sscxr.data.manifest import Manifest, read_manifest
from sscxr.data.prepare import MAX_SIZE, PrepareInterrupted, PrepareReport, prepare
from sscxr.errors import DataError

__all__ = [
    "FITS",
    "FORMAT_VERSION",
    "MAX_SIZE",
    "ImageCache",
    "PrepareInterrupted",
    "PrepareReport",
    "fit_geometry",
    "prepare",
    "resize_mask",
    "resize_to_cache",
]


_SAMPLE = 16  # rows checksummed by every `ImageCache.open` (~0.5 ms at 256 px)


def _repair(root: Path) -> str:
    """The fix quoted by every damaged-cache error: re-running prepare repairs what it can."""
    header = _read_progress(root)[0] if (root / "progress.jsonl").exists() else None
    if header is None:
        return f"rebuild it with `sscxr prepare MANIFEST --out {root} --overwrite`"
    return f"repair it with: {resume_command(header, root)}"


class ImageCache:
    """Read access to a finished cache. Memmaps open lazily, so pickling (DataLoader workers) is cheap.

    Use `ImageCache.open(folder)`; rows are in manifest order, `i` is a row index.
    """

    def __init__(self, root: Path, index: dict[str, Any], manifest: Manifest) -> None:
        self.root, self.index, self.manifest = root, index, manifest
        rows = index["rows"]
        self.ok = np.array([r["ok"] for r in rows], dtype=bool)  # (N,) decoded fine
        self.mask_available = np.array([r["mask"] for r in rows], dtype=bool)  # (N,) row has a mask
        self.hashed = np.array([has_hash(r) for r in rows], dtype=bool)  # (N,) row has perceptual hashes
        self._images: np.memmap | None = None
        self._masks: np.memmap | None = None
        self._hashes: np.memmap | None = None

    @classmethod
    def open(cls, out_dir: str | os.PathLike[str]) -> ImageCache:
        """Open a cache written by `prepare`.

        Raises:
            DataError: no cache there, an unfinished one (says how many rows remain and how to resume),
                or files that disagree with index.json.
        """
        root = Path(os.path.abspath(out_dir))
        if not (root / "index.json").exists():
            header, done = _read_progress(root) if (root / "progress.jsonl").exists() else (None, {})
            if header is None:
                raise DataError(
                    f"{root}: no image cache here (no index.json); build one with `sscxr prepare`."
                )
            raise DataError(
                f"{root}: the cache is unfinished, {header['n'] - len(done)} of {header['n']} rows "
                f"remain. Resume with: {resume_command(header, root)}"
            )
        try:
            index = json.loads((root / "index.json").read_text())
            if not isinstance(index, dict) or not {"rows", "n_total", "size"} <= index.keys():
                raise ValueError("fields missing")
        except (ValueError, UnicodeDecodeError) as e:
            raise DataError(
                f"{root / 'index.json'} is damaged ({type(e).__name__}); {_repair(root)}"
            ) from None
        if index.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{root}: cache format {index.get('format_version')}, this sscxr reads "
                f"{FORMAT_VERSION}; rebuild it with `sscxr prepare --overwrite`."
            )
        copy = read_manifest(root / "manifest.csv")
        # Relative paths of the copy still mean "relative to the original manifest's folder".
        manifest = Manifest(copy.rows, resolve_stored(root, index["manifest_root"]))
        if len(manifest) != index["n_total"]:
            raise DataError(
                f"{root}: manifest.csv has {len(manifest)} rows, index.json {index['n_total']}; "
                "the cache is damaged: rebuild it with `sscxr prepare --overwrite`."
            )
        cache = cls(root, index, manifest)
        cache._check_files()
        damaged = cache.verify(sample=_SAMPLE)
        if damaged:
            raise DataError(
                f"{root}: rows {damaged} no longer hold the pixels or hashes written there (checksum "
                f"mismatch); {_repair(root)}"
            )
        return cache

    def _check_files(self) -> None:
        """Refuse array files that are missing, of another shape, or of the wrong length."""
        shape = (len(self), self.size, self.size)
        files = [(name, shape, dtype) for name, dtype in array_files(self.has_masks)]
        if self.has_hashes:
            files.append((HASH_FILE, (len(self), self.index["near_duplicates"]["hash_words"]), np.uint64))
        for name, file_shape, dtype in files:
            problem = npy_problem(self.root / name, file_shape, dtype)
            if problem is not None:
                raise DataError(f"{self.root / name} {problem}; {_repair(self.root)}")

    def verify(self, sample: int | None = None) -> list[int]:
        """Row indices whose pixels, mask or hashes no longer match the checksums written with them.

        Args:
            sample: check only this many rows, evenly spread (the cheap check of `open`); None = all.

        Rows without a checksum (failed rows, caches written before checksums) are not checked. A row
        whose hashes (hashes.npy) no longer match theirs counts too: `prepare` recomputes them.
        """
        rows = self.index["rows"]
        order = range(len(rows)) if sample is None else np.linspace(0, len(rows) - 1, min(sample, len(rows)))
        masks = self.masks if self.has_masks else None
        hashes = self.hashes if self.has_hashes else None

        def damaged(i: int) -> bool:
            if row_intact(self.images, masks, i, rows[i]) is False:
                return True
            return hashes is not None and "hash_crc" in rows[i] and not hash_intact(hashes, i, rows[i])

        return sorted({int(i) for i in order if damaged(int(i))})

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = state["_masks"] = state["_hashes"] = None  # reopened in the receiving process
        return state

    def __len__(self) -> int:
        return int(self.index["n_total"])

    @property
    def rows(self) -> list[Any]:
        """Manifest rows (`ManifestRow`), one per cache row."""
        return self.manifest.rows

    @property
    def size(self) -> int:
        return int(self.index["size"])

    @property
    def fit(self) -> str:
        return str(self.index["fit"])

    @property
    def manifest_hash(self) -> str:
        """Hash of the manifest the cache was built from (`manifest_hash`), to record with a model."""
        return str(self.index["manifest_hash"])

    @property
    def manifest_path(self) -> str:
        """Where that manifest was when the cache was built (absolute)."""
        return str(resolve_stored(self.root, self.index["manifest_path"]))

    @property
    def has_masks(self) -> bool:
        return bool(self.index["has_masks"])

    @property
    def has_hashes(self) -> bool:
        """Whether the cache stores perceptual hashes and its near-duplicate pairs (prepared by an sscxr
        that computes them; `prepare` on an older cache adds them)."""
        return "near_duplicates" in self.index

    @property
    def hashes(self) -> np.memmap:
        """(N, HASH_WORDS) uint64 read-only memmap of `near_duplicates.hash_image` (zero rows: failed or
        blank images, see `hashed`); DataError when the cache has none."""
        if not self.has_hashes:
            raise DataError(
                f"{self.root}: this cache has no perceptual hashes (prepared before sscxr stored them); "
                f"add them with: {resume_command(self.index, self.root)}"
            )
        if self._hashes is None:
            self._hashes = np.load(self.root / HASH_FILE, mmap_mode="r")
        return self._hashes

    @property
    def images(self) -> np.memmap:
        """(N, S, S) uint16 read-only memmap."""
        if self._images is None:
            self._images = np.load(self.root / "images.npy", mmap_mode="r")
        return self._images

    @property
    def masks(self) -> np.memmap:
        """(N, S, S) uint8 0/1 read-only memmap; DataError when the manifest had no masks."""
        if not self.has_masks:
            raise DataError(f"{self.root}: this cache has no masks (its manifest has no mask_path values).")
        if self._masks is None:
            self._masks = np.load(self.root / "masks.npy", mmap_mode="r")
        return self._masks

    @property
    def stats(self) -> tuple[float, float]:
        """(mean, std) of the [0, 1] pixels over the ok images of the training splits (every split not
        named test* / holdout*; all ok images when there are none), padding included for fit='pad'."""
        stats = self.index["stats"]
        if stats["mean"] is None:
            raise DataError(f"{self.root}: no image decoded (see failures.csv), so there are no statistics.")
        return float(stats["mean"]), float(stats["std"])

    def image(self, i: int) -> np.ndarray:
        """(S, S) uint16 copy of row `i` (0..65535 = [0, 1])."""
        return np.array(self.images[i])

    def image_float(self, i: int) -> np.ndarray:
        """(S, S) float32 in [0, 1]."""
        return self.images[i].astype(np.float32) / np.float32(_MAX)

    def mask(self, i: int) -> np.ndarray:
        """(S, S) bool mask of row `i`; DataError when that row has none."""
        if not self.mask_available[i]:
            raise DataError(f"{self.root}: row {i} ({self.rows[i].path}) has no mask in the cache.")
        return np.asarray(self.masks[i]) > 0

    def original_shape(self, i: int) -> tuple[int, int] | None:
        """(H, W) of the source image, None when it failed to decode."""
        shape = self.index["rows"][i]["shape"]
        return None if shape is None else (int(shape[0]), int(shape[1]))

    def pixel_spacing(self, i: int) -> tuple[float, float] | None:
        """(row, column) spacing in mm of the source image, None when unknown."""
        spacing = self.index["rows"][i]["spacing"]
        return None if spacing is None else (float(spacing[0]), float(spacing[1]))

    def indices(
        self,
        split: str | Iterable[str] | None = None,
        labels: Iterable[str] | None = None,
        sites: Iterable[str] | None = None,
        only_ok: bool = True,
    ) -> np.ndarray:
        """(K,) int64 row indices matching all filters (None = any), in row order."""
        splits = {split} if isinstance(split, str) else None if split is None else set(split)
        label_set = None if labels is None else set(labels)
        site_set = None if sites is None else set(sites)
        keep = [
            i
            for i, r in enumerate(self.rows)
            if (not only_ok or self.ok[i])
            and (splits is None or r.split in splits)
            and (label_set is None or r.label in label_set)
            and (site_set is None or r.site in site_set)
        ]
        return np.asarray(keep, dtype=np.int64)
