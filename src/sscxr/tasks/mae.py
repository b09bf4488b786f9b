"""MAE pre-training (masked autoencoders, He et al. 2022) as a Task for the one training engine.

The second pre-training method beside GMML, on the same encoder, cache, standardisation and export: only
the pretext task differs. Every random draw of a sample (its augmentation, then the per-patch noise that
decides its mask) comes from one numpy generator seeded by (seed, epoch, row) in the dataset
(`MAEDataset`), so a sample's mask does not depend on its batch, rank or loader worker: N processes
compute what one process computes with the same global batch, and a resumed run continues bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
import torch
from torch.utils.data import default_collate

from sscxr.data.cache import ImageCache
from sscxr.data.datasets import CachedDataset, Sample, finish_view
from sscxr.data.transforms import AugmentConfig, draw_augment_numpy
from sscxr.errors import ConfigError
from sscxr.models.loading import Normalization
from sscxr.models.mae import NORM_PIX_EPS, MAEModel, num_visible, patch_mse, patchify, unpatchify
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.base import Batch, StepOutput
from sscxr.tasks.common import open_cache
from sscxr.tasks.pretraining import PretrainingTask, pretraining_rows

if TYPE_CHECKING:
    from sscxr.config import DataConfig
    from sscxr.engine.config import OptimConfig, TrainConfig

__all__ = ["MAEConfig", "MAEDataset", "MAETask", "build_mae"]


@dataclass
class MAEConfig:
    """MAE-specific settings (the `mae:` section of a pre-training config).

    Attributes:
        mask_ratio: fraction of the patches hidden from the encoder (paper: 0.75). Every image keeps
            exactly `int(L * (1 - mask_ratio))` patches visible (L patches per image).
        decoder_dim: width of the light decoder. Defaults for ViT-S/16: 256 wide, 4 blocks, 8 heads
            (the paper's ViT-B/L decoder is 512 wide with 8 blocks and 16 heads; a narrower, shallower
            one suits the 384-wide ViT-S).
        decoder_depth: decoder transformer blocks.
        decoder_heads: decoder attention heads (`decoder_dim` must be a multiple of it, and a multiple
            of 4 for the decoder's fixed 2-D sin-cos position embeddings).
        norm_pix_loss: targets are each patch normalised by its own mean and variance (eps 1e-6): the
            paper's better target for representations. False: the standardised pixels themselves.
        splits: only images of these splits are used for pre-training (as `gmml.splits`: no labels are
            needed, but test images must never be seen).
        n_vis: images in the per-epoch reconstruction picture (`recon/epoch_NNN.png`).
        snapshot_every: keep an encoder export every N epochs in `snapshots/epoch_NNN` (0 = only the final
            one), to measure frozen-feature quality against pre-training time.
    """

    mask_ratio: float = 0.75
    decoder_dim: int = 256
    decoder_depth: int = 4
    decoder_heads: int = 8
    norm_pix_loss: bool = True
    splits: list[str] = field(default_factory=lambda: ["train", "val"])
    n_vis: int = 8
    snapshot_every: int = 0

    def __post_init__(self) -> None:
        if not 0.0 < self.mask_ratio < 1.0:
            raise ConfigError(f"mae.mask_ratio must be in (0, 1) (got {self.mask_ratio})")
        for name in ("decoder_dim", "decoder_depth", "decoder_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"mae.{name} must be >= 1 (got {getattr(self, name)})")
        if self.decoder_dim % self.decoder_heads or self.decoder_dim % 4:
            raise ConfigError(
                f"mae.decoder_dim ({self.decoder_dim}) must be a multiple of mae.decoder_heads "
                f"({self.decoder_heads}) and of 4 (sin-cos position embeddings)"
            )
        if self.n_vis < 0 or self.snapshot_every < 0:
            raise ConfigError("mae.n_vis and mae.snapshot_every must be >= 0")


class MAERunConfig(Protocol):
    """What `build_mae` reads: a `PretrainConfig` with an `mae` section."""

    data: DataConfig
    model: ViTConfig
    optim: OptimConfig
    train: TrainConfig
    mae: MAEConfig


class MAEDataset(CachedDataset):
    """MAE pre-training samples: an augmented, standardised image and the noise that decides its mask.

    Per sample, from one numpy generator (`sample_rng`: `np.random.default_rng([seed, epoch, row])`) and
    in this order: the augmentation's draws (`draw_augment_numpy`, only when augmenting), then L uniforms,
    one per patch: the mask noise. A sample is therefore a pure function of (seed, epoch, row).

    Args:
        cache, indices, augment, seed: as `CachedDataset`.
        patch_size: the ViT's patch size (L = (S / patch_size) ** 2 patches).
        normalize: (mean, std) to standardise with; None = the cache's own statistics.

    `dataset[k]`: "image" (1, S, S) float32 standardised, "mask_noise" (L,) float32 in [0, 1),
    "index" () long (the cache row).
    """

    def __init__(
        self,
        cache: ImageCache,
        indices: Sequence[int] | np.ndarray,
        patch_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        normalize: tuple[float, float] | None = None,
    ) -> None:
        super().__init__(
            cache,
            indices,
            augment=augment,
            seed=seed,
            normalize=cache.stats if normalize is None else normalize,
        )
        if patch_size < 1 or cache.size % patch_size:
            raise ValueError(f"cache size {cache.size} is not divisible by the patch size {patch_size}")
        self.patch_size = patch_size
        self.num_patches = (cache.size // patch_size) ** 2

    def __getitem__(self, k: int) -> Sample:
        row = int(self.indices[k])
        rng = self.sample_rng(k)
        image = torch.from_numpy(self.cache.image_float(row))[None, None]  # (1, 1, S, S)
        size = self.cache.size
        params = None if self.augment_cfg is None else draw_augment_numpy(rng, self.augment_cfg, size, size)
        noise = torch.from_numpy(rng.random(self.num_patches).astype(np.float32))
        assert self.normalize is not None  # always set (the cache's statistics by default)
        image = finish_view(image, params, self.normalize)[0]
        return {"image": image, "mask_noise": noise, "index": torch.tensor(row, dtype=torch.long)}


class MAETask(PretrainingTask):
    """Masked autoencoding: reconstruct the patches of an X-ray hidden from the encoder.

    Args:
        model: the encoder + light decoder.
        vit_cfg: the encoder's architecture (written next to the exported weights).
        normalization: the intensity standardisation the model was trained with.
        vis_batch: a fixed batch ("image" (N, 1, H, W), "mask_noise" (N, L)) shown each epoch.
        extra_export: metadata stored with the exported encoder (data manifest hash, ...).
        snapshot_every: export the encoder every N epochs (0: never).
    """

    method = "mae"
    metric = "recon_mse"

    def __init__(
        self,
        model: MAEModel,
        vit_cfg: ViTConfig,
        normalization: Normalization,
        vis_batch: Batch | None = None,
        extra_export: dict[str, Any] | None = None,
        snapshot_every: int = 0,
    ) -> None:
        super().__init__(vit_cfg, normalization, extra_export, snapshot_every)
        self.model = model
        self.vis_batch = vis_batch

    def export_info(self) -> dict[str, Any]:
        method = {"mask_ratio": self.model.mask_ratio, "norm_pix_loss": self.model.norm_pix_loss}
        return {**super().export_info(), "mae": method}

    def training_step(self, batch: Batch) -> StepOutput:
        self._started()
        # The loss is this rank's mean over its masked patches. Every image has exactly L - keep masked
        # patches and every rank the same micro-batch size (the engine's training loader drops the
        # last, short batch), so each rank's denominator is the same and the global batch's mean is
        # the mean of the ranks' means: DDP's gradient averaging already gives exactly the
        # single-process gradient of the global batch, without GMML's all-reduced count.
        out = self.model(batch["image"], batch["mask_noise"])
        return StepOutput(loss=out.loss, logs={"loss": out.loss.detach()})

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> None:
        out = self.model(batch["image"], batch["mask_noise"])
        err = patch_mse(out.pred, self.model.targets(batch["image"]))
        # Sums, not means: validation batches may differ in size (the last one is short).
        self._accumulate(float(err[out.mask].sum(dtype=torch.float64)), float(out.mask.sum()))

    @torch.no_grad()
    def write_picture(self, run_dir: Path, epoch: int) -> None:
        if self.vis_batch is None:
            return
        # Imported here: `sscxr.config` imports `MAEConfig` from this module, and matplotlib (0.6 s)
        # is only needed for the picture.
        from sscxr.viz.recon import reconstruction_grid

        clean, masked, recon, pixel_mask = self.reconstruction(self.vis_batch)
        reconstruction_grid(
            clean[:, 0].numpy(),
            masked[:, 0].numpy(),
            recon[:, 0].numpy(),
            pixel_mask[:, 0].numpy(),
            Path(run_dir) / "recon" / f"epoch_{epoch + 1:03d}.png",
            title=f"MAE reconstruction ({1 - self.model.keep / self.model.num_patches:.0%} masked), "
            f"epoch {epoch + 1}",
        )

    @torch.no_grad()
    def reconstruction(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The picture's panels for a batch, in eval mode, on the CPU, all (N, C, H, W) float32.

        Returns:
            clean images; the encoder's input (masked patches set to 0, the cache's mean intensity); the
            decoder's prediction of every patch (with `norm_pix_loss` put back into pixel units with each
            true patch's mean and standard deviation, as the reference's demo does); the pixel mask
            (bool, True = masked).
        """
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        images = batch["image"].to(device).float()
        out = self.model(images, batch["mask_noise"].to(device))
        self.train(was_training)
        p, grid = self.model.patch_size, self.model.grid
        pred = out.pred.float()
        if self.model.norm_pix_loss:
            true = patchify(images, p)
            mean, var = true.mean(dim=-1, keepdim=True), true.var(dim=-1, keepdim=True)
            pred = pred * (var + NORM_PIX_EPS).sqrt() + mean
        patch_mask = out.mask[..., None].expand(-1, -1, pred.shape[-1]).float()
        pixel_mask = unpatchify(patch_mask, p, grid) > 0.5
        masked = images.masked_fill(pixel_mask, 0.0)
        return images.cpu(), masked.cpu(), unpatchify(pred, p, grid).cpu(), pixel_mask.cpu()


def build_mae(
    cfg: MAERunConfig, seed: int, device: torch.device | None = None
) -> tuple[MAETask, MAEDataset, MAEDataset | None]:
    """Build the MAE task and its train/val datasets from a prepared cache.

    Args:
        cfg: the resolved pre-training config (`.data`, `.model`, `.optim`, `.train`, `.mae`).
        seed: base seed of the per-sample randomness (augmentation, mask noise).
        device: where training runs; unused (every draw is applied in the loader), accepted so that
            every pre-training builder has the same signature (`sscxr.tasks.methods`).

    Returns:
        (task, train_set, val_set); val_set is None when `data.val_split` is not in `mae.splits` or the
        cache has no images in it.

    Raises:
        ConfigError: a mask ratio that leaves no patch visible or none masked at `model.img_size`.
        DataError: no usable images in the pre-training splits.
    """
    del device
    mcfg = cfg.mae
    num_patches = cfg.model.grid_size**2
    keep = num_visible(num_patches, mcfg.mask_ratio)
    if not 1 <= keep < num_patches:
        raise ConfigError(
            f"mae.mask_ratio={mcfg.mask_ratio} keeps {keep} of the {num_patches} patches of a "
            f"{cfg.model.img_size} px image visible: at least one must be visible and one masked"
        )
    cache = open_cache(cfg.data.cache, cfg.model.img_size, cfg.data.allow_leakage)
    mean, std = cache.stats
    norm = Normalization(mean=float(mean), std=float(std))
    train_idx, val_idx = pretraining_rows(cache, str(cfg.data.cache), mcfg.splits, cfg.data.val_split, "mae")

    def dataset(indices: np.ndarray, augment: bool) -> MAEDataset:
        return MAEDataset(
            cache,
            np.sort(indices),
            patch_size=cfg.model.patch_size,
            augment=cfg.data.augment if augment else None,
            seed=seed,
            normalize=(norm.mean, norm.std),
        )

    train_set = dataset(train_idx, augment=True)
    val_set = dataset(val_idx, augment=False) if len(val_idx) else None
    vis_source = val_set if val_set is not None else dataset(train_idx, augment=False)
    vis_batch = None
    if mcfg.n_vis:
        vis_batch = default_collate([vis_source[k] for k in range(min(mcfg.n_vis, len(vis_source)))])
        vis_batch = {k: v for k, v in vis_batch.items() if k in ("image", "mask_noise")}

    model = MAEModel(
        build_vit(cfg.model),
        decoder_dim=mcfg.decoder_dim,
        decoder_depth=mcfg.decoder_depth,
        decoder_heads=mcfg.decoder_heads,
        mask_ratio=mcfg.mask_ratio,
        norm_pix_loss=mcfg.norm_pix_loss,
    )
    extra = {"cache": str(cfg.data.cache), "manifest_hash": cache.manifest_hash}
    task = MAETask(model, cfg.model, norm, vis_batch, extra, mcfg.snapshot_every)
    return task, train_set, val_set
