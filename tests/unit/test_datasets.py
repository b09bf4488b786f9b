"""`CachedDataset` / `GMMLDataset`: determinism per (seed, epoch, row), donors, label filtering, norm."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch
from PIL import Image

from sscxr.data.cache import ImageCache, prepare
from sscxr.data.corruption import CorruptionConfig
from sscxr.data.datasets import CachedDataset, GMMLDataset, cache_split_indices
from sscxr.data.transforms import AugmentConfig
from sscxr.errors import DataError

LABELS = ["healthy", "pneumonia", "covid-19", "other", "healthy", "pneumonia"]


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    tmp = tmp_path_factory.mktemp("ds")
    rng = np.random.default_rng(0)
    rows = []
    for i, label in enumerate(LABELS):
        Image.fromarray((rng.random((40, 40)) * 255).astype(np.uint8)).save(tmp / f"{i}.png")
        mask = ""
        if i < 3:
            Image.fromarray(((rng.random((40, 40)) > 0.5) * 255).astype(np.uint8)).save(tmp / f"m{i}.png")
            mask = f"m{i}.png"
        rows.append([f"{i}.png", label, f"p{i}", "s", "train" if i < 4 else "val", mask])
    with open(tmp / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split", "mask_path"])
        w.writerows(rows)
    prepare(tmp / "m.csv", tmp / "cache", size=32, workers=0, progress=False)
    return ImageCache.open(tmp / "cache")


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_label_map_excludes_and_labels(cache: ImageCache) -> None:
    ds = CachedDataset(cache, cache.indices(), label_map={"healthy": 0, "pneumonia": 1, "covid-19": 2})
    assert ds.n_excluded == 1 and len(ds) == 5
    assert ds.indices.tolist() == [0, 1, 2, 4, 5] and ds.labels.tolist() == [0, 1, 2, 0, 1]
    assert ds.patient_ids.tolist() == ["p0", "p1", "p2", "p4", "p5"]
    s = ds[3]
    assert s["label"].dtype == torch.long and int(s["label"]) == 0 and int(s["index"]) == 4
    assert s["image"].shape == (1, 32, 32) and s["image"].dtype == torch.float32


def test_no_augment_returns_cached_pixels_and_normalises(cache: ImageCache) -> None:
    raw = CachedDataset(cache, [2])[0]["image"]
    np.testing.assert_array_equal(raw[0].numpy(), cache.image_float(2))
    mean, std = cache.stats
    ds = CachedDataset(cache, cache.indices(), normalize=(mean, std))
    images = torch.stack([ds[k]["image"] for k in range(len(ds))])
    torch.testing.assert_close(ds[2]["image"], (raw - mean) / std)
    assert abs(images.mean().item()) < 1e-4 and abs(images.std().item() - 1) < 1e-2


def test_deterministic_per_seed_epoch_row_whatever_order(cache: ImageCache) -> None:
    ds = CachedDataset(cache, cache.indices(), augment=AugmentConfig(), seed=5)
    forward = [ds[k] for k in range(len(ds))]
    backward = [ds[k] for k in reversed(range(len(ds)))][::-1]
    assert all(_same(a, b) for a, b in zip(forward, backward, strict=True))
    # The same row reached through another index list gets the same draws.
    sub = CachedDataset(cache, [3, 1], augment=AugmentConfig(), seed=5)
    assert _same(sub[1], forward[1])
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], forward[0]["image"])
    ds.set_epoch(0)
    assert _same(ds[0], forward[0])
    other_seed = CachedDataset(cache, cache.indices(), augment=AugmentConfig(), seed=6)
    assert not torch.equal(other_seed[0]["image"], forward[0]["image"])


def test_masks_follow_the_image(cache: ImageCache) -> None:
    ds = CachedDataset(
        cache, [0, 1, 2], augment=AugmentConfig(brightness=0, contrast=0, gamma=(1, 1)), with_mask=True
    )
    s = ds[1]
    assert s["mask"].shape == (1, 32, 32) and set(s["mask"].unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(DataError, match="no mask"):
        CachedDataset(cache, cache.indices(), with_mask=True)


def test_bad_indices_rejected(cache: ImageCache) -> None:
    with pytest.raises(ValueError, match="repeat"):
        CachedDataset(cache, [1, 1])
    with pytest.raises(ValueError, match="lie in"):
        CachedDataset(cache, [99])


def test_split_indices(cache: ImageCache) -> None:
    assert cache_split_indices(cache, "val").tolist() == [4, 5]


def test_gmml_sample_donor_and_determinism(cache: ImageCache) -> None:
    cfg = CorruptionConfig(p_replace=1.0)
    ds = GMMLDataset(cache, cache.indices(), cfg, patch_size=8, augment=AugmentConfig(), seed=1)
    mean, std = cache.stats
    for epoch in range(8):
        ds.set_epoch(epoch)
        for k in range(len(ds)):
            s = ds[k]
            assert int(s["donor"]) != int(s["index"]) and int(s["donor"]) in ds.indices.tolist()
    s = ds[2]
    assert s["image"].shape == s["corrupted"].shape == s["mask"].shape == (1, 32, 32)
    assert s["mask"].dtype == torch.bool and 0 < s["mask"].float().mean() < 1
    assert torch.equal(s["corrupted"][~s["mask"]], s["image"][~s["mask"]])
    assert _same(s, ds[2])
    # Clean image is standardised with the cache's statistics by default.
    plain = GMMLDataset(cache, cache.indices(), cfg, patch_size=8, seed=1)
    torch.testing.assert_close(plain[0]["image"][0], (torch.from_numpy(cache.image_float(0)) - mean) / std)


def test_gmml_noise_only_needs_no_donor(cache: ImageCache) -> None:
    ds = GMMLDataset(cache, [0], CorruptionConfig(kinds=("noise",)), patch_size=8)
    s = ds[0]
    assert int(s["donor"]) == -1 and int(s["kind"]) == 0
    with pytest.raises(ValueError, match="at least 2"):
        GMMLDataset(cache, [0], CorruptionConfig(), patch_size=8)


def test_set_epoch_reaches_loader_workers_that_persist_across_epochs(cache: ImageCache) -> None:
    """The epoch lives in shared memory: two persistent workers give each epoch's own samples, the ones
    the main process computes for that epoch (a plain attribute would leave them at epoch 0)."""
    from torch.utils.data import DataLoader

    ds = CachedDataset(cache, cache.indices(), augment=AugmentConfig(), seed=5)
    assert ds.shares_epoch
    loader = DataLoader(ds, batch_size=2, num_workers=2, persistent_workers=True)
    for epoch in (0, 3):
        ds.set_epoch(epoch)
        got = torch.cat([b["image"] for b in loader])
        want = torch.stack([ds[k]["image"] for k in range(len(ds))])
        torch.testing.assert_close(got, want, atol=0, rtol=0)
    ds.set_epoch(0)
    assert not torch.equal(torch.stack([ds[k]["image"] for k in range(len(ds))]), want)  # epochs differ
