"""A resumable, per-rank sharded sampler and the DataLoader built on it.

Rank r of N takes `perm[r::N]` of one global permutation, so step s's global batch over N ranks (each
taking b samples) is the set `perm[s*N*b : (s+1)*N*b]`: the same images as a single process with batch
N*b. The permutation is a pure function of (seed, epoch), so a resumed run skips exactly the samples
already seen with `set_start`.
"""

from __future__ import annotations

import functools
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


class _CompletingLoader(DataLoader[Any]):
    """A DataLoader whose batches pass through `complete(batch)` in the process that iterates it."""

    def __init__(self, *args: Any, complete: Callable[[Any], Any], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.complete = complete

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        return map(self.complete, super().__iter__())


class TensorRing:
    """`empty(shape, dtype)` that hands out the memory of earlier tensors again once nothing uses it.

    Filling fresh memory costs a page fault per 4 KiB page, which on some virtual machines is ~10 us,
    more than gathering the pixels into it: a new (2, 64, 1, 256, 256) uint16 batch each step cost the
    training process 0.7 ms a sample there, a reused one 0.05. A buffer is handed out again only when
    no tensor but the ring's own refers to its storage (PyTorch's storage use count, the test its
    CUDA-graph trees use); while a batch is held anywhere (a list, a numpy view, a dtype view) its
    buffer is left alone and another is used. Where PyTorch does not give that count, every call
    allocates. Pinned memory needs none of this: PyTorch's pinned allocator caches on its own.

    Args:
        slots: buffers kept; with more batches alive at once than this, the extra ones are fresh.
    """

    def __init__(self, slots: int = 4) -> None:
        self.slots = slots
        self._held: list[tuple[torch.Tensor, int]] = []  # (buffer, its use count when nothing else uses it)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised CPU tensor of `shape` and `dtype`: a view of a buffer nothing else uses."""
        shape = tuple(shape)
        free = [entry for entry in self._held if _storage_uses(entry[0]) == entry[1]]
        for buffer, _ in free:
            if buffer.shape == shape and buffer.dtype == dtype:
                return buffer.view(shape)
        buffer = torch.empty(shape, dtype=dtype)
        idle = _storage_uses(buffer)
        if idle is not None:
            if len(self._held) >= self.slots and free:  # make room: forget a free buffer of another shape
                self._held.remove(free[0])
            if len(self._held) < self.slots:
                self._held.append((buffer, idle))
        return buffer.view(shape)


def _storage_uses(tensor: torch.Tensor) -> int | None:
    """References to `tensor`'s storage (None where PyTorch does not say)."""
    count = getattr(torch._C, "_storage_Use_Count", None)
    return None if count is None else int(count(tensor.untyped_storage()._cdata))


def _pinned_empty(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(shape, dtype=dtype, pin_memory=True)


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
    unless a `collate_fn` is given; others are read sample by sample and collated. Its
    `complete_batch(batch, empty)`, if it has one, finishes each batch in this process (after pinning,
    when `pin_memory`), with `empty(shape, dtype)` making its new tensors: pinned memory when
    `pin_memory`, else a `TensorRing`'s reused buffers. What is cheaper here than sent from a worker.

    `persistent` keeps the workers between epochs (`workers` > 0): only for datasets whose `set_epoch`
    reaches workers that are already running (`shares_epoch`); otherwise workers are recreated each
    epoch so that they get the dataset as `set_epoch` left it.
    """
    kind: Callable[..., DataLoader[Any]] = DataLoader
    if collate_fn is None and callable(getattr(dataset, "fetch_batch", None)):
        complete = getattr(dataset, "complete_batch", None)
        if callable(complete):
            empty = _pinned_empty if pin_memory else TensorRing().empty
            kind = functools.partial(_CompletingLoader, complete=functools.partial(complete, empty=empty))
        dataset, collate_fn = _BatchFetch(dataset), _assembled
    return kind(
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
