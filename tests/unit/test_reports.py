"""The evaluation report end to end: files, self-contained HTML, numbers equal the metrics module's, n/a
with reasons, per-class counts, left-out labels, the paper-mapping note, provenance, cross-run rebuild
and the `sscxr evaluate` / `sscxr report` commands."""

from __future__ import annotations

import argparse
import csv
import json
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from sscxr.cli import evaluate_cmds
from sscxr.evaluation import EvalOptions, ModelSpec, SplitSpec, TestSpec, evaluate_models, metric_summary
from sscxr.evaluation.classification import ThresholdRule
from sscxr.metrics import bootstrap_metrics, classification_metrics
from sscxr.reports import load_evaluations, write_report
from sscxr.reports.classification import CSV_COLUMNS
from sscxr.reports.tables import NOT_RUN, fmt_metric

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_evaluation import BINARY_META, SIZE, MeanModel, write_cohort

N_BOOT, SEED = 60, 7
THREE_META = {
    **BINARY_META,
    "class_names": ["healthy", "pneumonia", "covid-19"],
    "task": "3-class",
    "label_map": {"healthy": 0, "pneumonia": 1, "covid-19": 2},
    "thresholds": {},
}


class NearestModel(torch.nn.Module):
    """3-class stand-in: logits fall with the distance of the mean intensity from 0.15 / 0.55 / 0.4."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        v = x.mean(dim=(1, 2, 3))[:, None]
        return -40.0 * (v - torch.tensor([0.15, 0.55, 0.4])) ** 2


def _evaluate(cache: Path, out: Path, run: str) -> dict[str, Any]:
    models = [
        ModelSpec("scratch", MeanModel(), dict(BINARY_META), Path("runs/scratch"), "optim:\n  lr: 0.0005\n"),
        ModelSpec("ss-cxr", MeanModel(sharpen=3.0), dict(BINARY_META), Path("runs/sscxr")),
        ModelSpec("3-class", NearestModel(), dict(THREE_META)),
    ]
    tests = [
        TestSpec("training distribution", SplitSpec(cache, ("test",))),
        TestSpec("pediatric", SplitSpec(cache, ("pediatric",))),
    ]
    opts = EvalOptions(ThresholdRule("youden"), n_boot=N_BOOT, seed=SEED, progress=False, device="cpu")
    doc = evaluate_models(models, tests, SplitSpec(cache, ("val",)), opts, out, "sscxr evaluate ...", run)
    write_report(doc, out)
    return doc


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("report")
    cache = write_cohort(tmp)
    return tmp / "out", _evaluate(cache, tmp / "out", "run-a")


def _texts(out: Path) -> tuple[str, str]:
    return (out / "report.md").read_text(), (out / "report.html").read_text()


def test_report_files_exist(report: tuple[Path, dict[str, Any]]) -> None:
    out, doc = report
    for name in ("report.md", "report.html", "metrics.csv", "metrics.json"):
        assert (out / name).stat().st_size > 0, name
    figures = sorted((out / "figures").glob("*.png"))
    # 2 tasks x 2 test sets x (ROC/PR, confusion, reliability)
    assert len(figures) == 12 and all(f.read_bytes()[:4] == b"\x89PNG" for f in figures)
    assert all((out / r["predictions_csv"]).is_file() for r in doc["results"])
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(doc))


def test_html_is_self_contained(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    html = _texts(out)[1]
    assert html.count('src="data:image/png;base64,') == 12
    assert re.findall(r'(?:src|href)="(?!data:)', html) == []
    for forbidden in ("http://", "https://", "<link", "<script", "@import", "url("):
        assert forbidden not in html, forbidden


def test_json_metrics_equal_metrics_module(report: tuple[Path, dict[str, Any]]) -> None:
    out, doc = report
    res = next(
        r for r in doc["results"] if r["model"] == "scratch" and r["test_set"] == "training distribution"
    )
    names = res["class_names"]
    with (out / res["predictions_csv"]).open() as f:
        rows = list(csv.DictReader(f))
    y = np.array([names.index(r["class"]) for r in rows])
    probs = np.array([[float(r[f"p_{c}"]) for c in names] for r in rows])
    patients = np.array([r["patient"] for r in rows], dtype=object)
    direct = classification_metrics(y, probs, names, res["threshold"])
    cis = bootstrap_metrics(y, probs, patients, lambda a, b: metric_summary(a, b, names, res["threshold"]),
                            n_boot=N_BOOT, seed=SEED)  # fmt: skip
    saved = json.loads((out / "metrics.json").read_text())["results"][doc["results"].index(res)]["metrics"]
    for m in saved:
        if m["class"] == "all":
            continue
        want = getattr(direct.row(m["class"]), m["metric"]).value
        key = f"{m['class']}/{m['metric']}"
        assert m["value"] == pytest.approx(want, abs=1e-5), key
        assert m["ci_low"] == pytest.approx(cis[key].low, abs=1e-5), key
    acc = next(m for m in saved if m["class"] == "all" and m["metric"] == "accuracy")
    assert acc["value"] == pytest.approx(direct.accuracy.value)


def test_undefined_metrics_are_na_with_reason(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    md, html = _texts(out)
    saved = json.loads((out / "metrics.json").read_text())
    ped = next(r for r in saved["results"] if r["model"] == "scratch" and r["test_set"] == "pediatric")
    sens = next(m for m in ped["metrics"] if m["class"] == "covid-19" and m["metric"] == "sensitivity")
    assert sens["value"] is None and sens["ci_low"] is None and sens["reason"].startswith("no positive")
    cell = f"n/a ({sens['reason']})"
    assert cell in md and cell.replace("(", "(") in html
    assert '<td class="na">n/a (no positive samples' in html
    with (out / "metrics.csv").open() as f:
        rows = list(csv.DictReader(f))
    row = next(r for r in rows if r["model"] == "scratch" and r["test_set"] == "pediatric"
               and r["class"] == "covid-19" and r["metric"] == "sensitivity")  # fmt: skip
    assert row["value"] == "" and row["reason"] == sens["reason"]
    assert "NaN" not in (out / "metrics.json").read_text()


def test_csv_is_long_format_of_json(report: tuple[Path, dict[str, Any]]) -> None:
    out, doc = report
    with (out / "metrics.csv").open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == CSV_COLUMNS
        rows = list(reader)
    assert len(rows) == sum(len(r["metrics"]) for r in doc["results"])
    first = doc["results"][0]["metrics"][0]
    assert float(rows[0]["value"]) == pytest.approx(first["value"]) and rows[0]["run"] == "run-a"


def test_counts_left_out_labels_mapping_and_provenance(report: tuple[Path, dict[str, Any]]) -> None:
    out, _ = report
    md, html = _texts(out)
    # per task and test set: images and patients per class (patient t1 has two healthy images)
    assert "| training distribution | covid_vs_healthy | healthy | 4 | 3 | pneumonia: 2 |" in md
    assert "| training distribution | covid_vs_healthy | covid-19 | 4 | 4 | pneumonia: 2 |" in md
    assert "| pediatric | 3-class | healthy | 3 | 3 | none |" in md
    for text in (md, html):
        assert "89.25%" in text and "specificity" in text
        assert "How our columns map onto the paper" in text
    assert 'our Spec (specificity, TNR) = the paper\'s "TPR" column' in md
    assert "feedfacecafebeef" in md and BINARY_META["command"] in md and "lr: 0.0005" in md
    assert "training distribution (4 / 4): Sens" in md and "ACC %" in md and "AUC-PR" in md
    assert 'colspan="7">training distribution (4 / 4)</th>' in html
    assert re.search(r"\| youden \| 0\.6\d* \| validation ", md)


def test_report_command_rebuilds_across_runs(report: tuple[Path, dict[str, Any]], tmp_path: Path) -> None:
    out_a, doc = report
    # A second run's saved metrics.json (only the run's name differs: the numbers are not the point).
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "metrics.json").write_text(json.dumps({**doc, "run": "run-b"}))
    parser = argparse.ArgumentParser()
    evaluate_cmds.register(parser.add_subparsers())
    inputs = [str(out_a / "metrics.json"), str(tmp_path / "b")]
    args = parser.parse_args(["report", *inputs, "--out", str(tmp_path / "c"), "--no-figures"])
    assert args.func(args) == 0
    assert not (tmp_path / "c" / "figures").exists()
    md = (tmp_path / "c" / "report.md").read_text()
    assert "Summary across runs (Table 6 style)" in md
    assert "| run-a | ss-cxr | covid_vs_healthy |" in md and "| run-b | ss-cxr | covid_vs_healthy |" in md
    docs = load_evaluations([tmp_path / "c"])
    assert [d["run"] for d in docs] == ["run-a", "run-b"]


def test_report_shows_degenerate_operating_point_and_training_flags(tmp_path: Path) -> None:
    # Youden on validation picks 0.6; every covid-19 test image scores <= 0.5: sensitivity 0, specificity 1.
    cache = write_cohort(tmp_path / "data")
    few = {
        "code": "few_steps",
        "message": "only 20 optimiser steps (fewer than 300): set train.min_steps=300",
    }
    meta = {**BINARY_META, "flags": [few]}
    opts = EvalOptions(ThresholdRule("youden"), n_boot=0, progress=False, device="cpu")
    tests = [TestSpec("training distribution", SplitSpec(cache, ("test",)))]
    doc = evaluate_models(
        [ModelSpec("m", MeanModel(), meta)], tests, SplitSpec(cache, ("val",)), opts, tmp_path
    )
    files = write_report(doc, tmp_path / "rep", figures=False)
    saved = json.loads(files.json.read_text())
    assert [f["code"] for f in saved["results"][0]["flags"]] == ["degenerate_operating_point"]
    assert saved["models"]["m"]["training_flags"] == [few]
    md, html = _texts(tmp_path / "rep")
    line = (
        "⚠ m on training distribution (threshold 0.6): degenerate operating point: "
        "sensitivity 0.000, specificity 1.000"
    )
    assert line in md and line in html
    assert "⚠ m (training, few_steps): only 20 optimiser steps" in md
    # A model and test set without flags show no Flags section.
    ok = evaluate_models([ModelSpec("m", MeanModel(), dict(BINARY_META))],
                         [TestSpec("pediatric", SplitSpec(cache, ("pediatric",)))], None,
                         EvalOptions(n_boot=0, progress=False, device="cpu"), tmp_path / "ok")  # fmt: skip
    assert "⚠" not in (write_report(ok, tmp_path / "rep_ok", figures=False).markdown.read_text())


def test_fmt_metric() -> None:
    row = {"metric": "accuracy", "value": 0.8925, "ci_low": 0.85, "ci_high": 0.93, "reason": None}
    assert fmt_metric(row) == "89.25 [85.00, 93.00]"
    assert fmt_metric({**row, "metric": "fnr"}, ci=False) == "0.892"
    assert fmt_metric({**row, "value": None, "reason": "no positive samples"}) == "n/a (no positive samples)"
    assert fmt_metric(None) == NOT_RUN


def test_evaluate_command_on_exported_classifier(tmp_path: Path) -> None:
    from sscxr.models.classifier import ViTClassifier, export_classifier
    from sscxr.models.loading import Normalization
    from sscxr.models.vit import ViTConfig, build_vit

    cache = write_cohort(tmp_path / "data")
    cfg = ViTConfig(img_size=SIZE, patch_size=8, embed_dim=32, depth=1, num_heads=2, drop_path_rate=0.0)
    torch.manual_seed(0)
    model = ViTClassifier(build_vit(cfg), ["healthy", "covid-19"], normalization=Normalization(0.3, 0.2))
    extra = {k: BINARY_META[k] for k in ("task", "label_map", "manifest_hash", "command")}
    (tmp_path / "run").mkdir()
    export_classifier(model, cfg, tmp_path / "run", extra)
    (tmp_path / "run" / "config.yaml").write_text("model:\n  depth: 1\n")
    parser = argparse.ArgumentParser()
    evaluate_cmds.register(parser.add_subparsers())
    args = parser.parse_args([
        "evaluate", "--model", f"tiny={tmp_path / 'run'}", "--test", f"in-dist={cache}:test",
        "--val", f"{cache}:val", "--threshold", "sensitivity:1.0", "--n-boot", "20", "--device", "cpu",
        "--out", str(tmp_path / "rep"),
    ])  # fmt: skip
    assert args.func(args) == 0
    doc = json.loads((tmp_path / "rep" / "metrics.json").read_text())
    assert doc["models"]["tiny"]["threshold"]["rule"] == "sensitivity:1"
    assert "--threshold sensitivity:1.0" in doc["command"]
    assert doc["models"]["tiny"]["config_yaml"] == "model:\n  depth: 1\n"
    assert doc["results"][0]["n_images"] == 8 and doc["results"][0]["excluded"] == {"pneumonia": 2}
