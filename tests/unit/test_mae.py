"""MAE: masking, visible-only encoding, the masked loss, the export, per-sample noise, exact resume."""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

from sscxr.config import CONFIG_DIR, DataConfig, load_config
from sscxr.data.cache import ImageCache, prepare
from sscxr.data.transforms import AugmentConfig
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.trainer import fit
from sscxr.errors import ConfigError
from sscxr.models.loading import load_encoder_weights
from sscxr.models.mae import (
    MAEModel,
    masked_patch_mse,
    patch_targets,
    patchify,
    random_masking,
    unpatchify,
)
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.tasks.base import TrainedWeights
from sscxr.tasks.mae import MAEConfig, MAEDataset, build_mae

pytestmark = pytest.mark.usefixtures("one_thread")

# 32 px, patches of 8: L = 16 patches, 4 of them visible at mask ratio 0.75.
TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, drop_path_rate=0.0)
TINY_MAE = MAEConfig(decoder_dim=16, decoder_depth=1, decoder_heads=2, n_vis=2)


@dataclass
class StandInConfig:
    """`PretrainConfig` with the `method` and `mae` fields it will get."""

    method: str = "mae"
    data: DataConfig = field(default_factory=DataConfig)
    model: ViTConfig = field(default_factory=ViTConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    mae: MAEConfig = field(default_factory=MAEConfig)


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """16 random 40 px greyscale images, one patient each: 12 train, 4 val, prepared at 32 px."""
    tmp = tmp_path_factory.mktemp("mae")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(16):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp / f"{i}.png")
        rows.append([f"{i}.png", "healthy", f"p{i}", "s", "train" if i < 12 else "val", ""])
    with open(tmp / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split", "mask_path"])
        w.writerows(rows)
    prepare(tmp / "m.csv", tmp / "cache", size=32, workers=0, progress=False)
    return tmp / "cache"


def _model(norm_pix_loss: bool = False, seed: int = 0) -> MAEModel:
    torch.manual_seed(seed)
    model = MAEModel(
        build_vit(TINY), decoder_dim=16, decoder_depth=1, decoder_heads=2, norm_pix_loss=norm_pix_loss
    )
    return model.eval()


def _config(cache: Path, **train: object) -> StandInConfig:
    train_cfg = TrainConfig(
        epochs=3, batch_size=4, workers=0, amp="off", progress=False, log_every=1, checkpoint_every=0
    )
    return StandInConfig(
        data=DataConfig(cache=str(cache)),
        model=replace(
            TINY, drop_path_rate=0.1
        ),  # drop path draws from the global RNG: resume must restore it
        optim=OptimConfig(
            lr=1e-3, warmup_epochs=1, betas=(0.9, 0.95), weight_decay=0.05, weight_decay_end=None
        ),
        train=replace(train_cfg, **train),
        mae=TINY_MAE,
    )


def test_patchify_round_trip_and_order() -> None:
    x = torch.arange(2 * 1 * 4 * 6, dtype=torch.float32).reshape(2, 1, 4, 6)
    patches = patchify(x, 2)
    assert patches.shape == (2, 6, 4)
    # Patch 1 is row 0, columns 2..3; its values are row-major within the patch.
    assert patches[0, 1].tolist() == [2.0, 3.0, 8.0, 9.0]
    assert torch.equal(unpatchify(patches, 2, (2, 3)), x)


def test_each_image_keeps_exactly_the_patches_with_the_smallest_noise() -> None:
    model = _model()
    L, keep = 16, int(16 * (1 - 0.75))
    assert (model.num_patches, model.keep) == (L, keep)
    noise = torch.rand(5, L, generator=torch.Generator().manual_seed(1))
    ids_keep, mask, ids_restore = random_masking(noise, keep)
    assert mask.sum(dim=1).tolist() == [L - keep] * 5
    for b in range(5):
        expected = np.argsort(noise[b].numpy(), kind="stable")[:keep]
        assert set(ids_keep[b].tolist()) == set(expected.tolist())
        assert set(torch.nonzero(~mask[b]).flatten().tolist()) == set(expected.tolist())
    # ids_restore undoes the shuffle (visible first, then masked, each in noise order) into grid order.
    shuffled = torch.from_numpy(np.argsort(noise.numpy(), axis=1, kind="stable"))
    assert torch.equal(torch.gather(shuffled, 1, ids_restore), torch.arange(L).expand(5, -1))
    # The model masks the same way.
    _, model_mask, _ = model.forward_encoder(torch.randn(5, 1, 32, 32), noise)
    assert torch.equal(model_mask, mask)


def _patch_view(images: torch.Tensor) -> torch.Tensor:
    """(B, 1, 32, 32) -> a (B, 4, 4, 8, 8) view: [b, row, col] is one 8 x 8 patch."""
    return images.view(images.shape[0], 4, 8, 4, 8).permute(0, 1, 3, 2, 4)


def test_the_encoder_sees_only_the_visible_patches() -> None:
    model = _model()
    g = torch.Generator().manual_seed(2)
    images, noise = torch.randn(3, 1, 32, 32, generator=g), torch.rand(3, 16, generator=g)
    with torch.no_grad():
        latent, mask, _ = model.forward_encoder(images, noise)
        out = model(images, noise)
    grid_mask = mask.view(3, 4, 4)

    other = images.clone()
    _patch_view(other)[grid_mask] = torch.randn(int(grid_mask.sum()), 8, 8, generator=g) * 5
    with torch.no_grad():
        latent2, _, _ = model.forward_encoder(other, noise)
        out2 = model(other, noise)
    torch.testing.assert_close(latent2, latent, rtol=0, atol=1e-6)
    torch.testing.assert_close(out2.pred, out.pred, rtol=0, atol=1e-6)  # the decoder never sees them either
    assert not torch.isclose(out2.loss, out.loss)  # ... but they are the targets

    visible = images.clone()
    b, r, c = (int(v) for v in torch.nonzero(~grid_mask)[0])
    _patch_view(visible)[b, r, c] += 1.0
    with torch.no_grad():
        latent3, _, _ = model.forward_encoder(visible, noise)
    assert (latent3[b] - latent[b]).abs().max() > 1e-3


def test_the_loss_is_the_mse_of_the_masked_patches_only() -> None:
    pred = torch.tensor([[[1.0, 2.0], [0.0, 0.0], [3.0, -1.0], [5.0, 5.0]]], requires_grad=True)
    target = torch.tensor([[[0.0, 0.0], [9.0, 9.0], [1.0, 1.0], [5.0, 4.0]]])
    mask = torch.tensor([[True, False, True, True]])
    loss = masked_patch_mse(pred, target, mask)
    # Per masked patch: (1 + 4) / 2, (4 + 4) / 2, (0 + 1) / 2; their mean.
    assert float(loss.detach()) == pytest.approx((2.5 + 4.0 + 0.5) / 3)
    loss.backward()
    assert pred.grad is not None
    assert torch.equal(pred.grad[0, 1], torch.zeros(2))  # the visible patch: exactly no gradient
    assert (pred.grad[0, [0, 2]] != 0).all()


def test_norm_pix_targets_are_normalised_per_patch() -> None:
    images = torch.tensor([[[[1.0, 2.0, 0.0, 0.0], [3.0, 6.0, 0.0, 0.0]]]])  # two 2 x 2 patches
    plain = patch_targets(images, 2, norm_pix_loss=False)
    assert plain.tolist() == [[[1.0, 2.0, 3.0, 6.0], [0.0, 0.0, 0.0, 0.0]]]
    normed = patch_targets(images, 2, norm_pix_loss=True)
    first = np.array([1.0, 2.0, 3.0, 6.0])
    expected = (first - first.mean()) / np.sqrt(first.var(ddof=1) + 1e-6)
    np.testing.assert_allclose(normed[0, 0].numpy(), expected, rtol=1e-6)
    assert normed[0, 1].tolist() == [0.0] * 4  # a flat patch: 0 / sqrt(eps)


@pytest.mark.parametrize("norm_pix_loss", [False, True])
def test_the_model_loss_matches_a_hand_computed_masked_mse(norm_pix_loss: bool) -> None:
    model = _model(norm_pix_loss)
    g = torch.Generator().manual_seed(3)
    images, noise = torch.randn(2, 1, 32, 32, generator=g), torch.rand(2, 16, generator=g)
    out = model(images, noise)
    pred, mask = out.pred.detach().double().numpy(), out.mask.numpy()
    target = patchify(images, 8).double().numpy()
    if norm_pix_loss:
        target = (target - target.mean(-1, keepdims=True)) / np.sqrt(
            target.var(-1, ddof=1, keepdims=True) + 1e-6
        )
    per_patch = ((pred - target) ** 2).mean(-1)
    assert float(out.loss.detach()) == pytest.approx(per_patch[mask].mean(), rel=1e-5)
    pred_leaf = out.pred.detach().requires_grad_(True)
    masked_patch_mse(pred_leaf, model.targets(images), out.mask).backward()
    assert pred_leaf.grad is not None and torch.equal(
        pred_leaf.grad[~out.mask], torch.zeros_like(pred_leaf.grad[~out.mask])
    )


def test_the_mean_of_equal_shards_is_the_global_mean() -> None:
    # What makes DDP's gradient averaging exact without an all-reduced count: same masked count per image.
    model = _model()
    g = torch.Generator().manual_seed(4)
    images, noise = torch.randn(4, 1, 32, 32, generator=g), torch.rand(4, 16, generator=g)
    with torch.no_grad():
        whole = model(images, noise).loss
        halves = (model(images[:2], noise[:2]).loss + model(images[2:], noise[2:]).loss) / 2
    torch.testing.assert_close(halves, whole)


def test_dataset_mask_noise_is_a_function_of_seed_epoch_row(cache_dir: Path) -> None:
    cache = ImageCache.open(cache_dir)
    rows = cache.indices(split="train")
    ds = MAEDataset(cache, rows, patch_size=8, augment=AugmentConfig(), seed=7)
    forward = [ds[k]["mask_noise"] for k in range(len(ds))]
    backward = [ds[k]["mask_noise"] for k in reversed(range(len(ds)))][::-1]
    assert all(torch.equal(a, b) for a, b in zip(forward, backward, strict=True))
    assert forward[0].shape == (16,) and forward[0].dtype == torch.float32
    assert len({tuple(n.tolist()) for n in forward}) == len(ds)  # rows differ
    # Another subset in another order: the same row has the same noise (and image).
    sub = MAEDataset(cache, rows[[5, 2]], patch_size=8, augment=AugmentConfig(), seed=7)
    assert torch.equal(sub[0]["mask_noise"], forward[5]) and torch.equal(sub[0]["image"], ds[5]["image"])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["mask_noise"], forward[0])
    ds.set_epoch(0)
    assert torch.equal(ds[0]["mask_noise"], forward[0])
    other_seed = MAEDataset(cache, rows, patch_size=8, augment=AugmentConfig(), seed=8)
    assert not torch.equal(other_seed[0]["mask_noise"], forward[0])
    # Standardised with the cache's statistics.
    mean, std = cache.stats
    plain = MAEDataset(cache, rows[:1], patch_size=8)[0]["image"]
    torch.testing.assert_close(plain[0], (torch.from_numpy(cache.image_float(int(rows[0]))) - mean) / std)


def test_export_loads_into_a_plain_timm_vit_and_the_picture_is_written(
    cache_dir: Path, tmp_path: Path
) -> None:
    cfg = _config(cache_dir)
    cfg.mae = replace(TINY_MAE, snapshot_every=1)
    torch.manual_seed(0)
    task, train_set, val_set = build_mae(cfg, seed=0)
    assert (len(train_set), len(val_set or [])) == (12, 4)
    task.export(tmp_path, TrainedWeights(None, None, "max", None, None, None, 0))
    plain = VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=2, num_heads=2, num_classes=0
    )
    result = plain.load_state_dict(load_file(tmp_path / "encoder.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    report = load_encoder_weights(build_vit(TINY), tmp_path / "encoder.safetensors")
    assert report.missing == [] and report.unexpected == []
    assert report.normalization is not None and report.normalization.mean == pytest.approx(
        float(train_set.normalize[0])
    )
    meta = json.loads((tmp_path / "encoder.json").read_text())
    assert meta["extra"]["pretraining"] == "mae" and meta["extra"]["mae"]["mask_ratio"] == 0.75

    task.on_epoch_end(tmp_path, 0)
    assert (tmp_path / "recon" / "epoch_001.png").is_file()
    assert (tmp_path / "snapshots" / "epoch_001" / "encoder.safetensors").is_file()


def _fit(cache: Path, run: Path, max_steps: int) -> dict[str, torch.Tensor]:
    cfg = _config(cache, max_steps=max_steps)
    torch.manual_seed(cfg.train.seed)  # as `seed_process`: timm initialises from the global RNG
    task, train_set, val_set = build_mae(cfg, seed=cfg.train.seed)
    fit(task, train_set, val_set, cfg.train, cfg.optim, run, None, None, resume="auto")
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_mae_resume_is_exact(cache_dir: Path, tmp_path: Path) -> None:
    # 12 training images, batch 4: 3 steps per epoch. 7 steps straight == 3 steps (one epoch), a fresh
    # task resumed from the run folder, 4 more steps (into the third epoch, mid-epoch).
    straight = _fit(cache_dir, tmp_path / "a", max_steps=7)
    _fit(cache_dir, tmp_path / "b", max_steps=3)
    resumed = _fit(cache_dir, tmp_path / "b", max_steps=7)
    assert straight.keys() == resumed.keys()
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name
    first = _fit(cache_dir, tmp_path / "c", max_steps=1)
    assert not torch.equal(first["model.decoder_pred.weight"], straight["model.decoder_pred.weight"])


@pytest.mark.parametrize("name", ["pretrain/mae_vit_s16", "pretrain/mae_cpu"])
def test_builtin_configs_load(name: str) -> None:
    cfg = load_config(StandInConfig, [name])
    assert cfg.method == "mae" and cfg.optim.betas == (0.9, 0.95) and cfg.mae.mask_ratio == 0.75
    assert (CONFIG_DIR / f"{name}.yaml").is_file()
    MAEModel(build_vit(cfg.model), cfg.mae.decoder_dim, cfg.mae.decoder_depth, cfg.mae.decoder_heads)


def test_bad_settings_are_refused(cache_dir: Path) -> None:
    with pytest.raises(ConfigError, match="mask_ratio"):
        MAEConfig(mask_ratio=1.0)
    with pytest.raises(ConfigError, match="decoder_heads"):
        MAEConfig(decoder_dim=30, decoder_heads=4)
    cfg = _config(cache_dir)
    cfg.mae = replace(TINY_MAE, mask_ratio=0.97)  # int(16 * 0.03) = 0 visible patches
    with pytest.raises(ConfigError, match="visible"):
        build_mae(cfg, seed=0)
