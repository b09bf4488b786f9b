"""The importer registry behind `sscxr import NAME`: an importer registered anywhere (here, a toy one,
with no change to the CLI code) gets its own sub-subcommand, `--help` and run; unknown names list the
known ones; every built-in importer's help shows only its own options; the parser loads no reader."""

from __future__ import annotations

import argparse
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sscxr.cli import main
from sscxr.data.importers import (
    Importer,
    Option,
    importer,
    importer_names,
    register_importer,
    unregister_importer,
)
from sscxr.data.manifest import Manifest, ManifestRow, read_manifest
from sscxr.errors import ConfigError

BUILTIN = ("folder", "kermany", "covidx", "montgomery", "shenzhen", "pairs", "jsrt", "csv", "masks")


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        main([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


# --------------------------------------------------------------------------- a toy importer
CALLS: list[argparse.Namespace] = []


def _run_toy(args: argparse.Namespace) -> Manifest:
    """Every PNG under ROOT, labelled --toy-label, each its own patient, from --toy-site."""
    CALLS.append(args)
    rows = [
        ManifestRow(p.name, label=args.toy_label, patient_id=p.stem, site=args.toy_site)
        for p in sorted(Path(args.root).glob("*.png"))
    ][: args.toy_limit]
    return Manifest(rows, root=args.root)


def _toy_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--toy-label", default="healthy", help="label of every toy image")
    parser.add_argument("--toy-limit", type=int, default=None, help="keep the first N toy images")


@pytest.fixture
def toy() -> Iterator[Importer]:
    entry = register_importer(
        Importer(
            "toy", "toy images, every PNG of a folder", _run_toy, root_help="the toy folder",
            options=(Option(("--toy-site",), {"default": "", "help": "site of the toy rows (required)"},
                            needed=True),),
            add_arguments=_toy_arguments,
        )
    )  # fmt: skip
    CALLS.clear()
    try:
        yield entry
    finally:
        unregister_importer("toy")


def test_a_registered_importer_gets_its_own_help(toy: Importer, capsys: pytest.CaptureFixture[str]) -> None:
    assert importer_names()[-1] == "toy" and importer("toy") is toy
    listing = help_of(capsys, "import")
    assert "toy" in listing and "toy images, every PNG of a folder" in listing
    text = help_of(capsys, "import", "toy")
    assert "the toy folder" in text
    assert "--toy-site" in text and "--toy-label" in text and "--toy-limit" in text
    assert "--out" in text and "--split SPLIT" in text  # what the CLI gives every importer
    # Only its own options: none of the built-in importers' options.
    for flag in ("--site ", "--path-col", "--where", "--masks", "--patient-pattern", "--label-file"):
        assert flag not in text, flag
    # ... and the built-in importers do not get the toy's.
    assert "--toy-label" not in help_of(capsys, "import", "kermany")


def test_a_registered_importer_runs(
    toy: Importer, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for i in range(4):
        png(tmp_path / "toys" / f"t{i}.png", 10 * i)
    out = tmp_path / "m.csv"
    argv = ["import", "toy", str(tmp_path / "toys"), "--toy-site", "lab", "--toy-label", "pneumonia",
            "--toy-limit", "3", "--split", "1,0,0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    assert len(CALLS) == 1 and CALLS[0].toy_limit == 3 and CALLS[0].importer is toy
    rows = read_manifest(out).rows
    assert [(Path(r.path).name, r.label, r.site, r.split) for r in rows] == [
        (f"t{i}.png", "pneumonia", "lab", "train") for i in range(3)
    ]
    assert f"wrote {out}: 3 images" in capsys.readouterr().out
    # Its needed option is checked like the built-in ones', before it runs.
    assert main(["import", "toy", str(tmp_path / "toys"), "--out", str(out)]) == 2
    assert "sscxr import: error: 'sscxr import toy' needs --toy-site" in capsys.readouterr().err
    assert len(CALLS) == 1


def test_unknown_importers_name_the_known_ones(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["import", "nope", "/d", "--out", "m.csv"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "invalid choice: 'nope'" in err and all(f"'{name}'" in err for name in BUILTIN), err
    with pytest.raises(ConfigError, match="unknown importer 'nope'; known importers: folder, kermany, "):
        importer("nope")


def test_unregistered_importers_are_gone(toy: Importer, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"known importers: .*masks, toy"):
        importer("nope")
    assert unregister_importer("toy") is toy
    with pytest.raises(SystemExit):
        main(["import", "toy", "/d", "--out", "m.csv"])
    assert "invalid choice: 'toy'" in capsys.readouterr().err
    register_importer(toy)  # for the fixture's clean-up


def test_registering_refuses_duplicates_and_bad_names(toy: Importer) -> None:
    with pytest.raises(ValueError, match="'kermany' is registered already"):
        register_importer(Importer("kermany", "another kermany", _run_toy))
    assert importer("kermany").summary != "another kermany"
    other = Importer("toy", "a replacement toy", _run_toy)
    assert register_importer(other, replace=True) is importer("toy") is other
    assert importer_names()[-1] == "toy"
    for bad in ("", "Toy", "-toy", "two words"):
        with pytest.raises(ValueError, match="importer name"):
            Importer(bad, "bad", _run_toy)


# ------------------------------------------------------------------- built-in importers' help
@pytest.mark.parametrize(
    ("name", "has", "lacks"),
    [
        ("folder", ("--patient-pattern", "--pseudonym-key-file"), ("--path-col", "--masks", "--where")),
        ("kermany", ("--site",), ("--path-col", "--where", "--masks", "--patient-pattern", "--strict")),
        ("covidx", ("--label-file", "--strict"), ("--path-col", "--masks", "--where")),
        ("montgomery", ("--masks-out", "--require-masks"), ("--path-col", "--mask-suffix", "--where")),
        ("shenzhen", ("--require-masks",), ("--masks-out", "--path-col", "--where")),
        ("pairs", ("--masks", "--meta-csv", "--mask-suffix"), ("--where", "--label-map", "--masks-out")),
        ("jsrt", ("--lung-values", "--masks-out"), ("--path-col", "--where", "--require-masks")),
        ("csv", ("--where", "--label-map-file", "--dedupe"), ("--masks-out", "--lung-values", "--meta-csv")),
        ("masks", ("--replace-masks", "--mask-dir"), ("--split", "--site", "--path-col", "--where")),
    ],
)
def test_each_builtin_help_shows_only_its_own_options(
    name: str, has: tuple[str, ...], lacks: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    text = help_of(capsys, "import", name)
    assert importer(name).summary in " ".join(text.split())
    for flag in has:
        assert flag in text, (name, flag)
    for flag in lacks:
        assert f"{flag} " not in text and f"{flag}\n" not in text, (name, flag)


def test_building_the_parser_loads_no_reader() -> None:
    # A fresh interpreter: the registry is read to build `sscxr import`, but the readers (and numpy,
    # pydicom, torch behind them) load only when an import runs or one of their names is used.
    code = (
        "import sys, sscxr.cli; sscxr.cli.build_parser()\n"
        "heavy = ('sscxr.data.importers.labelled', 'sscxr.data.importers.masks', 'numpy', 'pydicom',"
        " 'torch')\n"
        "print([m for m in heavy if m in sys.modules])\n"
        "from sscxr.data.importers import import_kermany, MASK_SUFFIXES\n"
        "print(import_kermany.__module__, 'sscxr.data.importers.masks' in sys.modules)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == ["[]", "sscxr.data.importers.kermany True"]
