"""A toy Task and dataset for engine tests: a small MLP regressing random vectors.

The task uses dropout (drawn from torch's global RNG) so that exact-resume tests fail unless the
engine restores RNG states; it can inject non-finite losses and replay a fixed list of validation
scores to test the finite-loss guard and best-checkpoint selection.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from sscxr.tasks.base import Batch, StepOutput, Task, TrainedWeights, reduce_sum


class ToyDataset(Dataset[dict[str, torch.Tensor]]):
    """`n` samples `{"x": (dim,), "y": (1,)}` with y a fixed linear function of x plus noise."""

    def __init__(self, n: int = 40, dim: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.1 * torch.randn(n, 1, generator=g)
        self.epochs_set: list[int] = []

    def set_epoch(self, epoch: int) -> None:
        self.epochs_set.append(epoch)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "y": self.y[i], "index": torch.tensor(i)}


class ToyTask(Task):
    """MLP regression with MSE loss; validation reports the global MSE and the sample count.

    Args:
        dim: input size.
        dropout: dropout probability (> 0 makes training consume the global RNG).
        nan_calls: training_step calls (0-based) whose loss is made NaN.
        nan_from: every call from this one on gives a NaN loss.
        val_scores: if given, `compute_metrics` also returns `score` = the next value of this list.
    """

    def __init__(
        self,
        dim: int = 8,
        dropout: float = 0.2,
        nan_calls: frozenset[int] = frozenset(),
        nan_from: int | None = None,
        val_scores: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(dim, 16), nn.LayerNorm(16), nn.GELU(), nn.Dropout(dropout), nn.Linear(16, 1)
        )
        self.nan_calls, self.nan_from = nan_calls, nan_from
        self.val_scores = list(val_scores) if val_scores is not None else None
        self.calls = 0
        self.epoch_ends: list[int] = []
        self.reset_metrics()

    def training_step(self, batch: Batch) -> StepOutput:
        pred = self.net(batch["x"])
        loss = nn.functional.mse_loss(pred.float(), batch["y"].float())
        if self.calls in self.nan_calls or (self.nan_from is not None and self.calls >= self.nan_from):
            loss = loss * float("nan")
        self.calls += 1
        return StepOutput(loss, {"abs_err": (pred.float() - batch["y"]).abs().mean().detach()})

    def validation_step(self, batch: Batch) -> None:
        pred = self.net(batch["x"]).float()
        self._sq = self._sq + ((pred - batch["y"]) ** 2).sum().double().cpu()
        self._n = self._n + torch.tensor(float(len(pred)), dtype=torch.float64)

    def compute_metrics(self) -> dict[str, float]:
        total = reduce_sum(torch.stack([self._sq, self._n]))
        out = {"mse": float(total[0] / total[1]), "count": float(total[1])}
        if self.val_scores is not None:
            out["score"] = self.val_scores.pop(0)
        return out

    def reset_metrics(self) -> None:
        self._sq = torch.zeros((), dtype=torch.float64)
        self._n = torch.zeros((), dtype=torch.float64)

    def on_epoch_end(self, run_dir: Path, epoch: int) -> None:
        self.epoch_ends.append(epoch)

    def export(self, run_dir: Path, trained: TrainedWeights) -> None:
        self.trained = trained  # what the engine handed over, for the tests
        torch.save(self.state_dict(), Path(run_dir) / "exported.pt")
