"""Where GMML's augmentation and corruption should run: in the loader (per sample) or in the step (batched).

    python benchmarks/bench_gmml_pipeline.py [--cache DIR] [--size 256] [--n 256] [--batch 64] [--device cuda]

For `gmml.augment_on` "loader" and "step", prints:
- the loader's CPU cost per sample (fetching and collating shuffled batches: what each DataLoader
  worker spends; plus completing them in the training process: the deferred batches' pixels are
  gathered there), as images/s per core, and the bytes a sample ships from the worker;
- images/s through one real persistent worker process (the shared-memory hand-over included), and the
  training process's CPU time per sample;
- the step's cost per batch of `GMMLViews` on each device (the work "step" moves out of the workers);
- images/s through a DataLoader with `num_workers=0` feeding the step's views, on the CPU: the whole
  pipeline cost when loader and step share the same cores (`augment_on: auto` is "step" everywhere,
  from whole pre-training runs measured both ways: docs/pretraining.md).
Without `--cache`, a cache of smooth 16-bit test images is generated in a temporary folder.
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, default_collate

from sscxr.data.cache import ImageCache, prepare
from sscxr.data.corruption import CorruptionConfig
from sscxr.data.datasets import GMML_HOST_KEYS, GMMLDataset
from sscxr.data.transforms import AugmentConfig
from sscxr.engine.distributed import to_device
from sscxr.engine.sampler import ShardedSampler, TensorRing, build_loader


def _make_cache(folder: Path, n: int, size: int) -> Path:
    """n generated 16-bit images at `size` px, prepared into `folder/cache`."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    rows = []
    for i in range(n):
        body = 0.5 + 0.3 * np.sin(5 * xx + rng.uniform(0, 3)) * np.cos(3 * yy)
        noisy = np.clip(body + 0.03 * rng.standard_normal((size, size), dtype=np.float32), 0, 1)
        Image.fromarray((noisy * 65535).astype(np.uint16)).save(folder / f"{i}.png")
        rows.append([f"{i}.png", "", f"p{i}", "bench", "train"])
    with open(folder / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split"])
        w.writerows(rows)
    prepare(folder / "m.csv", folder / "cache", size=size, workers=0, progress=False)
    return folder / "cache"


def _median_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def _nbytes(sample: dict[str, torch.Tensor]) -> int:
    return sum(v.numel() * v.element_size() for v in sample.values())


def _touch(batch: dict[str, torch.Tensor]) -> int:
    """Read one value per 4 KiB page of the batch's images; its size."""
    for key in ("pixels", "donor_pixels", "image", "corrupted"):
        if key in batch:
            flat = batch[key].reshape(-1)
            flat[:: 4096 // flat.element_size()].sum()
    return batch["index"].shape[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cache", type=Path, default=None)
    p.add_argument("--size", type=int, default=256, help="image size of the generated cache")
    p.add_argument("--n", type=int, default=256, help="images in the generated cache")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--patch", type=int, default=16)
    p.add_argument("--device", action="append", default=None, help="devices for the step (default: cpu)")
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        cache = ImageCache.open(args.cache or _make_cache(Path(tmp), args.n, args.size))
        idx = cache.indices()
        kw = dict(corruption_cfg=CorruptionConfig(), patch_size=args.patch, augment=AugmentConfig(), seed=0)
        loader_ds = GMMLDataset(cache, idx, **kw)
        step_ds = GMMLDataset(cache, idx, deferred=True, **kw)
        n = min(len(idx), 4 * args.batch)
        print(
            f"cache {cache.root} : {len(idx)} images at {cache.size} px, batch {args.batch}, "
            f"{torch.get_num_threads()} threads"
        )
        # What one loader worker does per batch: fetch it (`fetch_batch`, in shuffled order as in
        # training; collating included); then what the training process adds (`complete_batch`: the
        # deferred batches' pixels, gathered from the cache). Per sample, and as images/s of one core.
        order = np.random.default_rng(0).permutation(len(idx))[:n].tolist()
        for name, ds in (("loader", loader_ds), ("step", step_ds)):
            fetched = [ds.fetch_batch(order[s : s + args.batch]) for s in range(0, n, args.batch)]

            def fetch(ds: GMMLDataset = ds) -> None:
                for s in range(0, n, args.batch):
                    ds.fetch_batch(order[s : s + args.batch])

            ring = TensorRing()  # reused buffers, as the engine's loader uses on a CPU

            def complete(ds: GMMLDataset = ds, fetched: list = fetched, ring: TensorRing = ring) -> None:
                for batch in fetched:
                    ds.complete_batch(batch, ring.empty)

            worker = _median_seconds(fetch, 5, lambda: None) / n
            main = _median_seconds(complete, 5, lambda: None) / n
            print(
                f"augment_on={name:6s} CPU per sample: worker {worker * 1e3:6.3f} ms + training process "
                f"{main * 1e3:6.3f} ms ({1 / (worker + main):6.0f} images/s per core), the worker ships "
                f"{sum(v.nbytes for v in fetched[0].values()) / args.batch / 1024:7.2f} KiB"
            )
        # The same through one real worker process (shared-memory hand-over included); the training
        # process completes the batches and reads every page of their pixels once, as the step will
        # (a page received from a worker is mapped on that first read). Its CPU time per sample too.
        for name, ds in (("loader", loader_ds), ("step", step_ds)):
            sampler = ShardedSampler(len(ds), shuffle=True, drop_last=True)
            kw_loader = dict(workers=1, seed=0, pin_memory=False, drop_last=True, persistent=True)
            loader = build_loader(ds, sampler, args.batch, **kw_loader)
            rates, cpu = [], []
            for _ in range(4):  # the first epoch starts the (persistent) worker: not counted
                t0, c0 = time.perf_counter(), time.process_time()
                count = sum(_touch(batch) for batch in loader)
                rates.append(count / (time.perf_counter() - t0))
                cpu.append((time.process_time() - c0) / count)
            print(
                f"augment_on={name:6s} one worker process: {np.median(rates[1:]):8.0f} images/s "
                f"(median of 3 epochs after the first, {rates[0]:.0f} with the worker's start); "
                f"training process CPU {np.median(cpu[1:]) * 1e3:.3f} ms per sample"
            )
        raw = default_collate([step_ds[k] for k in range(args.batch)])
        for dev_name in args.device or ["cpu"]:
            dev = torch.device(dev_name)
            sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
            moved = to_device(raw, dev, keep=GMML_HOST_KEYS)
            t = _median_seconds(lambda moved=moved: step_ds.views(moved), 5, sync)
            print(
                f"augment_on=step   GMMLViews on {dev_name}: {t * 1e3:8.2f} ms per batch of {args.batch} "
                f"({t / args.batch * 1e3:.3f} ms per image)"
            )
        # The whole data path on the CPU with the loader in the training process (num_workers=0).
        for name, ds in (("loader", loader_ds), ("step", step_ds)):
            loader = DataLoader(ds, batch_size=args.batch, shuffle=True, num_workers=0, drop_last=True)

            def epoch(loader: DataLoader = loader, ds: GMMLDataset = ds) -> int:
                count = 0
                for batch in loader:
                    out = ds.views(batch)
                    count += out["image"].shape[0]
                return count

            t0 = time.perf_counter()
            count = epoch()
            rate = count / (time.perf_counter() - t0)
            print(f"augment_on={name:6s} CPU data path (num_workers=0, views included): {rate:8.1f} images/s")


if __name__ == "__main__":
    main()
