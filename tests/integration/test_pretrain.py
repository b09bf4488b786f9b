"""GMML pre-training end to end: CLI run folder, exported encoder, exact resume, 2 processes = 1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from sscxr.cli.train_cmds import seed_process
from sscxr.config import PretrainConfig, load_config
from sscxr.engine.checkpoint import load_checkpoint
from sscxr.engine.logging import read_metrics
from sscxr.engine.trainer import fit
from sscxr.models.loading import load_encoder_weights
from sscxr.models.vit import build_vit
from sscxr.tasks.gmml import build_pretraining


def _sscxr(args: list[str], torchrun: int = 0) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        launcher = [
            "-m",
            "torch.distributed.run",
            f"--nproc_per_node={torchrun}",
            f"--master_port={port}",
            "-m",
            "sscxr",
        ]
    else:
        launcher = ["-m", "sscxr"]
    proc = subprocess.run(
        [sys.executable, *launcher, *args], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, (
        f"sscxr {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    )
    return proc


def test_cli_pretrain_writes_run_folder(tiny_cache: Path, tmp_path: Path, tiny_overrides: list[str]) -> None:
    run = tmp_path / "run"
    _sscxr(
        [
            "pretrain",
            "-c",
            "tiny",
            *tiny_overrides,
            f"data.cache={tiny_cache}",
            "train.epochs=2",
            "train.batch_size=4",
            "gmml.snapshot_every=1",
            "--out",
            str(run),
        ]
    )
    for name in (
        "snapshots/epoch_001/encoder.safetensors",
        "snapshots/epoch_002/encoder.json",
        "config.yaml",
        "metrics.jsonl",
        "checkpoints/last.pt",
        "encoder.safetensors",
        "encoder.json",
        "recon/epoch_001.png",
        "recon/epoch_002.png",
    ):
        assert (run / name).is_file(), name
    assert "embed_dim: 32" in (run / "config.yaml").read_text()
    snapshot = json.loads((run / "snapshots" / "epoch_002" / "encoder.json").read_text())["extra"]
    assert snapshot["pretraining"] == "gmml" and snapshot["epoch"] == 2 and snapshot["train_seconds"] > 0
    ckpt = load_checkpoint(run / "checkpoints" / "last.pt")
    assert ckpt["config"]["model"]["embed_dim"] == 32 and ckpt["state"]["epoch"] == 2

    # The exported encoder loads back into a plain timm ViT: no missing, no unexpected keys.
    cfg = load_config(PretrainConfig, ["tiny"], tiny_overrides)
    encoder = build_vit(cfg.model)
    report = load_encoder_weights(encoder, run / "encoder.safetensors")
    assert report.missing == [] and report.unexpected == []
    from safetensors.torch import load_file

    plain = VisionTransformer(
        img_size=32, patch_size=8, in_chans=1, embed_dim=32, depth=4, num_heads=2, num_classes=0
    )
    result = plain.load_state_dict(load_file(run / "encoder.safetensors"), strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_cli_mae_pretrain_exports_an_encoder_that_fine_tuning_loads(
    tiny_cache: Path, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # The second method through the same command, engine and export: only `method=mae` differs.
    run = tmp_path / "mae"
    args = ["-c", "tiny", *tiny_overrides, "method=mae", "mae.decoder_dim=32", "mae.decoder_heads=2"]
    _sscxr(["pretrain", *args, f"data.cache={tiny_cache}", "train.epochs=2", "train.batch_size=4",
            "--out", str(run)])  # fmt: skip
    for name in ("encoder.safetensors", "encoder.json", "checkpoints/last.pt", "metrics.jsonl"):
        assert (run / name).is_file(), name
    assert "method: mae" in (run / "config.yaml").read_text()
    cfg = load_config(PretrainConfig, ["tiny"], tiny_overrides)
    report = load_encoder_weights(build_vit(cfg.model), run / "encoder.safetensors")
    assert report.missing == [] and report.unexpected == []
    assert '"pretraining": "mae"' in (run / "encoder.json").read_text()
    val = [r["metrics"] for r in read_metrics(run) if r["split"] == "val"]
    assert val and all(m["val/recon_mse"] > 0 for m in val)


def _fit(
    cache: Path, run: Path, max_steps: int, tiny: list[str], augment_on: str = "loader"
) -> dict[str, torch.Tensor]:
    cfg = load_config(
        PretrainConfig,
        ["tiny"],
        [
            *tiny,
            f"data.cache={cache}",
            "train.epochs=3",
            "train.batch_size=4",
            f"train.max_steps={max_steps}",
            "train.amp=off",
            "model.drop_path_rate=0.1",
            f"gmml.augment_on={augment_on}",
        ],
    )
    seed_process(cfg.train.seed, rank=0)
    task, train_set, val_set = build_pretraining(cfg, seed=cfg.train.seed)
    fit(task, train_set, val_set, cfg.train, cfg.optim, run, None, None, resume="auto")
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


@pytest.mark.parametrize("augment_on", ["loader", "step"])
def test_gmml_resume_is_exact(
    tiny_cache: Path, tmp_path: Path, tiny_overrides: list[str], augment_on: str
) -> None:
    # 7 steps straight == 3 steps (mid-epoch), a fresh task resumed from the run folder, 4 more steps.
    straight = _fit(tiny_cache, tmp_path / "a", max_steps=7, tiny=tiny_overrides, augment_on=augment_on)
    _fit(tiny_cache, tmp_path / "b", max_steps=3, tiny=tiny_overrides, augment_on=augment_on)
    resumed = _fit(tiny_cache, tmp_path / "b", max_steps=7, tiny=tiny_overrides, augment_on=augment_on)
    for name, value in straight.items():
        assert torch.equal(resumed[name], value), name


def test_the_step_pipeline_trains_as_the_loader_pipeline(
    tiny_cache: Path, tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # The same draws applied in the training step (batched) or in the loader (per sample): the same run.
    loader = _fit(tiny_cache, tmp_path / "loader", max_steps=5, tiny=tiny_overrides, augment_on="loader")
    step = _fit(tiny_cache, tmp_path / "step", max_steps=5, tiny=tiny_overrides, augment_on="step")
    for name, value in loader.items():
        torch.testing.assert_close(step[name], value, atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.dist
@pytest.mark.timeout(300)
@pytest.mark.parametrize("method", ["gmml", "mae"])
def test_two_processes_equal_one(
    tiny_cache: Path, tmp_path: Path, tiny_overrides: list[str], method: str
) -> None:
    common = [
        "pretrain",
        "-c",
        "tiny",
        *tiny_overrides,
        f"method={method}",
        "mae.decoder_dim=32",
        "mae.decoder_heads=2",
        f"data.cache={tiny_cache}",
        "train.epochs=1",
        "train.amp=off",
        "train.max_steps=3",
    ]
    _sscxr([*common, "train.batch_size=8", "--out", str(tmp_path / "one")])
    # Two processes that finish their batches in the training step equal one that finishes them in
    # the loader: the draws are per sample, wherever they are applied.
    two = [*common, "train.batch_size=4", "gmml.augment_on=step", "--out", str(tmp_path / "two")]
    _sscxr(two, torchrun=2)
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "last.pt")["model"]
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "last.pt")["model"]
    assert one.keys() == two.keys()
    for name, value in one.items():
        a, b = two[name], value
        if name.endswith("attn.qkv.bias"):
            # The key bias adds q . b_k to every logit of a query, which softmax ignores: its gradient
            # is 0 up to rounding, and AdamW turns that rounding (which depends on the reduction order,
            # so on the process count and the CPU's kernels) into steps of about lr. Compare q and v.
            d = a.shape[0] // 3
            a, b = torch.cat([a[:d], a[2 * d :]]), torch.cat([b[:d], b[2 * d :]])
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-4, msg=name)
