"""`sscxr predict` and `sscxr explain` on files, folders and manifests: the model's own numbers, one row
per input (unreadable ones say why), paths as the user gave them, thresholds, masks and heat maps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from crafted import crafted_dicom
from sscxr.cli import main
from sscxr.data.cache_format import resize_to_cache
from sscxr.data.io import read_xray
from sscxr.models.classifier import load_classifier
from tiny_models import classifier_run, segmenter_run

pytestmark = pytest.mark.usefixtures("one_thread")
# Exact comparisons run in float32: "auto" picks bf16 on CPUs with AMX (the training policy).
FP32 = ["--precision", "fp32"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A classifier trained on letterboxed images (fit "pad") with a second, named threshold."""
    folder = tmp_path_factory.mktemp("clf")
    return classifier_run(folder, {"fit": "pad"}, thresholds={"default": 0.5, "youden": 0.37})


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return segmenter_run(tmp_path_factory.mktemp("seg"))


def _inputs(root: Path) -> None:
    """data/ with a PNG, a 16-bit DICOM, two images of one name in sub-folders and a broken file."""
    rng = np.random.default_rng(0)
    (root / "data" / "a").mkdir(parents=True)
    (root / "data" / "b").mkdir()
    Image.fromarray((rng.random((40, 60)) * 255).astype(np.uint8)).save(root / "data" / "a" / "x.png")
    Image.fromarray((rng.random((50, 30)) * 255).astype(np.uint8)).save(root / "data" / "b" / "x.png")
    crafted_dicom(root / "data" / "scan.dcm", rng.integers(0, 4096, (48, 48)))
    (root / "data" / "broken.png").write_bytes(b"not a png")


def _rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_predict_rows_are_the_models_own_numbers(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert (
        main(["predict", str(model_dir), "data", "--out", "out", "--batch-size", "2", *FP32]) == 1
    )  # one unreadable
    assert "3 images classified" in capsys.readouterr().out
    rows = _rows(tmp_path / "out" / "predictions.csv")
    assert [r["input"] for r in rows] == ["data/a/x.png", "data/b/x.png", "data/broken.png", "data/scan.dcm"]
    broken = rows[2]
    assert broken["p_healthy"] == "" and broken["predicted"] == "" and "broken.png" in broken["error"]
    model, _ = load_classifier(model_dir)
    for row in (rows[0], rows[1], rows[3]):
        image = read_xray(tmp_path / row["input"]).image
        framed = torch.from_numpy(resize_to_cache(image, 32, "pad"))[None, None]  # the model's fit
        p = model.predict_proba(framed)[0].double().numpy()
        got = np.array([float(row["p_healthy"]), float(row["p_pneumonia"])])
        np.testing.assert_allclose(got, p, atol=2e-6)
        assert row["predicted"] == ("pneumonia" if p[1] >= 0.5 else "healthy") and row["error"] == ""
    doc = json.loads((tmp_path / "out" / "predictions.json").read_text())
    assert doc["n_images"] == 4 and doc["n_unreadable"] == 1
    assert doc["decision"] == {"positive_class": "pneumonia", "threshold": 0.5, "rule": "default"}
    assert str(tmp_path) not in (tmp_path / "out" / "predictions.json").read_text()
    # Batch size changes nothing; a named threshold and a number move the decision.
    assert main(["predict", str(model_dir), "data", "--out", "b1", "--batch-size", "1", *FP32]) == 1
    assert [r["p_pneumonia"] for r in _rows(tmp_path / "b1" / "predictions.csv")] == [
        r["p_pneumonia"] for r in rows
    ]
    assert main(["predict", str(model_dir), "data", "--out", "t0", "--threshold", "0"]) == 1
    assert {r["predicted"] for r in _rows(tmp_path / "t0" / "predictions.csv") if not r["error"]} == {
        "pneumonia"
    }
    assert main(["predict", str(model_dir), "data", "--out", "ty", "--threshold", "youden"]) == 1
    youden = _rows(tmp_path / "ty" / "predictions.csv")
    assert all(
        (r["predicted"] == "pneumonia") == (float(r["p_pneumonia"]) >= 0.37) for r in youden if not r["error"]
    )
    assert main(["predict", str(model_dir), "data", "--out", "tx", "--threshold", "best"]) == 2
    assert "youden" in capsys.readouterr().err


def test_predict_on_a_manifest_and_with_lung_masks(
    model_dir: Path, segmenter_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _inputs(tmp_path)
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "m.csv").write_text("path,label\n../data/scan.dcm,healthy\n../data/a/x.png,\n")
    monkeypatch.chdir(tmp_path)
    argv = [
        "predict",
        str(model_dir),
        "runs/m.csv",
        "data/b/x.png",
        "--out",
        "o",
        "--segmenter",
        str(segmenter_dir),
    ]
    assert main(argv) == 0
    rows = _rows(tmp_path / "o" / "predictions.csv")
    assert [r["input"] for r in rows] == ["data/scan.dcm", "data/a/x.png", "data/b/x.png"]
    # Masks at each image's own size; two inputs named x.png get two mask files.
    assert [r["mask"] for r in rows] == [
        "masks/data/scan_mask.png",
        "masks/data/a/x_mask.png",
        "masks/x_mask.png",
    ]
    for row in rows:
        mask = np.asarray(Image.open(tmp_path / "o" / row["mask"]))
        assert mask.shape == read_xray(tmp_path / row["input"]).image.shape
        assert set(np.unique(mask)) <= {0, 255}
        assert float(row["lung_fraction"]) == pytest.approx((mask > 0).mean(), abs=1e-4)


def test_explain_writes_maps_and_leaves_the_model_unchanged(
    model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _inputs(tmp_path)
    monkeypatch.chdir(tmp_path)
    assert main(["explain", str(model_dir), "data", "--out", "h", "--save-maps"]) == 1
    rows = _rows(tmp_path / "h" / "explain.csv")
    predicted = _rows_from_predict(model_dir, tmp_path)
    for row, pred in zip(rows, predicted, strict=True):
        assert (
            row["input"] == pred["input"] and row["p_pneumonia"] == pred["p_pneumonia"]
        )  # hooks change nothing
        if row["error"]:
            assert row["heatmap"] == ""
            continue
        figure = Image.open(tmp_path / "h" / row["heatmap"])
        assert figure.width > 2 * figure.height  # image + two overlays side by side
        maps = np.load((tmp_path / "h" / row["heatmap"]).with_suffix(".npz"), allow_pickle=False)
        shape = read_xray(tmp_path / row["input"]).image.shape
        for name in ("last_block", "rollout"):
            assert maps[name].shape == shape and maps[name].min() >= 0 and maps[name].max() <= 1 + 1e-6
    assert {r["heatmap"] for r in rows} >= {"a/x_heatmap.png", "b/x_heatmap.png", "scan_heatmap.png"}


def _rows_from_predict(model_dir: Path, root: Path) -> list[dict[str, str]]:
    assert main(["predict", str(model_dir), "data", "--out", "p"]) == 1
    return _rows(root / "p" / "predictions.csv")
