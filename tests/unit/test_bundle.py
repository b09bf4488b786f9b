"""Model bundles: what goes in, that every model command takes one, the same predictions bit for bit in a
fresh process, the evaluation's threshold and results, and refusals of damaged or foreign bundles."""

from __future__ import annotations

import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sscxr.cli import main
from sscxr.errors import CheckpointError
from sscxr.evaluation.files import decision_threshold
from sscxr.models.bundle import component_path, read_bundle, write_bundle
from sscxr.models.classifier import load_classifier
from sscxr.models.unetr import load_segmenter
from tiny_models import classifier_run, segmenter_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A fine-tuning run folder, a segmentation run folder and an evaluation of the classifier."""
    root = tmp_path_factory.mktemp("runs")
    extra = {"manifest_hash": "0123456789abcdef", "cache": "runs/cache", "command": "sscxr finetune ..."}
    classifier_run(root / "ft", extra)
    (root / "ft" / "config.yaml").write_text("train:\n  epochs: 3\n")
    segmenter_run(root / "seg")
    meta = json.loads((root / "ft" / "model.json").read_text())
    metric = {"class": "pneumonia", "metric": "auc_roc", "value": 0.912, "ci_low": 0.871, "ci_high": 0.948}
    doc = {
        "models": {
            "mine": {"config": meta, "threshold": {"value": 0.3125, "rule": "youden", "chosen_on": "val"}},
            "other": {"config": {**meta, "seed": 99}},
        },
        "results": [
            {"model": "mine", "test_set": "held-out", "n_images": 40, "metrics": [metric], "flags": []}
        ],
    }
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps(doc))
    return {"ft": root / "ft", "seg": root / "seg", "eval": root / "eval"}


def _images() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(0).random((3, 1, 32, 32), dtype=np.float32))


def test_bundle_holds_everything_and_every_loader_takes_it(runs: dict[str, Path], tmp_path: Path) -> None:
    path = write_bundle(runs["ft"], tmp_path / "b", segmenter=runs["seg"], evaluation=runs["eval"])
    root, index = read_bundle(path)
    assert index["components"] == {"classifier": "classifier", "segmenter": "segmenter"}
    models = {f"{k}/model.{ext}" for k in ("classifier", "segmenter") for ext in ("json", "safetensors")}
    assert set(index["files"]) == models | {"evaluation.json", "MODEL_CARD.md"}
    # Nothing that would need unpickling.
    assert not [p for p in root.rglob("*") if p.suffix in (".pt", ".pth", ".pkl", ".ckpt")]
    model, meta = load_classifier(path)
    original, _ = load_classifier(runs["ft"])
    with torch.no_grad():
        assert torch.equal(model(_images()), original(_images()))
    # The evaluation's validation threshold is the bundle's decision; the run's own is kept beside it.
    assert meta["thresholds"] == {"default": 0.5, "youden": 0.3125}
    assert decision_threshold(meta, None) == 0.3125 and decision_threshold(meta, "default") == 0.5
    seg = load_segmenter(path)
    assert torch.equal(seg.probabilities(_images()), load_segmenter(runs["seg"]).probabilities(_images()))
    card = (root / "MODEL_CARD.md").read_text()
    assert "0.912 [0.871, 0.948]" in card and "0123456789abcdef" in card and "held-out" in card
    assert "youden" in card and "epochs: 3" in card and "not a medical device" in card


def test_same_predictions_bit_for_bit_in_a_fresh_process(runs: dict[str, Path], tmp_path: Path) -> None:
    path = write_bundle(runs["ft"], tmp_path / "b", archive=True)
    assert path.suffix == ".zip" and (tmp_path / "b" / "bundle.json").is_file()
    np.save(tmp_path / "x.npy", _images().numpy())
    code = (
        "import sys, numpy as np, torch\n"
        "from sscxr.models.classifier import load_classifier\n"
        "torch.set_num_threads(1)\n"
        "model, _ = load_classifier(sys.argv[1])\n"
        "with torch.no_grad():\n"
        "    out = model(torch.from_numpy(np.load(sys.argv[2])))\n"
        "np.save(sys.argv[3], out.numpy())\n"
    )
    subprocess.run([sys.executable, "-c", code, str(path), str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
                   check=True)  # fmt: skip
    original, _ = load_classifier(runs["ft"])
    with torch.no_grad():
        expected = original(_images()).numpy()
    assert np.array_equal(np.load(tmp_path / "y.npy"), expected)


def test_predict_on_a_bundle_uses_its_segmenter_and_threshold(
    runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_bundle(runs["ft"], tmp_path / "b", segmenter=runs["seg"], evaluation=runs["eval"])
    Image.fromarray((np.random.default_rng(1).random((30, 40)) * 255).astype(np.uint8)).save(
        tmp_path / "x.png"
    )
    monkeypatch.chdir(tmp_path)
    assert main(["predict", "b", "x.png", "--out", "o"]) == 0
    doc = json.loads((tmp_path / "o" / "predictions.json").read_text())
    assert doc["decision"]["rule"] == "youden" and doc["decision"]["threshold"] == 0.3125
    row = doc["rows"][0]
    assert row["mask"] == "masks/x_mask.png" and (tmp_path / "o" / row["mask"]).is_file()
    assert row["predicted"] == ("pneumonia" if row["probabilities"]["pneumonia"] >= 0.3125 else "healthy")
    assert main(["predict", "b", "x.png", "--out", "o2", "--no-masks"]) == 0
    assert "mask" not in json.loads((tmp_path / "o2" / "predictions.json").read_text())["rows"][0]


def test_damaged_or_foreign_bundles_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    path = write_bundle(runs["ft"], tmp_path / "b")
    with pytest.raises(CheckpointError, match="no segmenter"):
        load_segmenter(path)
    weights = path / "classifier" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)
    with pytest.raises(CheckpointError, match=r"classifier/model\.safetensors is changed since bundling"):
        load_classifier(path)
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("../outside.txt", "x")
    with pytest.raises(CheckpointError, match="outside the bundle"):
        component_path(evil, "classifier")
    assert not (tmp_path / "outside.txt").exists()
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"not a readable \.zip bundle"):
        load_classifier(tmp_path / "junk.zip")
    with pytest.raises(CheckpointError, match="exists and is not a bundle"):
        write_bundle(runs["ft"], runs["seg"])
    with pytest.raises(CheckpointError, match="another model"):
        write_bundle(runs["ft"], tmp_path / "b2", evaluation=runs["eval"], evaluation_model="other")
