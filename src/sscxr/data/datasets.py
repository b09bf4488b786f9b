"""Datasets over an `ImageCache`: fine-tuning samples (`CachedDataset`) and GMML samples (`GMMLDataset`).

Every random number of a sample comes from `generator_for(seed, epoch, cache_index)`, so a sample is a
pure function of (seed, epoch, row): the same whatever DataLoader worker, rank or order reads it, and a
resumed run sees exactly the batches it would have seen. Call `set_epoch` before each epoch, in the main
process, before the epoch's `iter(loader)`. The epoch is kept in shared memory (`shares_epoch`), so it
reaches loader workers that persist across epochs, which the engine then keeps instead of starting new
ones every epoch.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from sscxr.data.cache import ImageCache
from sscxr.data.corruption import CorruptionConfig, corrupt
from sscxr.data.transforms import AugmentConfig, augment
from sscxr.errors import DataError
from sscxr.utils import generator_for

__all__ = ["CachedDataset", "GMMLDataset", "Sample", "cache_split_indices"]

Sample = dict[str, torch.Tensor]


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


class GMMLDataset(CachedDataset):
    """GMML pre-training samples: an augmented clean image, its corruption and the corruption mask.

    Per sample, from one generator and in this order: the donor row (uniform among the other rows of
    `indices`, never the image itself), the image's augmentation, the donor's own augmentation, then
    `corrupt`. The donor is drawn from the dataset rather than the batch so that each sample stays a
    pure function of (seed, epoch, row), independent of batch composition.

    Args:
        cache, indices, augment, seed: as `CachedDataset`.
        corruption_cfg: GMML corruption settings.
        patch_size: block grid of the corruption when `corruption_cfg.align` is None.
        normalize: (mean, std); None = the cache's own statistics (GMML.md: not ImageNet's).

    `dataset[k]`: "image" (1, S, S) clean standardised, "corrupted" (1, S, S), "mask" (1, S, S) bool
    (True = manipulated pixel), "kind" () long (0 noise, 1 replace), "index" () long, "donor" () long
    (donor row; -1 when the corruption uses no donors).
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
        if cache.size % (corruption_cfg.align or patch_size):
            raise ValueError(
                f"cache size {cache.size} is not divisible by the corruption grid "
                f"{corruption_cfg.align or patch_size}"
            )
        self.corruption_cfg, self.patch_size = corruption_cfg, patch_size

    def donor_position(self, k: int, generator: torch.Generator) -> int:
        """Position (in `indices`) of sample k's donor: uniform over the others, drawn from `generator`."""
        j = int(
            torch.randint(max(len(self) - 1, 1), (1,), generator=generator)
        )  # always drawn: stable stream
        if len(self) < 2:
            return -1  # no other image; only possible when the corruption uses no donors
        return j + 1 if j >= k else j  # skip k itself

    def __getitem__(self, k: int) -> Sample:
        row = int(self.indices[k])
        g = self.generator(k)
        donor_k = self.donor_position(k, g)
        image, _ = self._load(row, g, with_mask=False)
        donor, donor_row = None, -1
        if self.corruption_cfg.uses_donors:
            donor_row = int(self.indices[donor_k])
            donor = self._load(donor_row, g, with_mask=False)[0][None]
        out = corrupt(image[None], donor, g, self.corruption_cfg, self.patch_size)
        return {
            "image": image,
            "corrupted": out.x[0],
            "mask": out.mask[0],
            "kind": out.kind[0],
            "index": torch.tensor(row, dtype=torch.long),
            "donor": torch.tensor(donor_row, dtype=torch.long),
        }
