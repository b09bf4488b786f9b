"""The bad-input matrix: every way a user's input can be wrong, run through the CLI (`sscxr.cli.main`).

This file is the one place that lists them all. Each case runs one command and checks what the user
sees:

- refused inputs (config, numbers, damaged caches, run folders): exit code 2 and one line on stderr
  that names the file / key / option and what to do;
- skip-and-report inputs (unreadable images among good ones): the readable ones are processed, the
  bad one is named with its reason, and the exit code is the command's own: 0 for `prepare` (the
  failures are in failures.csv), 1 for `segment predict` (so that scripts notice).

Reader failures themselves (every message, every decoder) are tested in tests/unit/test_io.py and
tests/unit/test_properties.py; here they go through `prepare` / `segment predict`, where they meet users.
"""

from __future__ import annotations

import csv
import json
import re
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset

from crafted import crafted_png
from sscxr.cli import main
from sscxr.data.cache import ImageCache

# Tiny models: one intra-op thread is faster on a shared CPU (fixture in tests/conftest.py).
pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = [
    "model.img_size=32",
    "model.patch_size=8",
    "model.embed_dim=32",
    "model.depth=4",
    "model.num_heads=2",
]
TRAIN = ["train.workers=0", "train.progress=false", "train.batch_size=4", "train.epochs=1"]
GMML = ["gmml.decoder_hidden=64", "gmml.decoder_bottleneck=32", "gmml.recon_blocks=[2,3,4]", "gmml.n_vis=2"]
# Options first: the dotted overrides the tests append are positional.
PRETRAIN = ["pretrain", "--device", "cpu", "-c", "tiny", *MODEL, *GMML, *TRAIN]
FINETUNE = ["finetune", "--device", "cpu", "-c", "classify/tiny", *MODEL, *TRAIN]


def run(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of `sscxr ARGV` (argparse's exit included)."""
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # refused by the parser
        code = int(e.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d (DEBUG|INFO|WARNING|ERROR) ")


def one_error_line(err: str, command: str) -> str:
    """The single line a refused command prints (our errors: exactly one; argparse: usage, then it).

    Log lines (training commands log to stderr as they build) and progress bars are not part of it.
    """
    lines = [
        line
        for line in err.strip().splitlines()
        if line.strip() and not LOG_LINE.match(line) and "it/s]" not in line and "img/s]" not in line
    ]
    assert lines, "nothing on stderr"
    last = lines[-1]
    assert last.startswith(f"sscxr {command}: error:".replace("  ", " ").replace(" :", ":")), err
    if not lines[0].startswith("usage:"):  # not argparse: nothing but the one line
        assert len(lines) == 1, err
    return last


# ------------------------------------------------------------------------------------------- files
def png(path: Path, seed: int = 0, size: tuple[int, int] = (40, 48)) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size, dtype=np.uint8)).save(path)
    return path


def dicom(
    path: Path, *, syntax: str = uid.ExplicitVRLittleEndian, pixels: bool = True, **tags: object
) -> Path:
    """A 24 x 20 12-bit MONOCHROME2 CR DICOM (tags override the defaults)."""
    ds = Dataset()
    ds.SOPClassUID = uid.ComputedRadiographyImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.10.1.3"
    ds.Modality = "CR"
    ds.Rows, ds.Columns = 24, 20
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    if pixels:
        ds.PixelData = np.random.default_rng(1).integers(0, 4096, (24, 20), dtype="<u2").tobytes()
    for keyword, value in tags.items():
        setattr(ds, keyword, value)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = syntax
    FileDataset(str(path), ds, file_meta=meta, preamble=b"\0" * 128).save_as(path, enforce_file_format=True)
    return path


def _truncated_png(p: Path) -> Path:
    png(p, size=(128, 128))
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    return p


def _empty(p: Path) -> Path:
    p.write_bytes(b"")
    return p


def _text_as_png(p: Path) -> Path:
    p.write_text("patient list, not an image\n")
    return p


def _all_nan_tiff(p: Path) -> Path:
    Image.fromarray(np.full((16, 16), np.nan, np.float32), mode="F").save(p)
    return p


def _damaged_tiff(p: Path) -> Path:
    # The first page is fine but its pointer to the next one (after the IFD's entries) points into the
    # header: counting pages, Pillow fails with a TypeError ("Missing dimensions"), not an OSError.
    Image.fromarray(np.random.default_rng(2).integers(0, 65535, (6, 7), dtype=np.uint16)).save(p)
    data = bytearray(p.read_bytes())
    ifd = struct.unpack("<I", data[4:8])[0]
    entries = struct.unpack("<H", data[ifd : ifd + 2])[0]
    nxt = ifd + 2 + 12 * entries
    data[nxt : nxt + 4] = struct.pack("<I", 1)
    p.write_bytes(bytes(data))
    return p


def _dicom_bad_file_meta(p: Path) -> Path:
    dicom(p)
    data = bytearray(p.read_bytes())
    assert data[128:138] == b"DICM\x02\x00\x00\x00UL"  # File Meta Information Group Length, UL
    data[138] = 2  # its length: 2 bytes for a 4-byte UL, and pydicom fails with a BytesLengthException
    p.write_bytes(bytes(data))
    return p


def _dicom_rescale_not_a_number(p: Path) -> Path:
    dicom(p, RescaleSlope="9.99", RescaleIntercept="0")
    data = p.read_bytes()
    p.write_bytes(data.replace(b"9.99", b"abc ", 1))
    return p


def _dicom_broken_lut(p: Path) -> Path:
    return dicom(p, ModalityLUTSequence=[Dataset()])  # an item without LUT Descriptor / Data


# name -> (file name, writer, words the reason must hold). Reasons must be the reader's own message
# (naming the file and what is wrong), never a bare third-party exception.
BAD_IMAGES: dict[str, tuple[str, Callable[[Path], Path], str]] = {
    "truncated PNG": ("cut.png", _truncated_png, "truncated or corrupt"),
    "empty file": ("empty.png", _empty, "file is empty"),
    "text with a .png suffix": ("notes.png", _text_as_png, "neither DICOM nor an image format"),
    "DICOM without pixel data": ("nopix.dcm", lambda p: dicom(p, pixels=False), "no Pixel Data"),
    "DICOM with a bogus transfer syntax": (
        "syntax.dcm",
        lambda p: dicom(p, syntax="1.2.3.4.5"),
        "is not a DICOM transfer syntax",
    ),
    "all-NaN TIFF": ("nan.tif", _all_nan_tiff, "every pixel is NaN or infinite"),
    "PNG of too many pixels": (
        "huge.png",
        lambda p: crafted_png(p, 9000, 9000),
        "9000 x 9000 = 81,000,000 pixels, more than the 50,000,000",
    ),
    "DICOM of too many pixels": (
        "huge.dcm",
        lambda p: dicom(p, Rows=10000, Columns=9000),
        "9000 x 10000 = 90,000,000 pixels, more than the 50,000,000",
    ),
    "missing file": ("gone.png", lambda p: p, "file not found"),
    "TIFF with a damaged page pointer": ("pages.tif", _damaged_tiff, "image data is truncated or corrupt"),
    "DICOM with a damaged file meta": ("meta.dcm", _dicom_bad_file_meta, "is not a readable DICOM file"),
    "DICOM rescale slope not a number": ("slope.dcm", _dicom_rescale_not_a_number, "are not numbers"),
    "PALETTE COLOR DICOM without its palette": (
        "palette.dcm",
        lambda p: dicom(p, PhotometricInterpretation="PALETTE COLOR"),
        "DICOM header cannot be interpreted (ValueError: No suitable Palette Color Lookup Table",
    ),
    "DICOM with a malformed LUT": (
        "lut.dcm",
        _dicom_broken_lut,
        "Modality LUT Sequence (0028,3000) is malformed",
    ),
}


# ------------------------------------------------------------------------------ prepare: reader cases
@pytest.mark.parametrize("kind", list(BAD_IMAGES))
def test_prepare_skips_and_reports_an_unreadable_image(
    kind: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, write, reason = BAD_IMAGES[kind]
    (tmp_path / "img").mkdir()
    good = [png(tmp_path / "img" / f"good{i}.png", seed=i) for i in range(3)]
    bad = write(tmp_path / "img" / name)
    rows = [*good[:2], bad, good[2]]
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "path,label,patient_id,site,split\n"
        + "".join(f"img/{p.name},healthy,p{i},s,train\n" for i, p in enumerate(rows))
    )
    cache = tmp_path / "cache"
    code, out, _ = run(
        ["prepare", str(manifest), "--out", str(cache), "--size", "16", "--workers", "0"], capsys
    )
    assert code == 0  # skip and report: the others are cached
    assert "4 images, 3 ok, 1 failed" in out and "failures.csv" in out
    failures = list(csv.DictReader((cache / "failures.csv").open()))
    assert [Path(f["path"]).name for f in failures] == [name]
    text = failures[0]["reason"]
    assert name in text and reason in text, text
    opened = ImageCache.open(cache)
    assert opened.ok.tolist() == [True, True, False, True]
    assert all(opened.image(i).any() for i in (0, 1, 3))  # the good rows hold their pixels


def test_prepare_of_nothing_readable_is_an_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "img").mkdir()
    for i in range(2):
        (tmp_path / "img" / f"x{i}.png").write_bytes(b"not an image")
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\nimg/x0.png\nimg/x1.png\n")
    argv = ["prepare", str(manifest), "--out", str(tmp_path / "cache"), "--size", "16", "--workers", "0"]
    code, _, err = run(argv, capsys)
    assert code == 2
    line = one_error_line(err, "prepare")
    assert "none of the 2 images could be read" in line and "failures.csv" in line
    assert (tmp_path / "cache" / "failures.csv").is_file()  # the reasons are kept


@pytest.mark.parametrize("size", ["0", "100000"])
def test_prepare_refuses_a_cache_size_out_of_range(
    size: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run(
        ["prepare", str(tmp_path / "m.csv"), "--out", str(tmp_path / "c"), "--size", size], capsys
    )
    assert code == 2
    line = one_error_line(err, "prepare")
    assert f"--size {size}" in line and "between 8 and 4096" in line


def test_prepare_honours_the_pixel_bound_from_the_environment(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound travels to decoding workers through the environment: here 1,000 pixels, so the
    # 40 x 48 images are refused and the 20 x 20 one is cached.
    (tmp_path / "img").mkdir()
    big = [png(tmp_path / "img" / f"big{i}.png", seed=i) for i in range(2)]
    small = png(tmp_path / "img" / "small.png", size=(20, 20))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text("path\n" + "".join(f"img/{p.name}\n" for p in [*big, small]))
    monkeypatch.setenv("SSCXR_MAX_PIXELS", "1000")
    argv = ["prepare", str(manifest), "--out", str(tmp_path / "cache"), "--size", "16", "--workers", "0"]
    code, out, _ = run(argv, capsys)
    assert code == 0 and "3 images, 1 ok, 2 failed" in out
    reasons = [f["reason"] for f in csv.DictReader((tmp_path / "cache" / "failures.csv").open())]
    assert len(reasons) == 2 and all("48 x 40 = 1,920 pixels, more than the 1,000" in r for r in reasons)
    assert all("SSCXR_MAX_PIXELS" in r for r in reasons)


# ------------------------------------------------------------------------------------------ manifests
def _unclosed_quote(path: Path) -> None:
    # an opening quote never closed: the rest of the file becomes one cell, over csv's size limit
    path.write_text('path,label\n"img/a.png,normal\n' + "".join(f"img/{i}.png,normal\n" for i in range(8000)))


MANIFEST_ERRORS: dict[str, tuple[Callable[[Path], object], str]] = {
    "no path column": (lambda p: p.write_text("file,label\na.png,normal\n"), "no 'path' column"),
    "an image listed twice": (
        lambda p: p.write_text("path\nimg/a.png\nimg/b.png\n./img/a.png\n"),
        "1 image path(s) listed more than once: ",
    ),
    "more cells than the header": (
        lambda p: p.write_text("path,label\na.png,normal,extra\n"),
        "line 2: more cells than header columns",
    ),
    "an empty path": (lambda p: p.write_text("path,label\n,normal\n"), "line 2: empty 'path'"),
    "an unclosed quote": (_unclosed_quote, "not a readable CSV (field larger than field limit"),
    "no rows": (lambda p: p.write_text("path,label\n"), "the manifest has no rows"),
    "no file": (lambda p: None, "cannot be read"),
}


@pytest.mark.parametrize("case", list(MANIFEST_ERRORS))
def test_a_bad_manifest_is_one_line_naming_it(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write, expected = MANIFEST_ERRORS[case]
    manifest = tmp_path / "manifest.csv"
    write(manifest)
    code, _, err = run(["prepare", str(manifest), "--out", str(tmp_path / "cache"), "--size", "16"], capsys)
    assert code == 2
    line = one_error_line(err, "prepare")
    assert str(manifest) in line and expected in line, line


# ------------------------------------------------------------------------------------ damaged caches
def _truncate_images(cache: Path) -> str:
    path = cache / "images.npy"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return "images.npy"


def _garbage_index(cache: Path) -> str:
    (cache / "index.json").write_bytes(b"\x00{not json")
    return "index.json"


@pytest.mark.parametrize("command", ["finetune", "pretrain"])
@pytest.mark.parametrize(
    "damage", [_truncate_images, _garbage_index], ids=["truncated images.npy", "garbage index.json"]
)
def test_a_damaged_cache_is_refused_with_the_repair_command(
    command: str,
    damage: Callable[[Path], str],
    tiny_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    broken = damage(cache)
    argv = FINETUNE if command == "finetune" else PRETRAIN
    code, _, err = run([*argv, f"data.cache={cache}", "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = one_error_line(err, command)
    assert str(cache / broken) in line and "sscxr prepare" in line, line


def test_a_missing_cache_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run(
        [*FINETUNE, f"data.cache={tmp_path / 'nowhere'}", "--out", str(tmp_path / "run")], capsys
    )
    assert code == 2
    line = one_error_line(err, "finetune")
    assert "nowhere" in line and "sscxr prepare" in line


# --------------------------------------------------------------------------------------- configs
def _non_utf8_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("# réglages\ntrain:\n  epochs: 1\n".encode("latin-1"))
    return ["-c", str(path)]


def _invalid_yaml_config(tmp_path: Path) -> list[str]:
    path = tmp_path / "broken.yaml"
    path.write_text("train: [epochs: 1\n")
    return ["-c", str(path)]


CONFIG_ERRORS: dict[str, tuple[Callable[[Path], list[str]], str]] = {
    "img_size not a multiple of patch_size": (
        lambda _: ["model.img_size=63", "model.patch_size=16"],
        "img_size (63) must be a multiple of patch_size (16)",
    ),
    "depth 0": (lambda _: ["model.depth=0"], "depth must be a positive integer"),
    "epochs not a number": (lambda _: ["train.epochs=abc"], "train.epochs:"),
    "unknown key": (lambda _: ["model.dept=4"], "unknown config key 'model.dept'"),
    "override without '='": (lambda _: ["train.epochs"], "not of the form key=value"),
    "non-UTF-8 config file": (_non_utf8_config, "latin1.yaml: not UTF-8 text; save the config as UTF-8"),
    "invalid YAML config file": (_invalid_yaml_config, "broken.yaml: not valid YAML"),
}


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize(
    "case",
    list(CONFIG_ERRORS),
)
def test_a_bad_config_is_one_line_naming_the_key(
    command: str, case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, expected = CONFIG_ERRORS[case]
    base = ["pretrain", "-c", "tiny"] if command == "pretrain" else ["finetune", "-c", "classify/tiny"]
    code, _, err = run([*base, *make(tmp_path), "--out", str(tmp_path / "run")], capsys)
    assert code == 2
    line = one_error_line(err, command)
    assert expected in line, line
    assert not (tmp_path / "run").exists()  # refused before anything is written


# ---------------------------------------------------------------------------------- numbers, splits
PARSER_ERRORS: dict[str, tuple[list[str], str]] = {
    "evaluate --batch-size 0": (
        ["evaluate", "--model", "a=r", "--test", "t=c:test", "--batch-size", "0", "--out", "o"],
        "argument --batch-size: 0 is below the smallest allowed value, 1",
    ),
    "evaluate --n-boot -5": (
        ["evaluate", "--model", "a=r", "--test", "t=c:test", "--n-boot", "-5", "--out", "o"],
        "argument --n-boot: -5 is below the smallest allowed value, 0",
    ),
    # evaluate has no --workers (it runs in one process): the option itself is refused
    "evaluate --workers -2": (
        ["evaluate", "--model", "a=r", "--test", "t=c:test", "--workers", "-2", "--out", "o"],
        "unrecognized arguments: --workers -2",
    ),
    "segment evaluate --batch-size 0": (
        ["segment", "evaluate", "--model", "a=r", "--test", "t=c", "--batch-size", "0", "--out", "o"],
        "argument --batch-size: 0 is below",
    ),
    "segment evaluate --n-boot -5": (
        ["segment", "evaluate", "--model", "a=r", "--test", "t=c", "--n-boot", "-5", "--out", "o"],
        "argument --n-boot: -5 is below",
    ),
    "prepare --workers -2": (
        ["prepare", "m.csv", "--out", "c", "--workers", "-2"],
        "argument --workers: -2 is below the smallest allowed value, 0",
    ),
    "synth --workers -2": (["synth", "--out", "o", "--workers", "-2"], "argument --workers: -2 is below"),
    "split fractions not summing to 1": (["split", "m.csv", "--split", "0.7,0.2,0.2"], "summing to 1"),
    "split of two fractions": (["split", "m.csv", "--split", "0.7,0.3"], "summing to 1"),
    "split fractions not numbers": (["split", "m.csv", "--split", "a,b,c"], "expected three numbers"),
    "split with a negative fraction": (["split", "m.csv", "--split", "1.2,-0.1,-0.1"], "non-negative"),
}


@pytest.mark.parametrize("case", list(PARSER_ERRORS))
def test_a_bad_number_is_refused_by_the_parser(case: str, capsys: pytest.CaptureFixture[str]) -> None:
    argv, expected = PARSER_ERRORS[case]
    code, _, err = run(argv, capsys)
    assert code == 2
    # argparse names the (sub)parser that refused: unknown options are refused by the top one
    command = "" if "unrecognized" in expected else " ".join(argv[:2]) if argv[0] == "segment" else argv[0]
    line = one_error_line(err, command)
    assert expected in line, line


# ------------------------------------------------------------------------------------- run folders
def _another_runs_metrics(run_dir: Path) -> str:
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 1, "split": "train"}) + "\n")
    return "holds another run's metrics.jsonl"


def _another_config(run_dir: Path) -> str:
    (run_dir / "config.yaml").write_text("model:\n  depth: 12\n")
    return "holds a run with another config ("


@pytest.mark.parametrize("command", ["pretrain", "finetune"])
@pytest.mark.parametrize(
    "other", [_another_runs_metrics, _another_config], ids=["metrics.jsonl", "config.yaml"]
)
def test_out_holding_another_run_needs_force(
    command: str,
    other: Callable[[Path], str],
    tiny_cache: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    expected = other(run_dir)
    before = sorted(p.name for p in run_dir.iterdir())
    argv = FINETUNE if command == "finetune" else PRETRAIN
    code, _, err = run([*argv, f"data.cache={tiny_cache}", "--out", str(run_dir)], capsys)
    assert code == 2
    line = one_error_line(err, command)
    assert str(run_dir) in line and expected in line and "pass --force" in line, line
    assert sorted(p.name for p in run_dir.iterdir()) == before  # the other run is left as it was


# ---------------------------------------------------------------------------------- segment predict
@pytest.fixture(scope="module")
def segmenter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) tiny segmenter export: predict only needs something that loads and runs."""
    import dataclasses

    from sscxr.models.loading import Normalization
    from sscxr.models.unetr import SegmenterSpec, build_unetr, export_segmenter
    from sscxr.models.vit import ViTConfig

    vit = ViTConfig(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, drop_path_rate=0.0)
    spec = SegmenterSpec(vit=vit, normalization=Normalization(mean=0.4, std=0.2), feature_size=4)
    torch.manual_seed(0)
    model = build_unetr(spec).eval()
    run_dir = tmp_path_factory.mktemp("segmenter")
    export_segmenter(model.state_dict(), dataclasses.replace(spec, blocks=model.blocks), run_dir / "model")
    return run_dir


BAD_DICOMS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "DICOM without pixel data": (lambda p: dicom(p, pixels=False), "no Pixel Data"),
    "DICOM of truncated pixel data": (lambda p: dicom(p, Rows=240), "pixel data cannot be decoded"),
    "DICOM with a malformed LUT": (_dicom_broken_lut, "Modality LUT Sequence (0028,3000) is malformed"),
    "DICOM with a damaged file meta": (_dicom_bad_file_meta, "is not a readable DICOM file"),
}


@pytest.mark.parametrize("kind", list(BAD_DICOMS))
def test_segment_predict_skips_and_reports_an_undecodable_dicom(
    kind: str, segmenter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write, reason = BAD_DICOMS[kind]
    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        png(folder / f"chest{i}.png", seed=i)
    bad = write(folder / "bad.dcm")
    out = tmp_path / "masks"
    code, stdout, _ = run(["segment", "predict", "--model", str(segmenter), str(folder), "--out", str(out),
                           "--device", "cpu"], capsys)  # fmt: skip
    assert code == 1  # the project's rule: non-zero when an input failed, the others still processed
    assert "3 masks written" in stdout
    assert f"unreadable, skipped: {bad}" in stdout and reason in stdout, stdout
    predicted = list(csv.DictReader((out / "predictions.csv").open()))
    assert sorted(Path(r["input"]).name for r in predicted) == ["chest0.png", "chest1.png", "chest2.png"]
    assert all((out / r["mask"]).is_file() for r in predicted)
    failures = list(csv.DictReader((out / "failures.csv").open()))
    assert [Path(f["input"]).name for f in failures] == ["bad.dcm"] and reason in failures[0]["reason"]


def test_segment_predict_refuses_a_missing_input(
    segmenter: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = [
        "segment",
        "predict",
        "--model",
        str(segmenter),
        str(tmp_path / "nothing"),
        "--out",
        str(tmp_path / "o"),
    ]
    code, _, err = run([*argv, "--device", "cpu"], capsys)
    assert code == 2
    assert "nothing: no such file or folder" in one_error_line(err, "segment")
