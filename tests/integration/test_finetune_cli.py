"""`sscxr finetune` end to end on a tiny synthetic cohort: parse -> config -> build -> fit -> export."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from sscxr.cli.classify_cmds import register, run_finetune
from sscxr.data.cache import prepare
from sscxr.engine.logging import read_metrics
from sscxr.models.classifier import load_classifier
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import ViTConfig, build_vit
from sscxr.synthetic import SynthConfig, generate_cohort

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
TINY_MODEL = [
    f"model.{k}={getattr(TINY, k)}" for k in ("img_size", "patch_size", "embed_dim", "depth", "num_heads")
]


# Tiny models: one intra-op thread is faster on a shared CPU (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="sscxr")
    register(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def test_finetune_from_a_gmml_export_on_a_synthetic_cohort(tmp_path: Path) -> None:
    manifest = generate_cohort(
        SynthConfig(n_adult=64, n_pediatric=0, size=64, seed=1),
        tmp_path / "cohort",
        workers=0,
        progress=False,
    )
    prepare(manifest, tmp_path / "cache", size=32, workers=0, progress=False)
    torch.manual_seed(0)
    export_encoder(build_vit(TINY), TINY, Normalization(0.45, 0.2), tmp_path / "gmml" / "encoder")

    out = tmp_path / "cls"
    argv = [
        "finetune", "-c", "classify/tiny", *TINY_MODEL, f"data.cache={tmp_path / 'cache'}",
        "classify.task=three_class", "classify.init=sscxr", f"classify.init_path={tmp_path / 'gmml'}",
        "classify.labelled_fraction=0.5", "classify.class_balance=loss_weights", "optim.layer_decay=0.75",
        "classify.mode=lp_ft", "train.min_steps=null",  # one epoch on purpose: flagged as few_steps
        "train.epochs=1", "train.batch_size=4", "train.workers=0", "train.progress=false", "--out", str(out),
    ]  # fmt: skip
    args = _parse(argv)
    result = run_finetune(args)

    for name in ("model.safetensors", "model.json", "metrics.jsonl", "config.yaml"):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "config.yaml").read_text())
    assert config["classify"]["task"] == "three_class" and config["model"]["embed_dim"] == 32
    records = read_metrics(out)
    val = [r["metrics"] for r in records if r["split"] == "val"]
    assert len(val) == 1 and "val/auc_roc" in val[0] and "val/covid-19/sensitivity" in val[0]
    assert result.best_metric == val[0]["val/auc_roc"]

    meta = json.loads((out / "model.json").read_text())
    assert meta["format"] == "sscxr-classifier" and meta["class_names"] == [
        "healthy",
        "pneumonia",
        "covid-19",
    ]
    assert meta["init"]["missing"] == ["head.bias", "head.weight"] and meta["init"]["unexpected"] == []
    assert (
        meta["normalization"] == {"mean": 0.45, "std": 0.2} and meta["init"]["normalization_from"] == "export"
    )
    assert meta["labelled_subset"]["images"] < meta["labelled_subset"]["of_images"]
    assert len(meta["class_weights"]) == 3 and meta["checkpoint"]["weights"] == "best"
    assert (
        meta["command"].startswith("sscxr finetune -c classify/tiny")
        and "classify.init=sscxr" in meta["command"]
    )
    assert meta["manifest_hash"] and meta["decision"] == "argmax"
    # The few-label recipe and its guards, recorded.
    assert meta["mode"] == "lp_ft" and meta["pool"] == "avg"
    assert meta["lp_init"]["n_images"] == meta["labelled_subset"]["images"]
    assert meta["lp_init"]["class_weight"] == "balanced"
    assert meta["layer_decay"] == {"value": 0.75, "from": "optim.layer_decay"}
    assert meta["class_balance"]["setting"] == meta["class_balance"]["used"] == "loss_weights"
    codes = {f["code"] for f in meta["flags"]}
    assert {"few_steps", "small_validation"} <= codes and all(f["message"] for f in meta["flags"])
    model, _ = load_classifier(out)
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)
