"""ONNX export: parity with PyTorch within the stated tolerance for both graphs, a dynamic batch, the
same predictions through `sscxr predict --backend onnx`, and a refusal when parity fails."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from sscxr.cli import main
from sscxr.errors import CheckpointError
from sscxr.models import onnx_export
from sscxr.models.bundle import write_bundle
from sscxr.models.classifier import load_classifier
from sscxr.models.unetr import load_segmenter
from tiny_models import classifier_run, segmenter_run

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(bundle with a segmenter, its ONNX export folder)."""
    root = tmp_path_factory.mktemp("onnx")
    bundle = write_bundle(classifier_run(root / "ft"), root / "bundle", segmenter=segmenter_run(root / "seg"))
    assert main(["export", str(bundle), "--format", "onnx", "--out", str(root / "onnx")]) == 0
    return bundle, root / "onnx"


def test_both_graphs_match_pytorch_at_any_batch_size(exported: tuple[Path, Path]) -> None:
    bundle, out = exported
    report = json.loads((out / "export.json").read_text())
    assert set(report["graphs"]) == {"classifier", "segmenter"}
    assert all(
        g["ok"] and g["max_abs_diff"] <= onnx_export.PARITY_TOLERANCE for g in report["graphs"].values()
    )
    clf, _ = load_classifier(bundle)
    seg = load_segmenter(bundle)
    classifier = ort.InferenceSession(str(out / "classifier.onnx"), providers=["CPUExecutionProvider"])
    segmenter = ort.InferenceSession(str(out / "segmenter.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 5):
        x = torch.from_numpy(np.random.default_rng(batch).random((batch, 1, 32, 32), dtype=np.float32))
        logits, probs = classifier.run(None, {"image": x.numpy()})
        with torch.no_grad():
            expected = clf(x)
        np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
        np.testing.assert_allclose(probs, expected.softmax(-1).numpy(), atol=onnx_export.PARITY_TOLERANCE)
        (lungs,) = segmenter.run(None, {"image": x.numpy()})
        assert lungs.shape == (batch, 32, 32)
        np.testing.assert_allclose(
            lungs, seg.probabilities(x, precision="fp32").numpy(), atol=onnx_export.PARITY_TOLERANCE
        )
    assert json.loads((out / "classifier.json").read_text())["class_names"] == ["healthy", "pneumonia"]


def test_predict_through_onnx_runtime_gives_the_same_rows(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, out = exported
    rng = np.random.default_rng(0)
    for i in range(3):
        Image.fromarray((rng.random((40 + 7 * i, 36)) * 255).astype(np.uint8)).save(tmp_path / f"x{i}.png")
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                "predict",
                str(bundle),
                ".",
                "--out",
                "torch",
                "--no-masks",
                "--batch-size",
                "2",
                "--precision",
                "fp32",
            ]
        )
        == 0
    )
    assert main(["predict", str(out), ".", "--out", "onnx", "--backend", "onnx", "--batch-size", "2"]) == 0
    rows = [list(csv.DictReader((tmp_path / d / "predictions.csv").open())) for d in ("torch", "onnx")]
    assert [r["input"] for r in rows[0]] == [r["input"] for r in rows[1]] == ["x0.png", "x1.png", "x2.png"]
    for a, b in zip(*rows, strict=True):
        assert (
            abs(float(a["p_pneumonia"]) - float(b["p_pneumonia"])) <= 1e-5
            and a["predicted"] == b["predicted"]
        )
    assert (
        main(["predict", str(bundle), ".", "--out", "bad", "--backend", "onnx"]) == 2
    )  # not an export folder


def test_a_parity_failure_is_an_error_that_keeps_the_report(
    exported: tuple[Path, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bundle, _ = exported
    monkeypatch.setattr(onnx_export, "PARITY_TOLERANCE", -1.0)  # tiny graphs can match exactly
    with pytest.raises(CheckpointError, match="ONNX parity failed for classifier"):
        onnx_export.export_onnx(load_classifier_run(bundle), tmp_path / "o")
    assert not json.loads((tmp_path / "o" / "export.json").read_text())["graphs"]["classifier"]["ok"]


def load_classifier_run(bundle: Path) -> Path:
    return bundle / "classifier"
