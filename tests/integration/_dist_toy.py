"""Toy training run for the distributed engine test; run directly (1 process) or under torchrun.

Writes, on rank 0, `OUT/result.pt` with the final weights, the metrics of the untrained model on an
uneven validation set (7 samples) and the final validation metrics.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.distributed import cleanup, init_distributed
from sscxr.engine.logging import read_metrics
from sscxr.engine.trainer import evaluate, fit
from toy import ToyDataset, ToyTask


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--split", type=int, default=0, help="stop after this many steps, then resume")
    p.add_argument(
        "--own-folders", action="store_true", help="each rank r > 0 uses OUT/rank<r>: no shared --out"
    )
    args = p.parse_args()
    dist = init_distributed("cpu")
    if args.own_folders and dist.rank > 0:
        args.out = args.out / f"rank{dist.rank}"
    try:
        torch.manual_seed(0)
        task = ToyTask(dropout=0.0)
        train, val = ToyDataset(n=36), ToyDataset(n=7, seed=1)
        before = evaluate(task, val, dist, batch_size=2)
        tcfg = TrainConfig(
            epochs=2,
            batch_size=args.batch,
            accum_steps=args.accum,
            workers=0,
            amp="off",
            progress=False,
            log_every=2,
            checkpoint_every=0,
        )
        ocfg = OptimConfig(lr=1e-2, warmup_epochs=0.5)
        if args.split:
            split = TrainConfig(**{**tcfg.__dict__, "max_steps": args.split})
            fit(task, train, val, split, ocfg, args.out, dist, None, resume=False)
            torch.manual_seed(99 + dist.rank)  # a "restarted" job: other init, other RNG
            task = ToyTask(dropout=0.0)
        fit(task, train, val, tcfg, ocfg, args.out, dist, None, resume="auto")
        # Every rank keeps its final weights: they must be identical.
        args.out.mkdir(parents=True, exist_ok=True)
        torch.save(task.state_dict(), args.out / f"weights_rank{dist.rank}.pt")
        if dist.is_main:
            final = [r["metrics"] for r in read_metrics(args.out) if r["split"] == "val"][-1]
            torch.save(
                {"weights": task.state_dict(), "before": before, "final": final}, args.out / "result.pt"
            )
    finally:
        cleanup()


if __name__ == "__main__":
    main()
