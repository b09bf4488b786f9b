"""The main job (`sscxr demo`) runs end to end: every stage, at a smoke-test scale."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sscxr.cli import main


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_demo_runs_every_stage(tmp_path: Path, one_thread: None) -> None:
    out = tmp_path / "demo"
    args = [
        "demo",
        "--out",
        str(out),
        "--n-adult",
        "40",
        "--n-pediatric",
        "8",
        "--synth-size",
        "64",
        "--size",
        "32",
        "--batch-size",
        "4",
        "--epochs",
        "1",
        "--n-boot",
        "20",
        "--labelled-fraction",
        "0.5",
    ]
    assert main(args) == 0
    for name in (
        "cohort/contact_sheet.png",
        "cache/index.json",
        "pretrain/encoder.safetensors",
        "pretrain/recon/epoch_001.png",
        "classify/scratch/model.json",
        "classify/ss-cxr/model.json",
        "report_classification/report.html",
        "report_segmentation/report.html",
        "segment/ss-cxr/model.json",
    ):
        assert (out / name).is_file(), name
    # The SS-CXR classifier really started from the demo's GMML encoder.
    meta = json.loads((out / "classify" / "ss-cxr" / "model.json").read_text())
    assert "pretrain" in json.dumps(meta) and "sscxr" in json.dumps(meta)
    doc = json.loads((out / "report_classification" / "metrics.json").read_text())
    assert {r["model"] for r in doc["results"]} == {"scratch", "ss-cxr"}
    assert {r["test_set"] for r in doc["results"]} == {"training distribution", "unseen site", "pediatric"}
    # A second run finds every stage done and resumes (no error, same files).
    assert main(args) == 0
