"""Deferred GMML samples (`GMMLDataset(deferred=True)` + `GMMLViews`): the loader ships cached pixels
and the draws, the training step warps, jitters and corrupts the whole batch; both pipelines must give
the same samples, and a sample must not depend on the batch it lands in."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import default_collate

from sscxr.data.cache import ImageCache, prepare
from sscxr.data.corruption import KIND_NOISE, KIND_REPLACE, CorruptionConfig
from sscxr.data.datasets import GMMLDataset
from sscxr.data.transforms import AugmentConfig, apply_augment, augment_params
from sscxr.engine.distributed import to_device
from sscxr.errors import ConfigError
from sscxr.tasks.gmml import GMMLTask, resolve_augment_on

SIZE, ALIGN = 32, 8


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> ImageCache:
    tmp = tmp_path_factory.mktemp("views")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(10):
        # Smooth images with a bright disc at a different place each: augmentation visibly moves it.
        yy, xx = np.mgrid[0:40, 0:40]
        disc = ((yy - 8 - 2 * i) ** 2 + (xx - 30 + 2 * i) ** 2 < 40).astype(np.float64)
        pixels = 0.3 + 0.5 * disc + 0.1 * rng.random((40, 40))
        Image.fromarray((pixels * 255).astype(np.uint8)).save(tmp / f"{i}.png")
        rows.append([f"{i}.png", "", f"p{i}", "s", "train"])
    with open(tmp / "m.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "patient_id", "site", "split"])
        w.writerows(rows)
    prepare(tmp / "m.csv", tmp / "cache", size=SIZE, workers=0, progress=False)
    return ImageCache.open(tmp / "cache")


def _datasets(cache: ImageCache, augment: AugmentConfig | None, cfg: CorruptionConfig | None = None):
    kw = dict(corruption_cfg=cfg or CorruptionConfig(), patch_size=ALIGN, augment=augment, seed=5)
    return GMMLDataset(cache, cache.indices(), **kw), GMMLDataset(cache, cache.indices(), deferred=True, **kw)


@pytest.mark.parametrize("augment", [AugmentConfig(), None], ids=["augmented", "plain"])
def test_a_batch_finished_in_the_step_equals_the_loaders_samples(
    cache: ImageCache, augment: AugmentConfig | None
) -> None:
    loader, deferred = _datasets(cache, augment)
    loader.set_epoch(2), deferred.set_epoch(2)
    expected = default_collate([loader[k] for k in range(len(loader))])
    raw = default_collate([deferred[k] for k in range(len(deferred))])
    got = deferred.views(raw)
    assert set(got) == set(expected)
    assert torch.equal(got["mask"], expected["mask"]) and torch.equal(got["kind"], expected["kind"])
    assert torch.equal(got["donor"], expected["donor"]) and torch.equal(got["index"], expected["index"])
    torch.testing.assert_close(got["image"], expected["image"], atol=1e-6, rtol=0)
    torch.testing.assert_close(got["corrupted"], expected["corrupted"], atol=1e-6, rtol=0)
    assert {0, 1} <= set(got["kind"].tolist())  # both kinds were exercised


def test_the_clean_image_is_the_cached_image_augmented_with_the_samples_own_draws(cache: ImageCache) -> None:
    # Built here from the sample's own generator and `augment_params`, independently of GMMLViews.
    _, deferred = _datasets(cache, AugmentConfig())
    deferred.set_epoch(1)
    got = deferred.views(default_collate([deferred[k] for k in range(len(deferred))]))
    mean, std = deferred.normalize
    for k in range(len(deferred)):
        rng = deferred.sample_rng(k)
        deferred.donor_position(k, rng)  # the first draw of a sample
        row = int(deferred.indices[k])
        params = augment_params(rng.random(9).tolist(), AugmentConfig(), SIZE, SIZE)
        image, _ = apply_augment(torch.from_numpy(cache.image_float(row))[None, None], params)
        image = image[0]
        torch.testing.assert_close(got["image"][k], (image - mean) / std, atol=1e-6, rtol=0)
        plain = (torch.from_numpy(cache.image_float(row))[None] - mean) / std
        assert not torch.allclose(got["image"][k], plain, atol=1e-3)  # it was augmented


def test_deferred_samples_ship_uint16_pixels_and_under_half_the_bytes(cache: ImageCache) -> None:
    loader, deferred = _datasets(cache, AugmentConfig())
    raw, done = deferred[0], loader[0]
    assert raw["pixels"].dtype == torch.uint16 and raw["donor_pixels"].dtype == torch.uint16
    assert np.array_equal(raw["pixels"][0].numpy(), cache.image(int(raw["index"])))
    assert raw["cells"].shape == (SIZE // ALIGN, SIZE // ALIGN)

    def nbytes(sample: dict[str, torch.Tensor]) -> int:
        return sum(v.numel() * v.element_size() for v in sample.values())

    assert nbytes(raw) * 2 < nbytes(done)  # 4 bytes per pixel (two uint16 images) against 9


def test_a_sample_does_not_depend_on_its_batch(cache: ImageCache) -> None:
    _, deferred = _datasets(cache, AugmentConfig())
    whole = deferred.views(default_collate([deferred[k] for k in range(len(deferred))]))
    part = deferred.views(default_collate([deferred[k] for k in (7, 2)]))
    for name in ("image", "corrupted", "mask"):
        torch.testing.assert_close(part[name], whole[name][[7, 2]], atol=1e-6, rtol=0)


def test_the_step_corrupts_whole_cells_with_noise_or_the_augmented_donor(cache: ImageCache) -> None:
    _, deferred = _datasets(cache, AugmentConfig())
    raw = default_collate([deferred[k] for k in range(len(deferred))])
    got = deferred.views(raw)
    mask = got["mask"][:, 0]
    # The mask is a union of whole ALIGN x ALIGN cells, exactly the shipped cells.
    cells = mask.view(len(deferred), SIZE // ALIGN, ALIGN, SIZE // ALIGN, ALIGN)
    assert torch.equal(cells.all(4).all(2), cells.any(4).any(2))
    assert torch.equal(cells.any(4).any(2), raw["cells"])
    assert torch.equal(got["corrupted"][~got["mask"]], got["image"][~got["mask"]])  # untouched outside
    donor_views = deferred.views._clean(raw, "donor_")  # the donors as they were augmented
    for i, kind in enumerate(got["kind"].tolist()):
        m = got["mask"][i]
        assert int(raw["donor"][i]) != int(raw["index"][i])  # never the image itself
        if kind == KIND_REPLACE:
            assert torch.equal(got["corrupted"][i][m], donor_views[i][m])
        else:
            assert kind == KIND_NOISE
            noise = got["corrupted"][i][m]
            assert abs(float(noise.mean())) < 0.3 and 0.7 < float(noise.std()) < 1.3  # N(0, 1)


def test_the_step_pipeline_is_float32_under_autocast_and_keeps_seeds_on_the_host(cache: ImageCache) -> None:
    _, deferred = _datasets(cache, AugmentConfig())
    raw = default_collate([deferred[k] for k in range(4)])
    plain = deferred.views(raw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = deferred.views(raw)
    assert mixed["image"].dtype == torch.float32 and torch.equal(mixed["corrupted"], plain["corrupted"])
    moved = to_device(raw, torch.device("meta"), keep=GMMLTask.host_keys)
    assert moved["noise_seed"].device.type == "cpu" and moved["kind"].device.type == "cpu"
    assert moved["pixels"].device.type == "meta"


def test_augment_on_is_resolved_and_checked() -> None:
    assert resolve_augment_on("auto") == "step"
    assert resolve_augment_on("loader") == "loader" and resolve_augment_on("step") == "step"
    with pytest.raises(ConfigError, match="augment_on='gpu'"):
        resolve_augment_on("gpu")


def test_noise_only_corruption_ships_no_donor(cache: ImageCache, tmp_path: Path) -> None:
    loader, deferred = _datasets(cache, None, CorruptionConfig(kinds=("noise",)))
    raw = deferred[3]
    assert "donor_pixels" not in raw and int(raw["donor"]) == -1
    got = deferred.views(default_collate([raw]))
    torch.testing.assert_close(got["corrupted"][0], loader[3]["corrupted"], atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "augment, cfg",
    [(AugmentConfig(), CorruptionConfig()), (None, CorruptionConfig(kinds=("noise",)))],
    ids=["augmented-with-donors", "plain-noise-only"],
)
def test_a_batch_assembled_at_once_equals_its_samples_collated(
    cache: ImageCache, augment: AugmentConfig | None, cfg: CorruptionConfig
) -> None:
    # What a loader worker fetches (`fetch_batch`), completed in the training process (`complete_batch`),
    # must be exactly the stack of the samples it stands for, in any order: every value, dtype and key,
    # so that the batched fetch changes nothing but the speed.
    _, deferred = _datasets(cache, augment, cfg)
    deferred.set_epoch(3)
    ks = [7, 2, 9, 2, 0]
    fetched = deferred.fetch_batch(ks)
    got = deferred.complete_batch(fetched)
    expected = default_collate([deferred.deferred_sample(k) for k in ks])
    assert isinstance(got, dict) and got.keys() == expected.keys()
    for key, value in expected.items():
        assert got[key].dtype == value.dtype and torch.equal(got[key], value), key
    assert torch.equal(got["pixels"][1, 0], torch.from_numpy(cache.image(int(deferred.indices[2]))))
    assert torch.equal(got["pixels"][0, 0], torch.from_numpy(cache.image(int(deferred.indices[7]))))
    if "donor_pixels" in got:
        donor = int(got["donor"][1])
        assert donor != int(got["index"][1])
        assert torch.equal(got["donor_pixels"][1, 0], torch.from_numpy(cache.image(donor)))
    # The worker ships the draws only, all in one storage (one shared-memory segment, not one each);
    # the pixels are gathered where the cache is open, into one storage too.
    assert not {"pixels", "donor_pixels"} & fetched.keys()
    assert len({value.untyped_storage().data_ptr() for value in fetched.values()}) == 1
    pixels = [got[key] for key in ("pixels", "donor_pixels") if key in got]
    assert len({value.untyped_storage().data_ptr() for value in pixels}) == 1
    assert sum(v.nbytes for v in fetched.values()) < 1024 * len(ks)


def test_the_engines_loader_ships_assembled_batches_from_worker_processes(cache: ImageCache) -> None:
    # Through a real worker process (the draws are assembled in shared memory there, the pixels added in
    # this process), the engine's loader fetches whole batches (`fetch_batch`): they are the dataset's own.
    from sscxr.engine.sampler import ShardedSampler, build_loader

    _, deferred = _datasets(cache, AugmentConfig())
    sampler = ShardedSampler(len(deferred), 1, 0, shuffle=True, drop_last=True, pad=False, seed=1)
    kw = dict(seed=0, pin_memory=False, drop_last=True)
    batches = list(build_loader(deferred, sampler, 4, workers=1, **kw))
    order = list(sampler)
    assert len(batches) == 2
    for b, batch in enumerate(batches):
        expected = deferred.deferred_batch(order[4 * b : 4 * b + 4])
        assert all(torch.equal(batch[key], value) for key, value in expected.items())
    # Finished in the loader, a batch is the samples stacked, as a plain DataLoader would make it.
    loader_ds, _ = _datasets(cache, None)
    first = next(iter(build_loader(loader_ds, sampler, 4, workers=0, **kw)))
    plain = default_collate([loader_ds[k] for k in order[:4]])
    assert all(torch.equal(first[key], value) for key, value in plain.items())


class _SharedProbe(torch.utils.data.Dataset):
    """Reports whether a batch tensor made where the dataset runs is in shared memory."""

    def __len__(self) -> int:
        return 1

    def __getitem__(self, k: int) -> bool:
        from sscxr.data.datasets import _batch_tensors

        return _batch_tensors({"x": ((3, 2), torch.uint16)}, shared=True)["x"].is_shared()


def test_batches_assembled_in_a_worker_are_made_in_shared_memory() -> None:
    # Sending an ordinary tensor from a worker copies it into shared memory first: a second copy of
    # every batch's pixels. Made there directly, as default_collate does, the hand-over copies nothing.
    from torch.utils.data import DataLoader

    in_worker = DataLoader(_SharedProbe(), batch_size=None, num_workers=1)
    in_process = DataLoader(_SharedProbe(), batch_size=None, num_workers=0)
    assert list(in_worker) == [True] and list(in_process) == [False]


def test_the_tensor_ring_reuses_a_buffer_only_when_nothing_else_uses_it() -> None:
    # The training process gathers each batch's pixels into a reused buffer (fresh memory costs a page
    # fault per page); a buffer still referenced anywhere must never be handed out and overwritten.
    from sscxr.engine.sampler import TensorRing

    ring = TensorRing(slots=2)
    shape = (2, 3, 1, 4, 4)

    def fill(value: int) -> torch.Tensor:
        t = ring.empty(shape, torch.uint16)
        t.fill_(value)
        return t

    ptr = fill(1).data_ptr()
    assert fill(2).data_ptr() == ptr  # dropped: its memory comes back
    held = {
        "view": fill(3)[1],
        "numpy": fill(4)[0, 0].numpy(),
        "dtype view": fill(5).view(torch.int16),
        "list": [fill(6)],
    }
    for value in range(7, 12):  # more batches than slots while all of the above are held
        assert fill(value).eq(value).all()
    assert held["view"].eq(3).all() and (held["numpy"] == 4).all()
    assert held["dtype view"].eq(5).all() and held["list"][0].eq(6).all()
    assert len(ring._held) <= 2
