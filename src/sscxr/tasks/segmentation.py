"""Lung segmentation as a Task for the one training engine: UNETR on the (pre-trained) ViT, Dice + CE.

The encoder starts from scratch, from an sscxr GMML export / checkpoint (SS-CXR) or from an external
timm-layout file (e.g. SS-IN), through the same `load_encoder_weights` as the classifier, so the key
report is identical. The data pipeline applies one geometric transform to an image and its mask
(`CachedDataset(with_mask=True)`); the task runs the model, MONAI's `DiceCELoss` and, in validation,
per-image Dice / IoU (both empty = 1, as the metrics module's policy). The model exported at the end
is the best validation checkpoint (`train.best_metric`, default `val/dice`) when there is one.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.losses import DiceCELoss
from torch.utils.data import default_collate

from sscxr.config import DataConfig
from sscxr.data.cache import ImageCache
from sscxr.data.datasets import CachedDataset
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.errors import ConfigError, DataError
from sscxr.models.loading import Normalization
from sscxr.models.unetr import UNETR, SegmenterSpec, build_unetr, export_segmenter, lung_probability
from sscxr.models.vit import ViTConfig
from sscxr.tasks.base import Batch, StepOutput, Task, TrainedWeights, reduce_sum
from sscxr.tasks.common import INIT_MODES, load_encoder_start, open_cache
from sscxr.utils import display_path
from sscxr.viz.overlay import OverlayCase, overlay_figure

log = logging.getLogger(__name__)


@dataclass
class SegTaskConfig:
    """Segmentation-specific settings.

    Attributes:
        init: encoder start: "scratch", "sscxr" (GMML export / checkpoint: SS-CXR), "timm" (an
            external timm / DeiT-layout file, e.g. ImageNet GMML: SS-IN) or "auto" (scratch without
            init_path, else whatever the file is).
        init_path: weight file, or a pre-training run folder (its `encoder.safetensors`, else
            `checkpoints/last.pt`).
        out_channels: 2 (background / lung, softmax) or 1 (sigmoid).
        feature_size: decoder width at full resolution (MONAI's UNETR default 16).
        skip_blocks: 1-based ViT blocks read by the decoder; None = evenly spaced ((3, 6, 9, 12) at
            depth 12 with 16-pixel patches).
        norm_name: decoder normalisation (MONAI name).
        lambda_dice, lambda_ce: weights of the two loss terms.
        threshold: lung probability threshold for validation and export.
        n_vis: validation images drawn as overlays (0 = none).
        vis_every: epochs between overlay pictures (also after the first epoch).
    """

    init: str = "scratch"
    init_path: str = ""
    out_channels: int = 2
    feature_size: int = 16
    skip_blocks: list[int] | None = None
    norm_name: str = "instance"
    lambda_dice: float = 1.0
    lambda_ce: float = 1.0
    threshold: float = 0.5
    n_vis: int = 4
    vis_every: int = 10

    def __post_init__(self) -> None:
        if self.init not in INIT_MODES:
            raise ConfigError(f"seg.init must be one of {INIT_MODES}, got {self.init!r}")
        if self.init in ("sscxr", "timm") and not self.init_path:
            raise ConfigError(
                f"seg.init={self.init} needs seg.init_path (a weight file or a pre-training run)"
            )
        if self.init == "scratch" and self.init_path:
            raise ConfigError("seg.init=scratch ignores seg.init_path: drop it, or use seg.init=auto")
        if self.out_channels not in (1, 2):
            raise ConfigError(f"seg.out_channels must be 1 or 2, got {self.out_channels}")
        if self.feature_size < 1 or self.n_vis < 0 or self.vis_every < 1 or not 0.0 < self.threshold < 1.0:
            raise ConfigError(
                "seg.feature_size and seg.vis_every must be >= 1, seg.n_vis >= 0 and seg.threshold in (0, 1)"
            )
        if self.lambda_dice < 0 or self.lambda_ce < 0 or self.lambda_dice + self.lambda_ce == 0:
            raise ConfigError("seg.lambda_dice and seg.lambda_ce must be >= 0 and not both 0")


def _seg_train_defaults() -> TrainConfig:
    return TrainConfig(epochs=400, best_metric="val/dice", best_mode="max")


def _seg_optim_defaults() -> OptimConfig:
    # Paper, sec. 4.3 / GMML.md: AdamW, lr 5e-4, weight decay 1e-5 (constant).
    return OptimConfig(lr=5e-4, weight_decay=1e-5, weight_decay_end=None, warmup_epochs=10)


@dataclass
class SegmentConfig:
    """Everything `sscxr segment train` needs."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    optim: OptimConfig = field(default_factory=_seg_optim_defaults)
    train: TrainConfig = field(default_factory=_seg_train_defaults)
    seg: SegTaskConfig = field(default_factory=SegTaskConfig)


def _dice_iou(pred: torch.Tensor, gt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image Dice and IoU of (B, H, W) bool masks; both empty = 1 (the metrics module's policy)."""
    inter = (pred & gt).flatten(1).sum(1).double()
    total = pred.flatten(1).sum(1).double() + gt.flatten(1).sum(1).double()
    union = total - inter
    empty = total == 0
    dice = torch.where(empty, torch.ones_like(total), 2 * inter / total.clamp_min(1))
    iou = torch.where(empty, torch.ones_like(total), inter / union.clamp_min(1))
    return dice, iou


class SegmentationTask(Task):
    """UNETR lung segmentation.

    Args:
        model: the UNETR.
        spec: its export description (architecture, normalisation, fit, threshold).
        loss_weights: (lambda_dice, lambda_ce).
        vis_batch: fixed unaugmented samples ("image" (N, 1, H, W) in [0, 1], "mask") for overlays.
        vis_every: draw them after the first epoch and every `vis_every` epochs.
        extra_export: provenance stored in `model.json` (init report, cache, manifest hash).
    """

    def __init__(
        self,
        model: UNETR,
        spec: SegmenterSpec,
        loss_weights: tuple[float, float] = (1.0, 1.0),
        vis_batch: Batch | None = None,
        extra_export: dict[str, Any] | None = None,
        vis_every: int = 10,
    ) -> None:
        super().__init__()
        self.model, self.spec = model, spec
        binary = model.out_channels == 1
        # The loss holds no parameters or buffers: checkpoints keep only `model.*`.
        self._loss = DiceCELoss(
            to_onehot_y=not binary,
            softmax=not binary,
            sigmoid=binary,
            lambda_dice=loss_weights[0],
            lambda_ce=loss_weights[1],
        )
        self.vis_batch, self.extra_export, self.vis_every = vis_batch, dict(extra_export or {}), vis_every
        self.reset_metrics()

    def loss(self, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Dice + cross-entropy of (B, C, H, W) logits against a (B, 1, H, W) 0/1 mask, in float32."""
        return self._loss(logits.float(), mask.float())

    def training_step(self, batch: Batch) -> StepOutput:
        logits = self.model(batch["image"])
        loss = self.loss(logits, batch["mask"])
        return StepOutput(loss=loss, logs={"loss": loss.detach()})

    @torch.no_grad()
    def validation_step(self, batch: Batch) -> None:
        logits = self.model(batch["image"])
        pred = lung_probability(logits) > self.spec.threshold
        dice, iou = _dice_iou(pred, batch["mask"][:, 0] > 0.5)
        n = torch.tensor(float(len(dice)), dtype=torch.float64, device=dice.device)
        loss = self.loss(logits, batch["mask"]).double() * n
        self._sums = self._sums + torch.stack([dice.sum(), iou.sum(), loss, n]).cpu()

    def compute_metrics(self) -> dict[str, float]:
        dice, iou, loss, n = reduce_sum(self._sums).tolist()
        return {"dice": dice / n, "iou": iou / n, "loss": loss / n} if n > 0 else {}

    def reset_metrics(self) -> None:
        self._sums = torch.zeros(4, dtype=torch.float64)

    @torch.no_grad()
    def on_epoch_end(self, run_dir: Path, epoch: int) -> None:
        if self.vis_batch is None or (epoch > 0 and (epoch + 1) % self.vis_every):
            return
        was_training = self.training
        self.eval()
        device = next(self.parameters()).device
        prob = lung_probability(self.model(self.vis_batch["image"].to(device))).cpu()
        self.train(was_training)
        images = self.vis_batch["image"][:, 0].numpy()
        gts = self.vis_batch["mask"][:, 0].numpy() > 0.5
        preds = (prob > self.spec.threshold).numpy()
        cases = []
        for img, gt, pr in zip(images, gts, preds, strict=True):
            dice = float(_dice_iou(torch.from_numpy(pr)[None], torch.from_numpy(gt)[None])[0])
            cases.append(OverlayCase(img, gt, pr, f"Dice {dice:.3f}"))
        path = Path(run_dir) / "overlays" / f"epoch_{epoch + 1:03d}.png"
        overlay_figure([cases], path, title=f"validation, epoch {epoch + 1}")

    def best_state(self, trained: TrainedWeights) -> tuple[dict[str, torch.Tensor], str]:
        """The UNETR weights to export: the best validation checkpoint's when there is one, else the
        current ones."""
        if trained.best is not None:
            state = {k[len("model.") :]: v for k, v in trained.best.items() if k.startswith("model.")}
            return state, f"checkpoints/best.pt (step {trained.step})"
        return {k: v.detach() for k, v in self.model.state_dict().items()}, "end of training"

    def export(self, run_dir: Path, trained: TrainedWeights) -> None:
        state, source = self.best_state(trained)
        extra = {**self.extra_export, "weights_from": source}
        export_segmenter(state, self.spec, Path(run_dir) / "model", extra)


def init_encoder(model: UNETR, init: str, init_path: str, cache_norm: Normalization) -> dict[str, Any]:
    """Fill `model.encoder` as `seg.init` says; returns what was done (for `model.json`).

    The run-folder lookup and file-kind check are shared with the classifier (`load_encoder_start`).
    sscxr exports bring the normalisation GMML trained with; otherwise the cache's statistics are used.

    Returns:
        {"mode", "normalization": {"mean", "std"}, "normalization_from"} plus, when weights were loaded,
        the LoadReport's "path", "source", exact "missing" / "unexpected" keys and "adapted" notes.
    """
    if init == "scratch" or (init == "auto" and not init_path):
        return {"mode": "scratch", "normalization": asdict(cache_norm), "normalization_from": "cache"}
    record, report = load_encoder_start(model.encoder, init, init_path, "seg")
    norm = report.normalization or cache_norm
    log.info(
        "encoder initialised from %s (%s): missing keys %s; unexpected keys %s; adapted: %s",
        record["path"], report.source, report.missing, report.unexpected, report.adapted or "nothing",
    )  # fmt: skip
    return {
        **record,
        "normalization": asdict(norm),
        "normalization_from": "export" if report.normalization is not None else "cache",
        "pretraining": report.meta.get("extra", {}),
    }


def _mask_indices(cache: ImageCache, split: str) -> np.ndarray:
    idx = cache.indices(split=split)
    keep = idx[cache.mask_available[idx]] if cache.has_masks else idx[:0]
    if keep.size < idx.size:
        log.info(
            "split %s: %d of %d images have no mask and are left out", split, idx.size - keep.size, idx.size
        )
    return keep


def _no_masks_message(cache: ImageCache, split: str) -> str:
    """Why the training split has no masked image, and what to do about it."""
    ok = cache.indices()
    with_mask = ok[cache.mask_available[ok]] if cache.has_masks else ok[:0]
    where = Counter(cache.rows[i].split or "(none)" for i in with_mask)
    head = f"{cache.root}: no images with masks in split {split!r}"
    if not with_mask.size:
        return f"{head}; the cache has no masks: add them (sscxr import masks / pairs) and prepare again"
    found = ", ".join(f"{n} in {name!r}" for name, n in where.most_common())
    return (
        f"{head}; the masked images are {found}. Assign splits (sscxr split MANIFEST --split 0.7,0.15,0.15 "
        "--out NEW.csv) and prepare a cache from NEW.csv, or train on the split that has them "
        "(data.train_split=NAME)"
    )


def _datasets(
    cfg: SegmentConfig, cache: ImageCache, seed: int
) -> tuple[CachedDataset, CachedDataset | None, Batch | None]:
    """(train set (augmented, paired geometry), val set or None, fixed overlay batch or None); images
    in [0, 1]: the UNETR standardises them itself."""
    train_idx, val_idx = _mask_indices(cache, cfg.data.train_split), _mask_indices(cache, cfg.data.val_split)
    if train_idx.size == 0:
        raise DataError(_no_masks_message(cache, cfg.data.train_split))
    kw: dict[str, Any] = {"seed": seed, "with_mask": True}
    train_set = CachedDataset(cache, train_idx, augment=cfg.data.augment, **kw)
    val_set = CachedDataset(cache, val_idx, **kw) if val_idx.size else None
    if val_set is None:
        log.warning("split %r has no image with a mask: no validation, no best.pt", cfg.data.val_split)
    if cfg.seg.n_vis == 0:
        return train_set, val_set, None
    source = val_set or CachedDataset(cache, train_idx, **kw)
    batch = default_collate([source[k] for k in range(min(cfg.seg.n_vis, len(source)))])
    return train_set, val_set, {k: batch[k] for k in ("image", "mask")}


def build_segmentation(
    cfg: SegmentConfig, seed: int
) -> tuple[SegmentationTask, CachedDataset, CachedDataset | None]:
    """Build the segmentation task and its train / val datasets from a prepared cache with masks.

    Returns:
        (task, train_set, val_set); val_set is None when `data.val_split` has no masked images.
    """
    cache = open_cache(cfg.data.cache, cfg.model.img_size, cfg.data.allow_leakage)
    s = cfg.seg
    spec = SegmenterSpec(
        vit=cfg.model, normalization=Normalization(*cache.stats), out_channels=s.out_channels,
        feature_size=s.feature_size, blocks=tuple(s.skip_blocks or ()), norm_name=s.norm_name,
        fit=cache.fit, threshold=s.threshold,
    )  # fmt: skip
    model = build_unetr(spec)
    init = init_encoder(model, s.init, s.init_path, spec.normalization)
    spec = replace(spec, normalization=Normalization(**init["normalization"]), blocks=model.blocks)
    model.set_normalization(spec.normalization)  # a pre-trained encoder's, when it brought one
    train_set, val_set, vis = _datasets(cfg, cache, seed)
    extra = {
        "init": init,
        "cache": display_path(cfg.data.cache),
        "manifest_hash": cache.index.get("manifest_hash"),
        "train_split": cfg.data.train_split,
        "n_train": len(train_set),
    }
    task = SegmentationTask(model, spec, (s.lambda_dice, s.lambda_ce), vis, extra, s.vis_every)
    return task, train_set, val_set
