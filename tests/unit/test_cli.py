"""The `sscxr` command line itself: building the parser stays cheap, and every subcommand is listed."""

from __future__ import annotations

import subprocess
import sys

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
