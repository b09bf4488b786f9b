"""`sscxr prepare`, the cache writer: decode every manifest image once into a fixed-size uint16 memmap,
resumably.

The folder layout and the crash-safety rules this writer keeps are described in `cache.py`; the pieces
of the format shared with the reader (version, geometry, resizing, progress log, index.json) live in
`cache_format.py`.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sscxr.data.cache_format import (
    _FILES,
    _MAX,
    FITS,
    FORMAT_VERSION,
    HASH_FILE,
    _read_progress,
    _write_index,
    array_files,
    crc,
    has_hash,
    hash_intact,
    npy_data_offset,
    npy_problem,
    resize_mask,
    resize_to_cache,
    resume_command,
    row_intact,
    stored_path,
)
from sscxr.data.manifest import Manifest, manifest_hash, read_manifest
from sscxr.data.near_duplicates import (
    HASH_WORDS,
    REFUSE_THRESHOLD,
    hash_row,
    pairs_among,
    pairs_of,
    search_info,
)
from sscxr.errors import DataError, SSCXRError
from sscxr.utils import atomic_write_bytes, atomic_write_text, display_path

__all__ = ["MAX_SIZE", "PrepareInterrupted", "PrepareReport", "prepare"]

logger = logging.getLogger(__name__)

#: Largest cache side: 4096 x 4096 uint16 is 32 MiB a row, beyond any chest X-ray detector's resolution.
MAX_SIZE = 4096
_SMALL = 32  # images with a side below this are named in a warning: no radiograph is that small


class PrepareInterrupted(SSCXRError):
    """`prepare` was stopped (Ctrl-C); the cache is consistent and the message says how to resume."""


@dataclass
class PrepareReport:
    """What `prepare` did. Counts of ok / failed rows cover the whole cache, `n_done` this run only."""

    out_dir: Path
    n_total: int
    n_done: int
    n_skipped_already_done: int
    n_ok: int
    n_failed: int
    failures: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_s: float = 0.0
    n_rebuilt: int = 0  # logged rows redone because their bytes no longer matched their checksums
    n_hashed: int = 0  # logged rows given hashes from their cached pixels (older caches, damaged hashes)
    n_leak_pairs: int = 0  # near-duplicate pairs of different patients across splits (`sscxr check`)


def _to_uint16(image: np.ndarray) -> np.ndarray:
    return np.round(np.clip(image, 0.0, 1.0) * _MAX).astype(np.uint16)


# ------------------------------------------------------------------------------------------------ workers
@dataclass(frozen=True)
class _Task:
    index: int
    image_path: str
    mask_path: str | None
    size: int
    fit: str


@dataclass
class _Result:
    index: int
    pixels: np.ndarray | None = None  # (S, S) uint16
    mask: np.ndarray | None = None  # (S, S) uint8
    hashes: np.ndarray | None = None  # (HASH_WORDS,) uint64
    record: dict[str, Any] = field(default_factory=dict)


def _hash_record(record: dict[str, Any], hashes: np.ndarray | None) -> tuple[np.ndarray, dict[str, Any]]:
    """(hashes.npy row, `record` with its hash checksum): a blank image gets a zero row, marked blank."""
    row = np.zeros(HASH_WORDS, dtype=np.uint64) if hashes is None else hashes
    out = {k: v for k, v in record.items() if k not in ("hash_crc", "blank")}
    out["hash_crc"] = crc(row)
    if hashes is None:
        out["blank"] = True
    return row, out


def _load_row(task: _Task) -> _Result:
    """Decode and resize one row (runs in a worker process). Never raises: failures become records."""
    from sscxr.data.io import read_mask, read_xray  # imported here so the worker needs nothing else

    try:
        xray = read_xray(task.image_path)
        pixels = _to_uint16(resize_to_cache(xray.image, task.size, task.fit))
        mask = None
        if task.mask_path is not None:
            raw = read_mask(task.mask_path)
            if raw.shape != xray.image.shape:
                raise DataError(
                    f"mask {task.mask_path} is {raw.shape[1]}x{raw.shape[0]} but its image is "
                    f"{xray.image.shape[1]}x{xray.image.shape[0]}; masks must match their image"
                )
            mask = resize_mask(raw, task.size, task.fit)
        # From the cached pixels, not the decoded image: the hashes stay a function of the row alone.
        hashes = hash_row(pixels, xray.image.shape, task.fit)
    except Exception as e:  # any decoder bug must cost one row, not the run
        return _Result(task.index, record={"i": task.index, "status": "failed", "reason": _reason(e)})
    unit = pixels.astype(np.float64) / _MAX  # stats of what the loader will actually read
    spacing = xray.meta.pixel_spacing_mm
    record = {
        "i": task.index,
        "status": "ok",
        "shape": [int(s) for s in xray.image.shape],
        "spacing": None if spacing is None else [float(s) for s in spacing],
        "mask": mask is not None,
        "sum": float(unit.sum()),
        "sumsq": float(np.square(unit).sum()),
        "crc": crc(pixels),
    }
    if mask is not None:
        record["mask_crc"] = crc(mask)
    words, record = _hash_record(record, hashes)
    return _Result(task.index, pixels, mask, words, record)


@dataclass(frozen=True)
class _HashTask:
    index: int
    images_path: str
    shape: tuple[int, int]
    fit: str


def _hash_cached(task: _HashTask) -> tuple[int, np.ndarray | None]:
    """Hashes of one row read back from images.npy (runs in a worker process): no decoding."""
    images = np.load(task.images_path, mmap_mode="r")
    return task.index, hash_row(images[task.index], task.shape, task.fit)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, SSCXRError) else f"{type(e).__name__}: {text}"


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: only the parent should react (flush, log, exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # one process per core already


def _results(fn: Callable[[Any], Any], tasks: list[Any], workers: int, chunk: int) -> Iterator[Any]:
    """`fn` over `tasks`, in `workers` processes when there are several, in any order."""
    if workers <= 1 or len(tasks) <= 1:
        yield from map(fn, tasks)
        return
    chunksize = max(1, min(chunk, len(tasks) // (4 * workers)))
    with multiprocessing.get_context().Pool(workers, initializer=_worker_init) as pool:
        # Unordered: one slow DICOM must not stall the others; rows are addressed by index anyway.
        yield from pool.imap_unordered(fn, tasks, chunksize=chunksize)


# ----------------------------------------------------------------------------------------- cache folder
def _header(
    manifest_path: Path, out_dir: Path, relative: bool, manifest: Manifest, size: int, fit: str
) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "manifest_path": stored_path(manifest_path, out_dir, relative),
        "manifest_hash": manifest_hash(manifest_path),
        "size": size,
        "fit": fit,
        "n": len(manifest),
        "has_masks": manifest.has_masks,
    }


def _same_cache(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format_version", "manifest_hash", "size", "fit")
    return all(a.get(k) == b.get(k) for k in keys)


def _check_reusable(out_dir: Path, header: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix two caches in one folder; with `overwrite`, delete the old one's files."""
    old = None
    if (out_dir / "index.json").exists():
        try:
            old = json.loads((out_dir / "index.json").read_text())
        except (ValueError, UnicodeDecodeError):  # damaged: the progress log still says what the cache is
            logger.warning("%s: index.json is damaged; it is rebuilt from progress.jsonl", out_dir)
    if not isinstance(old, dict) and (out_dir / "progress.jsonl").exists():
        old = _read_progress(out_dir)[0]
    if old is None or _same_cache(old, header):
        return
    if not overwrite:
        raise DataError(
            f"{out_dir} already holds a cache of another manifest or geometry (manifest hash "
            f"{old.get('manifest_hash')}, size {old.get('size')}, fit {old.get('fit')}; asked: "
            f"{header['manifest_hash']}, {header['size']}, {header['fit']}). Choose another output folder "
            "or pass --overwrite to replace it."
        )
    for name in _FILES:
        (out_dir / name).unlink(missing_ok=True)


def _open_arrays(
    out_dir: Path, header: dict[str, Any], fresh: bool
) -> tuple[np.memmap, np.memmap | None, np.memmap, bool]:
    """Open (or create) the cache's memmaps for writing.

    On resume a damaged file is repaired rather than trusted or refused: a file of the right header but
    the wrong length (truncated, or cut by a full disk) is brought back to its length, and its rows are
    then checked against their checksums; a missing file or an unreadable header is created anew.
    hashes.npy is derived from the pixels: when it is missing (a cache written before hashes existed)
    or damaged, it is created anew and its rows recomputed from images.npy, decoding nothing.

    Returns:
        (images, masks or None, hashes, recreated): `recreated` when a pixel file had to be made anew,
        so every row must be decoded again.
    """
    n, s = header["n"], header["size"]
    arrays: list[np.memmap] = []
    recreated = False
    for name, dtype in array_files(header["has_masks"]):
        path = out_dir / name
        problem = None if fresh else npy_problem(path, (n, s, s), dtype)
        if problem is not None:
            layout = npy_data_offset(path) if path.is_file() else None
            if layout is not None and layout[1:] == ((n, s, s), np.dtype(dtype)):
                logger.warning("%s %s; restoring its length and checking every row", path, problem)
                os.truncate(path, layout[0] + n * s * s * np.dtype(dtype).itemsize)
            else:
                logger.warning("%s %s; creating it again (every row is decoded again)", path, problem)
                path.unlink(missing_ok=True)
                recreated = True
        if fresh or not path.exists():
            arrays.append(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, s, s)))
        else:
            arrays.append(np.load(path, mmap_mode="r+"))
    path = out_dir / HASH_FILE
    problem = None if fresh else npy_problem(path, (n, HASH_WORDS), np.uint64)
    if problem is not None and path.exists():  # absent: an older cache, said when its rows are hashed
        logger.warning("%s %s; creating it again from the cached pixels", path, problem)
    if problem is not None or fresh:
        path.unlink(missing_ok=True)
        hashes = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint64, shape=(n, HASH_WORDS))
    else:
        hashes = np.load(path, mmap_mode="r+")
    return arrays[0], (arrays[1] if len(arrays) > 1 else None), hashes, recreated


def _damaged(images: np.ndarray, masks: np.ndarray | None, records: dict[int, dict[str, Any]]) -> list[int]:
    """Logged rows whose bytes no longer match the checksums written with them."""
    return sorted(i for i, rec in records.items() if row_intact(images, masks, i, rec) is False)


def _check_room(out_dir: Path, header: dict[str, Any], fresh: bool) -> None:
    """Refuse, before anything is allocated, a cache larger than the free space of its disk."""
    if not fresh:
        return
    n, s = header["n"], header["size"]
    need = n * (s * s * (2 + (1 if header["has_masks"] else 0)) + HASH_WORDS * 8)
    free = shutil.disk_usage(out_dir).free
    if need > free:
        raise DataError(
            f"{out_dir}: a {s} x {s} cache of {n:,} images needs {need / 2**30:.1f} GiB, the disk has "
            f"{free / 2**30:.1f} GiB free; choose a smaller --size or another --out."
        )


class _Writer:
    """Parent-side sink: pixels into the memmaps, then (after a flush) their rows into progress.jsonl."""

    def __init__(
        self, out_dir: Path, images: np.memmap, masks: np.memmap | None, hashes: np.memmap, chunk: int
    ) -> None:
        self.images, self.masks, self.hashes, self.chunk = images, masks, hashes, chunk
        self.progress = open(out_dir / "progress.jsonl", "ab")  # noqa: SIM115 (closed in close())
        self.pending: list[dict[str, Any]] = []

    def put(self, res: _Result) -> None:
        # Failed rows are zeroed too, so a cache's bytes do not depend on what an earlier run left there.
        self.images[res.index] = 0 if res.pixels is None else res.pixels
        if self.masks is not None:
            self.masks[res.index] = 0 if res.mask is None else res.mask
        self.hashes[res.index] = 0 if res.hashes is None else res.hashes
        self.pending.append(res.record)  # only after its pixels are in the map
        if len(self.pending) >= self.chunk:
            self.commit()

    def put_hashes(self, index: int, words: np.ndarray, record: dict[str, Any]) -> None:
        """A logged row's new hashes; its record is logged again (the last line of a row counts)."""
        self.hashes[index] = words
        self.pending.append(record)
        if len(self.pending) >= self.chunk:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        self.images.flush()
        if self.masks is not None:
            self.masks.flush()
        self.hashes.flush()
        self.progress.write(b"".join(json.dumps(r).encode() + b"\n" for r in self.pending))
        self.progress.flush()
        os.fsync(self.progress.fileno())
        self.pending.clear()

    def close(self) -> None:
        self.commit()
        self.progress.close()


def _run(
    tasks: list[_Task],
    writer: _Writer,
    workers: int,
    chunk: int,
    bar: tqdm,
    after_row: Callable[[int], None] | None,
) -> int:
    """Process `tasks`, returning how many rows finished; on any exception the finished ones are kept."""
    n = 0
    results = _results(_load_row, tasks, workers, chunk)
    try:
        for res in results:
            writer.put(res)
            n += 1
            bar.update()
            if after_row is not None:
                after_row(n)
    finally:
        results.close()  # terminates the pool now, not whenever the generator is collected
        writer.close()
        bar.close()
    return n


def _write_failures(
    out_dir: Path, manifest: Manifest, records: dict[int, dict[str, Any]]
) -> list[tuple[str, str]]:
    failures = [
        (str(manifest.resolve(manifest.rows[i])), r.get("reason", ""))
        for i, r in sorted(records.items())
        if r["status"] != "ok"
    ]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["path", "reason"])
    writer.writerows(failures)
    atomic_write_text(out_dir / "failures.csv", buf.getvalue())
    return failures


def _default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def prepare(
    manifest_path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    size: int = 256,
    fit: str = "stretch",
    workers: int | None = None,
    progress: bool = True,
    chunk: int = 64,
    overwrite: bool = False,
    _after_row: Callable[[int], None] | None = None,
) -> PrepareReport:
    """Build (or resume) the image cache of a manifest; see `sscxr.data.cache` for the layout.

    Args:
        manifest_path: the manifest CSV.
        out_dir: cache folder (created). Rerunning on the same folder skips rows already logged.
        size: side S of the cached square images.
        fit: "stretch" (resize to S x S ignoring aspect, the COVID-Net convention) or "pad"
            (aspect-preserving letterbox with zero padding); see `fit_geometry`.
        workers: decoding processes (None: all cores available; 0 or 1: in this process).
        progress: show a tqdm bar.
        chunk: rows per flush of the memmaps + progress log (the most work an interrupt can lose).
        overwrite: replace a cache of another manifest / size / fit found in `out_dir`.
        _after_row: test hook called with the number of rows finished this run.

    Returns:
        A `PrepareReport`. Unreadable images are reported there and in failures.csv, never raised.

    Raises:
        DataError: unreadable manifest, or `out_dir` holds another cache and `overwrite` is False.
        PrepareInterrupted: on Ctrl-C, after saving finished rows; the message gives the resume command.
    """
    if not 8 <= size <= MAX_SIZE:
        raise DataError(f"--size {size}: the cache side must be between 8 and {MAX_SIZE} pixels.")
    if fit not in FITS or chunk < 1:
        raise ValueError(f"need fit in {FITS}, chunk >= 1; got {fit!r}, {chunk}")
    relative = not os.path.isabs(manifest_path)
    manifest_path, out_dir = Path(os.path.abspath(manifest_path)), Path(os.path.abspath(out_dir))
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise DataError(f"{manifest_path}: the manifest has no rows; nothing to prepare.")
    header = _header(manifest_path, out_dir, relative, manifest, size, fit)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_reusable(out_dir, header, overwrite)
    old_header, done = _read_progress(out_dir)
    fresh = old_header is None
    _check_room(out_dir, header, fresh)
    images, masks, hashes, recreated = _open_arrays(out_dir, header, fresh)
    damaged = list(done) if recreated else _damaged(images, masks, done)
    if damaged and not recreated:
        logger.warning(
            "%s: %d finished rows no longer match their checksums (first: %s); decoding them again",
            out_dir, len(damaged), damaged[:5],
        )  # fmt: skip
    for i in damaged:
        del done[i]
    if fresh:  # header last: a folder with a header always has its arrays
        done = {}
        atomic_write_bytes(out_dir / "manifest.csv", manifest_path.read_bytes())
        atomic_write_text(out_dir / "progress.jsonl", json.dumps({"header": header}) + "\n")
    tasks = [_task(manifest, i, size, fit) for i in range(len(manifest)) if i not in done]
    max_workers = _default_workers() if workers is None else workers
    n_workers = min(max_workers, len(tasks))
    writer = _Writer(out_dir, images, masks, hashes, chunk)
    try:
        n_hashed = _rehash(out_dir, done, hashes, writer, fit, max_workers, chunk, progress)
    except KeyboardInterrupt:
        writer.close()  # the rows hashed so far are kept
        raise PrepareInterrupted(
            f"prepare interrupted while hashing cached rows; resume with: {resume_command(header, out_dir)}"
        ) from None
    bar = tqdm(
        total=len(manifest),
        initial=len(manifest) - len(tasks),
        disable=not progress,
        unit="img",
        desc="prepare",
        dynamic_ncols=True,
    )
    start = time.perf_counter()
    try:
        n_done = _run(tasks, writer, n_workers, chunk, bar, _after_row)
    except KeyboardInterrupt:
        records = _read_progress(out_dir)[1]
        _write_failures(out_dir, manifest, records)
        remaining = len(manifest) - len(records)
        raise PrepareInterrupted(
            f"prepare interrupted: {len(records)} of {len(manifest)} rows are saved in {out_dir}, "
            f"{remaining} remain. Resume with: {resume_command(header, out_dir)}"
        ) from None
    seconds = time.perf_counter() - start
    report = _finish(out_dir, header, manifest, n_done, len(manifest) - len(tasks), seconds)
    report.n_rebuilt, report.n_hashed = len(damaged), n_hashed
    return report


def _rehash(
    out_dir: Path,
    done: dict[int, dict[str, Any]],
    hashes: np.memmap,
    writer: _Writer,
    fit: str,
    workers: int,
    chunk: int,
    progress: bool,
) -> int:
    """Give the logged ok rows whose hashes are missing or damaged new ones, from their cached pixels.

    Rows of a cache written before hashes existed have none; the pixels are intact (checked before),
    so nothing is decoded again. Updates `done` in place; returns how many rows were hashed.
    """
    todo = sorted(i for i, rec in done.items() if rec["status"] == "ok" and not hash_intact(hashes, i, rec))
    if not todo:
        return 0
    damaged = sum("hash_crc" in done[i] for i in todo)
    why = (
        f"{len(todo)} rows' hashes are missing or no longer match their checksums"
        if damaged
        else f"{len(todo)} rows have no perceptual hashes (a cache prepared before sscxr stored them)"
    )
    logger.warning("%s: %s: hashing them from the cached pixels (nothing is decoded)", out_dir, why)
    tasks = [_HashTask(i, str(out_dir / "images.npy"), tuple(done[i]["shape"]), fit) for i in todo]
    bar = tqdm(total=len(tasks), disable=not progress, unit="img", desc="hash", dynamic_ncols=True)
    results = _results(_hash_cached, tasks, min(workers, len(tasks)), chunk)
    try:
        for i, words in results:
            row, done[i] = _hash_record(done[i], words)
            writer.put_hashes(i, row, done[i])
            bar.update()
    finally:
        results.close()
        writer.commit()
        bar.close()
    return len(todo)


def _task(manifest: Manifest, i: int, size: int, fit: str) -> _Task:
    row = manifest.rows[i]
    mask = manifest.resolve_mask(row)
    return _Task(i, str(manifest.resolve(row)), None if mask is None else str(mask), size, fit)


def _finish(
    out_dir: Path, header: dict[str, Any], manifest: Manifest, n_done: int, n_skipped: int, seconds: float
) -> PrepareReport:
    records = _read_progress(out_dir)[1]
    failures = _write_failures(out_dir, manifest, records)
    if len(records) != header["n"]:  # only if rows vanished from the log underneath us
        raise DataError(
            f"{out_dir}: {header['n'] - len(records)} rows missing from progress.jsonl after "
            f"the run; rerun: {resume_command(header, out_dir)}"
        )
    pairs = _near_pairs(out_dir, header, records)
    index = _write_index(out_dir, header, manifest, records, search_info(pairs))
    leaks = [p for p in pairs_of(manifest.rows, pairs) if p.leak]
    if leaks:
        logger.warning(
            "%s: %d near-duplicate image pair(s) of different patients in different splits (e.g. %s); "
            "training and evaluation refuse the %d within %d bits: list them with `sscxr check %s`",
            out_dir, len(leaks), leaks[0].describe(manifest.rows), sum(p.refused for p in leaks),
            REFUSE_THRESHOLD, out_dir,
        )  # fmt: skip
    small = [i for i, r in records.items() if r["status"] == "ok" and min(r["shape"]) < _SMALL]
    if small:
        shape = records[small[0]]["shape"]
        logger.warning(
            "%s: %d image(s) smaller than %d px on a side (e.g. %s, %dx%d) were enlarged to %d px: check "
            "that they are X-rays (thumbnails, icons or masks listed as images?)",
            out_dir, len(small), _SMALL, manifest.rows[small[0]].path, shape[1], shape[0], header["size"],
        )  # fmt: skip
    if index["n_ok"] == 0:
        logger.error("%s: no image could be decoded; see failures.csv", out_dir)
    elif failures:
        logger.warning(
            "%d of %d images could not be read; see %s", len(failures), header["n"], out_dir / "failures.csv"
        )
    return PrepareReport(
        out_dir,
        header["n"],
        n_done,
        n_skipped,
        index["n_ok"],
        index["n_failed"],
        failures,
        seconds,
        n_done / seconds if seconds > 0 else 0.0,
        n_leak_pairs=len(leaks),
    )


def _near_pairs(out_dir: Path, header: dict[str, Any], records: dict[int, dict[str, Any]]) -> np.ndarray:
    """`(P, 3)` `(i, j, distance)` near-duplicate pairs among the hashed rows (~5 s for 5,216 X-rays)."""
    rows = np.array([i for i in range(header["n"]) if has_hash(records[i])], dtype=np.int64)
    start = time.perf_counter()
    found = pairs_among(np.load(out_dir / HASH_FILE, mmap_mode="r"), rows)
    logger.info(
        "%s: near-duplicate search among %d hashed rows: %d pairs (%.1f s)",
        display_path(out_dir), len(rows), len(found), time.perf_counter() - start,
    )  # fmt: skip
    return found
