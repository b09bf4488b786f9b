"""Importers on tiny trees in each published layout, plus the real samples in ../shared/data."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sscxr.data.importers import (
    CANONICAL_LABELS,
    RowFilter,
    import_covidx,
    import_csv,
    import_folder,
    import_image_mask_pairs,
    import_jsrt_masks,
    import_montgomery,
    import_shenzhen,
    join_masks,
    label_map_from,
    pseudonym,
    read_csv_metadata,
    read_patient_table,
)
from sscxr.data.manifest import Manifest, ManifestRow, read_manifest, write_manifest
from sscxr.errors import ConfigError, DataError

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
    (tmp_path / "meta.csv").write_text("file\n")
    with pytest.raises(DataError) as e:
        import_folder(tmp_path / "meta.csv")
    message = str(e.value)
    assert "meta.csv: is a file, not the image folder" in message and "sscxr import csv" in message
    assert "not found" not in message and "\n" not in message


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
    with pytest.raises(DataError, match=r"val\.txt: COVIDx label file not found.*--label-file"):
        import_covidx(tmp_path, label_files=["val.txt"])
    (tmp_path / "three.txt").write_text("1 n.png normal\n")  # no source column: the given site
    m = import_covidx(
        tmp_path, label_files=["three.txt"], image_dirs={"three": tmp_path / "imgs"}, site="lab"
    )
    assert [(r.path, r.site) for r in m] == [("imgs/n.png", "lab")]


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


# ------------------------------------------------------------------ CSV: filters, label map, dupes
# An ieee8023 covid-chestxray-dataset style metadata file (its columns, its kinds of values).
IEEE_CSV = (
    "patientid,offset,finding,view,modality,filename,notes\n"
    "1,0,COVID-19,PA,X-ray,a.png,\n"
    '1,3,"COVID-19, ARDS",AP Supine,X-ray,b.png,"intubated\nday 3"\n'  # a cell over two lines
    "2,,Pneumonia/Viral/COVID-19,AP,X-ray,c.png,\n"
    "3,,Pneumonia/Viral/SARS,PA,X-ray,d.png,\n"
    "4,,Streptococcus,PA,X-ray,e.png,\n"
    "5,,No Finding,PA,X-ray,f.png,\n"
    "6,,ARDS,PA,X-ray,g.png,\n"
    "7,,todo,L,X-ray,h.png,\n"
    "8,,COVID-19,Axial,CT,i.png,\n"
    "9,,,PA,X-ray,j.png,\n"
    '10,,"COVID-19, Streptococcus",PA,X-ray,k.png,\n'
)
IEEE_MAP = {
    "covid-19": ["COVID-19"],
    "pneumonia": ["Pneumonia", "Streptococcus"],
    "Normal": ["No Finding"],  # an alias of a canonical label is fine
}


def _ieee(tmp_path: Path, text: str = IEEE_CSV) -> Path:
    for name in "abcdefghijk":
        png(tmp_path / "images" / f"{name}.png")
    (tmp_path / "metadata.csv").write_text(text)
    return tmp_path / "metadata.csv"


def test_row_filter_syntax_and_matching() -> None:
    f = RowFilter.parse(" view = PA, AP ")
    assert (f.column, f.values, f.exclude) == ("view", ("PA", "AP"), False)
    assert f.keeps("pa") and f.keeps(" AP ") and not f.keeps("AP Supine") and not f.keeps("")
    drop = RowFilter.parse("view!=L,AP_supine")
    assert drop.exclude and not drop.keeps("l") and not drop.keeps("AP  Supine") and drop.keeps("PA")
    wild = RowFilter.parse("view=AP*")
    assert wild.keeps("AP") and wild.keeps("ap erect") and not wild.keeps("PA")
    assert RowFilter.parse("finding=").keeps("") and not RowFilter.parse("finding=").keeps("x")
    assert not RowFilter.parse("finding!=").keeps(" ")
    comma = RowFilter.parse(r"finding=COVID-19\, ARDS,SARS")
    assert comma.values == ("COVID-19, ARDS", "SARS") and comma.keeps("covid-19,ARDS")
    assert str(comma) == r"finding=COVID-19\, ARDS,SARS"
    for bad in ("modality", "=X-ray", "!=x"):
        with pytest.raises(ConfigError, match=r"--where .*expected COLUMN=VALUE"):
            RowFilter.parse(bad)


@pytest.mark.parametrize(
    ("raw", "label", "classes"),
    [
        ("COVID-19", "covid-19", ("covid-19",)),
        ("  covid-19 ", "covid-19", ("covid-19",)),  # case and spaces do not matter
        ("COVID-19, ARDS", "covid-19", ("covid-19",)),  # unmapped findings are ignored
        ("ARDS; COVID-19", "covid-19", ("covid-19",)),
        ("Pneumonia/Viral/COVID-19", "covid-19", ("covid-19",)),  # the most specific level wins
        ("Pneumonia/Viral/SARS", "pneumonia", ("pneumonia",)),  # a path entry
        ("Pneumonia/Viral/Influenza", "pneumonia", ("pneumonia",)),  # walks up to 'Pneumonia'
        ("Pneumonia/Bacterial/Streptococcus", "pneumonia", ("pneumonia",)),
        ("COVID-19, Streptococcus", "", ("covid-19", "pneumonia")),  # ambiguous
        ("COVID-19,Streptococcus,ARDS", "", ("covid-19", "pneumonia")),
        ("Streptococcus, COVID-19", "covid-19", ("covid-19",)),  # settled by a whole-value entry
        ("SARS-CoV-2", "", ()),  # no substring matching ('SARS' is no entry anyway)
        ("ARDS", "", ()),
        ("", "", ()),
    ],
)
def test_label_map_rules(raw: str, label: str, classes: tuple[str, ...]) -> None:
    m = label_map_from(
        ["COVID-19=covid-19", "Pneumonia/Viral/SARS=pneumonia", "Streptococcus=pneumonia"],
        classes={"pneumonia": ["Pneumonia"], "covid-19": ["Streptococcus, COVID-19"]},
    )
    match = m.lookup(raw)
    assert (match.label, match.classes) == (label, classes)
    assert match.ambiguous == (len(classes) > 1)


def test_label_map_file_and_entries(tmp_path: Path) -> None:
    f = tmp_path / "map.yaml"
    f.write_text("covid-19: [COVID-19, 'Pneumonia/Viral/COVID-19']\nnormal: No Finding\n")
    m = label_map_from(["SARS=pneumonia", "a=b=healthy"], f)  # RAW=CLASS splits at the last '='
    assert m.lookup("no finding").label == "healthy" and m.lookup("sars").label == "pneumonia"
    assert m.lookup("A=B").label == "healthy" and m.lookup("pneumonia/viral/covid-19").label == "covid-19"
    assert not label_map_from()
    with pytest.raises(ConfigError, match=r"'COVID-19' is mapped to both 'covid-19' and 'pneumonia'"):
        label_map_from(["COVID-19=pneumonia"], f)
    with pytest.raises(ConfigError, match=r"--label-map 'SARS=pnemonia': 'pnemonia' is not one of"):
        label_map_from(["SARS=pnemonia"])
    with pytest.raises(ConfigError, match=r"--label-map 'covid-19': expected RAW=CLASS"):
        label_map_from(["covid-19"])
    for text, why in (("covid-19: [a\n", "not valid YAML"), ("- a\n", "expected a mapping"),
                      ("covid-19: {a: 1}\n", "class .covid-19. needs a list")):  # fmt: skip
        f.write_text(text)
        with pytest.raises(ConfigError, match=rf"--label-map-file {f}: {why}"):
            label_map_from(file=f)
    with pytest.raises(ConfigError, match=r"--label-map-file .*absent.yaml: unreadable"):
        label_map_from(file=tmp_path / "absent.yaml")


def test_canonical_labels_are_the_manifest_ones() -> None:
    from sscxr.data.manifest import _LABEL_ALIASES

    assert set(CANONICAL_LABELS) == set(_LABEL_ALIASES.values())


def test_csv_filters_label_map_and_summary(tmp_path: Path) -> None:
    csv_path = _ieee(tmp_path)
    report = read_csv_metadata(
        csv_path, "filename", "finding", "patientid", image_dir=tmp_path / "images",
        where=["modality=X-ray", "view!=L"], label_map=IEEE_MAP, extra_cols=["view", "notes"],
    )  # fmt: skip
    m = report.manifest
    assert [(r.path, r.label, r.patient_id) for r in m] == [
        ("a.png", "covid-19", "1"),
        ("b.png", "covid-19", "1"),
        ("c.png", "covid-19", "2"),
        ("d.png", "pneumonia", "3"),
        ("e.png", "pneumonia", "4"),
        ("f.png", "healthy", "5"),
    ]
    assert m[1].extra == {"view": "AP Supine", "notes": "intubated\nday 3"}
    assert dict(report.filtered) == {"modality=X-ray": 1, "view!=L": 1}
    assert (report.no_label, dict(report.unmapped)) == (1, {"ARDS": 1})
    assert dict(report.ambiguous) == {"COVID-19, Streptococcus": 1}
    summary = report.summary()
    assert summary.startswith(f"{csv_path}: 6 of 11 rows imported; 2 dropped by --where")
    assert "1 with an empty 'finding' dropped" in summary and "'ARDS': 1" in summary
    assert "--label-map 'RAW=CLASS'" in summary and "several classes" in summary
    assert "\n" not in summary


def test_csv_summary_is_logged_and_unmapped_rows_can_be_kept(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    csv_path = _ieee(tmp_path)
    with caplog.at_level(logging.WARNING):
        m = import_csv(csv_path, "filename", "finding", image_dir=tmp_path / "images", label_map=IEEE_MAP)
    assert len(m) == 7 and "7 of 11 rows imported" in caplog.text  # never silent
    report = read_csv_metadata(
        csv_path, "filename", "finding", image_dir=tmp_path / "images", label_map=IEEE_MAP,
        keep_unmapped=True,
    )  # fmt: skip
    by_path = {r.path: r.label for r in report.manifest}
    assert len(by_path) == 11 and by_path["g.png"] == by_path["j.png"] == by_path["k.png"] == ""
    assert "kept unlabelled" in report.summary() and "--keep-unmapped" not in report.summary()
    # Without a label map every value is canonicalised and kept, as before.
    plain = import_csv(csv_path, "filename", "finding", image_dir=tmp_path / "images")
    assert len(plain) == 11 and {r.path: r.label for r in plain}["g.png"] == "ards"
    with pytest.raises(ConfigError, match="needs --label-col"):
        import_csv(csv_path, "filename", image_dir=tmp_path / "images", label_map=IEEE_MAP)
    with pytest.raises(DataError, match="No row is left"):
        import_csv(
            csv_path, "filename", "finding", image_dir=tmp_path / "images", label_map={"healthy": ["x"]}
        )


def test_csv_duplicates_refused_with_line_numbers(tmp_path: Path) -> None:
    text = IEEE_CSV + "11,,Pneumonia,PA,X-ray,b.png,\n" + "12,,No Finding,PA,X-ray,a,\n"
    csv_path = _ieee(tmp_path, text)
    with pytest.raises(DataError) as e:
        import_csv(csv_path, "filename", "finding", image_dir=tmp_path / "images")
    message = str(e.value)
    # b.png's first row starts on line 3 (its notes cell runs to line 4); 'a' names a.png too.
    assert message.startswith(f"{csv_path}: a.png is listed on lines 2, 15 (1 more image(s)")
    assert "--dedupe first" in message and "\n" not in message
    report = read_csv_metadata(csv_path, "filename", "finding", image_dir=tmp_path / "images", dedupe="first")
    rows = {r.path: r for r in report.manifest}
    assert len(report.manifest) == 11 and rows["b.png"].label == "covid-19, ards"  # the first row
    assert (report.duplicates, report.conflicting) == (2, 2)
    assert "2 repeated row(s) dropped (--dedupe first, 2 with another label" in report.summary()
    # A repeat the filters drop is no repeat.
    m = import_csv(csv_path, "filename", image_dir=tmp_path / "images", where=["patientid!=11,12"])
    assert len(m) == 11
    with pytest.raises(ValueError, match="dedupe='last'"):
        import_csv(csv_path, "filename", image_dir=tmp_path / "images", dedupe="last")


def test_csv_errors_name_the_file_and_the_fix(tmp_path: Path) -> None:
    csv_path = _ieee(tmp_path)
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(DataError) as e:
        import_csv(csv_path, "filename", image_dir=tmp_path / "elsewhere")
    message = str(e.value)
    assert message.startswith(
        f"{csv_path}: none of the 11 listed images was found under {tmp_path / 'elsewhere'}"
    )
    assert f"first missing: {tmp_path / 'elsewhere' / 'a.png'}, " in message and "--image-dir" in message
    assert "site" not in message
    with pytest.raises(DataError, match=r"elsewhere2: image folder not found; pass --image-dir"):
        import_csv(csv_path, "filename", image_dir=tmp_path / "elsewhere2")
    with pytest.raises(
        DataError, match=r"no row passes --where modality=MRI \('modality' holds 'X-ray', 'CT'\)"
    ):
        import_csv(csv_path, "filename", image_dir=tmp_path / "images", where=["modality=MRI"])
    with pytest.raises(DataError, match=r"--where column\(s\) \['modallity'\] not found; the columns are"):
        import_csv(csv_path, "filename", image_dir=tmp_path / "images", where=["modallity=X-ray"])
    with pytest.raises(DataError, match="not a regular expression"):
        import_csv(csv_path, "filename", image_dir=tmp_path / "images", patient_pattern="(")
    (tmp_path / "header_only.csv").write_text("filename,finding\n")
    with pytest.raises(DataError, match="no rows under the header"):
        import_csv(tmp_path / "header_only.csv", "filename", image_dir=tmp_path / "images")
    (tmp_path / "open_quote.csv").write_text('filename\n"a.png\n' + "x" * 200_000 + "\n")
    with pytest.raises(DataError, match=r"open_quote\.csv, line \d+: not a readable CSV.*unclosed quote"):
        import_csv(tmp_path / "open_quote.csv", "filename", image_dir=tmp_path / "images")
    one_missing = tmp_path / "one_missing.csv"
    one_missing.write_text(IEEE_CSV + "13,,COVID-19,PA,X-ray,z.png,\n")
    with pytest.raises(
        DataError, match=r"one_missing.csv: 1 listed image\(s\) not found .*: z\.png\. Fix the names"
    ):
        import_csv(one_missing, "filename", image_dir=tmp_path / "images", strict=True)


def test_csv_split_mask_and_patient_columns(tmp_path: Path) -> None:
    png(tmp_path / "x1.png")
    png(tmp_path / "x2.png")
    png(tmp_path / "m" / "x1_mask.png", box(0, 4, 0, 4))
    (tmp_path / "meta.csv").write_text("f,fold,seg,pid\nx1,TRAINING,m/x1_mask.png,P-1a\nx2,Testing,,P-1b\n")
    m = import_csv(
        tmp_path / "meta.csv", "f", "", "pid", split_col="fold", mask_col="seg", patient_pattern=r"^(P-\d)"
    )
    assert [(r.path, r.split, r.mask_path, r.patient_id) for r in m] == [
        ("x1.png", "train", "m/x1_mask.png", "P-1"),
        ("x2.png", "test", "", "P-1"),
    ]


# ------------------------------------------------------------------------ pairs: patient ids
def test_pairs_patients_from_a_table_a_pattern_or_dicom(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    for stem in ("JPC001a", "JPC001b", "JPC002", "odd"):
        png(tmp_path / "img" / f"{stem}.png")
        png(tmp_path / "seg" / f"{stem}_mask.png", box(0, 4, 0, 4))
    dicom(tmp_path / "img" / "scan.dcm", "MRN-777")
    (tmp_path / "meta.csv").write_text("file,pid\nimages/JPC001a.png,P1\nJPC001b,P1\nJPC002.png,P2\n")
    table = read_patient_table(tmp_path / "meta.csv", "file", "pid")
    assert table == {"JPC001a.png": "P1", "JPC001b": "P1", "JPC002.png": "P2"}
    with caplog.at_level(logging.WARNING):
        m = import_image_mask_pairs(tmp_path / "img", tmp_path / "seg", patients=table, pseudonym_key="k")
    ids = {r.path: r.patient_id for r in m}
    assert ids == {
        "JPC001a.png": "P1", "JPC001b.png": "P1", "JPC002.png": "P2",
        "odd.png": "odd", "scan.dcm": pseudonym("MRN-777", "k"),
    }  # fmt: skip
    assert "2 image(s) have no row in the patient table (--meta-csv): odd.png, scan.dcm" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        m = import_image_mask_pairs(tmp_path / "img", tmp_path / "seg", patient_pattern=r"^(JPC\d+)")
    ids = {r.path: r.patient_id for r in m}
    assert ids["JPC001a.png"] == ids["JPC001b.png"] == "JPC001" and ids["odd.png"] == "odd"
    assert ids["scan.dcm"] == pseudonym("MRN-777")  # a DICOM's own PatientID comes first
    assert "matched 3 of 4 file names" in caplog.text  # the DICOM was not tried
    (tmp_path / "bad.csv").write_text("file,pid\nJPC002.png,P2\nother.png,P3\nJPC002.png,P9\n")
    with pytest.raises(
        DataError, match=r"bad\.csv, lines 2 and 4: JPC002\.png is given the patients 'P2' and 'P9'"
    ):
        read_patient_table(tmp_path / "bad.csv", "file", "pid")
    with pytest.raises(DataError, match=r"column\(s\) \['patient'\] not found"):
        read_patient_table(tmp_path / "bad.csv", "file", "patient")


# --------------------------------------------------------------------- masks onto a manifest
def _split_manifest(tmp_path: Path) -> Manifest:
    """A patient-split manifest of images in two class folders (as `import folder` writes it)."""
    rows = [
        ManifestRow("covid/c1.png", "covid-19", "P1", "a", "train", extra={"view": "PA"}),
        ManifestRow("covid/c2.png", "covid-19", "P1", "a", "train", extra={"view": "AP"}),
        ManifestRow("normal/n1.png", "healthy", "P2", "b", "test", extra={"view": "PA"}),
        ManifestRow("normal/n2.png", "healthy", "P3", "b", "val", extra={"view": "PA"}),
    ]
    for r in rows:
        png(tmp_path / "data" / r.path)
    return Manifest(rows, tmp_path / "data")


def test_join_masks_keeps_every_other_column(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = _split_manifest(tmp_path)
    for stem in ("c1", "c2", "n1", "zz"):
        png(tmp_path / "lungs" / ("sub" if stem == "n1" else "") / f"{stem}_mask.png", box(0, 4, 0, 4))
    with caplog.at_level(logging.WARNING):
        joined = join_masks(m, tmp_path / "lungs", source="m.csv")
    assert [(r.path, r.label, r.patient_id, r.site, r.split, r.extra) for r in joined] == [
        (r.path, r.label, r.patient_id, r.site, r.split, r.extra) for r in m
    ]
    assert [joined.resolve_mask(r) for r in joined] == [
        tmp_path / "lungs" / "c1_mask.png",
        tmp_path / "lungs" / "c2_mask.png",
        tmp_path / "lungs" / "sub" / "n1_mask.png",  # searched recursively
        None,
    ]
    assert "1 mask(s) match no image of m.csv: zz_mask.png" in caplog.text
    assert "m.csv: 1 image(s) have no mask in" in caplog.text and "normal/n2.png" in caplog.text
    with pytest.raises(DataError, match=r"normal/n2\.png\. Add their masks, or drop --require-masks"):
        join_masks(m, tmp_path / "lungs", require_masks=True)
    # Through a file: every column comes back as it was written.
    out = write_manifest(joined, tmp_path / "joined.csv")
    back = read_manifest(out)
    assert [r.split for r in back] == ["train", "train", "test", "val"]
    assert back.resolve_mask(back[0]) == tmp_path / "lungs" / "c1_mask.png"


def test_join_masks_suffixes_and_existing_masks(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    m = _split_manifest(tmp_path)
    png(tmp_path / "seg" / "seg_c1.png", box(0, 4, 0, 4))
    png(tmp_path / "seg" / "c1.png", box(0, 4, 0, 4))  # the same stem without the pattern
    joined = join_masks(m, tmp_path / "seg", mask_suffix="seg_{stem}")
    assert joined.resolve_mask(joined[0]) == tmp_path / "seg" / "seg_c1.png"
    auto = join_masks(m, tmp_path / "seg")  # '' matches c1.png: the detected suffix
    assert auto.resolve_mask(auto[0]) == tmp_path / "seg" / "c1.png"
    with caplog.at_level(logging.WARNING):
        kept = join_masks(joined, tmp_path / "seg", mask_suffix="")
    assert kept.resolve_mask(kept[0]) == tmp_path / "seg" / "seg_c1.png"
    assert "1 row(s) already had a mask and keep it (--replace-masks" in caplog.text
    replaced = join_masks(joined, tmp_path / "seg", mask_suffix="", replace=True)
    assert replaced.resolve_mask(replaced[0]) == tmp_path / "seg" / "c1.png"
    # Masks in the images' own folder: the images themselves are not masks of themselves.
    png(tmp_path / "data" / "covid" / "c1_mask.png", box(0, 4, 0, 4))
    beside = join_masks(m, tmp_path / "data" / "covid")
    assert beside.resolve_mask(beside[0]) == tmp_path / "data" / "covid" / "c1_mask.png"
    assert beside[1].mask_path == ""


def test_join_masks_refuses_ambiguous_or_empty_matches(tmp_path: Path) -> None:
    m = _split_manifest(tmp_path)
    png(tmp_path / "two" / "c1_mask.png", box(0, 4, 0, 4))
    png(tmp_path / "two" / "c1_mask.gif", box(0, 4, 0, 4))
    with pytest.raises(
        DataError, match=r"two: 2 masks match the image stem 'c1' \(c1_mask\.gif, c1_mask\.png\); keep one"
    ):
        join_masks(m, tmp_path / "two")
    same_stem = m.with_rows([*m.rows, ManifestRow("normal/c1.png", "healthy", "P4", "b", "test")])
    png(tmp_path / "one" / "c1_mask.png", box(0, 4, 0, 4))
    with pytest.raises(DataError) as e:
        join_masks(same_stem, tmp_path / "one", source="m.csv")
    message = str(e.value)
    assert message.startswith(
        "m.csv: mask c1_mask.png matches 2 images by stem (covid/c1.png, normal/c1.png)"
    )
    assert "rename" in message and "\n" not in message
    png(tmp_path / "other" / "x_mask.png", box(0, 4, 0, 4))
    with pytest.raises(
        DataError, match=r"other: no mask matches an image of m\.csv by stem .*x_mask\.png.*--mask-suffix"
    ):
        join_masks(m, tmp_path / "other", source="m.csv")
    with pytest.raises(DataError, match=r"absent: mask folder not found; check --masks"):
        join_masks(m, tmp_path / "absent")


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
