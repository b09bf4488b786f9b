"""Two gloo processes train and evaluate exactly like one process with the same global batch."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).with_name("_dist_toy.py")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _run(cmd: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run([sys.executable, str(SCRIPT), "--out", str(single), "--batch", "8"])
    # 2 ranks x 2 per micro-batch x 2 accumulation = the single run's batch of 8; stopped and resumed
    # mid-epoch to also cover per-rank resume under DDP.
    _run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            f"--master_port={_free_port()}",
            str(SCRIPT),
            "--out",
            str(multi),
            "--batch",
            "2",
            "--accum",
            "2",
            "--split",
            "3",
        ]
    )
    one = torch.load(single / "result.pt", weights_only=True)
    two = torch.load(multi / "result.pt", weights_only=True)
    for name, value in one["weights"].items():
        torch.testing.assert_close(two["weights"][name], value, atol=1e-5, rtol=1e-5, msg=name)
    # Uneven validation shards (4 + 3 samples): every sample counted once, same metric as one process.
    assert one["before"]["count"] == two["before"]["count"] == 7.0
    assert two["before"]["mse"] == pytest.approx(one["before"]["mse"], rel=1e-6)
    assert two["final"]["val/count"] == 7.0
    assert one["final"]["val/mse"] < one["before"]["mse"]  # it did train
    assert two["final"]["val/mse"] == pytest.approx(one["final"]["val/mse"], rel=1e-4)


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_resume_without_a_shared_out_folder(tmp_path: Path) -> None:
    """Each rank has its own --out and only rank 0's holds the checkpoint (nodes without a shared
    disk): after the restart every rank resumes from rank 0's state and ends with the weights of an
    uninterrupted single-process run."""
    single, multi = tmp_path / "single", tmp_path / "multi"
    _run([sys.executable, str(SCRIPT), "--out", str(single), "--batch", "8"])
    launch = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node=2",
        f"--master_port={_free_port()}",
    ]
    _run([*launch, str(SCRIPT), "--out", str(multi), "--batch", "4", "--split", "3", "--own-folders"])
    assert not (multi / "rank1" / "checkpoints").exists()  # rank 1 never had a checkpoint of its own
    one = torch.load(single / "result.pt", weights_only=True)["weights"]
    ranks = [
        torch.load(f, weights_only=True)
        for f in (multi / "weights_rank0.pt", multi / "rank1" / "weights_rank1.pt")
    ]
    for name, value in one.items():
        torch.testing.assert_close(ranks[0][name], ranks[1][name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(ranks[0][name], value, atol=1e-5, rtol=1e-5, msg=name)
