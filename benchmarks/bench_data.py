"""Throughput of the data pipeline: `prepare` on 2048 px PNGs and DICOMs, then DataLoader images/s.

    python benchmarks/bench_data.py [--n 64] [--side 2048] [--size 256] [--workers N] [--keep DIR]

Prints one line per measurement. Inputs are generated (smooth gradients + noise, 16-bit), so the
numbers measure decoding / resizing / loading, not any real dataset's quirks.
"""

from __future__ import annotations

import argparse
import csv
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader

from sscxr.data.cache import ImageCache, prepare
from sscxr.data.corruption import CorruptionConfig
from sscxr.data.datasets import CachedDataset, GMMLDataset
from sscxr.data.transforms import AugmentConfig


def _pixels(side: int, rng: np.random.Generator) -> np.ndarray:
    """(side, side) uint16 with 12 bits used: a smooth 'chest' plus detector noise."""
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    body = 0.5 + 0.3 * np.sin(5 * xx + rng.uniform(0, 3)) * np.cos(3 * yy)
    noisy = body + 0.03 * rng.standard_normal((side, side), dtype=np.float32)
    return (np.clip(noisy, 0, 1) * 4095).astype(np.uint16)


def _write_dicom(path: Path, pixels: np.ndarray) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.Rows, ds.Columns = "DX", *pixels.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.PixelSpacing = [0.14, 0.14]
    ds.PixelData = pixels.tobytes()
    ds.save_as(str(path), enforce_file_format=True)


def _dataset(folder: Path, kind: str, n: int, side: int) -> Path:
    """Write n images of one kind ("png" or "dcm") and their manifest; returns the manifest path."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        name = f"{kind}_{i:04d}.{kind}"
        if kind == "png":
            Image.fromarray(_pixels(side, rng)).save(folder / name, compress_level=6)
        else:
            _write_dicom(folder / name, _pixels(side, rng))
        rows.append([name, "healthy", f"p{i}", "bench", "train", ""])
    manifest = folder / "manifest.csv"
    with open(manifest, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split", "mask_path"])
        w.writerows(rows)
    return manifest


def _loader_rate(ds: torch.utils.data.Dataset, workers: int, batch: int, epochs: int = 2) -> float:
    loader = DataLoader(
        ds,
        batch_size=batch,
        shuffle=True,
        num_workers=workers,
        drop_last=False,
        generator=torch.Generator().manual_seed(0),
    )
    n, start = 0, 0.0
    for epoch in range(epochs + 1):  # epoch 0 warms up (worker start, page cache)
        if epoch == 1:
            start = time.perf_counter()
        ds.set_epoch(epoch)  # type: ignore[attr-defined]
        for b in loader:
            n += b["image"].shape[0] if epoch else 0
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=64)
    p.add_argument("--side", type=int, default=2048)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--workers", type=int, default=None, help="prepare processes (default: all cores)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--keep", type=Path, default=None, help="work here instead of a temporary folder")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or Path(tmp)
        cores = args.workers or len(os.sched_getaffinity(0))
        caches = {}
        for kind in ("png", "dcm"):
            manifest = _dataset(work / kind, kind, args.n, args.side)
            caches[kind] = work / f"cache_{kind}"
            report = prepare(
                manifest, caches[kind], size=args.size, workers=args.workers, progress=False, overwrite=True
            )
            print(
                f"prepare {kind:3s} {args.side}px -> {args.size}px, {cores} workers: "
                f"{report.images_per_s:7.1f} images/s ({report.n_done} in {report.seconds:.1f} s)"
            )
        cache = ImageCache.open(caches["png"])
        idx = cache.indices()
        datasets = {
            "CachedDataset+augment": CachedDataset(
                cache, idx, augment=AugmentConfig(), normalize=cache.stats
            ),
            "GMMLDataset+augment": GMMLDataset(
                cache, idx, CorruptionConfig(), patch_size=16, augment=AugmentConfig()
            ),
        }
        for name, ds in datasets.items():
            for workers in (0, 2):
                rate = _loader_rate(ds, workers, args.batch)
                print(
                    f"loader {name:22s} {args.size}px batch {args.batch} num_workers={workers}: "
                    f"{rate:7.1f} images/s"
                )


if __name__ == "__main__":
    main()
