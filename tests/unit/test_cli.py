"""The `sscxr` command line itself: building the parser stays cheap, and every subcommand is listed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

COMMANDS = (
    "synth",
    "import",
    "split",
    "prepare",
    "pretrain",
    "finetune",
    "segment",
    "evaluate",
    "report",
    "demo",
)


def test_building_the_parser_does_not_import_torch() -> None:
    # A fresh interpreter: this test process has torch imported already. `sscxr --help` must not pay
    # for torch, the engine or the evaluation code; they are imported when a command runs.
    code = "import sscxr.cli, sys; sscxr.cli.build_parser(); print('torch' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


def test_help_lists_every_subcommand() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "sscxr", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    listed = {
        line.split()[0] for line in proc.stdout.splitlines() if line.startswith("    ") and line.split()
    }
    assert set(COMMANDS) <= listed, proc.stdout


def _png(path: Path, value: int, size: int = 16) -> None:
    import numpy as np
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size), value, dtype=np.uint8)).save(path)


def test_import_jsrt_and_csv_layouts_write_manifests(tmp_path: Path) -> None:
    import numpy as np
    from PIL import Image

    from sscxr.cli import main
    from sscxr.data.io import read_mask
    from sscxr.data.manifest import read_manifest

    (tmp_path / "lab").mkdir()
    label = np.zeros((16, 16), dtype=np.uint8)
    label[2:8, 2:6], label[2:8, 10:14], label[10:14, 6:10] = 255, 128, 60  # two lungs and a heart
    for i in range(3):
        _png(tmp_path / "img" / f"case{i}.png", 100 + i)
        Image.fromarray(label).save(tmp_path / "lab" / f"case{i}.png")
    out = tmp_path / "jsrt.csv"
    assert (
        main(
            [
                "import",
                "jsrt",
                str(tmp_path / "img"),
                "--masks",
                str(tmp_path / "lab"),
                "--lung-values",
                "255,128",
                "--masks-out",
                str(tmp_path / "masks"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    m = read_manifest(out)
    assert len(m) == 3 and m.has_masks
    mask = read_mask(m.resolve_mask(m.rows[0]))
    assert mask.sum() == 2 * 6 * 4 and not mask[10:14, 6:10].any()  # lungs kept, heart left out

    (tmp_path / "meta.csv").write_text("file,finding,pid\ncase0.png,COVID-19,p1\ncase1.png,No finding,p2\n")
    out = tmp_path / "from_csv.csv"
    assert (
        main(
            [
                "import",
                "csv",
                str(tmp_path / "meta.csv"),
                "--path-col",
                "file",
                "--label-col",
                "finding",
                "--patient-col",
                "pid",
                "--image-dir",
                str(tmp_path / "img"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = read_manifest(out).rows
    assert [(r.label, r.patient_id) for r in rows] == [("covid-19", "p1"), ("healthy", "p2")]


def test_import_reports_missing_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sscxr.cli import main

    assert main(["import", "jsrt", str(tmp_path), "--out", str(tmp_path / "m.csv")]) == 2
    assert "needs --masks, --lung-values, --masks-out" in capsys.readouterr().err


def test_synth_writes_manifest_and_contact_sheet(tmp_path: Path) -> None:
    from sscxr.cli import main

    out = tmp_path / "cohort"
    args = [
        "synth",
        "--out",
        str(out),
        "--n-adult",
        "8",
        "--n-pediatric",
        "2",
        "--size",
        "64",
        "--workers",
        "1",
    ]
    assert main(args) == 0
    assert (out / "manifest.csv").is_file() and (out / "contact_sheet.png").is_file()
    first = (out / "manifest.csv").read_bytes()
    assert main(args) == 0  # same config: nothing regenerated
    assert (out / "manifest.csv").read_bytes() == first
    record = json.loads((out / "synth_config.json").read_text())
    assert record["config"]["acquisition_jitter"] == 1.0 and record["generator_version"] == 2
    # another acquisition jitter is another cohort: refused without --force, then recorded
    assert main([*args, "--acquisition-jitter", "0.333"]) == 2
    assert main([*args, "--acquisition-jitter", "0.333", "--force"]) == 0
    assert json.loads((out / "synth_config.json").read_text())["config"]["acquisition_jitter"] == 0.333
    assert main([*args, "--acquisition-jitter", "5", "--force"]) == 2


def test_prepare_verify_and_repair_a_damaged_cache(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from sscxr.cli import main

    cohort, cache = tmp_path / "cohort", tmp_path / "cache"
    synth = ["synth", "--out", str(cohort), "--n-adult", "8", "--n-pediatric", "0", "--size", "64"]
    assert main([*synth, "--workers", "1"]) == 0
    prep = ["prepare", str(cohort / "manifest.csv"), "--out", str(cache), "--size", "32", "--workers", "0"]
    assert main(prep) == 0
    capsys.readouterr()
    assert main([*prep, "--verify"]) == 0
    assert "every row matches its checksum" in capsys.readouterr().out
    images = np.load(cache / "images.npy", mmap_mode="r+")
    images[2] = 0
    images.flush()
    del images
    # open() samples rows: the damage is refused in one line that names the cache and the fix
    assert main([*prep, "--verify"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(cache) in err[0] and "repair it with: sscxr prepare" in err[0]
    assert main(prep) == 0
    assert "1 damaged rows decoded again" in capsys.readouterr().out
    assert main([*prep, "--verify"]) == 0
    assert main([*prep[:-4], "--size", "100000"]) == 2
    assert "between 8 and 4096" in capsys.readouterr().err


def test_split_refuses_a_leak_and_resplit_repairs_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from dataclasses import replace

    from sscxr.cli import main
    from sscxr.data.manifest import read_manifest, write_manifest
    from sscxr.data.splits import check_no_leak

    cohort = tmp_path / "cohort"
    assert main(["synth", "--out", str(cohort), "--n-adult", "40", "--n-pediatric", "0", "--size", "32"]) == 0
    m = read_manifest(cohort / "manifest.csv")
    test_patient = next(r.patient_id for r in m.rows if r.split == "test")
    first_train = next(i for i, r in enumerate(m.rows) if r.split == "train")
    # a hand-edited manifest: one training image now belongs to a test patient
    rows = [replace(r, patient_id=test_patient) if i == first_train else r for i, r in enumerate(m.rows)]
    write_manifest(m.with_rows(rows), tmp_path / "leaky.csv")
    capsys.readouterr()
    split = ["split", str(tmp_path / "leaky.csv"), "--split", "0.6,0.2,0.2", "--hold-out-site", "site_d"]
    assert main(split) == 2  # existing splits kept: the leak is named, with the option that fixes it
    assert "--resplit" in capsys.readouterr().err
    assert main([*split, "--resplit"]) == 0
    fixed = read_manifest(tmp_path / "leaky.csv")
    check_no_leak(fixed)
    assert {r.split for r in fixed.rows if r.site == "site_d"} == {"test_site"}


def test_a_full_disk_is_one_line_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    import sscxr.data.cache
    from sscxr.cli import main

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "cache" / "images.npy"))

    monkeypatch.setattr(sscxr.data.cache, "prepare", full)
    assert main(["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "cache")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "the disk is full" in err[0] and "images.npy" in err[0] and "re-run" in err[0]
    with pytest.raises(OSError):  # -v: the traceback, for a bug report
        main(["-v", "prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "cache")])


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["evaluate", "--model", "a=b", "--test", "t=c:test", "--n-boot", "-5", "--out", "o"], "--n-boot"),
        (
            ["evaluate", "--model", "a=b", "--test", "t=c:test", "--batch-size", "0", "--out", "o"],
            "--batch-size",
        ),
        (["prepare", "m.csv", "--out", "c", "--workers", "-2"], "--workers"),
        (["split", "m.csv", "--split", "0.7,0.2"], "summing to 1"),
        (["split", "m.csv", "--split", "a,b,c"], "expected three numbers"),
    ],
)
def test_bad_numbers_are_refused_by_the_parser(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    from sscxr.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2 and expected in capsys.readouterr().err


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["model.img_size=63"], "img_size (63) must be a multiple of patch_size (16)"),
        (["model.depth=0"], "depth must be a positive integer"),
        (["train.epochs=abc"], "train.epochs:"),
        (["gmml.recon_blocks=[2,9]"], "blocks are 1..6"),
        (["gmml.recon_blocks=[2,3]"], "stop before the last block"),
    ],
)
def test_bad_configs_are_one_line(
    overrides: list[str], expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from sscxr.cli import main

    assert main(["pretrain", "-c", "tiny", *overrides, "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err


def test_console_log_handler_follows_the_current_stderr(monkeypatch: pytest.MonkeyPatch) -> None:
    """`sscxr study` runs commands in-process: a stream swapped and closed since must not break logging."""
    import io
    import logging
    import sys

    from sscxr.console import StderrHandler

    handler = StderrHandler()
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    handler.handle(logging.makeLogRecord({"msg": "one", "levelno": logging.WARNING}))
    assert first.getvalue() == "one\n"
    first.close()
    second = io.StringIO()
    monkeypatch.setattr(sys, "stderr", second)
    handler.handle(logging.makeLogRecord({"msg": "two", "levelno": logging.WARNING}))
    assert second.getvalue() == "two\n"
