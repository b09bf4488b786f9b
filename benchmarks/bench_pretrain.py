"""Speed of GMML pre-training against the bare timm ViT step, as model-FLOPs utilisation (MFU).

Prints, for ViT-S/16 at 256 px (by default), batch 16, bf16 autocast:
  * the bare timm ViT forward + backward + AdamW step (images/s, MFU);
  * the whole pre-training step of the config's method (GMML, or MAE with -c pretrain/mae_vit_s16)
    through the real engine (cache -> augmentation + corruption, in the
    loader or in the step as `--augment-on` says -> encoder -> decoder -> masked L1 -> AdamW), images/s
    and MFU, and the ratio of the two MFUs;
  * the data loader alone (images/s, both `augment_on` ways) and the run's peak memory.

FLOPs are counted with `torch.utils.flop_counter.FlopCounterMode` over one forward + backward (matmuls
and convolutions, the way MFU is usually defined), not estimated.

    python benchmarks/bench_pretrain.py                      # this CPU (peak: --peak-tflops 0.93)
    python benchmarks/bench_pretrain.py --device cuda --batch 256 --fused-attn --peak-tflops 989
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import default_collate
from torch.utils.flop_counter import FlopCounterMode

from sscxr.config import PretrainConfig, load_config
from sscxr.data.cache import ImageCache, prepare
from sscxr.data.datasets import GMMLDataset
from sscxr.engine.distributed import DistInfo, resolve_amp, resolve_device, to_device
from sscxr.engine.trainer import fit
from sscxr.models.vit import build_vit
from sscxr.synthetic import SynthConfig, generate_cohort
from sscxr.tasks.gmml import resolve_augment_on
from sscxr.tasks.methods import pretrain_method


def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float:
    """Forward + backward FLOPs of `model` on batch `x`, divided by the batch size."""
    counter = FlopCounterMode(display=False)
    with counter:
        model(x).float().mean().backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops() / x.shape[0]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _peak_side(device: torch.device) -> int:
    return 4096 if device.type == "cuda" else 1024


def matmul_peak(device: torch.device, dtype: torch.dtype | None) -> float:
    """Measured FLOP/s of a large matmul in `dtype` (float32 when None): the attainable peak here.

    4096 x 4096 on an accelerator; 1024 x 1024 on a CPU, where a 4096 one in bf16 without native kernels takes
    minutes (and 1024 is already large enough to reach the CPU's matmul peak)."""
    side = _peak_side(device)
    a = torch.randn(side, side, device=device, dtype=dtype or torch.float32)
    for _ in range(2):
        a @ a
    sync(device)
    n, t0 = 5, time.perf_counter()
    for _ in range(n):
        a @ a
    sync(device)
    return 2 * side**3 * n / (time.perf_counter() - t0)


def bare_step(
    cfg: PretrainConfig, device: torch.device, batch: int, steps: int, warmup: int
) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the fastest plain timm ViT training step at these settings."""
    model = build_vit(cfg.model).to(device)
    x = torch.randn(batch, 1, cfg.model.img_size, cfg.model.img_size, device=device)
    flops = flops_per_image(model, x)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    dtype = resolve_amp(cfg.train.amp, device)
    for i in range(warmup + steps):
        if i == warmup:
            sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = model(x).float().pow(2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    return batch * steps / (time.perf_counter() - t0), flops


def make_cache(root: Path, size: int, n: int) -> Path:
    manifest = generate_cohort(
        SynthConfig(n_adult=n, n_pediatric=0, size=size, seed=0), root / "cohort", progress=False
    )
    prepare(manifest, root / "cache", size=size, progress=False)
    return root / "cache"


def pretrain_step(
    cfg: PretrainConfig, device: torch.device, steps: int, warmup: int, run: Path
) -> tuple[float, float]:
    """(images/s, FLOPs per image) of the real engine's GMML step, measured after `warmup` steps."""
    task, train_set, _ = pretrain_method(cfg.method).build(cfg, seed=0, device=device)
    task.to(device)
    batch = to_device(default_collate([train_set[i] for i in range(4)]), device, keep=task.host_keys)
    counter = FlopCounterMode(display=False)
    with counter:  # the method's whole training step: MAE's encoder sees only the visible patches
        task.training_step(batch).loss.backward()
    task.zero_grad(set_to_none=True)
    flops = counter.get_total_flops() / 4
    cfg.train.max_steps = warmup + steps
    cfg.train.log_every = warmup if warmup else steps
    dist = DistInfo(device=device) if device.type == "cuda" else DistInfo()
    fit(task, train_set, None, cfg.train, cfg.optim, run, dist, None, resume=False, force=True)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = [r["metrics"] for r in records if r["split"] == "train"]
    # The first window holds the warm-up (allocator, loader start); the rest is steady state.
    steady = [m["train/img_per_s"] for m in train[1:]] or [train[-1]["train/img_per_s"]]
    return sum(steady) / len(steady), flops


def loader_speed(cfg: PretrainConfig, workers: int, batches: int, deferred: bool) -> float:
    """Images/s of the GMML loader alone: cache read and draws, plus, unless `deferred` (augment_on
    "step"), the augmentation and corruption that "step" leaves to the training step."""
    cache = ImageCache.open(cfg.data.cache)
    ds = GMMLDataset(
        cache,
        cache.indices(),
        cfg.gmml.corruption,
        cfg.model.patch_size,
        cfg.data.augment,
        seed=0,
        deferred=deferred,
    )
    loader = torch.utils.data.DataLoader(
        ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers, drop_last=True
    )
    n, t0 = 0, time.perf_counter()
    while n < batches:
        for _ in loader:
            n += 1
            if n == batches:
                break
    return batches * cfg.train.batch_size / (time.perf_counter() - t0)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-c", "--config", default="pretrain/gmml_vit_s16", help="e.g. pretrain/mae_vit_s16")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: 0 on CPU, 8 on GPU)")
    p.add_argument("--fused-attn", action="store_true", help="fused SDPA attention (GPUs); off on CPUs")
    p.add_argument("--amp", default="bf16", help="bf16 | fp16 | off | auto (default bf16, as the issue asks)")
    p.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak (default: 0.93 for this CPU)")
    p.add_argument("--only", choices=["bare", "pretrain", "loader"], default=None)
    p.add_argument("--augment-on", default="auto", help="gmml.augment_on: auto | loader | step")
    p.add_argument("--compile", action="store_true", help="train.compile=true for the GMML step")
    args = p.parse_args()

    device = resolve_device(args.device, 0)
    workers = args.workers if args.workers is not None else (8 if device.type == "cuda" else 0)
    peak = (args.peak_tflops or (0.93 if device.type == "cpu" else 989.0)) * 1e12
    with tempfile.TemporaryDirectory() as tmp:
        cache = make_cache(Path(tmp), args.size, n=max(64, 2 * args.batch))
        cfg = load_config(
            PretrainConfig,
            [args.config],
            [
                f"data.cache={cache}",
                f"model.img_size={args.size}",
                f"train.batch_size={args.batch}",
                f"train.workers={workers}",
                f"model.fused_attn={str(args.fused_attn).lower()}",
                "train.progress=false",
                "train.checkpoint_every=0",
                "train.epochs=1000",
                f"train.amp={args.amp}",
                f"gmml.augment_on={args.augment_on}",
                f"train.compile={str(args.compile).lower()}",
            ],
        )
        dtype = resolve_amp(args.amp, device)
        measured = matmul_peak(device, dtype)
        print(
            f"device {device}, threads {torch.get_num_threads()}, amp {dtype}, "
            f"batch {args.batch}, {args.size} px, fused_attn {args.fused_attn}, loader workers {workers}, "
            f"augment_on {resolve_augment_on(args.augment_on)}, compile {args.compile}"
        )
        print(
            f"MFU against the stated peak {peak / 1e12:.3f} TFLOP/s; measured {measured / 1e12:.3f} TFLOP/s "
            f"for a {_peak_side(device)}^3 matmul in {dtype or torch.float32} (MFU vs it in brackets)"
        )
        results = {}
        if args.only in (None, "bare"):
            ips, flops = bare_step(cfg, device, args.batch, args.steps, args.warmup)
            results["bare"] = (ips, flops)
            print(
                f"bare timm ViT step : {ips:7.2f} img/s, {flops / 1e9:6.1f} GFLOP/img, "
                f"MFU {ips * flops / peak:6.1%} ({ips * flops / measured:6.1%})"
            )
        if args.only in (None, "pretrain"):
            ips, flops = pretrain_step(cfg, device, args.steps, args.warmup, Path(tmp) / "run")
            results["pretrain"] = (ips, flops)
            print(
                f"{cfg.method.upper():4s} pre-train step: {ips:7.2f} img/s, {flops / 1e9:6.1f} GFLOP/img, "
                f"MFU {ips * flops / peak:6.1%} ({ips * flops / measured:6.1%})"
            )
        if len(results) == 2:
            (bi, bf), (pi, pf) = results["bare"], results["pretrain"]
            print(f"MFU ratio pre-train / bare: {(pi * pf) / (bi * bf):.3f}")
        if args.only in (None, "loader") and cfg.method == "gmml":  # the GMML loader, both ways
            for name, deferred in (("loader", False), ("step", True)):
                ips = loader_speed(cfg, workers, batches=max(8, args.steps), deferred=deferred)
                print(f"data loader alone  : {ips:7.1f} img/s ({workers} workers, augment_on {name})")
        if device.type == "cuda":
            print(f"peak GPU memory    : {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")
        print(f"peak host memory   : {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB")


if __name__ == "__main__":
    main()
