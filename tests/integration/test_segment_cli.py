"""`sscxr segment train | evaluate | predict` end to end: the synthetic cohort and (if present) real pairs."""

from __future__ import annotations

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sscxr.cli import segment_cmds
from sscxr.data.cache import prepare
from sscxr.data.importers import import_image_mask_pairs, import_shenzhen
from sscxr.data.manifest import write_manifest
from sscxr.data.splits import patient_split

TINY = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
    "seg.feature_size=4",
    "seg.n_vis=2",
    "train.workers=0",
    "train.progress=false",
    "train.batch_size=4",
    "--device",
    "cpu",
]


# Tiny models: one intra-op thread is faster on a shared CPU (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="sscxr")
    segment_cmds.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return int(args.func(args))


def _mask(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im)


def test_train_evaluate_predict(tiny_cohort: Path, tiny_cache: Path, tmp_path: Path) -> None:
    run, rep, pred = tmp_path / "run", tmp_path / "report", tmp_path / "masks"
    torch.manual_seed(0)
    rc = _run(
        [
            "segment",
            "train",
            "-c",
            "segment/tiny",
            f"data.cache={tiny_cache}",
            "train.epochs=1",
            *TINY,
            "--out",
            str(run),
        ]
    )
    assert rc == 0
    for name in (
        "model.safetensors",
        "model.json",
        "metrics.jsonl",
        "config.yaml",
        "checkpoints/last.pt",
        "checkpoints/best.pt",
        "overlays/epoch_001.png",
    ):
        assert (run / name).is_file(), name
    meta = json.loads((run / "model.json").read_text())
    assert meta["format"] == "sscxr-segmenter" and meta["blocks"] == [1, 3, 4] and meta["img_size"] == 32

    rc = _run(
        [
            "segment",
            "evaluate",
            "--model",
            f"a={run}",
            "--model",
            f"b={run / 'model.json'}",
            "--test",
            f"site={tiny_cache}:test_site",
            "--test",
            f"val={tiny_cache}:val",
            "--postprocess",
            "--n-boot",
            "20",
            "--device",
            "cpu",
            "--out",
            str(rep),
        ]
    )
    assert rc == 0
    for name in ("report.md", "report.html", "table.csv", "per_image.csv", "summary.json"):
        assert (rep / name).is_file(), name
    html = (rep / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 6 and 'src="figures' not in html  # 4 overlays + 2 compare
    assert len(list((rep / "figures").glob("*.png"))) == 6
    table = list(csv.DictReader((rep / "table.csv").open()))
    assert len(table) == 2 * 2 * 2 * 6  # models x tests x (raw, post-processed) x metrics
    summary = json.loads((rep / "summary.json").read_text())
    assert {(s["model"], s["test"]) for s in summary} == {
        ("a", "site"),
        ("a", "val"),
        ("b", "site"),
        ("b", "val"),
    }
    assert "IoU" in (rep / "report.md").read_text() and "post-processing" in (rep / "report.md").read_text()

    odd = tmp_path / "extra"
    odd.mkdir()
    Image.fromarray((np.random.default_rng(0).random((80, 120)) * 255).astype(np.uint8)).save(
        odd / "wide.png"
    )
    (odd / "broken.png").write_bytes(b"not an image")
    rc = _run(
        [
            "segment",
            "predict",
            "--model",
            str(run),
            str(tiny_cohort.parent / "images"),
            str(odd),
            "--out",
            str(pred),
            "--device",
            "cpu",
        ]
    )
    assert rc == 1  # one unreadable input, reported; the others were processed
    n_images = len(list((tiny_cohort.parent / "images").glob("*.png")))
    masks = sorted(pred.glob("synth-*_mask.png"))
    assert len(masks) == n_images
    assert _mask(masks[0]).shape == (64, 64)  # the cohort's original size, not the model's 32 px
    assert set(np.unique(_mask(masks[0]))) <= {0, 255}
    assert _mask(pred / "wide_mask.png").shape == (80, 120)
    failures = list(csv.DictReader((pred / "failures.csv").open()))
    assert [Path(f["input"]).name for f in failures] == ["broken.png"]
    assert len(list(csv.DictReader((pred / "predictions.csv").open()))) == n_images + 1


@pytest.mark.realdata
def test_real_pairs_import_prepare_train_evaluate(shared_data: Path, tmp_path: Path) -> None:
    caches = {}
    manifests = {
        "shenzhen": import_shenzhen(shared_data / "shenzhen_mini"),
        "imlab": import_image_mask_pairs(shared_data / "imlab_lung", site="imlab"),
    }
    for name, manifest in manifests.items():
        split = patient_split(manifest, {"train": 0.6, "val": 0.2, "test": 0.2}, seed=0, stratify=False)
        path = write_manifest(split, tmp_path / f"{name}.csv")
        report = prepare(path, tmp_path / f"cache_{name}", size=32, workers=0, progress=False)
        assert report.n_failed == 0
        caches[name] = tmp_path / f"cache_{name}"
    run = tmp_path / "run"
    rc = _run(
        [
            "segment",
            "train",
            "-c",
            "segment/tiny",
            f"data.cache={caches['shenzhen']}",
            "train.epochs=2",
            "train.max_steps=2",
            *TINY[:-2],
            "train.batch_size=2",
            "--device",
            "cpu",
            "--out",
            str(run),
        ]
    )
    assert rc == 0 and (run / "model.safetensors").is_file()
    rc = _run(
        [
            "segment",
            "evaluate",
            "--model",
            f"real={run}",
            "--test",
            f"shenzhen={caches['shenzhen']}:all",
            "--test",
            f"imlab={caches['imlab']}:all",
            "--n-boot",
            "10",
            "--device",
            "cpu",
            "--out",
            str(tmp_path / "rep"),
        ]
    )
    assert rc == 0
    summary = {s["test"]: s for s in json.loads((tmp_path / "rep" / "summary.json").read_text())}
    assert summary["shenzhen"]["n_images"] == 10 and summary["imlab"]["n_images"] == 4
    rc = _run(
        [
            "segment",
            "predict",
            "--model",
            str(run),
            str(shared_data / "imlab_lung" / "1.jpg"),
            str(shared_data / "shenzhen_mini" / "test_images"),
            "--out",
            str(tmp_path / "pred"),
            "--device",
            "cpu",
        ]
    )
    assert rc == 0
    assert _mask(tmp_path / "pred" / "1_mask.png").shape == (512, 512)
    assert _mask(tmp_path / "pred" / "CHNCXR_0185_0_mask.png").shape == (256, 256)
