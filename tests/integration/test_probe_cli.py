"""`sscxr probe` end to end on the tiny synthetic cohort: outputs, and one-line errors for bad arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from sscxr.cli import main
from sscxr.models.loading import Normalization, export_encoder
from sscxr.models.vit import ViTConfig, build_vit

TINY = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def gmml(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A pre-training run folder holding an (untrained) tiny GMML export."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        encoder = build_vit(TINY)
    run = tmp_path_factory.mktemp("gmml")
    export_encoder(encoder, TINY, Normalization(0.45, 0.2), run / "encoder")
    return run


def _argv(cache: Path, gmml: Path, out: Path, *extra: str) -> list[str]:
    return [
        "probe", "--encoder", f"SS-CXR={gmml}", "--cache", str(cache), "--task", "pneumonia_vs_healthy",
        "--test", f"held-out={cache}:test", "--test", f"unseen site={cache}:test_site",
        "--fractions", "0.5,1", "--seeds", "0,1", "--pixels", "8", "--n-boot", "10", "--device", "cpu",
        "--out", str(out), *extra,
    ]  # fmt: skip


def test_probe_cli_writes_probe_json_predictions_and_report(
    tiny_cache: Path, gmml: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "probe"
    assert main(_argv(tiny_cache, gmml, out)) == 0
    doc = json.loads((out / "probe.json").read_text())
    names = list(dict.fromkeys(r["name"] for r in doc["rows"]))
    assert names == [
        "pixels 8px linear", "random encoder linear", "random encoder knn", "SS-CXR linear", "SS-CXR knn"
    ]  # fmt: skip
    assert doc["sources"]["random encoder"]["vit"]["embed_dim"] == 32  # the first encoder's architecture
    assert doc["sources"]["SS-CXR"]["normalization_from"] == "export"
    assert len(doc["rows"]) == 2 * 2 * 5 and {f["code"] for f in doc["flags"]} >= {"small_validation"}
    for row in doc["rows"]:
        for name in ("val", "held-out", "unseen site"):
            assert (out / row["predictions"][name]).is_file()
    assert (out / "predictions/f0.5/s1/SS-CXR_knn/unseen_site.csv").is_file()
    report = (out / "report.md").read_text()
    assert "## Labelled fraction 0.5" in report and "## Labelled fraction 1" in report
    printed = capsys.readouterr().out
    assert "SS-CXR linear" in printed and "20 cells computed, 0 reused" in printed

    assert main(_argv(tiny_cache, gmml, out)) == 0  # resumed: nothing to recompute
    assert "0 cells computed, 20 reused" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--test", "x=CACHE:nosuchsplit"), "selects no decoded rows"),
        (("--encoder", "other=MISSING"), "no such encoder"),
        (("--fractions", "0.5,1.5"), "--fractions"),
    ],
)
def test_probe_cli_bad_arguments_give_one_line_errors(
    tiny_cache: Path,
    gmml: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: tuple[str, str],
    message: str,
) -> None:
    flag, value = change
    value = value.replace("CACHE", str(tiny_cache)).replace("MISSING", str(tmp_path / "nothing.safetensors"))
    assert main([*_argv(tiny_cache, gmml, tmp_path / "out"), flag, value]) == 2
    # log lines of the work done before the error may come first; the error is one line, the last
    err = [line for line in capsys.readouterr().err.strip().splitlines() if " INFO " not in line]
    assert len(err) == 1 and err[0].startswith("sscxr probe: error:") and message in err[0]
