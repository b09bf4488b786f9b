"""`sscxr prepare`: decode every manifest image once into a fixed-size uint16 memmap, resumably.

Layout of a cache folder (see docs/design.md, "Cache layout"):

    index.json       format_version, manifest path + hash, size, fit, counts, stats, per-row facts
    images.npy       (N, S, S) uint16 (np.lib.format memmap); value / 65535 = [0, 1] intensity
    masks.npy        (N, S, S) uint8 0/1, only when some manifest row has a mask
    progress.jsonl   a header line, then one line per finished row, written after its pixels were flushed
    failures.csv     path,reason of every row that could not be decoded
    manifest.csv     byte copy of the manifest the cache was built from

Crash safety: a row's progress line is appended only after the memmap holding its pixels was flushed,
so whatever stops the run (Ctrl-C, kill, power cut), every logged row is complete; unlogged rows are
redone by the next `prepare`. `index.json` appears (atomically) only when every row is logged, and
`ImageCache.open` refuses a folder without it.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sscxr.data.manifest import Manifest, manifest_hash, read_manifest
from sscxr.errors import DataError, SSCXRError
from sscxr.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "FITS",
    "FORMAT_VERSION",
    "ImageCache",
    "PrepareInterrupted",
    "PrepareReport",
    "fit_geometry",
    "prepare",
    "resize_mask",
    "resize_to_cache",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FITS = ("stretch", "pad")
_MAX = 65535.0
_FILES = ("index.json", "images.npy", "masks.npy", "progress.jsonl", "failures.csv", "manifest.csv")


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


# ----------------------------------------------------------------------------------------------- resizing
def fit_geometry(shape: tuple[int, int], size: int, fit: str) -> tuple[int, int, int, int]:
    """Where an image of `shape` lands in the `size` x `size` cache frame.

    Returns:
        `(height, width, top, left)` of the resized image inside the frame: the whole frame for
        "stretch"; aspect-preserving and centred (letterbox, zero padding) for "pad". Invert it to
        write predictions back at the original size.
    """
    if fit == "stretch":
        return size, size, 0, 0
    if fit != "pad":
        raise ValueError(f"fit must be one of {FITS}, got {fit!r}")
    scale = size / max(shape)
    h, w = max(1, round(shape[0] * scale)), max(1, round(shape[1] * scale))
    return h, w, (size - h) // 2, (size - w) // 2


def resize_to_cache(image: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """Antialiased bilinear resize of a `(H, W)` float32 image into the `(size, size)` frame.

    torch's `interpolate(antialias=True)` is the same filter as PIL's BILINEAR resize (a triangle whose
    support widens with the reduction factor, so no aliasing of film grain or text), about twice as
    fast as PIL without `reducing_gap`, and exact where `reducing_gap` approximates.
    """
    h, w, top, left = fit_geometry(image.shape, size, fit)
    src = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None, None]
    resized = F.interpolate(src, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    out = np.zeros((size, size), dtype=np.float32)
    out[top : top + h, left : left + w] = resized[0, 0].numpy()
    return out


def resize_mask(mask: np.ndarray, size: int, fit: str = "stretch") -> np.ndarray:
    """Resize a `(H, W)` bool mask like its image: area-weighted, then thresholded at 0.5 (stays binary).

    Returns:
        `(size, size)` uint8 array of 0/1.
    """
    return (resize_to_cache(mask.astype(np.float32), size, fit) > 0.5).astype(np.uint8)


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
    record: dict[str, Any] = field(default_factory=dict)


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
    }
    return _Result(task.index, pixels, mask, record)


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, SSCXRError) else f"{type(e).__name__}: {text}"


def _worker_init() -> None:
    # Ctrl-C reaches the whole process group: only the parent should react (flush, log, exit).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    torch.set_num_threads(1)  # one process per core already


def _results(tasks: list[_Task], workers: int, chunk: int) -> Iterator[_Result]:
    if workers <= 1 or len(tasks) <= 1:
        yield from map(_load_row, tasks)
        return
    chunksize = max(1, min(chunk, len(tasks) // (4 * workers)))
    with multiprocessing.get_context().Pool(workers, initializer=_worker_init) as pool:
        # Unordered: one slow DICOM must not stall the others; rows are addressed by index anyway.
        yield from pool.imap_unordered(_load_row, tasks, chunksize=chunksize)


# ----------------------------------------------------------------------------------------- cache folder
def _header(manifest_path: Path, manifest: Manifest, size: int, fit: str) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "manifest_path": str(manifest_path),
        "manifest_hash": manifest_hash(manifest_path),
        "size": size,
        "fit": fit,
        "n": len(manifest),
        "has_masks": manifest.has_masks,
    }


def _same_cache(a: dict[str, Any], b: dict[str, Any]) -> bool:
    keys = ("format_version", "manifest_hash", "size", "fit")
    return all(a.get(k) == b.get(k) for k in keys)


def _read_progress(out_dir: Path) -> tuple[dict[str, Any] | None, dict[int, dict[str, Any]]]:
    """(header or None, finished rows by index). Cuts off a torn final line so appends stay aligned."""
    path = out_dir / "progress.jsonl"
    if not path.exists():
        return None, {}
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if end < len(data):  # a line was being written when the run died: it never counted
        with open(path, "r+b") as f:
            f.truncate(end)
    lines = data[:end].splitlines()
    try:
        header = json.loads(lines[0])["header"] if lines else None
    except (ValueError, KeyError, TypeError):
        header = None
    done: dict[int, dict[str, Any]] = {}
    for line in lines[1:]:
        try:
            rec = json.loads(line)
            done[int(rec["i"])] = rec
        except (ValueError, KeyError, TypeError):
            logger.warning("%s: skipping an unreadable line; that row will be redone", path)
    return header, done


def _check_reusable(out_dir: Path, header: dict[str, Any], overwrite: bool) -> None:
    """Refuse to mix two caches in one folder; with `overwrite`, delete the old one's files."""
    old = None
    if (out_dir / "index.json").exists():
        old = json.loads((out_dir / "index.json").read_text())
    elif (out_dir / "progress.jsonl").exists():
        old = _read_progress(out_dir)[0]
    if old is None or _same_cache(old, header):
        return
    if not overwrite:
        raise DataError(
            f"{out_dir} already holds a cache of another manifest or geometry (manifest hash "
            f"{old.get('manifest_hash')}, size {old.get('size')}, fit {old.get('fit')}; asked: "
            f"{header['manifest_hash']}, {header['size']}, {header['fit']}). Choose another output folder "
            "or pass overwrite=True (`--overwrite`) to replace it."
        )
    for name in _FILES:
        (out_dir / name).unlink(missing_ok=True)


def _open_arrays(out_dir: Path, header: dict[str, Any], fresh: bool) -> tuple[np.memmap, np.memmap | None]:
    n, s = header["n"], header["size"]
    names = ["images.npy"] + (["masks.npy"] if header["has_masks"] else [])
    arrays: list[np.memmap] = []
    for name, dtype in zip(names, (np.uint16, np.uint8), strict=False):
        path = out_dir / name
        if fresh:
            arrays.append(np.lib.format.open_memmap(path, mode="w+", dtype=dtype, shape=(n, s, s)))
            continue
        try:
            arr = np.load(path, mmap_mode="r+")
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: unreadable ({e}); rerun with overwrite=True (`--overwrite`).") from e
        if arr.shape != (n, s, s) or arr.dtype != dtype:
            raise DataError(
                f"{path}: shape {arr.shape} {arr.dtype}, expected {(n, s, s)} {np.dtype(dtype)}; "
                "rerun with overwrite=True (`--overwrite`)."
            )
        arrays.append(arr)
    return arrays[0], (arrays[1] if len(arrays) > 1 else None)


def resume_command(header: dict[str, Any], out_dir: Path) -> str:
    """The shell command that continues (or re-checks) the cache described by `header`."""
    return (
        f"sscxr prepare {header['manifest_path']} --out {out_dir} --size {header['size']} "
        f"--fit {header['fit']}"
    )


class _Writer:
    """Parent-side sink: pixels into the memmaps, then (after a flush) their rows into progress.jsonl."""

    def __init__(self, out_dir: Path, images: np.memmap, masks: np.memmap | None, chunk: int) -> None:
        self.images, self.masks, self.chunk = images, masks, chunk
        self.progress = open(out_dir / "progress.jsonl", "ab")  # noqa: SIM115 (closed in close())
        self.pending: list[dict[str, Any]] = []

    def put(self, res: _Result) -> None:
        # Failed rows are zeroed too, so a cache's bytes do not depend on what an earlier run left there.
        self.images[res.index] = 0 if res.pixels is None else res.pixels
        if self.masks is not None:
            self.masks[res.index] = 0 if res.mask is None else res.mask
        self.pending.append(res.record)  # only after its pixels are in the map
        if len(self.pending) >= self.chunk:
            self.commit()

    def commit(self) -> None:
        if not self.pending:
            return
        self.images.flush()
        if self.masks is not None:
            self.masks.flush()
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
    results = _results(tasks, workers, chunk)
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


def _write_index(
    out_dir: Path, header: dict[str, Any], manifest: Manifest, records: dict[int, dict[str, Any]]
) -> dict[str, Any]:
    ok = [records[i] for i in range(header["n"]) if records[i]["status"] == "ok"]
    n_pix = len(ok) * header["size"] ** 2
    mean = sum(r["sum"] for r in ok) / n_pix if ok else None
    var = sum(r["sumsq"] for r in ok) / n_pix - mean**2 if mean is not None else None
    index = {
        **{k: v for k, v in header.items() if k != "n"},
        "manifest_root": str(manifest.root),
        "n_total": header["n"],
        "n_ok": len(ok),
        "n_failed": header["n"] - len(ok),
        "n_with_mask": sum(bool(r.get("mask")) for r in ok),
        "stats": {"mean": mean, "std": None if var is None else math.sqrt(max(var, 0.0))},
        "rows": [_row_summary(records[i]) for i in range(header["n"])],
    }
    atomic_write_json(out_dir / "index.json", index)
    return index


def _row_summary(rec: dict[str, Any]) -> dict[str, Any]:
    ok = rec["status"] == "ok"
    return {"ok": ok, "shape": rec.get("shape"), "spacing": rec.get("spacing"), "mask": bool(rec.get("mask"))}


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
    """Build (or resume) the image cache of a manifest; see the module docstring for the layout.

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
    if size < 1 or fit not in FITS or chunk < 1:
        raise ValueError(f"need size >= 1, fit in {FITS}, chunk >= 1; got {size}, {fit!r}, {chunk}")
    manifest_path, out_dir = Path(os.path.abspath(manifest_path)), Path(os.path.abspath(out_dir))
    manifest = read_manifest(manifest_path)
    if len(manifest) == 0:
        raise DataError(f"{manifest_path}: the manifest has no rows; nothing to prepare.")
    header = _header(manifest_path, manifest, size, fit)
    out_dir.mkdir(parents=True, exist_ok=True)
    _check_reusable(out_dir, header, overwrite)
    old_header, done = _read_progress(out_dir)
    fresh = old_header is None
    images, masks = _open_arrays(out_dir, header, fresh)
    if fresh:  # header last: a folder with a header always has its arrays
        done = {}
        atomic_write_bytes(out_dir / "manifest.csv", manifest_path.read_bytes())
        atomic_write_text(out_dir / "progress.jsonl", json.dumps({"header": header}) + "\n")
    tasks = [_task(manifest, i, size, fit) for i in range(len(manifest)) if i not in done]
    n_workers = min(_default_workers() if workers is None else workers, len(tasks))
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
        n_done = _run(tasks, _Writer(out_dir, images, masks, chunk), n_workers, chunk, bar, _after_row)
    except KeyboardInterrupt:
        records = _read_progress(out_dir)[1]
        _write_failures(out_dir, manifest, records)
        remaining = len(manifest) - len(records)
        raise PrepareInterrupted(
            f"prepare interrupted: {len(records)} of {len(manifest)} rows are saved in {out_dir}, "
            f"{remaining} remain. Resume with: {resume_command(header, out_dir)}"
        ) from None
    seconds = time.perf_counter() - start
    return _finish(out_dir, header, manifest, n_done, len(manifest) - len(tasks), seconds)


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
    index = _write_index(out_dir, header, manifest, records)
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
    )


class ImageCache:
    """Read access to a finished cache. Memmaps open lazily, so pickling (DataLoader workers) is cheap.

    Use `ImageCache.open(folder)`; rows are in manifest order, `i` is a row index.
    """

    def __init__(self, root: Path, index: dict[str, Any], manifest: Manifest) -> None:
        self.root, self.index, self.manifest = root, index, manifest
        rows = index["rows"]
        self.ok = np.array([r["ok"] for r in rows], dtype=bool)  # (N,) decoded fine
        self.mask_available = np.array([r["mask"] for r in rows], dtype=bool)  # (N,) row has a mask
        self._images: np.memmap | None = None
        self._masks: np.memmap | None = None

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
        index = json.loads((root / "index.json").read_text())
        if index.get("format_version") != FORMAT_VERSION:
            raise DataError(
                f"{root}: cache format {index.get('format_version')}, this sscxr reads "
                f"{FORMAT_VERSION}; rebuild it with `sscxr prepare --overwrite`."
            )
        copy = read_manifest(root / "manifest.csv")
        # Relative paths of the copy still mean "relative to the original manifest's folder".
        manifest = Manifest(copy.rows, Path(index["manifest_root"]))
        if len(manifest) != index["n_total"]:
            raise DataError(
                f"{root}: manifest.csv has {len(manifest)} rows, index.json {index['n_total']}; "
                "the cache is damaged: rebuild it with `sscxr prepare --overwrite`."
            )
        cache = cls(root, index, manifest)
        if cache.images.shape != (len(cache), cache.size, cache.size):
            raise DataError(
                f"{root / 'images.npy'}: shape {cache.images.shape} does not match index.json; "
                "rebuild it with `sscxr prepare --overwrite`."
            )
        return cache

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_images"] = state["_masks"] = None  # reopened in the receiving process
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
        """Where that manifest was when the cache was built."""
        return str(self.index["manifest_path"])

    @property
    def has_masks(self) -> bool:
        return bool(self.index["has_masks"])

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
        """(mean, std) of the [0, 1] pixels over all ok images (padding included for fit='pad')."""
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
