"""GMML pre-training as a Task for the one training engine.

Every random draw of a sample (donor, augmentation, corruption) is made in the data pipeline
(`GMMLDataset`), seeded by (seed, epoch, index): each sample's corruption is then independent of which
rank or batch it lands in, so N processes compute exactly what one process computes with the same
global batch, and a resumed run continues bit for bit. Where the draws are *applied* is
`gmml.augment_on`: in the loader workers, or in the training step on the training device (`GMMLViews`),
which is what keeps a GPU busy. The task then runs the model and the masked L1 loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import default_collate

from sscxr.data.corruption import CorruptionConfig
from sscxr.data.datasets import GMML_HOST_KEYS, GMMLDataset, GMMLViews
from sscxr.errors import ConfigError
from sscxr.models.gmml import GMMLModel, default_recon_blocks, masked_l1_loss
from sscxr.models.loading import Normalization
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.base import Batch, StepOutput, reduce_sum_async
from sscxr.tasks.common import open_cache
from sscxr.tasks.pretraining import PretrainingTask, pretraining_rows

if TYPE_CHECKING:
    from sscxr.config import PretrainConfig

__all__ = ["GMMLConfig", "GMMLTask", "build_pretraining", "resolve_augment_on"]


@dataclass
class GMMLConfig:
    """GMML-specific settings (the `gmml:` section of a pre-training config; `../shared/GMML.md`)."""

    corruption: CorruptionConfig = field(default_factory=CorruptionConfig)
    recon_blocks: list[int] | None = None  # 1-based; None = (6, 8, 10, 12) for depth 12, evenly spaced else
    decoder_hidden: int = 2048
    decoder_bottleneck: int = 256
    # Only images from these splits are used for pre-training (GMML needs no labels, but images of
    # the test sets must never be seen, or the test results would be optimistic).
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    n_vis: int = 8  # images in the per-epoch reconstruction grid
    # Keep an encoder export every N epochs in `snapshots/epoch_NNN` (0 = only the final one), so
    # frozen-feature quality can be measured against pre-training time (`sscxr probe` on each).
    snapshot_every: int = 0
    # Where the drawn augmentation and corruption are applied: "loader" (in the DataLoader workers,
    # per sample), "step" (in the training step on the training device, batched; the loader then
    # ships uint16 pixels and the draws) or "auto" ("step"; docs/pretraining.md says why).
    augment_on: str = "auto"


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class GMMLTask(PretrainingTask):
    """Group-masked model learning: reconstruct the corrupted pixels of an X-ray.

    Args:
        model: the encoder + light decoder.
        vit_cfg: the encoder's architecture (written next to the exported weights).
        normalization: the intensity standardisation the model was trained with.
        vis_batch: a fixed batch (`image`, `corrupted`, `mask`: (N, 1, H, W)) drawn each epoch.
        extra_export: metadata stored with the exported encoder (data manifest hash, ...).
        snapshot_every: export the encoder every N epochs (0: never).
        align: pixels per corruption cell of deferred batches (default: the patch size).

    Batches may be finished samples or deferred ones (`GMMLDataset(deferred=True)`); deferred ones are
    finished on the step's device first. "kind", "noise_seed" and the warps stay on the host
    (`host_keys`).
    """

    method = "gmml"
    metric = "recon_l1"
    host_keys = GMML_HOST_KEYS

    def __init__(
        self,
        model: GMMLModel,
        vit_cfg: ViTConfig,
        normalization: Normalization,
        vis_batch: Batch | None = None,
        extra_export: dict[str, Any] | None = None,
        snapshot_every: int = 0,
        align: int | None = None,
    ) -> None:
        super().__init__(vit_cfg, normalization, extra_export, snapshot_every)
        self.views = GMMLViews((normalization.mean, normalization.std), align or vit_cfg.patch_size)
        self.model = model
        self.vis_batch = vis_batch

    def _loss(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mask = batch["mask"].bool()
        # Normalise by the global masked-pixel count (over all ranks) divided by the world size: DDP's
        # gradient averaging then yields exactly the single-process gradient of the global batch. The
        # count is an exact integer sum, never summed in the model's (bf16) dtype: 8 mantissa bits
        # would put a relative error of up to 4e-3 on every loss. Its all-reduce runs during the
        # forward pass, so no rank waits for it.
        count = reduce_sum_async(mask.sum().to(torch.float64))
        pred = self.model(batch["corrupted"])
        denominator = count().float() / _world_size()
        loss = masked_l1_loss(pred.float(), batch["image"].float(), mask, denominator=denominator)
        return loss, pred

    def training_step(self, batch: Batch) -> StepOutput:
        self._started()
        batch = self.views(batch)
        loss, _ = self._loss(batch)
        return StepOutput(loss=loss, logs={"loss": loss.detach(), "mask_frac": batch["mask"].float().mean()})

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> None:
        batch = self.views(batch)
        pred = self.model(batch["corrupted"]).float()
        mask = batch["mask"].float()
        self._accumulate(float(((pred - batch["image"].float()).abs() * mask).sum()), float(mask.sum()))

    @torch.no_grad()
    def write_picture(self, run_dir: Path, epoch: int) -> None:
        if self.vis_batch is None:
            return
        # Imported here: `sscxr.config` imports `GMMLConfig` from this module, and matplotlib (0.6 s)
        # is only needed for the picture.
        from sscxr.viz.recon import reconstruction_grid

        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        vis = {k: v.to(device) for k, v in self.vis_batch.items()}
        recon = self.model(vis["corrupted"]).float()
        self.train(was_training)
        as_np = {k: v[:, 0].float().cpu().numpy() for k, v in vis.items()}
        reconstruction_grid(
            as_np["image"],
            as_np["corrupted"],
            recon[:, 0].cpu().numpy(),
            as_np["mask"] > 0.5,
            run_dir / "recon" / f"epoch_{epoch + 1:03d}.png",
            title=f"GMML reconstruction, epoch {epoch + 1}",
        )


def _check_recon_blocks(blocks: list[int], depth: int) -> None:
    """The decoder must read blocks that exist, and the last one: blocks above the highest one read get
    no gradient, so they would be exported untrained (and DDP would wait for their gradients)."""
    bad = [b for b in blocks if not 1 <= b <= depth]
    if bad or not blocks:
        raise ConfigError(f"gmml.recon_blocks {blocks}: blocks are 1..{depth} (model.depth={depth})")
    if max(blocks) != depth:
        raise ConfigError(
            f"gmml.recon_blocks {blocks} stop before the last block ({depth}): blocks {max(blocks) + 1}.."
            f"{depth} would get no gradient and be exported untrained; include {depth}, or set "
            f"model.depth={max(blocks)}"
        )


AUGMENT_ON = ("auto", "loader", "step")


def resolve_augment_on(value: str) -> str:
    """`gmml.augment_on` resolved: "loader" or "step".

    "auto" is "step" everywhere: on accelerators a GPU outruns the loader workers that would feed it
    finished samples; on CPUs the batched finishing in the step costs less than finishing each sample
    in the loader (the demo's pre-training took 0.91x the time with no loader worker and 0.93x with one,
    on a 2-core Intel Xeon; docs/pretraining.md).
    """
    if value not in AUGMENT_ON:
        raise ConfigError(f"gmml.augment_on={value!r}: choose one of {', '.join(AUGMENT_ON)}")
    return "step" if value == "auto" else value


def build_pretraining(
    cfg: PretrainConfig, seed: int, device: torch.device | None = None
) -> tuple[GMMLTask, GMMLDataset, GMMLDataset | None]:
    """Build the GMML task and its train/val datasets from a prepared cache.

    Args:
        cfg: the resolved pre-training config.
        seed: base seed of the per-sample randomness (augmentation, corruption, donors).
        device: where training runs (the methods' common signature; GMML's datasets do not use it).

    Returns:
        (task, train_set, val_set); val_set is None when the cache has no images in `data.val_split`.
        With `augment_on` "step" the datasets are deferred (`GMMLDataset(deferred=True)`).

    Raises:
        ConfigError: `gmml.recon_blocks` outside 1..depth, or not reaching the last block; an unknown
            `gmml.augment_on`.
    """
    blocks = cfg.gmml.recon_blocks or list(default_recon_blocks(cfg.model.depth))
    _check_recon_blocks(blocks, cfg.model.depth)
    deferred = resolve_augment_on(cfg.gmml.augment_on) == "step"
    cache = open_cache(cfg.data.cache, cfg.model.img_size, cfg.data.allow_leakage)
    mean, std = cache.stats
    norm = Normalization(mean=float(mean), std=float(std))
    train_idx, val_idx = pretraining_rows(
        cache, str(cfg.data.cache), cfg.gmml.splits, cfg.data.val_split, "gmml"
    )

    def dataset(indices: np.ndarray, augment: bool, deferred: bool = deferred) -> GMMLDataset:
        return GMMLDataset(
            cache,
            np.sort(indices),
            corruption_cfg=cfg.gmml.corruption,
            patch_size=cfg.model.patch_size,
            augment=cfg.data.augment if augment else None,
            seed=seed,
            normalize=(norm.mean, norm.std),
            deferred=deferred,
        )

    train_set = dataset(train_idx, augment=True)
    val_set = dataset(val_idx, augment=False) if len(val_idx) else None
    # The picture's few images are finished here, whatever the training pipeline.
    vis_source = dataset(val_idx if len(val_idx) else train_idx, augment=False, deferred=False)
    vis_batch = default_collate([vis_source[k] for k in range(min(cfg.gmml.n_vis, len(vis_source)))])
    vis_batch = {k: v for k, v in vis_batch.items() if k in ("image", "corrupted", "mask")}

    encoder = build_vit(cfg.model)
    model = GMMLModel(
        encoder, recon_blocks=blocks, hidden=cfg.gmml.decoder_hidden, bottleneck=cfg.gmml.decoder_bottleneck
    )
    extra = {"cache": str(cfg.data.cache), "manifest_hash": cache.manifest_hash}
    task = GMMLTask(model, cfg.model, norm, vis_batch, extra, cfg.gmml.snapshot_every, align=train_set.align)
    return task, train_set, val_set
