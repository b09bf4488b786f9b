"""A resumable, per-rank sharded sampler and the DataLoader built on it.

Rank r of N takes `perm[r::N]` of one global permutation, so step s's global batch over N ranks (each
taking b samples) is the set `perm[s*N*b : (s+1)*N*b]`: the same images as a single process with batch
N*b. The permutation is a pure function of (seed, epoch), so a resumed run skips exactly the samples
already seen with `set_start`.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from sscxr.utils import derive_seed


class ShardedSampler(Sampler[int]):
    """Indices of this rank's shard of `range(n)` for the current epoch.

    Args:
        n: dataset length.
        world_size: number of processes.
        rank: this process's rank.
        seed: seed of the per-epoch permutation (derived with the epoch through `derive_seed`).
        shuffle: permute each epoch (training) or keep the natural order (evaluation).
        drop_last: drop the tail so every rank gets `n // world_size` samples (training).
        pad: instead of dropping, repeat the first indices until every rank has the same count. Never
            use it for evaluation: duplicates bias the metrics.
    """

    def __init__(
        self,
        n: int,
        world_size: int = 1,
        rank: int = 0,
        seed: int = 0,
        shuffle: bool = True,
        drop_last: bool = True,
        pad: bool = False,
    ) -> None:
        if n < 0 or world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(
                f"need n >= 0, world_size >= 1, 0 <= rank < world_size (got {n}, {world_size}, {rank})"
            )
        if drop_last and pad:
            raise ValueError("drop_last and pad are exclusive: choose one way to even out the shards")
        self.n, self.world_size, self.rank, self.seed = n, world_size, rank, seed
        self.shuffle, self.drop_last, self.pad = shuffle, drop_last, pad
        self.epoch = 0
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch's permutation and rewind to its start (call `set_start` afterwards to skip)."""
        self.epoch = epoch
        self.start = 0

    def set_start(self, k: int) -> None:
        """Skip the first `k` samples of this rank's shard (exact mid-epoch resume)."""
        if not 0 <= k <= self.shard_size():
            raise ValueError(f"start {k} outside this rank's shard of {self.shard_size()} samples")
        self.start = k

    def shard_size(self) -> int:
        """Samples in this rank's full shard for one epoch (before `set_start`)."""
        if self.drop_last:
            return self.n // self.world_size
        if self.pad:
            return -(-self.n // self.world_size)
        # Without padding rank r gets the indices r, r + N, ...: the first n % N ranks get one more.
        return len(range(self.rank, self.n, self.world_size))

    def _indices(self) -> np.ndarray:
        if self.shuffle:
            rng = np.random.default_rng(derive_seed(self.seed, self.epoch))
            order = rng.permutation(self.n)
        else:
            order = np.arange(self.n)
        if self.drop_last:
            order = order[: self.n - self.n % self.world_size]
        elif self.pad and self.n > 0:
            total = -(-self.n // self.world_size) * self.world_size
            order = np.resize(order, total)  # np.resize repeats from the start
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self._indices()[self.start :].tolist())

    def __len__(self) -> int:
        return self.shard_size() - self.start


def seed_worker(worker_id: int) -> None:
    """`worker_init_fn`: seed numpy and `random` in a loader worker from its torch seed.

    The torch seed of each worker is the loader generator's draw + worker_id, so this keeps any
    third-party augmentation that uses the global generators reproducible. It only runs inside the
    worker process, never in the trainer.
    """
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class _BatchFetch(Dataset[Any]):
    """A dataset that makes whole batches (`fetch_batch(indices)`), as a DataLoader fetches them.

    A DataLoader hands each batch's indices to `__getitems__` and its result to the collate function;
    here the first is the dataset's `fetch_batch` and the second passes the batch through.
    """

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, k: int) -> Any:
        return self.dataset[k]

    def __getitems__(self, ks: list[int]) -> Any:
        return self.dataset.fetch_batch(ks)


def _assembled(batch: Any) -> Any:
    return batch


def build_loader(
    dataset: Dataset[Any],
    sampler: ShardedSampler,
    batch_size: int,
    *,
    workers: int,
    seed: int,
    pin_memory: bool,
    drop_last: bool,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    persistent: bool = False,
) -> DataLoader[Any]:
    """A DataLoader over `sampler` whose worker seeds derive from `seed` (pass the epoch and rank into it).

    A dataset with a `fetch_batch(indices)` method (`GMMLDataset`) makes each batch whole, in one go,
    unless a `collate_fn` is given; others are read sample by sample and collated.

    `persistent` keeps the workers between epochs (`workers` > 0): only for datasets whose `set_epoch`
    reaches workers that are already running (`shares_epoch`); otherwise workers are recreated each
    epoch so that they get the dataset as `set_epoch` left it.
    """
    if collate_fn is None and callable(getattr(dataset, "fetch_batch", None)):
        dataset, collate_fn = _BatchFetch(dataset), _assembled
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=collate_fn,
        pin_memory=pin_memory,
        drop_last=drop_last,
        generator=torch.Generator().manual_seed(seed),
        worker_init_fn=seed_worker,
        persistent_workers=persistent and workers > 0,
    )


def build_eval_loader(
    dataset: Dataset[Any],
    world_size: int,
    rank: int,
    batch_size: int,
    *,
    workers: int = 0,
    pin_memory: bool = False,
    collate_fn: Callable[[list[Any]], Any] | None = None,
    persistent: bool = False,
) -> DataLoader[Any]:
    """This rank's evaluation loader: natural order, no padding, no dropped tail.

    Shards may differ by one sample between ranks; metrics gathered over ranks then count every sample
    exactly once (a padding sampler would count some twice). `persistent` keeps the workers between
    passes (`workers` > 0): evaluation samples do not change between passes.
    """
    sampler = ShardedSampler(len(dataset), world_size, rank, shuffle=False, drop_last=False, pad=False)  # type: ignore[arg-type]
    return build_loader(
        dataset,
        sampler,
        batch_size,
        workers=workers,
        seed=derive_seed(rank),
        pin_memory=pin_memory,
        drop_last=False,
        collate_fn=collate_fn,
        persistent=persistent,
    )
