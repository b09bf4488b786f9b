"""Importers on tiny trees in each published layout, plus the real samples in ../shared/data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sscxr.data.importers import (
    import_covidx,
    import_csv,
    import_folder,
    import_image_mask_pairs,
    import_jsrt_masks,
    import_montgomery,
    import_shenzhen,
    pseudonym,
)
from sscxr.data.manifest import read_manifest, write_manifest
from sscxr.errors import DataError

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "data"
realdata = pytest.mark.skipif(not DATA.is_dir(), reason=f"{DATA} is absent")


def png(path: Path, array: np.ndarray | None = None) -> Path:
    """Write an 8-bit PNG (default: an 8x8 ramp) and return its path."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) if array is None else array.astype(np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def box(y0: int, y1: int, x0: int, x1: int, value: int = 255) -> np.ndarray:
    out = np.zeros((8, 8), np.uint8)
    out[y0:y1, x0:x1] = value
    return out


def dicom(path: Path, patient_id: str) -> Path:
    """Write a tiny valid DICOM (8x8, MONOCHROME2) with the given PatientID."""
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.PatientID, ds.PatientName = patient_id, "Doe^Jane"
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.arange(64, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


# ------------------------------------------------------------------------------------------ folders
def test_folder_with_class_subfolders(tmp_path: Path) -> None:
    png(tmp_path / "NORMAL" / "1.png")
    png(tmp_path / "NORMAL" / "deep" / "2.jpeg")
    png(tmp_path / "COVID" / "1.png")
    png(tmp_path / "Viral Pneumonia" / "a.PNG")
    png(tmp_path / "NORMAL" / "._1.png")  # macOS resource fork: not an image
    (tmp_path / "NORMAL" / "notes.txt").write_text("x")
    manifest = import_folder(tmp_path, site="siteA")
    assert [(r.path, r.label) for r in manifest] == [
        ("COVID/1.png", "covid-19"),
        ("NORMAL/1.png", "healthy"),
        ("NORMAL/deep/2.jpeg", "healthy"),
        ("Viral Pneumonia/a.PNG", "pneumonia"),
    ]
    # Per-image patient ids must not merge COVID/1 and NORMAL/1.
    assert len(manifest.patients()) == 4
    assert {r.site for r in manifest} == {"siteA"}
    assert manifest.resolve(manifest[0]) == tmp_path / "COVID" / "1.png"


def test_folder_flat_and_forced(tmp_path: Path) -> None:
    png(tmp_path / "x.png")
    png(tmp_path / "images" / "y.png")
    assert [r.label for r in import_folder(tmp_path)] == ["", ""]
    # One first-level folder is not a class layout, unless the caller says so.
    only = import_folder(tmp_path / "images")
    assert [r.label for r in only] == [""]
    png(tmp_path / "b" / "z.png")
    assert [r.label for r in import_folder(tmp_path)] == ["", "", ""]  # x.png is in no folder
    forced = import_folder(tmp_path, class_subfolders=True)
    assert [(r.path, r.label) for r in forced] == [
        ("b/z.png", "b"),
        ("images/y.png", "images"),
        ("x.png", ""),
    ]
    png(tmp_path / "x.png").unlink()
    assert [r.label for r in import_folder(tmp_path)] == ["b", "images"]
    assert [r.label for r in import_folder(tmp_path, class_subfolders=False)] == ["", ""]


def test_folder_split_then_class(tmp_path: Path) -> None:
    for split in ("train", "val", "test"):
        png(tmp_path / split / "NORMAL" / "a.png")
        png(tmp_path / split / "PNEUMONIA" / "b.png")
    manifest = import_folder(tmp_path)
    assert manifest.counts("split") == {"test": 2, "train": 2, "val": 2}
    assert manifest.counts("label") == {"healthy": 3, "pneumonia": 3}


def test_folder_dicom_patient_pseudonym(tmp_path: Path) -> None:
    dicom(tmp_path / "a" / "one.dcm", "MRN-123456")
    dicom(tmp_path / "a" / "1.2.840.99", "MRN-123456")  # UID-named, no image suffix
    dicom(tmp_path / "b" / "noext", "OTHER-9")
    png(tmp_path / "b" / "plain.png")
    manifest = import_folder(tmp_path)
    assert [r.path for r in manifest] == ["a/1.2.840.99", "a/one.dcm", "b/noext", "b/plain.png"]
    assert import_folder(tmp_path / "a", pseudonym_key="k")[0].patient_id == pseudonym("MRN-123456", "k")
    ids = [r.patient_id for r in manifest]
    assert ids[0] == ids[1] == pseudonym("MRN-123456") and len(ids[0]) == 12
    assert ids[2] == pseudonym("OTHER-9") and ids[3] == "b/plain"
    assert pseudonym("MRN-123456", key="secret") != ids[0]
    out = write_manifest(manifest, tmp_path / "manifest.csv").read_text()
    assert "MRN-123456" not in out and "OTHER-9" not in out and "Doe" not in out


def test_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        import_folder(tmp_path / "missing")
    with pytest.raises(DataError, match="no image files"):
        import_folder(tmp_path)


def test_folder_patient_pattern_keeps_a_patients_images_together(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("COVID-00015a", "COVID-00015b", "COVID-00016a", "odd-name"):
        png(tmp_path / "covid" / f"{name}.png")
    png(tmp_path / "normal" / "n1.png")
    with caplog.at_level(logging.WARNING):
        m = import_folder(tmp_path, patient_pattern=r"^(COVID-\d+)")
    ids = {r.path: r.patient_id for r in m}
    assert ids["covid/COVID-00015a.png"] == ids["covid/COVID-00015b.png"] == "COVID-00015"
    assert ids["covid/COVID-00016a.png"] == "COVID-00016" and ids["covid/odd-name.png"] == "covid/odd-name"
    assert "matched 3 of 5 file names" in caplog.text
    with pytest.raises(DataError, match="not a regular expression"):
        import_folder(tmp_path, patient_pattern="(unclosed")


def test_folder_refuses_a_mask_folder_as_a_class(tmp_path: Path) -> None:
    png(tmp_path / "train_images" / "a.png")
    png(tmp_path / "train_masks" / "a.png", box(0, 4, 0, 4))
    with pytest.raises(DataError, match=r"\['train_masks'\] hold masks.*sscxr import pairs"):
        import_folder(tmp_path)


def test_cli_keyed_pseudonyms_from_a_key_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from sscxr.cli import main

    dicom(tmp_path / "imgs" / "one.dcm", "MRN-123456")
    key = tmp_path / "key.txt"
    key.write_text("0123456789abcdef0123\n")
    out = tmp_path / "m.csv"
    assert (
        main(
            ["import", "folder", str(tmp_path / "imgs"), "--out", str(out), "--pseudonym-key-file", str(key)]
        )
        == 0
    )
    assert read_manifest(out)[0].patient_id == pseudonym("MRN-123456", "0123456789abcdef0123")
    key.write_text("short")
    assert (
        main(
            ["import", "folder", str(tmp_path / "imgs"), "--out", str(out), "--pseudonym-key-file", str(key)]
        )
        == 2
    )
    assert "at least 16" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ COVIDx
def test_covidx_cxr3_and_missing_files(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    png(tmp_path / "train" / "a.png")
    png(tmp_path / "train" / "b b.png")
    png(tmp_path / "test" / "c.png")
    (tmp_path / "train.txt").write_text(
        "p1 a.png positive rsna\n\np2 b b.png negative bimcv\np3 gone.png positive rsna\n"
        "p4 gone2.png negative rsna\n"
    )
    (tmp_path / "test.txt").write_text("p5 c.png COVID-19\n")  # 3-column (older) line
    with caplog.at_level(logging.WARNING):
        manifest = import_covidx(tmp_path)
    assert [(r.path, r.label, r.patient_id, r.site, r.split) for r in manifest] == [
        ("train/a.png", "covid-19", "p1", "rsna", "train"),
        ("train/b b.png", "non-covid", "p2", "bimcv", "train"),
        ("test/c.png", "covid-19", "p5", "", "test"),
    ]
    assert "2 listed image(s) missing" in caplog.text and "gone.png" in caplog.text
    with pytest.raises(DataError, match=r"gone2\.png"):
        import_covidx(tmp_path, strict=True)


def test_covidx_old_classes_image_dirs_and_bad_lines(tmp_path: Path) -> None:
    png(tmp_path / "imgs" / "n.png")
    png(tmp_path / "imgs" / "p.png")
    (tmp_path / "train_COVIDx8B.txt").write_text("1 n.png normal cohen\n2 p.png pneumonia cohen\n")
    manifest = import_covidx(
        tmp_path, label_files=["train_COVIDx8B.txt"], image_dirs={"train": tmp_path / "imgs"}
    )
    assert [(r.label, r.split, r.path) for r in manifest] == [
        ("healthy", "train", "imgs/n.png"),
        ("pneumonia", "train", "imgs/p.png"),
    ]
    (tmp_path / "bad.txt").write_text("1 n.png\n")
    with pytest.raises(DataError, match="line 1"):
        import_covidx(tmp_path, label_files=["bad.txt"])
    with pytest.raises(DataError, match=r"val\.txt"):
        import_covidx(tmp_path, label_files=["val.txt"])


# -------------------------------------------------------------------------------------- Montgomery
def test_montgomery_merges_left_and_right(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "MontgomerySet"
    left, right = box(1, 7, 0, 3, 255), box(2, 6, 5, 8, 200)
    for name in ("MCUCXR_0001_0.png", "MCUCXR_0002_1.png"):
        png(root / "CXR_png" / name)
        png(root / "ManualMask" / "leftMask" / name, left)
    png(root / "ManualMask" / "rightMask" / "MCUCXR_0001_0.png", right)
    out = tmp_path / "merged"
    with caplog.at_level(logging.WARNING):
        manifest = import_montgomery(root, out_dir=out)
    assert [(r.path, r.label, r.patient_id, r.site) for r in manifest] == [
        ("CXR_png/MCUCXR_0001_0.png", "healthy", "MCUCXR_0001", "montgomery"),
        ("CXR_png/MCUCXR_0002_1.png", "tuberculosis", "MCUCXR_0002", "montgomery"),
    ]
    merged = np.asarray(Image.open(manifest.resolve_mask(manifest[0])))
    assert merged.dtype == np.uint8 and set(np.unique(merged)) == {0, 255}
    np.testing.assert_array_equal(merged == 255, (left > 127) | (right > 127))
    assert manifest.resolve_mask(manifest[0]).parent == out
    assert manifest[1].mask_path == "" and "without both lung masks" in caplog.text
    with pytest.raises(DataError, match="MCUCXR_0002_1"):
        import_montgomery(root, out_dir=out, require_masks=True)
    with pytest.raises(DataError, match="CXR_png"):
        import_montgomery(tmp_path / "elsewhere", out_dir=out)


# ---------------------------------------------------------------------------------------- Shenzhen
@pytest.mark.parametrize(
    ("image_dir", "mask_dir", "mask_name"),
    [
        ("CXR_png", "CXR_png", "{}_mask.png"),
        ("CXR_png", "masks", "{}_mask.png"),
        ("train_images", "train_masks", "{}_mask.png"),
        ("train", "train_masks", "{}_mask.png"),
        ("CXR_png", "mask", "{}.png"),
    ],
)
def test_shenzhen_layouts(tmp_path: Path, image_dir: str, mask_dir: str, mask_name: str) -> None:
    for stem in ("CHNCXR_0001_0", "CHNCXR_0002_1"):
        png(tmp_path / image_dir / f"{stem}.png")
        png(tmp_path / mask_dir / mask_name.format(stem), box(2, 6, 2, 6))
    png(tmp_path / "test_images" / "CHNCXR_0003_1.png")
    manifest = import_shenzhen(tmp_path)
    by_path = {r.path: r for r in manifest}
    assert len(manifest) == 3
    first = by_path[f"{image_dir}/CHNCXR_0001_0.png"]
    assert (first.label, first.patient_id, first.site) == ("healthy", "CHNCXR_0001", "shenzhen")
    assert first.mask_path == f"{mask_dir}/" + mask_name.format("CHNCXR_0001_0")
    assert by_path[f"{image_dir}/CHNCXR_0002_1.png"].label == "tuberculosis"
    assert by_path["test_images/CHNCXR_0003_1.png"].mask_path == ""
    with pytest.raises(DataError, match="without a mask"):
        import_shenzhen(tmp_path, require_masks=True)


# ----------------------------------------------------------------------------------- generic pairs
def test_pairs_same_folder_dash_mask(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for n in (1, 2, 3):
        png(tmp_path / f"{n}.png")
    png(tmp_path / "1-mask.png", box(0, 4, 0, 4))
    png(tmp_path / "2-mask.png", box(0, 4, 0, 4))
    png(tmp_path / "9-mask.png", box(0, 4, 0, 4))  # mask without image
    with caplog.at_level(logging.WARNING):
        manifest = import_image_mask_pairs(tmp_path, site="lab", label="Normal")
    assert [(r.path, r.mask_path) for r in manifest] == [
        ("1.png", "1-mask.png"),
        ("2.png", "2-mask.png"),
        ("3.png", ""),
    ]
    assert {(r.site, r.label) for r in manifest} == {("lab", "healthy")}
    assert "1 mask(s) match no image: " in caplog.text and "9-mask.png" in caplog.text
    assert "3.png" in caplog.text
    with pytest.raises(DataError, match=r"3\.png"):
        import_image_mask_pairs(tmp_path, require_masks=True)
    with pytest.raises(DataError, match="need a suffix"):
        import_image_mask_pairs(tmp_path, mask_suffix="")


def test_pairs_separate_folder_and_pattern(tmp_path: Path) -> None:
    png(tmp_path / "img" / "a.png")
    png(tmp_path / "img" / "b.jpg")
    png(tmp_path / "seg" / "a.png")
    png(tmp_path / "seg" / "b.png")
    manifest = import_image_mask_pairs(tmp_path / "img", tmp_path / "seg")
    assert [(r.path, r.mask_path) for r in manifest] == [("a.png", "../seg/a.png"), ("b.jpg", "../seg/b.png")]
    assert manifest.resolve_mask(manifest[1]) == tmp_path / "seg" / "b.png"
    png(tmp_path / "pat" / "mask_a.png")
    manifest = import_image_mask_pairs(tmp_path / "img", tmp_path / "pat", mask_suffix="mask_{stem}")
    assert [r.mask_path for r in manifest] == ["../pat/mask_a.png", ""]


def test_jsrt_label_values_to_lung_masks(tmp_path: Path) -> None:
    png(tmp_path / "img" / "JPCLN001.png")
    png(tmp_path / "img" / "JPCLN002.png")
    coded = np.zeros((8, 8), np.uint8)
    coded[1:7, 0:3], coded[1:7, 5:8], coded[0, :], coded[3:5, 3:5] = (
        255,
        170,
        85,
        42,
    )  # lungs, clavicle, heart
    png(tmp_path / "labels" / "JPCLN001_label.png", coded)
    manifest = import_jsrt_masks(
        tmp_path / "img", tmp_path / "labels", lung_values=(255, 170), out_dir=tmp_path / "out"
    )
    assert [r.site for r in manifest] == ["jsrt", "jsrt"]
    mask = np.asarray(Image.open(manifest.resolve_mask(manifest[0])))
    np.testing.assert_array_equal(mask == 255, np.isin(coded, (255, 170)))
    assert set(np.unique(mask)) == {0, 255}
    assert manifest[1].mask_path == ""
    with pytest.raises(ValueError, match="lung_values"):
        import_jsrt_masks(tmp_path / "img", tmp_path / "labels", lung_values=(), out_dir=tmp_path / "out")


# ---------------------------------------------------------------------------------------------- CSV
def test_csv_importer(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    png(tmp_path / "images" / "C-01a.jpg")
    png(tmp_path / "images" / "C-01b.png")
    png(tmp_path / "images" / "C-02.png")
    text = "id,finding,note\nC-01a,COVID-19,39°C\nC-01b,,\nC-02,No finding,x\nC-03,Pneumonia,\n"
    (tmp_path / "meta.csv").write_bytes(text.encode("cp1252"))
    with caplog.at_level(logging.WARNING):
        manifest = import_csv(
            tmp_path / "meta.csv",
            "id",
            "finding",
            "id",
            image_dir=tmp_path / "images",
            patient_pattern=r"^(C-\d+)",
            extra_cols=["note"],
            site="fig",
        )
    assert [(r.path, r.label, r.patient_id, r.site) for r in manifest] == [
        ("C-01a.jpg", "covid-19", "C-01", "fig"),
        ("C-01b.png", "", "C-01", "fig"),
        ("C-02.png", "healthy", "C-02", "fig"),
    ]
    assert manifest[0].extra == {"note": "39°C"}
    assert "1 listed image(s) not found" in caplog.text and "C-03" in caplog.text
    with pytest.raises(DataError, match="C-03"):
        import_csv(tmp_path / "meta.csv", "id", image_dir=tmp_path / "images", strict=True)
    with pytest.raises(DataError, match="'label'"):
        import_csv(tmp_path / "meta.csv", "id", "label", image_dir=tmp_path / "images")


# ----------------------------------------------------------------------------------------- real data
@pytest.mark.realdata
@realdata
def test_real_shenzhen_mini(tmp_path: Path) -> None:
    manifest = import_shenzhen(DATA / "shenzhen_mini")
    assert len(manifest) == 17
    with_masks = [r for r in manifest if r.mask_path]
    assert len(with_masks) == 10 and all(r.path.startswith("train_images/") for r in with_masks)
    assert all(Path(r.mask_path).name == Path(r.path).stem + "_mask.png" for r in with_masks)
    assert {r.path.split("/")[0] for r in manifest if not r.mask_path} == {"test_images"}
    assert manifest.counts("label") == {"healthy": 14, "tuberculosis": 3}
    back = read_manifest(write_manifest(manifest, tmp_path / "m.csv"))
    assert all(back.resolve(r).is_file() for r in back)
    assert all(back.resolve_mask(r).is_file() for r in back if r.mask_path)


@pytest.mark.realdata
@realdata
def test_real_imlab_pairs() -> None:
    manifest = import_image_mask_pairs(DATA / "imlab_lung")
    assert [(r.path, r.mask_path) for r in manifest] == [(f"{n}.jpg", f"{n}-mask.png") for n in (1, 2, 3, 4)]


@pytest.mark.realdata
@realdata
def test_real_fig1_csv() -> None:
    manifest = import_csv(
        DATA / "fig1" / "metadata.csv",
        "patientid",
        "finding",
        "patientid",
        image_dir=DATA / "fig1" / "images",
        patient_pattern=r"^(COVID-\d+)",
        site="fig1",
    )
    assert len(manifest) == 55
    assert manifest.counts("label") == {"": 15, "covid-19": 35, "healthy": 3, "pneumonia": 2}
    patients = manifest.patients()
    assert len(patients[manifest[2].patient_id]) == 2  # COVID-00003a and COVID-00003b
    assert all(manifest.resolve(r).is_file() for r in manifest)


@pytest.mark.realdata
@realdata
def test_real_dicom_folder_hides_patient_ids(tmp_path: Path) -> None:
    import pydicom

    manifest = import_folder(DATA / "dicom" / "chest")
    assert "CR-MONO1-10-chest" in {r.path for r in manifest}  # ACR-NEMA, no suffix, no preamble
    out = write_manifest(manifest, tmp_path / "m.csv").read_text()
    for row in manifest:
        ds = pydicom.dcmread(manifest.resolve(row), stop_before_pixels=True, force=True)
        pid = str(ds.get("PatientID", "") or "").strip()
        if len(pid) > 2:
            assert pid not in out
