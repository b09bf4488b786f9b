"""The near-duplicate check on real radiographs: speed, recall on republished copies, false pairs.

    python benchmarks/bench_near_duplicates.py [--data ../shared/data/kermany_train] [--n-recall 600]
                                               [--size 256] [--workers 2] [--keep DIR]

On Kermany's 5,216 training radiographs (real pediatric CXRs, 2,846 children; see its README):

1. `prepare` of the whole set (with a patient split 70/15/15): images/s with hashing, and the cost of the
   pair search it runs once at the end; then the check every training start runs (`open_cache`'s
   `require_no_near_duplicates`, which reads the stored pairs) and the cost of a fresh search.
2. Hashing alone (`hash_row` of cached rows, one process): rows/s.
3. False pairs: near-duplicate pairs of *different* children among all 13.6 M pairs, and the smallest
   distances between different children (the margin below which the threshold is safe).
4. Recall: `--n-recall` images republished as a collection would (resized, cropped by 5%, re-encoded as
   JPEG, all three) go through the real pipeline (file -> read_xray -> cache row -> hashes); a copy is
   found when `near_pairs` pairs it with its original. The same with the hashes of the decoded image
   before resizing, and of `fit="pad"` rows, to compare where hashing is the most robust.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import sscxr.data.near_duplicates as nd
from sscxr.data.cache import ImageCache, prepare, resize_to_cache
from sscxr.data.cache_format import _MAX
from sscxr.data.importers import import_kermany
from sscxr.data.io import read_xray
from sscxr.data.manifest import write_manifest
from sscxr.data.splits import patient_split

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "kermany_train"


def _crop(im: Image.Image, fx: float, fy: float, keep_x: float = 0.95, keep_y: float = 0.95) -> Image.Image:
    w, h = im.size
    cw, ch = round(w * keep_x), round(h * keep_y)
    left, top = round(fx * (w - cw)), round(fy * (h - ch))
    return im.crop((left, top, left + cw, top + ch))


def _jpeg(im: Image.Image, quality: int) -> Image.Image:
    buf = io.BytesIO()
    im.convert("L").save(buf, format="JPEG", quality=quality)
    return Image.open(io.BytesIO(buf.getvalue()))


def _resize(im: Image.Image, f: float) -> Image.Image:
    return im.resize((round(im.size[0] * f), round(im.size[1] * f)), Image.Resampling.BILINEAR)


Transform = Callable[[Image.Image, np.random.Generator], Image.Image]
TRANSFORMS: dict[str, Transform] = {
    "resize 50%": lambda im, r: _resize(im, 0.5),
    "resize 200%": lambda im, r: _resize(im, 2.0),
    "resize 70% x 85% (aspect)": lambda im, r: im.resize((round(im.size[0] * 0.7), round(im.size[1] * 0.85))),
    "crop 5%, random offset": lambda im, r: _crop(im, r.uniform(), r.uniform()),
    "crop 5%, a corner": lambda im, r: _crop(im, float(r.integers(2)), float(r.integers(2))),
    "crop 5% off one edge": lambda im, r: _crop(im, float(r.integers(2)), 0.5, 0.95, 1.0),
    "JPEG q75": lambda im, r: _jpeg(im, 75),
    "JPEG q40": lambda im, r: _jpeg(im, 40),
    "crop 5% + resize 50% + JPEG q75": lambda im, r: _jpeg(
        _resize(_crop(im, r.uniform(), r.uniform()), 0.5), 75
    ),
}


def _row(image: np.ndarray, size: int, fit: str) -> np.ndarray:
    return np.round(np.clip(resize_to_cache(image, size, fit), 0, 1) * _MAX).astype(np.uint16)


def _hashes(image: np.ndarray, size: int) -> dict[str, np.ndarray]:
    """The hashes of one decoded image, three ways: before resizing, of its stretch row, of its pad row."""
    out = {"decoded image": nd.hash_image(image)}
    for fit in ("stretch", "pad"):
        out[f"cache row ({fit})"] = nd.hash_row(_row(image, size, fit), image.shape, fit)
    return out  # type: ignore[return-value]


def _prepare(data: Path, work: Path, size: int, workers: int) -> ImageCache:
    manifest = patient_split(import_kermany(data), {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    write_manifest(manifest, work / "manifest.csv")
    report = prepare(work / "manifest.csv", work / "cache", size=size, workers=workers, progress=False)
    print(
        f"prepare: {report.n_total} images at {size} px, {workers} workers: {report.images_per_s:.1f} "
        f"images/s (decode + resize + hash), {report.n_leak_pairs} cross-split leak pairs"
    )
    return ImageCache.open(work / "cache")


def _search(cache: ImageCache) -> None:
    """Speed of hashing and of the pair search; the false pairs among different children."""
    rows = np.flatnonzero(cache.ok)[:500]
    start = time.perf_counter()
    for i in rows:
        nd.hash_row(cache.images[i], cache.original_shape(i), cache.fit)
    print(f"hashing (hash_row, 1 process): {len(rows) / (time.perf_counter() - start):.0f} rows/s")
    hashes = np.asarray(cache.hashes)
    start = time.perf_counter()
    cand = nd._candidates(hashes[:, : nd._COARSE_WORDS].copy(), nd.COARSE_THRESHOLD)
    t_coarse = time.perf_counter() - start
    pairs = nd.near_pairs(hashes)
    t_all = time.perf_counter() - start - t_coarse
    n = len(hashes)
    print(
        f"pair search, N={n} ({n * (n - 1) // 2:,} pairs): {t_all:.2f} s = {n / t_all:.0f} images/s "
        f"(coarse stage {t_coarse:.2f} s, {len(cand):,} candidates = {len(cand) / (n * (n - 1) / 2):.1%})"
    )
    patient = np.array([r.patient_id for r in cache.rows])
    other = patient[pairs[:, 0]] != patient[pairs[:, 1]]
    rate = other.sum() / (n * (n - 1) / 2)
    print(
        f"pairs within {nd.THRESHOLD} bits: {len(pairs)} ({int((~other).sum())} of one child, "
        f"{int(other.sum())} of different children: false-positive rate {rate:.1e} per pair)"
    )
    wide = nd.near_pairs(hashes, threshold=160)
    d = wide[patient[wide[:, 0]] != patient[wide[:, 1]], 2]
    print(f"  smallest distances between different children: {np.sort(d)[:10].tolist()}")
    start = time.perf_counter()
    leaks = nd.require_no_near_duplicates(cache, allow=True, option="(benchmark)")
    print(
        f"training-start check (stored pairs): {(time.perf_counter() - start) * 1000:.1f} ms, "
        f"{len(leaks)} leak message(s)"
    )


def _recall(data: Path, n: int, size: int, work: Path) -> None:
    """Recall of the copies through file -> read_xray -> hashes, for three places to hash."""
    files = sorted(data.rglob("*.jpeg"))
    rng = np.random.default_rng(0)
    chosen = [files[i] for i in rng.choice(len(files), size=min(n, len(files)), replace=False)]
    found: dict[str, dict[str, list[tuple[bool, int]]]] = {}
    start, n_hashed = time.perf_counter(), 0
    for k, path in enumerate(chosen):
        im = Image.open(path).convert("L")
        base = _hashes(read_xray(path).image, size)
        for name, transform in TRANSFORMS.items():
            copy = work / f"copy{k}.png"  # lossless: the JPEG transforms carry their own loss
            transform(im, rng).save(copy)
            other = _hashes(read_xray(copy).image, size)
            n_hashed += 1
            for where, h in base.items():
                pair = np.stack([h, other[where]])
                hit = len(nd.near_pairs(pair)) == 1
                dist = int(nd.fine_distance(pair[:1], pair[1:])[0])
                found.setdefault(where, {}).setdefault(name, []).append((hit, dist))
            copy.unlink()
    seconds = time.perf_counter() - start
    print(f"recall on {len(chosen)} images x {len(TRANSFORMS)} copies ({n_hashed / seconds:.1f} copies/s):")
    for where, per in found.items():
        print(f"  hashes of the {where}:")
        for name, results in per.items():
            hits = np.array([h for h, _ in results])
            dist = np.array([d for _, d in results])
            print(
                f"    {name:34s} recall {hits.mean():.3f}  fine distance median {np.median(dist):3.0f} "
                f"p95 {np.percentile(dist, 95):3.0f} max {dist.max():3d}"
            )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--data", type=Path, default=DEFAULT_DATA, help="Kermany's train folder (NORMAL, PNEUMONIA)"
    )
    p.add_argument("--n-recall", type=int, default=600, help="images republished for the recall")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2, help="prepare's processes")
    p.add_argument("--keep", type=Path, help="work in this folder (and keep the cache) instead of a temp one")
    args = p.parse_args()
    if not args.data.is_dir():
        raise SystemExit(f"{args.data}: no such folder; pass --data (Kermany's train folder)")
    torch.set_num_threads(1)  # as in prepare's workers
    print(
        f"hashes: {nd.HASH_WORDS * 8} bytes a row; near-duplicate when coarse <= {nd.COARSE_THRESHOLD} of 64 "
        f"and fine <= {nd.THRESHOLD} of 576 bits"
    )
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        cache = _prepare(args.data, work, args.size, args.workers)
        _search(cache)
        _recall(args.data, args.n_recall, args.size, work)


if __name__ == "__main__":
    main()
