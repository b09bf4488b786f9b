"""The training engine on a toy task: exact resume, accumulation, checkpoints, guards, best.pt, logs."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sscxr.engine import checkpoint as ckpt_mod
from sscxr.engine.checkpoint import load_checkpoint, save_checkpoint, unwrap
from sscxr.engine.config import OptimConfig, TrainConfig
from sscxr.engine.distributed import all_reduce_mean, gather_objects, init_distributed, resolve_amp
from sscxr.engine.logging import read_metrics, setup_logging
from sscxr.engine.sampler import ShardedSampler
from sscxr.engine.schedule import build_schedules
from sscxr.engine.trainer import FitResult, NonFiniteLossError, fit
from sscxr.errors import CheckpointError, ConfigError
from toy import ToyDataset, ToyTask


def _fit(
    run_dir: Path,
    task: ToyTask,
    n: int = 40,
    val: bool = True,
    resume: Any = False,
    optim_kw: dict[str, Any] | None = None,
    **kw: Any,
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
    optim = OptimConfig(
        lr=2e-2, warmup_epochs=0.5, weight_decay=0.05, weight_decay_end=0.2, **(optim_kw or {})
    )
    val_set = ToyDataset(n=11, seed=1) if val else None
    return fit(
        task, ToyDataset(n=n), val_set, TrainConfig(**train), optim, run_dir, None, None, resume=resume
    )


def _weights(task: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in task.state_dict().items()}


def _assert_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _straight_and_resumed(tmp_path: Path, amp: str) -> tuple[dict, dict]:
    torch.manual_seed(0)
    straight = ToyTask()
    _fit(tmp_path / "straight", straight, amp=amp)
    torch.manual_seed(0)
    first = _fit(tmp_path / "split", ToyTask(), amp=amp, max_steps=7, checkpoint_every=3)
    assert first.state.step == 7 and first.state.sample_in_epoch == 28  # stopped mid-epoch 0
    # A fresh "process": new objects, another global RNG state, weights from another init.
    torch.manual_seed(1234)
    resumed = ToyTask()
    result = _fit(tmp_path / "split", resumed, amp=amp, resume="auto")
    assert result.state.step == 20 and result.state.epoch == 2
    return _weights(straight), _weights(resumed)


@pytest.mark.parametrize("amp", ["off", "bf16"])
def test_resume_mid_epoch_is_bitwise_exact(tmp_path: Path, amp: str) -> None:
    straight, resumed = _straight_and_resumed(tmp_path, amp)
    _assert_equal(straight, resumed)


def test_resume_without_rng_restore_would_differ(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Guards the test above: the toy's dropout really depends on the restored RNG.
    monkeypatch.setattr(ckpt_mod, "restore_rng", lambda *a: True)
    straight, resumed = _straight_and_resumed(tmp_path, "off")
    assert any(not torch.equal(straight[k], resumed[k]) for k in straight)


def test_accumulated_half_batches_equal_one_full_batch(tmp_path: Path) -> None:
    torch.manual_seed(0)
    full = ToyTask(dropout=0.0)
    _fit(tmp_path / "full", full, batch_size=8, accum_steps=1, epochs=1)
    torch.manual_seed(0)
    accum = ToyTask(dropout=0.0)
    _fit(tmp_path / "accum", accum, batch_size=4, accum_steps=2, epochs=1)
    for k, v in _weights(full).items():
        torch.testing.assert_close(_weights(accum)[k], v, atol=1e-6, rtol=1e-5)
    # Adam hides a constant gradient scale in the weights: compare the logged gradient norms and losses.
    logs = [
        [r["metrics"] for r in read_metrics(tmp_path / name) if r["split"] == "train"]
        for name in ("full", "accum")
    ]
    assert len(logs[0]) == len(logs[1]) == 5
    for a, b in zip(*logs, strict=True):
        assert b["train/grad_norm"] == pytest.approx(a["train/grad_norm"], rel=1e-5)
        assert b["train/loss"] == pytest.approx(a["train/loss"], rel=1e-5)
    assert not torch.equal(_weights(full)["net.0.weight"], ToyTask(dropout=0.0).state_dict()["net.0.weight"])


def test_checkpoint_round_trip_without_wrapper_prefixes(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = ToyTask()
    opt = torch.optim.AdamW(task.parameters(), lr=1e-3)
    task(next(iter(torch.utils.data.DataLoader(ToyDataset(), batch_size=4)))).loss.backward()
    opt.step()
    compiled = torch.compile(task)  # lazy: nothing is compiled until called
    assert any(k.startswith("_orig_mod.") for k in compiled.state_dict())
    rng_at_save = torch.get_rng_state()
    path = save_checkpoint(tmp_path / "c.pt", compiled, opt, None, {"step": 3}, {"train": {"epochs": [1, 2]}})
    ck = load_checkpoint(path)
    assert unwrap(compiled) is task
    assert set(ck) == {"model", "optimizer", "scaler", "state", "config", "rng", "format_version"}
    assert not any(k.startswith(("module.", "_orig_mod.")) for k in ck["model"])
    fresh = ToyTask()
    fresh.load_state_dict(ck["model"])
    _assert_equal(_weights(fresh), _weights(task))
    opt2 = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    opt2.load_state_dict(ck["optimizer"])
    assert ck["state"] == {"step": 3} and ck["config"]["train"]["epochs"] == [1, 2]
    assert torch.equal(ck["rng"]["torch"], rng_at_save)
    assert not list(tmp_path.glob(".*.tmp"))  # the temp file was moved, not left behind


def test_foreign_or_broken_files_raise_checkpoint_error(tmp_path: Path) -> None:
    (tmp_path / "garbage.pt").write_bytes(b"\x00not a checkpoint" * 10)
    torch.save({"weights": torch.zeros(2)}, tmp_path / "foreign.pt")
    torch.save({"format_version": 99, "model": {}}, tmp_path / "future.pt")
    torch.save({"format_version": 1, "model": {}}, tmp_path / "partial.pt")
    torch.save({"format_version": 1, "obj": ToyTask}, tmp_path / "code.pt")  # weights_only refuses classes
    save_checkpoint(tmp_path / "ok.pt", ToyTask(), None, None, {}, {})
    data = (tmp_path / "ok.pt").read_bytes()
    (tmp_path / "truncated.pt").write_bytes(data[: len(data) // 2])
    for name, match in [
        ("garbage", "cannot be read"),
        ("foreign", "not an sscxr"),
        ("future", "version 99"),
        ("partial", "lacks"),
        ("code", "cannot be read"),
        ("truncated", "cannot be read"),
        ("missing", "no such"),
    ]:
        with pytest.raises(CheckpointError, match=match):
            load_checkpoint(tmp_path / f"{name}.pt")


@pytest.mark.parametrize("fused", [True, False])  # skipped on the device / decided on the host
def test_nonfinite_step_is_skipped(tmp_path: Path, fused: bool) -> None:
    torch.manual_seed(0)
    task = ToyTask(nan_calls=frozenset({2}))
    result = _fit(tmp_path, task, epochs=1, optim_kw={"fused": fused})
    assert result.state.nonfinite_steps == 1 and result.state.step == 10
    assert all(torch.isfinite(v).all() for v in task.state_dict().values())
    train = [r["metrics"] for r in read_metrics(tmp_path) if r["split"] == "train"]
    assert len(train) == 10 and "train/loss" not in train[2]  # the skipped step logs no loss
    assert all(isinstance(m["train/loss"], float) for i, m in enumerate(train) if i != 2)


def test_five_nonfinite_steps_in_a_row_raise_and_keep_last_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    task = ToyTask(nan_from=6)
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError, match="5 optimiser steps"):
        _fit(tmp_path, task, n=80, epochs=1, checkpoint_every=2)
    assert "step 6: non-finite" in caplog.text
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["state"]["step"] == 6 and ck["state"]["nonfinite_steps"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_fused_adamw_skips_a_nonfinite_step_without_a_host_sync_per_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On the fused path no optimiser step reads a device value on the host: the skip happens on the
    device and the bookkeeping is read later, where the loop syncs anyway."""
    from sscxr.engine import trainer

    def no_host_decision(flag: torch.Tensor) -> bool:
        raise AssertionError("all_true (a host sync) called on the fused path")

    monkeypatch.setattr(trainer, "all_true", no_host_decision)
    inside, syncs = [False], []
    real_step = trainer._Loop._optimizer_step

    def step(self: Any, batches: Any) -> None:
        inside[0] = True
        try:
            real_step(self, batches)
        finally:
            inside[0] = False

    monkeypatch.setattr(trainer._Loop, "_optimizer_step", step)

    def spying(name: str) -> Any:
        real = getattr(torch.Tensor, name)

        def spy(self: torch.Tensor, *a: Any, **kw: Any) -> Any:
            if inside[0]:
                syncs.append(name)
            return real(self, *a, **kw)

        return spy

    # Every way to read a device value on the host.
    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, spying(name))
    torch.manual_seed(0)
    task = ToyTask(nan_calls=frozenset({2}))
    result = _fit(tmp_path, task, epochs=1, val=False, log_every=50)
    assert syncs == []
    assert result.state.nonfinite_steps == 1 and result.state.step == 10
    assert all(torch.isfinite(v).all() for v in task.state_dict().values())


@pytest.mark.parametrize("fused", [True, False])
def test_a_skipped_step_leaves_weights_moments_and_step_counters_alone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fused: bool
) -> None:
    from sscxr.engine import trainer

    snapshots: dict[int, tuple[Any, ...]] = {}  # step -> weights, optimiser state before and after
    real_step = trainer._Loop._optimizer_step

    def snapshot(loop: Any) -> tuple[dict[str, torch.Tensor], list[dict[str, torch.Tensor]]]:
        states = [
            {k: v.clone() for k, v in loop.optimizer.state[p].items()}
            for g in loop.optimizer.param_groups
            for p in g["params"]
        ]
        return _weights(loop.task), states

    def step(self: Any, batches: Any) -> None:
        before = snapshot(self)
        real_step(self, batches)
        snapshots[self.state.step - 1] = (*before, *snapshot(self))

    monkeypatch.setattr(trainer._Loop, "_optimizer_step", step)
    torch.manual_seed(0)
    task = ToyTask(nan_calls=frozenset({2}))
    result = _fit(tmp_path, task, epochs=1, val=False, log_every=50, optim_kw={"fused": fused})
    assert result.state.nonfinite_steps == 1
    w0, s0, w1, s1 = snapshots[2]
    _assert_equal(w0, w1)
    assert len(s0) == len(s1) and all(a.keys() == b.keys() for a, b in zip(s0, s1, strict=True))
    for a, b in zip(s0, s1, strict=True):
        _assert_equal(a, b)  # exp_avg, exp_avg_sq and step
    w0, s0, w1, s1 = snapshots[3]
    assert any(not torch.equal(w0[k], w1[k]) for k in w0)  # a good step does move the weights
    _, _, _, final = snapshots[9]
    assert all(float(st["step"]) == 9 for st in final)  # 10 steps, one skipped


def test_five_nonfinite_steps_found_late_still_raise_with_a_healthy_last_checkpoint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With no log or save inside the epoch the streak is read at its end: the same error, the right step
    numbers, and last.pt from the end of the healthy epoch before."""
    torch.manual_seed(0)
    task = ToyTask(nan_from=26)  # epoch 1 of 20-step epochs goes bad at step 26
    with caplog.at_level(logging.WARNING), pytest.raises(NonFiniteLossError, match=r"5 .*last: step 30\)"):
        _fit(tmp_path, task, n=80, epochs=2, val=False, log_every=50)
    assert task.calls == 40  # the lag: the streak was read at the end of the epoch
    assert "step 26: non-finite loss or gradient, update skipped (1 in a row)" in caplog.text
    assert "step 30: non-finite loss or gradient, update skipped (5 in a row)" in caplog.text
    assert "step 31:" not in caplog.text
    ck = load_checkpoint(tmp_path / "checkpoints" / "last.pt")
    assert ck["state"]["step"] == 20 and ck["state"]["nonfinite_steps"] == 0
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


def test_the_lagged_check_changes_nothing_numerically(tmp_path: Path) -> None:
    """A run with a skipped step trains the same weights whatever log_every is, and a logged window's
    means leave the skipped step out."""
    weights, logs = [], []
    for every in (1, 5, 50):
        torch.manual_seed(0)
        task = ToyTask(nan_calls=frozenset({2}))
        result = _fit(tmp_path / str(every), task, epochs=1, val=False, log_every=every)
        assert result.state.nonfinite_steps == 1
        weights.append(_weights(task))
        logs.append([r["metrics"] for r in read_metrics(tmp_path / str(every)) if r["split"] == "train"])
    _assert_equal(weights[0], weights[1])
    _assert_equal(weights[0], weights[2])
    good = [m["train/loss"] for m in logs[0][:5] if "train/loss" in m]
    assert len(good) == 4 and logs[1][0]["train/loss"] == pytest.approx(sum(good) / 4, rel=1e-6)


def test_best_checkpoint_follows_the_validation_metric(tmp_path: Path) -> None:
    torch.manual_seed(0)
    task = ToyTask(val_scores=[0.1, 0.5, 0.3])
    result = _fit(tmp_path / "full", task, epochs=3, best_metric="val/score")
    assert result.best_metric == 0.5 and result.state.best_step == 20
    best = load_checkpoint(tmp_path / "full" / "checkpoints" / "best.pt")
    assert best["state"]["epoch"] == 2 and best["state"]["best_metric"] == 0.5
    # The engine hands exactly those weights, and how the run went, to the task's export.
    handed = task.trained
    _assert_equal(handed.best, best["model"])
    assert (handed.metric, handed.value, handed.step, handed.epoch) == ("val/score", 0.5, 20, 1)
    assert handed.steps == 30
    # The same run stopped right after epoch 1 saves exactly the weights best.pt holds.
    torch.manual_seed(0)
    _fit(tmp_path / "cut", ToyTask(val_scores=[0.1, 0.5]), epochs=3, best_metric="val/score", max_steps=20)
    last = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    _assert_equal(best["model"], last["model"])


def test_early_stopping_and_unknown_best_metric(tmp_path: Path) -> None:
    task = ToyTask(val_scores=[0.5, 0.4, 0.3, 0.2, 0.1])
    result = _fit(tmp_path / "es", task, epochs=5, best_metric="val/score", early_stop_patience=2)
    assert result.state.epoch == 3 and result.state.bad_epochs == 2 and task.epoch_ends == [0, 1, 2]
    with pytest.raises(ConfigError, match="val/mse"):
        _fit(tmp_path / "bad", ToyTask(), epochs=1, best_metric="val/auc")


def test_metrics_log_config_and_lr_per_iteration(tmp_path: Path) -> None:
    torch.manual_seed(0)
    data = ToyDataset()
    task = ToyTask()
    result = _fit(tmp_path, task, log_every=3)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    train = [r for r in records if r["split"] == "train"]
    val = [r for r in records if r["split"] == "val"]
    assert [r["step"] for r in train] == [3, 6, 9, 12, 15, 18] and len(val) == 2
    assert {
        "train/loss",
        "train/lr",
        "train/wd",
        "train/grad_norm",
        "train/abs_err",
        "train/img_per_s",
    } <= set(train[0]["metrics"])
    assert val[-1]["metrics"]["val/count"] == 11.0 and {"time", "epoch"} <= set(val[-1])
    lr_at, wd_at = build_schedules(
        OptimConfig(lr=2e-2, warmup_epochs=0.5, weight_decay=0.05, weight_decay_end=0.2), 2e-2, 10, 2
    )
    for r in train:
        assert r["metrics"]["train/lr"] == pytest.approx(lr_at[r["step"] - 1])
        assert r["metrics"]["train/wd"] == pytest.approx(wd_at[r["step"] - 1])
    cfg = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert cfg["train"]["batch_size"] == 4 and cfg["optim"]["betas"] == [0.9, 0.999]
    assert (tmp_path / "exported.pt").is_file() and result.last_checkpoint == tmp_path / "checkpoints/last.pt"
    assert len(data) == 40
    # Resuming a finished run does no more steps.
    again = _fit(tmp_path, ToyTask(), resume="auto", log_every=3)
    assert again.state.step == result.state.step == 20


def test_min_steps_floor_trains_longer_validates_less_and_resumes_exactly(tmp_path: Path) -> None:
    # 36 samples at batch 16: 2 steps per epoch; 10 epochs would be 20 steps, the floor asks for 60.
    floor = {"n": 36, "batch_size": 16, "epochs": 10, "min_steps": 60, "log_every": 1}
    torch.manual_seed(0)
    straight = ToyTask()
    result = _fit(tmp_path / "straight", straight, **floor)
    assert result.state.step == 60 and result.state.epoch == 30
    records = read_metrics(tmp_path / "straight")
    assert max(r["step"] for r in records if r["split"] == "train") == 60
    # 30 epochs, at most MAX_FLOOR_VALIDATIONS (25) validations: every 2nd epoch; the last always.
    assert [r["epoch"] for r in records if r["split"] == "val"] == list(range(1, 30, 2))
    # The schedule spans the 60 steps: the lr reaches min_lr at the last one.
    lrs = [r["metrics"]["train/lr"] for r in records if r["split"] == "train"]
    assert lrs[-1] == pytest.approx(1e-6) and max(lrs) == pytest.approx(2e-2)
    # Stopped after 23 steps and resumed, the planned length (a function of config + data) is the same.
    torch.manual_seed(0)
    _fit(tmp_path / "split", ToyTask(), max_steps=23, **floor)
    torch.manual_seed(99)
    resumed = ToyTask()
    again = _fit(tmp_path / "split", resumed, resume="auto", **floor)
    assert again.state.step == 60
    _assert_equal(_weights(straight), _weights(resumed))


def test_set_epoch_reaches_the_training_set(tmp_path: Path) -> None:
    train = ToyDataset()
    fit(
        ToyTask(),
        train,
        None,
        TrainConfig(epochs=3, batch_size=8, workers=0, amp="off", progress=False),
        OptimConfig(),
        tmp_path,
        None,
        None,
        resume=False,
    )
    assert train.epochs_set == [0, 1, 2]
    with pytest.raises(CheckpointError, match="nothing to resume"):
        fit(
            ToyTask(),
            train,
            None,
            TrainConfig(epochs=1, batch_size=8, workers=0, progress=False),
            OptimConfig(),
            tmp_path / "new",
            None,
            None,
            resume=True,
        )


def test_sharded_sampler_global_batches_match_single_process() -> None:
    n, world, b = 23, 3, 2
    single = list(ShardedSampler(n, 1, 0, seed=5))
    shards = [list(ShardedSampler(n, world, r, seed=5)) for r in range(world)]
    assert all(len(s) == n // world for s in shards)
    for step in range(len(shards[0]) // b):
        dist_batch = {i for s in shards for i in s[step * b : (step + 1) * b]}
        assert dist_batch == set(single[step * world * b : (step + 1) * world * b])
    s = ShardedSampler(n, world, 1, seed=5)
    s.set_epoch(3)
    epoch3 = list(s)
    again = ShardedSampler(n, world, 1, seed=5)
    again.set_epoch(3)
    assert epoch3 != shards[1] and epoch3 == list(again)  # a new order per epoch, a pure function of it
    s.set_start(4)
    assert list(s) == epoch3[4:] and len(s) == len(epoch3) - 4
    s.set_epoch(4)
    assert len(s) == n // world  # a new epoch rewinds


def test_eval_sampler_covers_every_sample_once() -> None:
    shards = [list(ShardedSampler(7, 2, r, shuffle=False, drop_last=False)) for r in range(2)]
    assert shards == [[0, 2, 4, 6], [1, 3, 5]]
    padded = [list(ShardedSampler(7, 2, r, drop_last=False, pad=True)) for r in range(2)]
    assert len(padded[0]) == len(padded[1]) == 4
    with pytest.raises(ValueError, match="exclusive"):
        ShardedSampler(7, 2, 0, drop_last=True, pad=True)


def test_amp_resolution_and_rank_filtered_logging(capsys: pytest.CaptureFixture[str]) -> None:
    cpu = torch.device("cpu")
    assert resolve_amp("off", cpu) is None and resolve_amp("bf16", cpu) is torch.bfloat16
    assert resolve_amp("auto", cpu) in (None, torch.bfloat16)
    setup_logging(rank=1)
    logging.getLogger("sscxr.engine.test").info("hidden on rank 1")
    logging.getLogger("sscxr.engine.test").warning("shown on rank 1")
    setup_logging(rank=0)
    logging.getLogger("sscxr.engine.test").info("shown on rank 0")
    err = capsys.readouterr().err
    assert "hidden" not in err and "[rank 1] WARNING" in err and "shown on rank 0" in err
    logger = logging.getLogger("sscxr")
    assert not logger.propagate  # no second, unfiltered copy through root handlers
    for h in [h for h in logger.handlers if h.get_name() == "sscxr-console"]:
        logger.removeHandler(h)
    logger.propagate = True


def test_single_process_distributed_helpers(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    info = init_distributed("cpu")
    assert (info.rank, info.world_size, info.is_main, info.device.type) == (0, 1, True, "cpu")
    means = all_reduce_mean({"a": torch.tensor(2.0), "b": torch.tensor(3)})
    assert {k: float(v) for k, v in means.items()} == {"a": 2.0, "b": 3.0}
    assert gather_objects({"x": 1}) == [{"x": 1}]
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(ValueError, match="WORLD_SIZE"):
        init_distributed("cpu")


def test_a_folder_holding_another_run_is_refused_unless_forced(tmp_path: Path) -> None:
    from sscxr.errors import CheckpointError

    def run(lr: float, epochs: int = 1, **kw: Any) -> FitResult:
        train = TrainConfig(epochs=epochs, batch_size=4, workers=0, amp="off", progress=False, log_every=1)
        optim = OptimConfig(lr=lr, warmup_epochs=0)
        config = {"train": train, "optim": optim}
        return fit(ToyTask(), ToyDataset(n=8), None, train, optim, tmp_path, None, config, **kw)

    run(1e-2)
    lines = (tmp_path / "metrics.jsonl").read_text().count("\n")
    (tmp_path / "checkpoints" / ".last.pt.k1ll3d.tmp").write_bytes(b"half a checkpoint")  # a kill mid-write
    run(1e-2, epochs=2)  # same experiment, longer: resumes (train.epochs may change)
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))  # the kill's leftovers are removed
    with pytest.raises(CheckpointError, match=r"another config \(optim\.lr: 0\.01 -> 0\.02\).*--force"):
        run(2e-2)
    with pytest.raises(CheckpointError, match=r"holds another run's metrics\.jsonl"):
        run(1e-2, resume=False)  # a fresh start would append to the old run's log
    result = run(2e-2, force=True)
    assert result.state.step == 2  # started over: 8 samples / batch 4, one epoch
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == lines  # only this run's records


@pytest.mark.parametrize(("fp32_s", "bf16_s", "want"), [(1.0, 0.5, torch.bfloat16), (1.0, 0.95, None)])
def test_amp_auto_on_cpu_follows_the_measurement(
    monkeypatch: pytest.MonkeyPatch, fp32_s: float, bf16_s: float, want: torch.dtype | None
) -> None:
    from sscxr.engine import distributed

    monkeypatch.setattr(distributed, "cpu_precision_timings", lambda: (fp32_s, bf16_s))
    assert resolve_amp("auto", torch.device("cpu")) is want
    with distributed.precision_autocast(torch.device("cpu"), "auto") as ctx:
        assert torch.is_autocast_enabled("cpu") is (want is not None)
    assert ctx is not None
    assert resolve_amp("off", torch.device("cpu")) is None  # an explicit choice is never measured


def test_the_precision_probe_is_quick_and_leaves_the_global_rng_alone() -> None:
    from sscxr.engine.distributed import cpu_precision_timings

    cpu_precision_timings.cache_clear()
    before = torch.random.get_rng_state()
    fp32_s, bf16_s = cpu_precision_timings()
    assert torch.equal(torch.random.get_rng_state(), before)
    assert 0 < fp32_s < 5 and 0 < bf16_s < 5
    assert cpu_precision_timings() == (fp32_s, bf16_s)  # measured once per process


def test_a_resumed_run_keeps_the_precision_it_started_with(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """amp auto measured bf16 when the run started and float32 when it resumed: the resumed run keeps
    bf16 and ends bit for bit where an uninterrupted bf16 run ends."""
    from sscxr.engine import distributed

    monkeypatch.setattr(distributed, "cpu_precision_timings", lambda: (1.0, 0.5))
    torch.manual_seed(0)
    straight = ToyTask()
    _fit(tmp_path / "straight", straight, amp="auto")
    torch.manual_seed(0)
    _fit(tmp_path / "split", ToyTask(), amp="auto", max_steps=7, checkpoint_every=3)
    monkeypatch.setattr(distributed, "cpu_precision_timings", lambda: (1.0, 1.0))  # now "float32"
    torch.manual_seed(1234)
    resumed = ToyTask()
    result = _fit(tmp_path / "split", resumed, amp="auto", resume="auto")
    assert result.state.amp == "bf16"
    _assert_equal(_weights(straight), _weights(resumed))


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path: Path) -> None:
    """`train.compile=true` runs (torch.compile on the CPU) and trains the weights eager training gives."""
    pytest.importorskip("torch._inductor")
    torch.manual_seed(0)
    eager = ToyTask(dropout=0.0)
    _fit(tmp_path / "eager", eager, epochs=1)
    torch.manual_seed(0)
    compiled = ToyTask(dropout=0.0)
    result = _fit(tmp_path / "compiled", compiled, epochs=1, compile=True)
    assert result.state.step == 10
    for name, value in _weights(eager).items():
        torch.testing.assert_close(_weights(compiled)[name], value, atol=1e-5, rtol=1e-4, msg=name)


def test_the_precision_probe_runs_inside_inference_and_no_grad_contexts() -> None:
    from sscxr.engine.distributed import cpu_precision_timings

    for context in (torch.no_grad, torch.inference_mode):
        cpu_precision_timings.cache_clear()
        with context():
            assert min(cpu_precision_timings()) > 0


class _SharedEpochToy(ToyDataset):
    """A toy dataset that declares its epoch reaches persistent workers (its samples do not use it)."""

    shares_epoch = True


def _record_persistent(monkeypatch: pytest.MonkeyPatch, builder: str) -> list[object]:
    """Spy on the trainer's `builder` (a loader builder): the list of the `persistent` it was called with."""
    from sscxr.engine import trainer

    built: list[object] = []
    real = getattr(trainer, builder)

    def counting(*args: object, **kw: object):  # type: ignore[no-untyped-def]
        built.append(kw.get("persistent"))
        return real(*args, **kw)

    monkeypatch.setattr(trainer, builder, counting)
    return built


def test_loader_workers_persist_across_epochs_and_train_the_same_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _record_persistent(monkeypatch, "build_loader")
    torch.manual_seed(0)
    inline = ToyTask(dropout=0.0)
    fit(inline, _SharedEpochToy(n=40), None, TrainConfig(epochs=3, batch_size=4, workers=0, amp="off",
        progress=False, checkpoint_every=0), OptimConfig(lr=2e-2), tmp_path / "a", None, None)  # fmt: skip
    assert built == [False, False, False]  # no workers: a loader per epoch, as before
    built.clear()
    torch.manual_seed(0)
    workers = ToyTask(dropout=0.0)
    fit(workers, _SharedEpochToy(n=40), None, TrainConfig(epochs=3, batch_size=4, workers=2, amp="off",
        progress=False, checkpoint_every=0), OptimConfig(lr=2e-2), tmp_path / "b", None, None)  # fmt: skip
    assert built == [True]  # one loader, its workers kept for the three epochs
    _assert_equal(_weights(inline), _weights(workers))


def test_validation_loader_is_built_once_and_its_workers_persist(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _record_persistent(monkeypatch, "build_eval_loader")
    scores = []
    for workers in (0, 1):
        torch.manual_seed(0)
        task = ToyTask(dropout=0.0)
        _fit(tmp_path / f"w{workers}", task, epochs=3, workers=workers)
        scores.append([r["metrics"] for r in read_metrics(tmp_path / f"w{workers}") if r["split"] == "val"])
    assert built == [False, True]  # one loader per run for its three validations; workers kept
    assert len(scores[0]) == 3 and scores[0] == scores[1]  # the same validation either way


@pytest.mark.parametrize(
    "bf16_s, bf16_steps, picks_bf16",
    [(0.05, 3, True), (0.2, 3, False), (5.0, 1, False)],
    ids=["bf16-faster", "bf16-slower", "bf16-hopeless"],
)
def test_the_precision_probe_stops_timing_a_hopeless_bf16(
    bf16_s: float, bf16_steps: int, picks_bf16: bool
) -> None:
    # Without native bf16 kernels a ViT-S block step took 2 s against 87 ms in float32: the probe must
    # not spend three of those at every command's start, yet must time a contender fully.
    from sscxr.engine.distributed import BF16_MIN_SPEEDUP, _best_times

    steps: list[torch.dtype | None] = []

    def timed(dtype: torch.dtype | None) -> float:
        steps.append(dtype)
        return 0.1 if dtype is None else bf16_s

    fp32, bf16 = _best_times(timed)
    assert steps.count(None) == 3 and steps.count(torch.bfloat16) == bf16_steps
    assert (fp32, bf16) == (0.1, bf16_s)
    assert (fp32 >= BF16_MIN_SPEEDUP * bf16) is picks_bf16
