"""Datasets over an `ImageCache`: fine-tuning samples (`CachedDataset`) and GMML samples (`GMMLDataset`).

Every random number of a sample comes from `generator_for(seed, epoch, cache_index)`, so a sample is a
pure function of (seed, epoch, row): the same whatever DataLoader worker, rank or order reads it, and a
resumed run sees exactly the batches it would have seen. Call `set_epoch` before each epoch, in the main
process, before the epoch's `iter(loader)`. The epoch is kept in shared memory (`shares_epoch`), so it
reaches loader workers that persist across epochs, which the engine then keeps instead of starting new
ones every epoch.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import Dataset, default_collate, get_worker_info

from sscxr.data.cache import ImageCache
from sscxr.data.cache_format import _MAX
from sscxr.data.corruption import CorruptionConfig, CorruptionDraw, apply_corruption, draw_corruption_each
from sscxr.data.transforms import AugmentConfig, AugmentParams, apply_augment, augment, draw_augment_arrays
from sscxr.errors import DataError
from sscxr.utils import generator_for

__all__ = [
    "GMML_HOST_KEYS",
    "CachedDataset",
    "GMMLDataset",
    "GMMLViews",
    "Sample",
    "cache_split_indices",
    "finish_view",
]

Sample = dict[str, torch.Tensor]
# `empty(shape, dtype)`: where a batch's pixels are gathered (`torch.empty`, pinned memory, a reused buffer)
EmptyTensor = Callable[[tuple[int, ...], torch.dtype], torch.Tensor]


def cache_split_indices(cache: ImageCache, split: str | Sequence[str]) -> np.ndarray:
    """(K,) int64 indices of the decoded rows of one split (or several), in row order."""
    return cache.indices(split=split)


def _check_indices(cache: ImageCache, indices: Sequence[int] | np.ndarray) -> np.ndarray:
    idx = np.asarray(indices, dtype=np.int64).reshape(-1)
    if idx.size and (idx.min() < 0 or idx.max() >= len(cache)):
        raise ValueError(f"indices must lie in [0, {len(cache)}), got [{idx.min()}, {idx.max()}]")
    if np.unique(idx).size != idx.size:
        raise ValueError(
            "indices must not repeat (a repeated row would count twice and could be its own donor)"
        )
    bad = idx[~cache.ok[idx]]
    if bad.size:
        raise DataError(
            f"{cache.root}: {bad.size} selected rows failed to decode (first: row {bad[0]}, "
            f"{cache.rows[bad[0]].path}); select with `cache.indices(...)`, which skips them (failures.csv)."
        )
    return idx


def finish_view(
    x: torch.Tensor, params: AugmentParams | None, normalize: tuple[float, float]
) -> torch.Tensor:
    """(B, 1, S, S) float32 in [0, 1] -> the drawn augmentation applied (when `params` is given), then
    standardised with (mean, std). What GMML's views and MAE's samples both do to a cached image.

    Standardises in place, so no second (B, 1, S, S) buffer on the training step's hot path: `x` must
    be a tensor the caller owns (both callers convert cached pixels into a fresh one).
    """
    if params is not None:
        x, _ = apply_augment(x, params)
    return x.sub_(normalize[0]).div_(normalize[1])


class CachedDataset(Dataset[Sample]):
    """Cached images (optionally labels and masks), augmented per (seed, epoch, row).

    Args:
        cache: an opened `ImageCache`.
        indices: cache rows to serve (e.g. `cache.indices(split="train")`); order defines `k`.
        label_map: label string -> class id. Rows whose label is not a key are dropped (`n_excluded`).
            None: no "label" in samples.
        augment: augmentation config; None = no augmentation (evaluation).
        seed: base seed of the per-sample generators.
        with_mask: also return the row's mask (every selected row must have one).
        normalize: (mean, std) to standardise the image with; None keeps [0, 1] intensities.

    `dataset[k]` is a dict: "image" (1, S, S) float32, "index" () long (cache row), and "label" () long
    when `label_map` is given, "mask" (1, S, S) float32 0/1 when `with_mask`. Patient ids are not put in
    batches (strings); read them from `patient_ids[k]`.
    """

    def __init__(
        self,
        cache: ImageCache,
        indices: Sequence[int] | np.ndarray,
        label_map: dict[str, int] | None = None,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        with_mask: bool = False,
        normalize: tuple[float, float] | None = None,
    ) -> None:
        idx = _check_indices(cache, indices)
        self.n_excluded = 0
        if label_map is not None:
            keep = np.array([cache.rows[i].label in label_map for i in idx], dtype=bool)
            self.n_excluded = int((~keep).sum())
            idx = idx[keep]
        if with_mask and not cache.has_masks:
            raise DataError(f"{cache.root}: with_mask=True but the cache has no masks.")
        if with_mask and not cache.mask_available[idx].all():
            missing = int((~cache.mask_available[idx]).sum())
            raise DataError(
                f"{cache.root}: {missing} selected rows have no mask; select rows with "
                "`cache.mask_available[i]` for segmentation."
            )
        if normalize is not None and not normalize[1] > 0:
            raise ValueError(f"normalize std must be > 0, got {normalize}")
        self.cache, self.indices, self.label_map = cache, idx, label_map
        self.augment_cfg, self.seed, self.with_mask, self.normalize = augment, seed, with_mask, normalize
        # A shared-memory scalar, not an int: persistent loader workers read the value set_epoch writes.
        self._epoch = torch.zeros((), dtype=torch.int64).share_memory_()
        self.patient_ids = np.array([cache.rows[i].patient_id for i in idx], dtype=object)
        self.labels = (
            np.array([label_map[cache.rows[i].label] for i in idx], dtype=np.int64)
            if label_map is not None
            else None
        )

    #: `set_epoch` reaches loader workers that persist across epochs (the engine keeps them).
    shares_epoch = True

    @property
    def epoch(self) -> int:
        """The epoch whose random draws samples use."""
        return int(self._epoch)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose random draws samples use (seen by every loader worker)."""
        self._epoch.fill_(int(epoch))

    def __len__(self) -> int:
        return int(self.indices.size)

    def generator(self, k: int) -> torch.Generator:
        """The generator of sample `k` in the current epoch."""
        return generator_for(self.seed, self.epoch, int(self.indices[k]))

    def sample_rng(self, k: int) -> np.random.Generator:
        """A numpy generator of sample `k` in the current epoch (the pre-training samples' draws).

        numpy rather than torch: a pre-training sample's draws are a few dozen tiny arrays, for which
        numpy calls cost a fraction of torch's, and they are most of a loader worker's time.
        """
        return np.random.default_rng([self.seed, self.epoch, int(self.indices[k])])

    def _load(
        self, row: int, generator: torch.Generator, with_mask: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Row `row` augmented with `generator`: image (1, S, S) float32 (standardised if asked), mask."""
        image = torch.from_numpy(self.cache.image_float(row))[None]
        mask = torch.from_numpy(self.cache.mask(row).astype(np.float32))[None] if with_mask else None
        if self.augment_cfg is not None:
            image, mask = augment(image, generator, self.augment_cfg, mask)
        if self.normalize is not None:
            image = (image - self.normalize[0]) / self.normalize[1]
        return image, mask

    def __getitem__(self, k: int) -> Sample:
        row = int(self.indices[k])
        image, mask = self._load(row, self.generator(k), self.with_mask)
        sample: Sample = {"image": image, "index": torch.tensor(row, dtype=torch.long)}
        if self.labels is not None:
            sample["label"] = torch.tensor(self.labels[k], dtype=torch.long)
        if mask is not None:
            sample["mask"] = mask
        return sample


#: Batch entries of a deferred GMML batch that stay on the host: `GMMLViews` reads them as Python
#: numbers (which images need noise, each one's seed, whether any warp is not the identity); reading
#: them back from a GPU would stall it. The warps go to the device when they are used (a few bytes).
GMML_HOST_KEYS: frozenset[str] = frozenset(
    {"kind", "noise_seed", "theta", "intensity", "donor_theta", "donor_intensity"}
)


class GMMLDataset(CachedDataset):
    """GMML pre-training samples: an augmented clean image, its corruption and the corruption mask.

    Per sample, from one numpy generator (`sample_rng`) and in this order: the donor row (uniform among
    the other rows of `indices`, never the image itself), the image's augmentation draws, the donor's
    own, then the corruption's (`draw_corruption_numpy`: kind, target, blocks, noise seed; a batch's
    are made together by `draw_corruption_each`, each from its sample's generator). The donor is drawn
    from the dataset rather than the batch so that each sample stays a pure function of (seed, epoch,
    row), independent of batch composition.

    Two ways to serve the same samples (`deferred`):
    - False: each sample is finished in the loader worker (`GMMLViews` on a batch of one).
    - True: the sample holds the cached uint16 pixels of the image and its donor plus the draws, under
      half the bytes (4 per pixel against 9); the training step finishes the whole batch on its device
      (`GMMLViews`: batched warp, intensity jitter and corruption), so a GPU is not fed by CPU-bound
      loader workers.
    Both give the same tensors (on one kind of device): the draws are made in the same place.

    Args:
        cache, indices, augment, seed: as `CachedDataset`.
        corruption_cfg: GMML corruption settings.
        patch_size: block grid of the corruption when `corruption_cfg.align` is None.
        normalize: (mean, std); None = the cache's own statistics (GMML.md: not ImageNet's).
        deferred: serve raw pixels and draws instead of finished samples.

    `dataset[k]` (not deferred): "image" (1, S, S) clean standardised, "corrupted" (1, S, S), "mask"
    (1, S, S) bool (True = manipulated pixel), "kind" () long (0 noise, 1 replace), "index" () long,
    "donor" () long (donor row; -1 when the corruption uses no donors). Deferred: "pixels" (1, S, S)
    uint16, with augmentation "theta" (2, 3) and "intensity" (3,); with donors "donor_pixels",
    "donor_theta", "donor_intensity"; "cells" (gh, gw) bool, "kind", "noise_seed" () int64, "index",
    "donor".
    """

    def __init__(
        self,
        cache: ImageCache,
        indices: Sequence[int] | np.ndarray,
        corruption_cfg: CorruptionConfig,
        patch_size: int,
        augment: AugmentConfig | None = None,
        seed: int = 0,
        normalize: tuple[float, float] | None = None,
        deferred: bool = False,
    ) -> None:
        super().__init__(
            cache,
            indices,
            augment=augment,
            seed=seed,
            normalize=cache.stats if normalize is None else normalize,
        )
        if corruption_cfg.uses_donors and len(self) < 2:
            raise ValueError(
                "the replace corruption needs at least 2 images (a donor is never the image itself)"
            )
        self.align = corruption_cfg.align or patch_size
        if cache.size % self.align:
            raise ValueError(f"cache size {cache.size} is not divisible by the corruption grid {self.align}")
        self.corruption_cfg, self.patch_size, self.deferred = corruption_cfg, patch_size, deferred

    @property
    def views(self) -> GMMLViews:
        """What turns this dataset's deferred samples into finished ones."""
        assert self.normalize is not None  # always set for GMML (the cache's statistics by default)
        return GMMLViews(self.normalize, self.align)

    def donor_position(self, k: int, rng: np.random.Generator) -> int:
        """Position (in `indices`) of sample k's donor: uniform over the others, drawn from `rng`."""
        j = int(rng.integers(max(len(self) - 1, 1)))  # always drawn: stable stream
        if len(self) < 2:
            return -1  # no other image; only possible when the corruption uses no donors
        return j + 1 if j >= k else j  # skip k itself

    def deferred_batch(self, ks: Sequence[int]) -> Sample:
        """Samples `ks` as one deferred batch: what `default_collate` makes of their `deferred_sample`s.

        `deferred_draws` then `gather_pixels`: the draws are written into the batch's arrays and the
        cached pixels gathered in one copy, instead of a tensor per value per sample and then a stack.
        """
        return self.gather_pixels(self.deferred_draws(ks))

    def deferred_draws(self, ks: Sequence[int], shared: bool = False) -> Sample:
        """Every random draw of samples `ks`, batched: a deferred batch without its pixels.

        Each sample's draws come from its own generator, one sample after the other as always (the
        corruption's geometry for the whole batch at once: `draw_corruption_each`). Every tensor is a
        view of one storage (`_batch_tensors`). `shared`: the draws are to be sent from a loader
        worker, so that storage is one shared-memory segment there.
        """
        n, size, grid = len(ks), self.cache.size, (self.cache.size // self.align,) * 2
        donors = self.corruption_cfg.uses_donors
        views = 2 if donors else 1  # the image, then its donor
        specs = {
            "theta": ((views, n, 2, 3), torch.float32),
            "intensity": ((views, n, 3), torch.float32),
            "cells": ((n, *grid), torch.bool),
            "kind": ((n,), torch.int64),
            "noise_seed": ((n,), torch.int64),
            "index": ((n,), torch.int64),
            "donor": ((n,), torch.int64),
        }
        if self.augment_cfg is None:
            del specs["theta"], specs["intensity"]
        t = _batch_tensors(specs, shared)
        a = {key: value.numpy() for key, value in t.items()}  # numpy views: the draws are written here
        a["index"][:] = self.indices[np.asarray(ks, dtype=np.int64)]
        a["donor"][:] = -1
        rngs = [self.sample_rng(k) for k in ks]
        for i, (k, g) in enumerate(zip(ks, rngs, strict=True)):
            donor_k = self.donor_position(k, g)
            if donors:
                a["donor"][i] = self.indices[donor_k]
            if self.augment_cfg is not None:
                for view in range(views):  # the image's draws, then its donor's
                    a["theta"][view, i], a["intensity"][view, i] = draw_augment_arrays(
                        g, self.augment_cfg, size, size
                    )
        # Then each generator's corruption draws, the geometry of the whole batch at once.
        draw = draw_corruption_each(rngs, self.corruption_cfg, grid)
        a["cells"][:], a["kind"][:], a["noise_seed"][:] = draw.cells, draw.kind, draw.noise_seed
        batch: Sample = {}
        if self.augment_cfg is not None:
            for view, prefix in enumerate(("", "donor_")[:views]):
                batch[f"{prefix}theta"], batch[f"{prefix}intensity"] = t["theta"][view], t["intensity"][view]
        batch.update({key: t[key] for key in ("cells", "kind", "noise_seed", "index", "donor")})
        return batch

    def gather_pixels(self, draws: Sample, empty: EmptyTensor | None = None) -> Sample:
        """`draws` (of `deferred_draws`) with the cached pixels of their images and donors added.

        "pixels" and "donor_pixels" are views of one (2, B, 1, S, S) uint16 tensor made by
        `empty(shape, dtype)` (None: `torch.empty`; e.g. pinned memory for a copy to a CUDA device that
        does not wait, or a reused buffer), filled by one gather per view from the cache's rows "index"
        and "donor".
        """
        views = ("pixels", "donor_pixels")[: 2 if self.corruption_cfg.uses_donors else 1]
        n, size = draws["index"].shape[0], self.cache.size
        shape = (len(views), n, 1, size, size)
        pixels = torch.empty(shape, dtype=torch.uint16) if empty is None else empty(shape, torch.uint16)
        out = pixels.numpy()
        for view, key in enumerate(("index", "donor")[: len(views)]):
            # mode="clip": writes straight into `out` (the rows are valid; "raise" would buffer a copy).
            np.take(self.cache.images, draws[key].numpy(), axis=0, out=out[view, :, 0], mode="clip")
        return {**{key: pixels[view] for view, key in enumerate(views)}, **draws}

    def deferred_sample(self, k: int) -> Sample:
        """Sample k as cached pixels plus every random draw (what `dataset[k]` is when `deferred`)."""
        return {key: value[0] for key, value in self.deferred_batch([k]).items()}

    def __getitem__(self, k: int) -> Sample:
        if self.deferred:
            return self.deferred_sample(k)
        return {key: value[0] for key, value in self.views(self.deferred_batch([k])).items()}

    def fetch_batch(self, ks: Sequence[int]) -> Sample:
        """What a loader worker makes of samples `ks`; `complete_batch` of it is the collated batch.

        Deferred: only the draws (`deferred_draws`, a few hundred bytes a sample); the training
        process adds the pixels (`complete_batch`) from the cache it has open, where sending them from
        the worker would put 256 KiB a sample (at 256 px) through fresh shared memory, whose page
        faults cost more than the worker's own work. Not deferred: the finished samples, stacked.

        The engine's loaders fetch whole batches with it (see `sscxr.engine.sampler.build_loader`);
        a plain DataLoader over this dataset reads `dataset[k]` and gets the same batches.
        """
        if self.deferred:
            return self.deferred_draws(ks, shared=True)
        return default_collate([self[k] for k in ks])

    def complete_batch(self, batch: Sample, empty: EmptyTensor | None = None) -> Sample:
        """`fetch_batch`'s result as the collated batch, in the process that trains (see there); the
        deferred batches' pixels go into `empty(shape, dtype)` (see `gather_pixels`)."""
        return self.gather_pixels(batch, empty) if self.deferred else batch


def _batch_tensors(
    specs: dict[str, tuple[tuple[int, ...], torch.dtype]], shared: bool
) -> dict[str, torch.Tensor]:
    """Uninitialised tensors of the given shapes and dtypes, all views of one storage.

    `shared` and inside a DataLoader worker, that storage is one shared-memory segment, allocated as
    `default_collate` allocates its batches: sending the batch to the training process then copies
    nothing and passes one file descriptor, where a batch of separate tensors costs a new segment per
    tensor (about 0.4 ms each, which at small images was most of a worker's time per batch).
    """
    align = 64  # bytes: every view starts where any dtype may start
    sizes = {key: math.prod(shape) * dtype.itemsize for key, (shape, dtype) in specs.items()}
    offsets, total = {}, 0
    for key, nbytes in sizes.items():
        offsets[key] = total
        total += -(-nbytes // align) * align
    in_worker = shared and get_worker_info() is not None
    storage = torch.UntypedStorage._new_shared(total) if in_worker else torch.UntypedStorage(total)
    base = torch.empty(0, dtype=torch.uint8).set_(storage)
    return {
        key: base[offsets[key] : offsets[key] + sizes[key]].view(dtype).view(shape)
        for key, (shape, dtype) in specs.items()
    }


@dataclass(frozen=True)
class GMMLViews:
    """Turns a batch of deferred GMML samples into finished ones, on the batch's device.

    Args:
        normalize: (mean, std) of the standardisation (applied after augmentation).
        align: pixels per corruption cell.

    Calling it on a deferred batch (keys of `GMMLDataset.deferred_sample`, stacked; "kind" and
    "noise_seed" may stay on the host, see `GMML_HOST_KEYS`) returns "image", "corrupted" (B, 1, S, S)
    float32, "mask" (B, 1, S, S) bool, "kind" (B,) long on the pixels' device, and "index", "donor".
    A batch that is already finished (no "pixels") is returned as it is.
    """

    normalize: tuple[float, float]
    align: int

    def _clean(self, batch: Sample, prefix: str) -> torch.Tensor:
        """(B, 1, S, S) float32: cached pixels to [0, 1], the drawn augmentation, standardisation."""
        x = batch[f"{prefix}pixels"].float().div_(_MAX)  # as ImageCache.image_float
        drawn = f"{prefix}theta" in batch
        params = AugmentParams(batch[f"{prefix}theta"], batch[f"{prefix}intensity"]) if drawn else None
        return finish_view(x, params, self.normalize)

    @torch.no_grad()
    def __call__(self, batch: Sample) -> Sample:
        if "pixels" not in batch:
            return batch
        # Data preparation, not the model: full float32 even inside the step's autocast.
        with torch.autocast(batch["pixels"].device.type, enabled=False):
            image = self._clean(batch, "")
            donors = self._clean(batch, "donor_") if "donor_pixels" in batch else None
            draw = CorruptionDraw(batch["kind"], batch["cells"], batch["noise_seed"])
            out = apply_corruption(image, donors, draw, self.align)
        return {
            "image": image,
            "corrupted": out.x,
            "mask": out.mask,
            "kind": out.kind,
            "index": batch["index"],
            "donor": batch["donor"],
        }
