"""`sscxr import kermany`: patients read from file names, so a split never separates a child's images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sscxr.cli import main
from sscxr.data.importers import import_kermany
from sscxr.data.importers.kermany import patient_of
from sscxr.data.manifest import read_manifest
from sscxr.errors import DataError


@pytest.mark.parametrize(
    ("stem", "patient", "subtype"),
    [
        ("person123_bacteria_456", "person123", "bacteria"),
        ("person447_virus_921_1", "person447", "virus"),
        ("IM-0115-0001", "IM-0115", ""),
        ("IM-0429-0001-0002", "IM-0429", ""),
        ("NORMAL2-IM-1427-0001", "NORMAL2-IM-1427", ""),
    ],
)
def test_patient_of_published_names(stem: str, patient: str, subtype: str) -> None:
    assert patient_of(stem) == (patient, subtype)


def test_patient_of_rejects_other_names() -> None:
    with pytest.raises(DataError, match="not a Kermany file name"):
        patient_of("scan_001")


def _tree(root: Path, names: dict[str, list[str]]) -> None:
    for cls, files in names.items():
        (root / cls).mkdir(parents=True)
        for f in files:
            Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / cls / f)


def test_import_and_split_keep_patients_together(tmp_path: Path) -> None:
    root = tmp_path / "train"
    pneu = [f"person{p}_bacteria_{k}.jpeg" for p in range(12) for k in range(3)]
    norm = [f"IM-{p:04d}-000{k}.jpeg" for p in range(12) for k in range(1, 3)]
    _tree(root, {"PNEUMONIA": pneu, "NORMAL": norm})
    m = import_kermany(root)
    assert {r.label for r in m.rows} == {"healthy", "pneumonia"}
    assert len({r.patient_id for r in m.rows}) == 24
    assert {r.extra["subtype"] for r in m.rows if r.label == "pneumonia"} == {"bacteria"}
    out = tmp_path / "m.csv"
    assert main(["import", "kermany", str(root), "--out", str(out), "--split", "0.5,0.25,0.25"]) == 0
    rows = read_manifest(out).rows
    split_of: dict[str, set[str]] = {}
    for r in rows:
        split_of.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in split_of.values())  # no child in two splits
    assert {r.split for r in rows} == {"train", "val", "test"}


def test_a_stray_file_is_named_in_the_error(tmp_path: Path) -> None:
    root = tmp_path / "train"
    _tree(root, {"PNEUMONIA": ["person1_virus_1.jpeg", "copy of x.jpeg"], "NORMAL": ["IM-0001-0001.jpeg"]})
    with pytest.raises(DataError, match="copy of x"):
        import_kermany(root)


@pytest.mark.realdata
def test_real_kermany_folder(shared_data: Path) -> None:
    root = shared_data / "kermany_train"
    if not root.is_dir():
        pytest.skip("kermany_train absent")
    m = import_kermany(root)
    assert len(m) == 5216
    labels = [r.label for r in m.rows]
    assert labels.count("healthy") == 1341 and labels.count("pneumonia") == 3875
    # Several images per child: fewer patients than images.
    assert len({r.patient_id for r in m.rows}) < 5216
