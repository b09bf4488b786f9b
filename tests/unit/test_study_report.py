"""The study report: reference rows first, paired differences with verdicts, flags shown."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sscxr.reports.study import verdict, write_study_report
from sscxr.study.aggregate import Estimate, Predictions, compare_rows
from sscxr.study.results import Cell, StudyResults
from sscxr.study.spec import StartSpec, StudySpec


def _preds(strength: float, seed: int, y: np.ndarray) -> Predictions:
    rng = np.random.default_rng(seed)
    s = np.clip(strength * y + (1 - strength) * rng.random(y.size), 0, 1)
    return Predictions(("healthy", "pneumonia"), np.arange(y.size), np.arange(y.size).astype(object),
                       y, np.stack([1 - s, s], 1), (s > 0.5).astype(np.int64))  # fmt: skip


def test_verdict() -> None:
    assert verdict(Estimate(0.05, 0.01, 0.09, 0.0, ())) == "better"
    assert verdict(Estimate(-0.05, -0.09, -0.01, 0.0, ())) == "worse"
    assert verdict(Estimate(0.01, -0.02, 0.04, 0.0, ())) == "no clear difference"
    assert verdict(Estimate(0.01, float("nan"), float("nan"), 0.0, ())) == "undetermined"


def test_report_orders_rows_and_shows_differences_and_flags(tmp_path: Path) -> None:
    y = (np.arange(300) % 3 == 0).astype(np.int64)
    preds = {
        "SS-CXR lp_ft": {s: _preds(0.7, s, y) for s in range(3)},
        "scratch finetune": {s: _preds(0.1, 10 + s, y) for s in range(3)},
        "pixels 64px linear": {s: _preds(0.3, 20 + s, y) for s in range(3)},
    }
    comparison = compare_rows(preds, ["scratch finetune", "pixels 64px linear"], n_boot=100)
    rows = {"SS-CXR lp_ft": {"start": "SS-CXR", "mode": "lp_ft"},
            "scratch finetune": {"start": "scratch", "mode": "finetune"},
            "pixels 64px linear": {"start": "pixels", "mode": "linear"}}  # fmt: skip
    flags = {"scratch finetune": [{"code": "below_chance", "message": "best val AUC 0.43", "where": "x"}]}
    results = StudyResults([Cell("pneumonia_vs_healthy", 0.01, "test", comparison)], flags, rows,
                           {"pneumonia_vs_healthy": ("healthy", "pneumonia")})  # fmt: skip
    spec = StudySpec(name="t", starts={"scratch": StartSpec(), "SS-CXR": StartSpec("sscxr", path="x")},
                     tasks=["pneumonia_vs_healthy"], fractions=[0.01], tests={"test": "test"})  # fmt: skip
    report = write_study_report(spec, results, tmp_path)
    md = report.markdown.read_text()
    table = [line for line in md.splitlines() if line.startswith("| ") and "AUC-ROC" not in line]
    names = [line.split("|")[1].strip() for line in table[:4] if not line.startswith("|---")]
    assert names[0] == "pixels 64px linear"  # the reference row first
    lp = next(line for line in table if line.startswith("| SS-CXR lp_ft"))
    assert lp.count("better") == 2  # beats both references, paired intervals exclude 0
    assert "⚠ below_chance" in md and "best val AUC 0.43" in md
    assert "Summary" in md and "best pre-trained row 'SS-CXR lp_ft'" in md
    doc = json.loads(report.json.read_text())
    assert doc["cells"][0]["diffs"]["SS-CXR lp_ft"]["scratch finetune"]["auc_roc"]["low"] > 0
    assert report.html.read_text().startswith("<!DOCTYPE html>")
