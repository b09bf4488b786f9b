"""Segmentation training throughput (UNETR on ViT-S/16) against the bare encoder's training step.

    python benchmarks/bench_segment.py [--img 256] [--batch 16] [--steps 10] [--warmup 3] [--amp bf16]
                                       [--device auto] [--threads N]

Both measurements are one optimiser step on random data, with the same autocast, AdamW and batch:
- encoder: timm ViT forward + backward (loss = mean square of the tokens) + AdamW step, i.e. the cost
  floor of any fine-tuning of this encoder;
- segmentation: `SegmentationTask.training_step` (UNETR decoder + MONAI Dice-CE) + backward + AdamW.
The ratio segmentation / encoder images per second says how much the UNETR decoder costs on top.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from sscxr.models.loading import Normalization
from sscxr.models.unetr import SegmenterSpec, build_unetr
from sscxr.models.vit import ViTConfig, build_vit, vit_preset
from sscxr.tasks.segmentation import SegmentationTask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(step: Callable[[], None], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds per step (median-free: the mean over `steps` after `warmup` untimed ones)."""
    for _ in range(warmup):
        step()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    _sync(device)
    return (time.perf_counter() - start) / steps


def _trainer(
    model: torch.nn.Module, loss_of: Callable[[], torch.Tensor], device: torch.device, amp: bool
) -> Callable[[], None]:
    """One optimiser step: autocast forward, backward, AdamW."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=1e-5, fused=device.type == "cuda")

    def step() -> None:
        with torch.autocast(device.type, torch.bfloat16, enabled=amp):
            loss = loss_of()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def _encoder_step(vit: ViTConfig, x: torch.Tensor, device: torch.device, amp: bool) -> Callable[[], None]:
    encoder = build_vit(vit).to(device).train()
    return _trainer(encoder, lambda: encoder.forward_features(x).float().pow(2).mean(), device, amp)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--img", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--amp", choices=("bf16", "off"), default="bf16")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    a = p.parse_args()
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    )
    if a.threads:
        torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    vit = vit_preset("vit_small", img_size=a.img, drop_path_rate=0.1)
    amp = a.amp == "bf16"
    x = torch.randn(a.batch, 1, a.img, a.img, device=device)
    mask = (torch.rand(a.batch, 1, a.img, a.img, device=device) > 0.5).float()

    t_enc = _time(_encoder_step(vit, x, device, amp), a.steps, a.warmup, device)

    spec = SegmenterSpec(vit=vit, normalization=Normalization(0.5, 0.25))
    task = SegmentationTask(build_unetr(spec), spec).to(device).train()
    batch = {"image": x, "mask": mask}
    seg_step = _trainer(task, lambda: task.training_step(batch).loss, device, amp)
    t_seg = _time(seg_step, a.steps, a.warmup, device)

    n_enc = sum(p.numel() for p in task.model.encoder.parameters())
    n_all = sum(p.numel() for p in task.model.parameters())
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"cpu ({torch.get_num_threads()} thr)"
    )
    print(f"device {name}; ViT-S/16 at {a.img} px, batch {a.batch}, amp {a.amp}, {a.steps} timed steps")
    print(f"encoder step (fwd+bwd+AdamW): {a.batch / t_enc:8.1f} img/s  ({t_enc * 1e3:.0f} ms/step)")
    print(f"UNETR segmentation step:     {a.batch / t_seg:8.1f} img/s  ({t_seg * 1e3:.0f} ms/step)")
    print(
        f"ratio segmentation / encoder: {t_enc / t_seg:.3f}; parameters {n_all / 1e6:.1f} M "
        f"(encoder {n_enc / 1e6:.1f} M, decoder {(n_all - n_enc) / 1e6:.1f} M)"
    )


if __name__ == "__main__":
    main()
