"""`sscxr import LAYOUT`: one registry entry per layout, per-layout help, the CSV options, `import masks`,
and one-line errors (exit 2) that name the option to change."""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sscxr.cli import build_parser, main
from sscxr.data.importers import OPTIONS, registered_importers
from sscxr.data.manifest import read_manifest


def png(path: Path, value: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)
    return path


def help_of(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args([*argv, "--help"])
    assert e.value.code == 0
    return capsys.readouterr().out


def error_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    """The stderr of a command that must fail with exit code 2 and a one-line message."""
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    # Warnings logged on the way may come first; the error itself is the one last line.
    err = lines[-1]
    assert err.startswith("sscxr import: error: ") or err.startswith("sscxr split: error: "), lines
    assert not any("Traceback" in line for line in lines), lines
    return err


# ----------------------------------------------------------------------------- registry and help
def test_every_layout_is_a_subcommand_with_only_its_own_options(capsys: pytest.CaptureFixture[str]) -> None:
    listing = help_of(capsys, "import")
    layouts = registered_importers()
    names = [layout.name for layout in layouts]
    assert names == ["folder", "kermany", "covidx", "montgomery", "shenzhen", "pairs", "jsrt", "csv", "masks"]
    assert all(name in listing for name in names)
    all_flags = {o.flags[0] for o in OPTIONS.values()}
    for layout in layouts:
        text = help_of(capsys, "import", layout.name)
        own = {o.flags[0] for o in layout.options}
        assert all(flag in text for flag in own), (layout.name, own)
        for flag in all_flags - own:
            assert f"{flag} " not in text and f"{flag}\n" not in text, (layout.name, flag)
        assert ("--split SPLIT" in text) == layout.splits
    folder = help_of(capsys, "import", "folder")
    assert "--patient-pattern" in folder and "--path-col" not in folder and "--masks" not in folder
    csv_help = help_of(capsys, "import", "csv")
    assert "--where" in csv_help and "--label-map-file" in csv_help and "--masks-out" not in csv_help


@pytest.mark.parametrize(
    "command",
    [
        # README, docs and the studies' invocations (study/run.py puts the importer args before --out).
        "import folder /d --out m.csv --split 0.8,0.1,0.1",
        "import folder /d --out m.csv --pseudonym-key-file k.txt --patient-pattern ^(P\\d+)",
        "import kermany /d --split 0.7,0.15,0.15 --seed 0 --out m.csv",
        "import covidx /d --out m.csv",
        "import montgomery /d --masks-out mc --out m.csv",
        "import shenzhen /d --out m.csv",
        "import pairs /d --masks /m --out m.csv",
        "import jsrt /d --masks /l --lung-values 255,128 --masks-out o --out m.csv",
        "import csv meta.csv --path-col f --label-col l --patient-col p --image-dir /i --out m.csv",
    ],
)
def test_existing_invocations_still_parse(command: str) -> None:
    args = build_parser().parse_args(shlex.split(command))
    assert args.command == "import" and args.layout == command.split()[1]
    assert args.out == Path("m.csv") and args.root in (Path("/d"), Path("meta.csv"))


def test_missing_needed_options_are_named_at_once(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    err = error_of(capsys, ["import", "jsrt", str(tmp_path), "--out", str(tmp_path / "m.csv")])
    assert "'sscxr import jsrt' needs --masks, --lung-values, --masks-out" in err
    err = error_of(capsys, ["import", "masks", str(tmp_path / "m.csv"), "--out", str(tmp_path / "n.csv")])
    assert "'sscxr import masks' needs --masks" in err
    err = error_of(capsys, ["import", "csv", str(tmp_path / "x.csv"), "--out", str(tmp_path / "m.csv")])
    assert "'sscxr import csv' needs --path-col" in err


# ------------------------------------------------------------------------------------------- csv
META = (
    "patientid,finding,view,modality,filename\n"
    "p1,COVID-19,PA,X-ray,a.png\n"
    'p1,"COVID-19, ARDS",AP Supine,X-ray,b.png\n'
    "p2,Pneumonia/Viral/SARS,AP,X-ray,c.png\n"
    "p3,Pneumonia/Bacterial/Streptococcus,PA,X-ray,d.png\n"
    "p4,No Finding,PA,X-ray,e.png\n"
    "p5,ARDS,PA,X-ray,f.png\n"
    "p6,COVID-19,L,X-ray,g.png\n"
    "p7,COVID-19,Axial,CT,h.png\n"
)


def _meta(tmp_path: Path, extra_rows: str = "") -> list[str]:
    for name in "abcdefgh":
        png(tmp_path / "images" / f"{name}.png")
    (tmp_path / "metadata.csv").write_text(META + extra_rows)
    csv_path, images = str(tmp_path / "metadata.csv"), str(tmp_path / "images")
    return ["import", "csv", csv_path, "--path-col", "filename", "--label-col", "finding",
            "--patient-col", "patientid", "--image-dir", images]  # fmt: skip


def test_csv_filters_and_label_map(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "map.yaml").write_text("pneumonia: [Pneumonia]\nhealthy: [No Finding]\n")
    out = tmp_path / "m.csv"
    argv = [
        *_meta(tmp_path),
        "--where", "modality=x-ray", "--where", "view=PA,AP*",
        "--label-map", "COVID-19=covid-19", "--label-map-file", str(tmp_path / "map.yaml"),
        "--extra-col", "view", "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    printed = capsys.readouterr().out
    rows = read_manifest(out).rows
    assert [(r.path, r.label, r.patient_id, r.extra["view"]) for r in rows] == [
        ("images/a.png", "covid-19", "p1", "PA"),
        ("images/b.png", "covid-19", "p1", "AP Supine"),
        ("images/c.png", "pneumonia", "p2", "AP"),
        ("images/d.png", "pneumonia", "p3", "PA"),
        ("images/e.png", "healthy", "p4", "PA"),
    ]
    assert "5 of 8 rows imported; 2 dropped by --where (modality=x-ray: 1, view=PA,AP*: 1)" in printed
    assert "1 whose label maps to no class dropped ('ARDS': 1)" in printed
    assert f"wrote {out}: 5 images" in printed
    # --keep-unmapped keeps ARDS, unlabelled; without a map it is refused.
    assert main([*argv, "--keep-unmapped"]) == 0
    assert {r.path: r.label for r in read_manifest(out).rows}["images/f.png"] == ""
    err = error_of(capsys, [*_meta(tmp_path), "--keep-unmapped", "--out", str(out)])
    assert "--keep-unmapped" in err and "--label-map" in err


def test_csv_duplicates(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "m.csv"
    argv = [*_meta(tmp_path, "p9,Pneumonia,PA,X-ray,c.png\n"), "--out", str(out)]
    err = error_of(capsys, argv)
    assert f"{tmp_path / 'metadata.csv'}: c.png is listed on lines 4, 10; keep one row per image" in err
    assert "--dedupe first" in err and not out.exists()
    assert main([*argv, "--dedupe", "first"]) == 0
    rows = read_manifest(out).rows
    assert len(rows) == 8 and [r.patient_id for r in rows if r.path.endswith("c.png")] == ["p2"]
    assert "1 repeated row(s) dropped (--dedupe first, 1 with another label" in capsys.readouterr().out


def test_csv_errors_name_the_option(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = ["--out", str(tmp_path / "m.csv")]
    argv = _meta(tmp_path)
    (tmp_path / "empty").mkdir()
    wrong_dir = [*argv[:-1], str(tmp_path / "empty"), *out]
    err = error_of(capsys, wrong_dir)
    assert f"none of the 8 listed images was found under {tmp_path / 'empty'}" in err
    assert f"first missing: {tmp_path / 'empty' / 'a.png'}" in err and "--image-dir" in err
    # It used to get as far as the split and talk about sites.
    err = error_of(capsys, [*wrong_dir, "--hold-out-site", "x"])
    assert "none of the 8 listed images" in err
    err = error_of(capsys, [*argv, "--where", "modality", *out])
    assert "--where 'modality': expected COLUMN=VALUE" in err
    err = error_of(capsys, [*argv, "--where", "kind=x", *out])
    assert "--where column(s) ['kind'] not found" in err
    err = error_of(capsys, [*argv, "--label-map", "COVID-19=covid", "--label-map", "COVID-19=healthy", *out])
    assert "'COVID-19' is mapped to both 'covid-19' and 'healthy'" in err
    no_label_col = [a for a in argv if a not in ("--label-col", "finding")]
    err = error_of(capsys, [*no_label_col, "--label-map", "COVID-19=covid-19", *out])
    assert "needs --label-col" in err
    err = error_of(capsys, [*argv, "--hold-out-site", "Site-A", *out])
    assert "its rows name no site" in err and "--site" in err


def test_csv_split_mask_and_site_columns(tmp_path: Path) -> None:
    png(tmp_path / "x1.png")
    png(tmp_path / "x2.png")
    png(tmp_path / "x3.png")
    png(tmp_path / "masks" / "x1.png", 255)
    (tmp_path / "meta.csv").write_text("f,fold,seg,hospital\nx1,train,masks/x1.png,A\nx2,Testing,,B\nx3,,,\n")
    out = tmp_path / "m.csv"
    argv = ["import", "csv", str(tmp_path / "meta.csv"), "--path-col", "f", "--split-col", "fold",
            "--mask-col", "seg", "--site-col", "hospital", "--site", "other", "--out", str(out),
            "--split", "1,0,0"]  # fmt: skip
    assert main(argv) == 0
    rows = read_manifest(out).rows
    assert [(r.split, r.mask_path, r.site) for r in rows] == [
        ("train", "masks/x1.png", "A"),
        ("test", "", "B"),  # the published split is kept
        ("train", "", "other"),  # only the empty one is filled
    ]


# ----------------------------------------------------------------------------------------- pairs
def test_pairs_patient_col_keeps_a_patients_images_in_one_split(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    names = [f"img{i:02d}" for i in range(12)]
    for i, name in enumerate(names):
        png(tmp_path / "img" / f"{name}.png", i)
        png(tmp_path / "seg" / f"{name}_mask.png", 255)
    # Three images per patient: a split by image stem would spread them over train and test.
    (tmp_path / "meta.csv").write_text(
        "file,subject\n" + "".join(f"{n}.png,S{i // 3}\n" for i, n in enumerate(names))
    )
    out = tmp_path / "m.csv"
    argv = ["import", "pairs", str(tmp_path / "img"), "--masks", str(tmp_path / "seg"),
            "--meta-csv", str(tmp_path / "meta.csv"), "--path-col", "file", "--patient-col", "subject",
            "--split", "0.5,0.25,0.25", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    rows = read_manifest(out).rows
    assert {r.patient_id for r in rows} == {"S0", "S1", "S2", "S3"}
    splits: dict[str, set[str]] = {}
    for r in rows:
        splits.setdefault(r.patient_id, set()).add(r.split)
    assert all(len(s) == 1 for s in splits.values()) and all(r.mask_path for r in rows)
    assert "masks 12 of 12" in capsys.readouterr().out
    assert main([*argv[:5], "--patient-pattern", r"^(img0)", "--out", str(out)]) == 0
    assert {r.patient_id for r in read_manifest(out).rows} == {"img0", "img10", "img11"}
    err = error_of(capsys, [*argv[:5], "--patient-col", "subject", "--out", str(out)])
    assert "--meta-csv" in err
    err = error_of(capsys, [*argv[:7], "--patient-col", "subject", "--out", str(out)])
    assert "needs --path-col" in err


# ----------------------------------------------------------------------------------------- masks
def test_import_masks_joins_onto_a_split_manifest(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for cls in ("covid", "normal"):
        for i in range(3):
            png(tmp_path / "data" / cls / f"{cls}{i}.png", i)
    manifest = tmp_path / "m.csv"
    assert (
        main(["import", "folder", str(tmp_path / "data"), "--split", "0.6,0.2,0.2", "--out", str(manifest)])
        == 0
    )
    before = read_manifest(manifest).rows
    for name in ("covid0", "covid1", "normal2", "stray"):
        png(tmp_path / "lungs" / f"{name}-mask.png", 255)
    out = tmp_path / "with_masks.csv"
    argv = ["import", "masks", str(manifest), "--mask-dir", str(tmp_path / "lungs"), "--out", str(out)]
    assert main(argv) == 0
    assert "masks 3 of 6" in capsys.readouterr().out
    after = read_manifest(out).rows
    assert [(r.path, r.label, r.patient_id, r.split) for r in after] == [
        (r.path, r.label, r.patient_id, r.split) for r in before
    ]
    assert [Path(r.mask_path).name for r in after] == [
        "covid0-mask.png", "covid1-mask.png", "", "", "", "normal2-mask.png",
    ]  # fmt: skip
    err = error_of(capsys, [*argv, "--require-masks"])
    assert "image(s) have no mask" in err and "covid/covid2.png" in err and "--require-masks" in err
    png(tmp_path / "lungs" / "covid0-mask.gif", 255)
    err = error_of(capsys, argv)
    assert "2 masks match the image stem 'covid0'" in err
    err = error_of(capsys, [*argv, "--mask-suffix", "_seg"])
    assert "no mask matches an image" in err and "--mask-suffix" in err


# --------------------------------------------------------------------- folders, sites, split
def test_folder_on_a_file_and_site_options(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "list.csv").write_text("a\n")
    err = error_of(capsys, ["import", "folder", str(tmp_path / "list.csv"), "--out", str(tmp_path / "m.csv")])
    assert "is a file, not the image folder" in err and "sscxr import csv" in err
    for stem in ("CHNCXR_0001_0", "CHNCXR_0002_1"):
        png(tmp_path / "sz" / f"{stem}.png")
        png(tmp_path / "sz" / f"{stem}_mask.png", 255)
    out = tmp_path / "sz.csv"
    assert main(["import", "shenzhen", str(tmp_path / "sz"), "--site", "sz-2", "--out", str(out)]) == 0
    assert {r.site for r in read_manifest(out).rows} == {"sz-2"}
    assert main(["import", "shenzhen", str(tmp_path / "sz"), "--out", str(out)]) == 0
    assert {r.site for r in read_manifest(out).rows} == {"shenzhen"}


def test_split_refuses_what_would_erase_splits(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png(tmp_path / "data" / "a" / "1.png")
    png(tmp_path / "data" / "b" / "2.png")
    m = tmp_path / "m.csv"
    assert main(["import", "folder", str(tmp_path / "data"), "--split", "0.5,0.5,0", "--out", str(m)]) == 0
    text = m.read_text()
    err = error_of(capsys, ["split", str(m), "--resplit"])
    assert "--resplit" in err and "--split" in err and m.read_text() == text
    err = error_of(capsys, ["split", str(m)])
    assert "nothing to do" in err and "--split" in err
    err = error_of(capsys, ["import", "folder", str(tmp_path / "data"), "--resplit", "--out", str(m)])
    assert "--resplit" in err
    assert main(["split", str(m), "--split", "0.5,0.5,0", "--resplit", "--seed", "1"]) == 0


def test_covidx_label_files_site_and_strict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    png(tmp_path / "train" / "a.png")
    (tmp_path / "train_COVIDx9A.txt").write_text("p1 a.png COVID-19\np2 gone.png normal\n")
    out = tmp_path / "m.csv"
    argv = ["import", "covidx", str(tmp_path), "--out", str(out)]
    err = error_of(capsys, argv)
    assert "train.txt: COVIDx label file not found" in err and "--label-file" in err
    argv += ["--label-file", "train_COVIDx9A.txt", "--site", "cohen"]
    assert main(argv) == 0
    assert [(r.path, r.label, r.site, r.split) for r in read_manifest(out).rows] == [
        ("train/a.png", "covid-19", "cohen", "train")
    ]
    err = error_of(capsys, [*argv, "--strict"])
    assert "gone.png" in err and "drop --strict" in err and "Skipped" not in err


def test_relative_paths_stay_relative_through_import_split_and_prepare(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A user who names everything relatively gets files with no trace of the machine's layout, and
    the data, manifest and cache still work after the whole project folder moves."""
    from sscxr.data.cache import ImageCache

    project = tmp_path / "project"
    for cls in ("covid", "normal"):
        for i in range(3):
            png(project / "data" / cls / f"{cls}{i}.png", 40 * i + 10)
    monkeypatch.chdir(project)
    assert main(["import", "folder", "data", "--out", "runs/m.csv"]) == 0
    assert main(["split", "runs/m.csv", "--split", "0.5,0.5,0"]) == 0
    text = Path("runs/m.csv").read_text()
    assert str(tmp_path) not in text
    assert all(r.path.startswith("../data/") for r in read_manifest("runs/m.csv").rows)
    assert main(["prepare", "runs/m.csv", "--out", "runs/cache", "--size", "16", "--workers", "0"]) == 0
    index = Path("runs/cache/index.json").read_text()
    assert str(tmp_path) not in index and str(tmp_path) not in Path("runs/cache/progress.jsonl").read_text()

    moved = tmp_path / "moved"
    project.rename(moved)
    monkeypatch.chdir(tmp_path)  # and opened from another working folder
    cache = ImageCache.open(moved / "runs" / "cache")
    assert cache.manifest_path == str(moved / "runs" / "m.csv")
    assert all(cache.manifest.resolve(r).is_file() for r in cache.manifest.rows)

    # An absolute data folder gives absolute paths, as before.
    assert main(["import", "folder", str(moved / "data"), "--out", str(moved / "runs" / "abs.csv")]) == 0
    assert all(Path(r.path).is_absolute() for r in read_manifest(moved / "runs" / "abs.csv").rows)
