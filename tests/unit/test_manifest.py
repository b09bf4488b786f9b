"""Manifest rows, CSV round trips, validation and label canonicalisation."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from sscxr.data.manifest import (
    IMAGE_PATIENT_PREFIX,
    Manifest,
    ManifestRow,
    canonical_label,
    manifest_hash,
    read_manifest,
    write_manifest,
)
from sscxr.errors import DataError


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("normal", "healthy"),
        ("NORMAL", "healthy"),
        ("No finding", "healthy"),
        ("No_Finding", "healthy"),
        ("pneumonia", "pneumonia"),
        ("Viral Pneumonia", "pneumonia"),
        ("COVID-19", "covid-19"),
        ("COVID", "covid-19"),
        ("positive", "covid-19"),
        ("negative", "non-covid"),
        ("Tuberculosis", "tuberculosis"),
        ("  Lung_Opacity ", "lung_opacity"),
        ("", ""),
    ],
)
def test_canonical_label(raw: str, expected: str) -> None:
    assert canonical_label(raw) == expected


def _manifest(root: Path) -> Manifest:
    rows = [
        ManifestRow("a/x.png", "healthy", "p1", "s1", "train", "m/x.png", {"view": "PA", "note": 'a, "b"'}),
        ManifestRow("a/y.png", "covid-19", "p2", "s2", "test", "", {"view": "AP"}),
        ManifestRow("b/z.png", "", "p2", "s1", "", "", {"age": "40"}),
    ]
    return Manifest(rows, root)


def test_round_trip_keeps_rows_and_extra_columns(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    out = write_manifest(manifest, tmp_path / "manifest.csv")
    back = read_manifest(out)
    assert back.root == tmp_path
    assert [(r.path, r.label, r.patient_id, r.site, r.split, r.mask_path) for r in back] == [
        (r.path, r.label, r.patient_id, r.site, r.split, r.mask_path) for r in manifest
    ]
    # Extra columns survive (union of all rows, missing cells empty), including quotes and commas.
    assert back[0].extra == {"view": "PA", "note": 'a, "b"', "age": ""}
    assert back[2].extra == {"view": "", "note": "", "age": "40"}
    header = out.read_text().splitlines()[0]
    assert header == "path,label,patient_id,site,split,mask_path,view,note,age"
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_paths_relative_to_new_manifest_folder(tmp_path: Path) -> None:
    data = tmp_path / "data"
    manifest = _manifest(data)
    out = write_manifest(manifest, tmp_path / "manifest.csv")
    back = read_manifest(out)
    assert back[0].path == "data/a/x.png"
    assert back[0].mask_path == "data/m/x.png"
    assert back.resolve(back[0]) == manifest.resolve(manifest[0]) == data / "a" / "x.png"
    assert back.resolve_mask(back[0]) == data / "m" / "x.png"
    assert back.resolve_mask(back[1]) is None


def test_paths_outside_manifest_folder_keep_the_form_given(tmp_path: Path) -> None:
    data = tmp_path / "data"
    rows = [
        ManifestRow("a/x.png", "healthy", "p1", "s1", "train", "m/x.png"),
        ManifestRow(str(data / "a" / "y.png"), "healthy", "p2", "s1", "train", str(data / "m" / "y.png")),
    ]
    out = write_manifest(Manifest(rows, data), tmp_path / "runs" / "m.csv")
    back = read_manifest(out)
    # A row given relative stays relative (nothing of the machine's layout in the file), an absolute one
    # stays absolute; both still point at the same files.
    assert (back[0].path, back[0].mask_path) == ("../data/a/x.png", "../data/m/x.png")
    assert back[1].path == (data / "a" / "y.png").as_posix()
    assert back[1].mask_path == (data / "m" / "y.png").as_posix()
    assert back.resolve(back[0]) == data / "a" / "x.png"
    assert back.resolve_mask(back[1]) == data / "m" / "y.png"
    assert str(tmp_path) not in out.read_text().splitlines()[1]


@pytest.mark.parametrize(("outside", "absolute"), [("relative", False), ("absolute", True)])
def test_paths_outside_manifest_folder_in_the_form_asked(
    tmp_path: Path, outside: str, absolute: bool
) -> None:
    data = tmp_path / "data"
    rows = [ManifestRow(str(data / "a" / "y.png"), "healthy", "p2"), ManifestRow("a/x.png", "")]
    back = read_manifest(write_manifest(Manifest(rows, data), tmp_path / "runs" / "m.csv", outside=outside))
    assert [Path(r.path).is_absolute() for r in back] == [absolute, absolute]
    assert [back.resolve(r) for r in back] == [data / "a" / "y.png", data / "a" / "x.png"]
    # Inside the manifest's folder paths are relative whatever is asked: the folder moves as one.
    inside = read_manifest(write_manifest(Manifest(rows, data), data / "m.csv", outside=outside))
    assert [r.path for r in inside] == ["a/y.png", "a/x.png"]


def test_duplicate_path_rejected_with_its_name(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\nimgs/one.png,normal\nimgs/two.png,\n./imgs/one.png,\n")
    with pytest.raises(DataError, match=r"one\.png") as err:
        read_manifest(csv)
    assert "two.png" not in str(err.value)
    assert str(csv) in str(err.value)


def test_missing_path_column_rejected(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("file,label\nx.png,normal\n")
    with pytest.raises(DataError, match="'path' column"):
        read_manifest(csv)


def test_empty_path_and_extra_cells_rejected(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,label\n,normal\n")
    with pytest.raises(DataError, match="line 2"):
        read_manifest(csv)
    csv.write_text("path,label\nx.png,normal,oops\n")
    with pytest.raises(DataError, match="more cells"):
        read_manifest(csv)


def test_missing_file_is_data_error(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv"):
        read_manifest(tmp_path / "nope.csv")


def test_minimal_manifest_fills_patient_ids_with_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv = tmp_path / "m.csv"
    csv.write_text("path,patient_id,custom\nx.png,,1\ny.png,p7,2\nsub/z.png,,3\n")
    with caplog.at_level(logging.WARNING):
        manifest = read_manifest(csv)
    assert [r.patient_id for r in manifest] == [
        IMAGE_PATIENT_PREFIX + "x.png",
        "p7",
        IMAGE_PATIENT_PREFIX + "sub/z.png",
    ]
    assert len(manifest.patients()) == 3
    assert "2 of 3 rows have no patient_id" in caplog.text
    assert [r.extra for r in manifest] == [{"custom": "1"}, {"custom": "2"}, {"custom": "3"}]


def test_cp1252_manifest_is_read(tmp_path: Path) -> None:
    csv = tmp_path / "m.csv"
    csv.write_bytes("path,note\nx.png,39°C\n".encode("cp1252"))
    assert read_manifest(csv)[0].extra["note"] == "39°C"


def test_queries(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    assert len(manifest) == 3
    assert manifest.labels() == ["covid-19", "healthy"]
    assert manifest.counts("label") == {"": 1, "covid-19": 1, "healthy": 1}
    assert manifest.counts(by="site") == {"s1": 2, "s2": 1}
    assert manifest.counts("split") == {"": 1, "test": 1, "train": 1}
    with pytest.raises(ValueError, match="by must be"):
        manifest.counts("patient_id")
    assert manifest.patients() == {"p1": [0], "p2": [1, 2]}
    assert manifest.has_masks
    assert not manifest.filter(split="test").has_masks
    assert [r.path for r in manifest.filter(split="train")] == ["a/x.png"]
    assert [r.path for r in manifest.filter(split=["train", "test"])] == ["a/x.png", "a/y.png"]
    assert [r.path for r in manifest.filter(sites=["s1"], labels=["healthy"])] == ["a/x.png"]
    assert manifest.filter(labels=[]).rows == []
    assert [r.path for r in manifest] == ["a/x.png", "a/y.png", "b/z.png"]
    assert manifest.extra_columns() == ["view", "note", "age"]


def test_rows_are_frozen_and_hashable() -> None:
    row = ManifestRow("x.png", extra={"a": "1"})
    with pytest.raises(AttributeError):
        row.label = "healthy"  # type: ignore[misc]
    assert len({row, ManifestRow("x.png", extra={"a": "1"})}) == 1


def test_manifest_hash(tmp_path: Path) -> None:
    out = write_manifest(_manifest(tmp_path), tmp_path / "m.csv")
    first = manifest_hash(out)
    assert len(first) == 16 and int(first, 16) >= 0
    assert manifest_hash(out) == first
    out.write_text(out.read_text() + "c/new.png,,,,,\n")
    assert manifest_hash(out) != first


def test_hand_written_labels_and_splits_are_canonicalised(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """`COVID`, `Normal`, `TRAINING` must not silently drop rows from every task."""
    path = tmp_path / "m.csv"
    path.write_text(
        "path,label,patient_id,site,split,mask_path\n"
        "a.png,COVID,p1,s,TRAINING,\nb.png,Normal,p2,s,Validation,\nc.png,pneumonia,p3,s,test,\n"
        "d.png,healthy,p4,s,,\n"
    )
    with caplog.at_level("INFO"):
        m = read_manifest(path)
    assert [r.label for r in m.rows] == ["covid-19", "healthy", "pneumonia", "healthy"]
    assert [r.split for r in m.rows] == ["train", "val", "test", ""]
    assert "'COVID' -> 'covid-19'" in caplog.text and "split 'TRAINING' -> 'train'" in caplog.text
    assert "1 of 4 rows have no split" in caplog.text and "sscxr split" in caplog.text
