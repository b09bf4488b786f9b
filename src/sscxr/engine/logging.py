"""Console logging with rank filtering, and the metrics log (`metrics.jsonl`, optional TensorBoard)."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from sscxr.console import StderrHandler

log = logging.getLogger(__name__)

_HANDLER_NAME = "sscxr-console"
_FILE_HANDLER_NAME = "sscxr-file"


class _RankFilter(logging.Filter):
    """Lets every record through on rank 0, only warnings and errors on the other ranks."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


def setup_logging(
    rank: int = 0, level: int = logging.INFO, log_file: str | os.PathLike[str] | None = None
) -> None:
    """Configure the `sscxr` logger: console on stderr, INFO on rank 0 and WARNING on other ranks.

    Calling it again replaces the handlers it installed before (no duplicated lines).

    Args:
        rank: this process's rank (non-zero ranks only report problems, tagged with their rank).
        level: level on rank 0.
        log_file: optional file that rank 0 also writes (appended).
    """
    logger = logging.getLogger("sscxr")
    logger.setLevel(min(level, logging.WARNING))
    for handler in list(logger.handlers):
        if handler.get_name() in (_HANDLER_NAME, _FILE_HANDLER_NAME):
            logger.removeHandler(handler)
            handler.close()
    prefix = "" if rank == 0 else f"[rank {rank}] "
    fmt = logging.Formatter(f"%(asctime)s {prefix}%(levelname)s %(name)s: %(message)s", "%H:%M:%S")
    console = StderrHandler()
    console.set_name(_HANDLER_NAME)
    console.setFormatter(fmt)
    console.setLevel(level if rank == 0 else logging.WARNING)
    console.addFilter(_RankFilter(rank))
    logger.addHandler(console)
    # The sscxr logger owns its output: records reaching a root handler too (e.g. from basicConfig) would
    # print twice, and unfiltered by rank.
    logger.propagate = False
    if log_file is not None and rank == 0:
        Path(log_file).parent.mkdir(parents=True, exist_ok=True)
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
        file_handler.set_name(_FILE_HANDLER_NAME)
        file_handler.setFormatter(fmt)
        file_handler.setLevel(level)
        logger.addHandler(file_handler)


def _json_number(value: float) -> float | str | None:
    # JSON has no NaN / inf: keep them readable as strings instead of writing invalid JSON.
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLogger:
    """Append-only metrics log: one JSON object per line in `run_dir/metrics.jsonl`.

    Each line is `{"step", "epoch", "split", "metrics": {name: value}, "time", "elapsed_s"}`. Only the
    main process writes (`enabled=False` elsewhere makes every call a no-op).
    """

    def __init__(
        self, run_dir: str | os.PathLike[str], enabled: bool = True, tensorboard: bool = False
    ) -> None:
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self._start = time.time()
        self._writer: Any = None
        if not enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            self._writer = _open_tensorboard(Path(run_dir) / "tensorboard")

    def log(self, split: str, metrics: Mapping[str, float], step: int, epoch: int) -> None:
        """Write one record (flushed at once so that a crash loses nothing already logged)."""
        if not self.enabled:
            return
        now = time.time()
        record = {
            "step": step,
            "epoch": epoch,
            "split": split,
            "metrics": {k: _json_number(float(v)) for k, v in metrics.items()},
            "time": round(now, 3),
            "elapsed_s": round(now - self._start, 3),
        }
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self._writer is not None:
            for name, value in metrics.items():
                self._writer.add_scalar(name if "/" in name else f"{split}/{name}", float(value), step)
            self._writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer, if any."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class StepMeter:
    """Running means of the per-step logs and the throughput since the last `summary`.

    Values stay on the device until `summary`, which averages them over ranks in one collective: the
    only host sync of the logging path. A step's logs may carry a device-side weight (1 = counted, 0 =
    a skipped step), so that the training loop need not know on the host which steps were skipped.
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}
        self._weight: torch.Tensor | None = None  # summed weights of the steps in `_sums`
        self._seen = 0
        self._t0 = time.perf_counter()

    def restart_clock(self) -> None:
        """Start a new throughput window (e.g. after validation, which should not count)."""
        self._t0, self._seen = time.perf_counter(), 0

    def add(self, logs: Mapping[str, torch.Tensor] | None, weight: torch.Tensor | None = None) -> None:
        """Record one optimiser step (every step counts for throughput).

        Args:
            logs: the step's scalar logs, or None for a step known on the host to be skipped.
            weight: the step's weight in the means as a scalar tensor (0 or 1; None = 1). A step of
                weight 0 adds nothing, even where its values are NaN, and costs no host sync.
        """
        self._seen += 1
        if not logs:
            return
        for name, value in logs.items():
            value = value.detach().float()
            if weight is not None:
                # where, not a product: NaN * 0 is NaN, and a skipped step's loss is often NaN.
                value = torch.where(weight > 0, value * weight, 0.0)
            self._sums[name] = self._sums[name] + value if name in self._sums else value
        if weight is None:
            weight = torch.ones((), device=next(iter(logs.values())).device)
        weight = weight.detach().float().reshape(())
        self._weight = weight if self._weight is None else self._weight + weight

    def summary(self, samples_per_step: int) -> dict[str, float]:
        """Means over steps and ranks, plus `img_per_s` (global); resets the window.

        Metrics are left out when no step of the window counted (all skipped). Every rank must call it
        at the same step (it is a collective); the weights must agree across ranks (the training loop's
        skip decision is all-reduced).
        """
        from sscxr.engine.distributed import all_reduce_mean  # deferred: avoids an import cycle

        now = time.perf_counter()
        out = {"img_per_s": self._seen * samples_per_step / max(now - self._t0, 1e-9)}
        if self._weight is not None:
            # The same weight on every rank: the mean over ranks of sum / weight is the global mean.
            scale = self._weight.clamp(min=1.0)
            means = all_reduce_mean({k: v / scale for k, v in self._sums.items()})
            keys = sorted(means)
            values = torch.stack([*(means[k] for k in keys), self._weight.to(means[keys[0]].device)])
            *numbers, weight = values.cpu().tolist()  # the one host sync
            if weight > 0:
                out.update(zip(keys, numbers, strict=True))
        self._sums, self._weight, self._seen, self._t0 = {}, None, 0, now
        return out


def _open_tensorboard(log_dir: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        # Logging extras must not stop a training run: say how to get them and carry on.
        log.warning(
            "train.tensorboard is set but the tensorboard package is missing: install it with "
            "`pip install 'sscxr[tensorboard]'` (or `pip install tensorboard`); metrics.jsonl "
            "is still written"
        )
        return None
    return SummaryWriter(log_dir=str(log_dir))


def read_metrics(run_dir: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` (for reports and tests)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
