"""Task.after_optimizer_step: an EMA teacher follows the student, resumes exactly, and 2 processes = 1.

Run as a script (one process, or under torchrun) this file is also the training run of the
2-process test: `python -m torch.distributed.run --nproc_per_node=2 test_task_hooks.py --out DIR ...`.
"""

from __future__ import annotations

import argparse
import copy
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.distributed import DistInfo, cleanup, init_distributed
from sscxr.engine.trainer import FitResult, fit
from sscxr.tasks.base import Batch, StepOutput, Task, cosine_value
from toy import ToyDataset

START, END = 0.9, 1.0  # the teacher's momentum schedule


class EMATask(Task):
    """A linear student regressing y, pulled towards an EMA teacher of itself (as in DINO / BYOL).

    The teacher is a deep copy with `requires_grad=False` (in the state_dict, outside the optimiser
    and DDP's reducer); the loss uses it, so a teacher that resumed wrong would also move the student.
    `after_optimizer_step` records its arguments and the student it saw, for the tests.
    """

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.student = nn.Linear(dim, 1)
        self.teacher = copy.deepcopy(self.student).requires_grad_(False)
        self.calls: list[tuple[int, int, float, bool]] = []  # step, total, momentum, grad enabled
        self.students: list[dict[str, torch.Tensor]] = []  # the student after each step

    def training_step(self, batch: Batch) -> StepOutput:
        pred = self.student(batch["x"]).float()
        target = self.teacher(batch["x"]).float()
        loss = nn.functional.mse_loss(pred, batch["y"].float()) + 0.5 * nn.functional.mse_loss(pred, target)
        return StepOutput(loss)

    def after_optimizer_step(self, step: int, total_steps: int) -> None:
        m = cosine_value(START, END, step, total_steps)
        self.calls.append((step, total_steps, m, torch.is_grad_enabled()))
        self.students.append({k: v.detach().clone() for k, v in self.student.state_dict().items()})
        for t, s in zip(self.teacher.parameters(), self.student.parameters(), strict=True):
            t.mul_(m).add_(s, alpha=1.0 - m)


def _fit(
    run_dir: Path, task: EMATask, resume: Any = False, dist: DistInfo | None = None, n: int = 40, **kw: Any
) -> FitResult:
    train = {
        "epochs": 2,
        "batch_size": 4,
        "workers": 0,
        "amp": "off",
        "progress": False,
        "log_every": 1,
        "checkpoint_every": 0,
    } | kw
    fused = train.pop("fused", None)
    optim = OptimConfig(lr=2e-2, warmup_epochs=0.5, weight_decay=0.05, fused=fused)
    return fit(task, ToyDataset(n=n), None, TrainConfig(**train), optim, run_dir, dist, None, resume=resume)


def _weights(task: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


def _steps(task: EMATask) -> list[tuple[int, int]]:
    return [(step, total) for step, total, _, _ in task.calls]


def test_cosine_value_runs_from_start_to_end() -> None:
    assert cosine_value(0.996, 1.0, 0, 10) == 0.996
    assert cosine_value(0.996, 1.0, 9, 10) == 1.0
    assert cosine_value(0.996, 1.0, 99, 10) == 1.0  # clamped past the end
    assert cosine_value(0.5, 1.0, 0, 1) == 0.5
    assert cosine_value(0.0, 1.0, 5, 11) == pytest.approx(0.5)
    values = [cosine_value(0.9, 1.0, i, 20) for i in range(20)]
    assert values == sorted(values)
    with pytest.raises(ValueError):
        cosine_value(0.0, 1.0, 0, 0)


@pytest.mark.parametrize("fused", [True, False])  # the step skippable on the device / decided on the host
def test_the_hook_updates_an_ema_teacher_after_every_step(tmp_path: Path, fused: bool) -> None:
    torch.manual_seed(0)
    task = EMATask()
    init = _weights(task.student)
    result = _fit(tmp_path, task, fused=fused)
    assert result.state.step == 20
    # Once per step, in order, with the planned length; under no_grad.
    assert _steps(task) == [(i, 20) for i in range(20)]
    assert not any(grad for *_, grad in task.calls)
    assert [m for _, _, m, _ in task.calls] == [cosine_value(START, END, i, 20) for i in range(20)]
    # The hook ran after the update: what it saw last is the final student.
    for k, v in task.student.state_dict().items():
        assert torch.equal(task.students[-1][k], v), k
    # Step 0 has lr 0 (warm-up from 0); from then on each step moves the student the hook sees.
    pairs = zip(task.students[:-1], task.students[1:], strict=True)
    moved = [not torch.equal(a["weight"], b["weight"]) for a, b in pairs]
    assert all(moved)
    # The teacher is the EMA of the students it saw, recomputed here in float64.
    expected = {k: v.double() for k, v in init.items()}
    for step, seen in enumerate(task.students):
        m = cosine_value(START, END, step, 20)
        expected = {k: m * expected[k] + (1 - m) * seen[k].double() for k in expected}
    for k, v in task.teacher.state_dict().items():
        torch.testing.assert_close(v.double(), expected[k], atol=1e-6, rtol=0, msg=k)
        assert not torch.equal(v, init[k]) and not torch.equal(v, task.student.state_dict()[k]), k
    # The teacher is checkpointed and left out of the optimiser.
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    for k, v in task.teacher.state_dict().items():
        assert torch.equal(ck["model"][f"teacher.{k}"], v), k
    assert sum(len(g["params"]) for g in ck["optimizer"]["param_groups"]) == 2  # student weight, bias


def test_resume_is_exact_teacher_included(tmp_path: Path) -> None:
    torch.manual_seed(0)
    straight = EMATask()
    _fit(tmp_path / "straight", straight)
    torch.manual_seed(0)
    first = EMATask()
    stopped = _fit(tmp_path / "split", first, max_steps=7, checkpoint_every=3)
    assert stopped.state.step == 7
    assert _steps(first) == [(i, 20) for i in range(7)]  # max_steps does not shorten the schedule
    # A fresh "process": another init (teacher included), another global RNG state.
    torch.manual_seed(1234)
    resumed = EMATask()
    result = _fit(tmp_path / "split", resumed, resume="auto")
    assert result.state.step == 20
    assert _steps(resumed) == [(i, 20) for i in range(7, 20)]
    a, b = _weights(straight), _weights(resumed)
    assert a.keys() == b.keys() and any(k.startswith("teacher.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -- 2 processes = 1 ---------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _train(out: Path, dist: DistInfo | None, batch: int, accum: int, split: int) -> EMATask:
    """2 epochs of 36 samples (4 steps of 8 per epoch); stopped after `split` steps and resumed."""
    rank = dist.rank if dist is not None else 0
    kw = {"n": 36, "batch_size": batch, "accum_steps": accum, "log_every": 2}
    torch.manual_seed(0)
    task = EMATask()
    if split:
        _fit(out, task, dist=dist, max_steps=split, **kw)
        torch.manual_seed(99 + rank)  # a "restarted" job: other init, other RNG
        task = EMATask()
    _fit(out, task, resume="auto", dist=dist, **kw)
    return task


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--accum", type=int, default=1)
    p.add_argument("--split", type=int, default=0)
    args = p.parse_args()
    dist = init_distributed("cpu")
    try:
        task = _train(args.out, dist, args.batch, args.accum, args.split)
        torch.save({"weights": task.state_dict(), "steps": _steps(task)}, args.out / f"rank{dist.rank}.pt")
    finally:
        cleanup()


@pytest.mark.dist
@pytest.mark.timeout(180)
def test_two_processes_match_one_process(tmp_path: Path) -> None:
    single = _train(tmp_path / "single", None, batch=8, accum=1, split=0)
    assert _steps(single) == [(i, 8) for i in range(8)]
    # 2 ranks x 2 per micro-batch x 2 accumulation = the single run's batch of 8, resumed mid-epoch.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    multi = tmp_path / "multi"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={_free_port()}",
        __file__, "--out", str(multi), "--batch", "2", "--accum", "2", "--split", "3",
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr[-4000:]}"
    ranks = [torch.load(multi / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    for r in ranks:
        assert r["steps"] == [(i, 8) for i in range(3, 8)]  # the resumed part, on every rank
    one = single.state_dict()
    assert any(k.startswith("teacher.") for k in one)
    for k, v in one.items():
        # Identical on every rank (the teacher follows the synchronised student) and equal to 1 process.
        assert torch.equal(ranks[0]["weights"][k], ranks[1]["weights"][k]), k
        torch.testing.assert_close(ranks[0]["weights"][k], v, atol=1e-6, rtol=0, msg=k)
    torch.manual_seed(0)
    assert not torch.equal(one["teacher.weight"], EMATask().teacher.weight)  # it did move


if __name__ == "__main__":
    main()
