"""What the pre-training methods (GMML, MAE: `tasks/methods.py`) share.

`PretrainingTask` holds the encoder's description and its exports (the final `encoder` and snapshots
along the way, with the training time, so probe quality can be plotted against pre-training minutes),
and the validation reconstruction error accumulated as a (sum, count) pair gathered over ranks.
`pretraining_rows` picks the cache rows a method pre-trains and validates on.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sscxr.data.cache import ImageCache
from sscxr.errors import DataError
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import ViTConfig
from sscxr.tasks.base import Task, TrainedWeights, reduce_sum

__all__ = ["PretrainingTask", "pretraining_rows"]


class PretrainingTask(Task):
    """Base of the pre-training tasks: encoder exports and the validation reconstruction error.

    Args:
        vit_cfg: the encoder's architecture (written next to the exported weights).
        normalization: the intensity standardisation it is trained with.
        extra_export: metadata stored with every export (data manifest hash, ...).
        snapshot_every: export the encoder every N epochs to `snapshots/epoch_NNN` (0: never).

    Subclasses hold their model as `self.model`, whose `encoder` (a timm ViT) is what is exported; they
    set `method` and `metric`, call `_started()` first in `training_step` and
    `_accumulate(error_sum, count)` in `validation_step`, may add to `export_info()` and may draw
    their picture in `write_picture`.
    """

    method = "pretraining"  # the name exports record under "pretraining"
    metric = "recon"  # the validation metric's name

    def __init__(
        self,
        vit_cfg: ViTConfig,
        normalization: Normalization,
        extra_export: dict[str, Any] | None = None,
        snapshot_every: int = 0,
    ) -> None:
        super().__init__()
        self.vit_cfg = vit_cfg
        self.normalization = normalization
        self.extra_export = extra_export or {}
        self.snapshot_every = int(snapshot_every)
        self._t0: float | None = None  # wall clock of the first training step of this process
        self._val_sum = 0.0
        self._val_count = 0.0

    def _started(self) -> None:
        """Note the first training step's time (snapshots record the training time since)."""
        if self._t0 is None:
            self._t0 = time.monotonic()

    def _accumulate(self, error_sum: float, count: float) -> None:
        """Add one validation batch's summed error over `count` elements (batches may differ in size)."""
        self._val_sum += error_sum
        self._val_count += count

    def compute_metrics(self) -> dict[str, float]:
        t = reduce_sum(torch.tensor([self._val_sum, self._val_count], dtype=torch.float64))
        return {self.metric: float(t[0] / t[1])} if t[1] > 0 else {}

    def reset_metrics(self) -> None:
        self._val_sum = 0.0
        self._val_count = 0.0

    def export_info(self) -> dict[str, Any]:
        """Metadata written with every export of the encoder."""
        return {"pretraining": self.method, **self.extra_export}

    def _export(self, folder: Path, extra: dict[str, Any]) -> None:
        export_encoder(self.model.encoder, self.vit_cfg, self.normalization, folder / "encoder", extra)

    def on_epoch_end(self, run_dir: Path, epoch: int) -> None:
        if self.snapshot_every and (epoch + 1) % self.snapshot_every == 0:
            # Time since this process started training (a resumed run counts from its restart).
            elapsed = None if self._t0 is None else round(time.monotonic() - self._t0, 1)
            extra = {**self.export_info(), "epoch": epoch + 1, "train_seconds": elapsed}
            self._export(Path(run_dir) / "snapshots" / f"epoch_{epoch + 1:03d}", extra)
        self.write_picture(Path(run_dir), epoch)

    def write_picture(self, run_dir: Path, epoch: int) -> None:
        """Rank 0, after each epoch: the method's reconstruction picture (default: none)."""
        return None

    def export(self, run_dir: Path, trained: TrainedWeights) -> None:
        self._export(Path(run_dir), self.export_info())

    def describe(self) -> dict[str, Any]:
        """What is exported alongside the encoder (for logs)."""
        return {"vit": asdict(self.vit_cfg), "normalization": asdict(self.normalization)}


def pretraining_rows(
    cache: ImageCache, cache_name: str, splits: list[str], val_split: str, section: str
) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, validation rows) of a pre-training: `splits` without `val_split`, and `val_split`
    when it is one of `splits` (else none). Rows are sorted.

    Raises:
        DataError: no usable image in the training splits (the message lists the cache's splits and
            says how to choose, `section` naming the config section, e.g. "gmml").
    """
    train_splits = [s for s in splits if s != val_split]
    parts = [cache.indices(split=s) for s in train_splits]
    train = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if len(train) == 0:
        present = sorted({r.split or "(none)" for r in cache.rows})
        raise DataError(
            f"{cache_name}: no usable images in splits {train_splits} (the cache's splits: "
            f"{', '.join(present)}); pre-train on the splits it has ({section}.splits=[...]) or assign "
            "splits with sscxr split MANIFEST --split 0.7,0.15,0.15 --out NEW.csv and prepare a cache "
            "from it"
        )
    val = cache.indices(split=val_split) if val_split in splits else np.zeros(0, dtype=np.int64)
    return np.sort(train), np.sort(np.asarray(val, dtype=np.int64))
