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
        "demo", "--out", str(out), "--n-adult", "40", "--n-pediatric", "8", "--synth-size", "64",
        "--size", "32", "--batch-size", "4", "--epochs", "1", "--min-steps", "2", "--seeds", "2",
        "--n-boot", "20", "--labelled-fraction", "0.5",
    ]  # fmt: skip
    assert main(args) == 0
    ft = out / "finetune" / "pneumonia_vs_healthy"
    for name in (
        "data/cohort/contact_sheet.png",
        "data/cache/index.json",
        "pretrain/gmml/encoder.safetensors",
        "pretrain/gmml/recon/epoch_001.png",
        "probe/pneumonia_vs_healthy/probe.json",
        "finetune/pneumonia_vs_healthy/scratch-finetune/f0.5/s1/model.json",
        "finetune/pneumonia_vs_healthy/SS-CXR-lp_ft/f0.5/s1/model.json",
        "report.html",
        "results.json",
        "report_segmentation/report.html",
        "segment/ss-cxr/model.json",
    ):
        assert (out / name).is_file(), name
    # The SS-CXR classifier really started from the demo's GMML encoder.
    meta = json.loads((ft / "SS-CXR-lp_ft" / "f0.5" / "s0" / "model.json").read_text())
    assert "pretrain" in json.dumps(meta) and "sscxr" in json.dumps(meta)
    doc = json.loads((out / "results.json").read_text())
    tests = {c["test"] for c in doc["cells"]}
    assert tests == {"training distribution", "unseen site", "pediatric"}
    rows = set(doc["cells"][0]["rows"])
    assert {"scratch finetune", "SS-CXR lp_ft", "SS-CXR linear", "random encoder linear"} <= rows
    assert any(r.startswith("pixels") for r in rows)
    assert doc["cells"][0]["seeds"] == [0, 1]
    # A second run finds every stage done and resumes (no error, same table).
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["cells"] == doc["cells"]
