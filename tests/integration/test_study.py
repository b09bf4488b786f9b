"""`sscxr study`: runs what is missing, resumes after an interruption without redoing finished runs,
and reproduces the same table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from sscxr.cli import main
from sscxr.errors import SSCXRError
from sscxr.study.run import plan, run_steps
from sscxr.study.spec import load_study

MODEL = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
]
TRAIN = ["train.workers=0", "train.progress=false", "train.batch_size=4", "train.epochs=1"]


def _study(tmp_path: Path, cache: Path) -> Path:
    study = {
        "name": "tiny",
        "data": {"cache": str(cache), "size": 32},
        "pretrain": {"gmml": {"config": "tiny", "overrides": [
            *MODEL, *TRAIN, "gmml.decoder_hidden=64", "gmml.decoder_bottleneck=32",
            "gmml.recon_blocks=[2,3,4]", "gmml.n_vis=2"]}},
        "starts": {"scratch": {"init": "scratch"}, "SS-CXR": {"init": "sscxr", "pretrain": "gmml"}},
        "tasks": ["healthy_vs_pathology"],
        "fractions": [0.5],
        "seeds": [0, 1],
        "tests": {"held-out": "test", "unseen site": "test_site"},
        "probe": {"features": "avg", "pixels": 8},
        "finetune": {"config": "classify/tiny", "modes": ["lp_ft"],
                     "overrides": [*MODEL, *TRAIN, "train.min_steps=3"]},
        "n_boot": 50,
    }  # fmt: skip
    path = tmp_path / "tiny_study.yaml"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_study_runs_resumes_and_reproduces(tmp_path: Path, tiny_cache: Path, one_thread: None) -> None:
    study = _study(tmp_path, tiny_cache)
    spec = load_study(str(study))
    # 1. An interrupted study: the third step fails (as a Ctrl-C or a crash would stop it).
    calls: list[list[str]] = []

    def failing(argv: list[str]) -> int:
        calls.append(argv)
        if len(calls) == 3:
            return 1
        return main(argv)

    out_b = tmp_path / "resumed"
    steps = plan(spec, out_b)
    with pytest.raises(SSCXRError, match="fix it, then run the study again"):
        run_steps(steps, failing)
    done_before = [s.title for s in steps if s.done]
    assert len(done_before) == 2  # pre-training and the probe finished
    # 2. Resumed: only the missing steps run.
    ran: list[list[str]] = []

    def counting(argv: list[str]) -> int:
        ran.append(argv)
        return main(argv)

    run_steps(plan(spec, out_b), counting)
    assert len(ran) == len(steps) - 2 and all(a[0] != "pretrain" for a in ran)
    assert main(["study", str(study), "--out", str(out_b)]) == 0  # nothing left: only the report
    # 3. An uninterrupted study gives the same table.
    out_a = tmp_path / "straight"
    assert main(["study", str(study), "--out", str(out_a)]) == 0
    a = json.loads((out_a / "results.json").read_text())
    b = json.loads((out_b / "results.json").read_text())
    assert a["cells"] == b["cells"]
    # The report holds the reference rows, the probe rows and the fine-tuned rows, with paired differences.
    cell = a["cells"][0]
    rows = set(cell["rows"])
    assert {
        "pixels 8px linear",
        "random encoder linear",
        "SS-CXR linear",
        "scratch finetune",
        "SS-CXR lp_ft",
    } <= rows
    assert "scratch finetune" in cell["diffs"]["SS-CXR lp_ft"]
    assert len(cell["seeds"]) == 2
    report = (out_a / "report.md").read_text()
    assert "pixels 8px linear" in report and "Δ AUC-ROC vs scratch finetune" in report
    assert (out_a / "report.html").is_file() and (out_a / "commands.sh").is_file()


def test_study_refuses_to_mix_studies(tmp_path: Path, tiny_cache: Path) -> None:
    study = _study(tmp_path, tiny_cache)
    out = tmp_path / "out"
    assert main(["study", str(study), "--out", str(out), "--dry-run"]) == 0
    assert main(["study", str(study), "--out", str(out), "--set", "seeds=[5]", "--dry-run"]) == 2


def test_study_errors_name_the_key(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("name: x\nstarts: {scratch: {init: scratch}}\ndata: {cache: c}\nfractons: [0.1]\n")
    with pytest.raises(Exception, match="Did you mean 'fractions'"):
        load_study(str(path))
    path.write_text("starts: {SS-CXR: {init: sscxr, pretrain: nope}}\ndata: {cache: c}\n")
    with pytest.raises(Exception, match="not a pretrain run"):
        load_study(str(path))


def test_study_refuses_overrides_of_per_draw_keys(tmp_path: Path) -> None:
    path = tmp_path / "s.yaml"
    base = "starts: {scratch: {init: scratch}}\ndata: {cache: c}\n"
    path.write_text(base + "finetune: {overrides: [train.seed=0]}\n")
    with pytest.raises(SSCXRError, match=r"train\.seed"):
        load_study(str(path))
    path.write_text(base + "finetune: {fraction_overrides: {'0.1': [classify.subset_seed=3]}}\n")
    with pytest.raises(SSCXRError, match=r"classify\.subset_seed"):
        load_study(str(path))


def test_demo_study_trains_each_draw_with_its_own_seed(tmp_path: Path) -> None:
    """`sscxr demo --seed` seeds the cohort and pre-training, never every draw's fine-tuning alike."""
    import argparse

    from sscxr.cli import build_parser
    from sscxr.cli.demo import demo_study

    args = build_parser().parse_args(["demo", "--seed", "7", "--out", str(tmp_path / "d")])
    assert isinstance(args, argparse.Namespace)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(demo_study(args)))
    steps = [s for s in plan(load_study(str(path)), tmp_path / "d") if s.argv[0] == "finetune"]
    for step in steps:
        seeds = [a.split("=")[1] for a in step.argv if a.startswith("train.seed=")]
        draw = next(a.split("=")[1] for a in step.argv if a.startswith("classify.subset_seed="))
        assert seeds[-1] == draw, step.argv
    assert {next(a for a in s.argv if a.startswith("train.seed=")) for s in steps} == {
        f"train.seed={k}" for k in range(5)
    }
