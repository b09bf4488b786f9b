"""Fine-tuning throughput: the engine's classification step against a bare timm ViT training step.

    python benchmarks/bench_finetune.py [--steps 20] [--log-every 5] [--batch 16] [--size 256]
                                        [--amp bf16] [--device auto] [--threads N]

Both sides train the same ViT-S/16 classifier (1 channel, 2 classes, drop path 0.1) at the same batch,
size and precision:
- bare: `build_vit` + timm's head, random batch already on the device, forward -> cross-entropy ->
  backward -> fused AdamW step; timed between device synchronisations after warm-up steps.
- engine: `sscxr.engine.fit` on a `ClassificationTask`, fed by the engine's own DataLoader from an
  in-memory dataset of random images (so the data pipeline is not what is measured). Throughput is the
  engine's own `train/img_per_s` of each logging window, the first window (warm-up) dropped. It includes
  everything the engine adds per step: lr/wd schedule, gradient-norm, finite-loss check (one host sync),
  logging, the in-model standardisation, batch transfer.

Prints images/s for each and the ratio engine / bare (target >= 0.90).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.distributed import DistInfo, resolve_amp, resolve_device
from sscxr.engine.trainer import fit
from sscxr.models.classifier import ViTClassifier
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.classification import ClassificationTask
from sscxr.tasks.labels import TASKS


class RandomImages(Dataset[dict[str, torch.Tensor]]):
    """`n` fixed random images (1, S, S) in [0, 1] with binary labels, held in memory."""

    def __init__(self, n: int, size: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(n, 1, size, size, generator=g)
        self.labels = torch.randint(0, 2, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": self.images[i], "label": self.labels[i], "index": torch.tensor(i)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare_step_rate(cfg: ViTConfig, batch: int, steps: int, warmup: int, device: torch.device,
                   amp: torch.dtype | None) -> float:  # fmt: skip
    """Images/s of a plain timm training step (forward, loss, backward, fused AdamW)."""
    torch.manual_seed(0)
    model = build_vit(cfg)
    model.reset_classifier(2)
    model.to(device).train()
    fused = device.type in ("cuda", "cpu")
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=0.05, fused=fused)
    x = torch.rand(batch, 1, cfg.img_size, cfg.img_size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    for i in range(warmup + steps):
        if i == warmup:
            _sync(device)
            t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    _sync(device)
    return steps * batch / (time.perf_counter() - t0)


def engine_step_rate(cfg: ViTConfig, batch: int, steps: int, log_every: int, device: torch.device,
                     amp_mode: str) -> float:  # fmt: skip
    """Images/s of the engine training a ClassificationTask (first logging window dropped)."""
    torch.manual_seed(0)
    task_map = TASKS["covid_vs_noncovid"]
    task = ClassificationTask(ViTClassifier(build_vit(cfg), task_map.class_names), cfg, task_map)
    total = log_every + steps
    data = RandomImages(batch * total, cfg.img_size)
    train = TrainConfig(epochs=1, batch_size=batch, amp=amp_mode, workers=0, log_every=log_every,
                        checkpoint_every=0, progress=False, max_steps=total)  # fmt: skip
    optim = OptimConfig(lr=5e-4, warmup_epochs=0, weight_decay=0.05, weight_decay_end=None, clip_grad=None)
    with tempfile.TemporaryDirectory() as run_dir:
        fit(task, data, None, train, optim, run_dir, DistInfo(device=device), None, resume=False)
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    rates = [r["metrics"]["train/img_per_s"] for r in records if r["split"] == "train"][1:]
    n = len(rates)
    return n / sum(1.0 / r for r in rates)  # equal-step windows: harmonic mean = total images / time


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20, help="timed steps (a multiple of --log-every)")
    p.add_argument("--log-every", type=int, default=5, help="engine logging window = warm-up steps")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--amp", default="bf16", choices=("bf16", "fp16", "off"))
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--repeat", type=int, default=1, help="alternate bare / engine this many times")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device, 0)
    amp = resolve_amp(args.amp, device)
    cfg = ViTConfig(
        img_size=args.size, patch_size=16, embed_dim=384, depth=12, num_heads=6, drop_path_rate=0.1
    )
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu x{torch.get_num_threads()}"
    print(f"ViT-S/16 {args.size}px, batch {args.batch}, amp {args.amp}, {name}, {args.steps} timed steps")
    for _ in range(args.repeat):
        bare = bare_step_rate(cfg, args.batch, args.steps, args.log_every, device, amp)
        eng = engine_step_rate(cfg, args.batch, args.steps, args.log_every, device, args.amp)
        print(f"bare timm step {bare:8.1f} img/s | engine fine-tuning step {eng:8.1f} img/s | "
              f"ratio {eng / bare:.3f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
