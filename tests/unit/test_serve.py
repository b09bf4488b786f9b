"""`sscxr serve`: the API answers with the model's own numbers (as `sscxr predict` / `explain` give them),
refuses bad and oversize uploads in one line naming the file, leaves nothing on disk, stays exact under
concurrent requests, and documents itself in /openapi.json."""

from __future__ import annotations

import argparse
import base64
import io
import logging
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("fastapi")
pytest.importorskip("httpx")
from fastapi.testclient import TestClient

from crafted import crafted_dicom
from sscxr.cli import serve_cmds
from sscxr.data.io import read_xray
from sscxr.errors import ConfigError
from sscxr.evaluation.files import PredictOptions, explain_files, frame_image, predict_files
from sscxr.evaluation.segmentation import predict_mask
from sscxr.models.classifier import load_classifier
from sscxr.models.unetr import load_segmenter
from sscxr.serve import ServeOptions, create_app, load_models
from tiny_models import classifier_run, segmenter_run

pytestmark = pytest.mark.usefixtures("one_thread")

PATIENT = ("Doe^Jane", "PID-731904")  # DICOM header fields that must never leave the server


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("clf")
    return classifier_run(folder, {"fit": "pad"}, thresholds={"default": 0.5, "youden": 0.37})


@pytest.fixture(scope="module")
def segmenter_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return segmenter_run(tmp_path_factory.mktemp("seg"))


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """PNGs of several sizes, a 12-bit DICOM carrying a patient name and id, and a text file."""
    import pydicom

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.default_rng(0)
    out = {}
    for i, (h, w) in enumerate(
        [(40, 60), (50, 30), (64, 64), (33, 47), (72, 40), (45, 45), (38, 70), (60, 52)]
    ):
        out[f"x{i}.png"] = root / f"x{i}.png"
        Image.fromarray((rng.random((h, w)) * 255).astype(np.uint8)).save(out[f"x{i}.png"])
    dcm = crafted_dicom(root / "scan.dcm", rng.integers(0, 4096, (48, 56)))
    ds = pydicom.dcmread(dcm)
    ds.PatientName, ds.PatientID = PATIENT
    ds.save_as(str(dcm), enforce_file_format=True)
    out["scan.dcm"] = dcm
    out["notes.txt"] = root / "notes.txt"
    out["notes.txt"].write_text("not an image\n")
    return out


@pytest.fixture(scope="module")
def client(model_dir: Path, segmenter_dir: Path) -> Iterator[TestClient]:
    app = create_app(load_models(model_dir, segmenter_dir), ServeOptions(device="cpu", precision="fp32"))
    with TestClient(app) as c:
        yield c


def _post(client: TestClient, endpoint: str, path: Path, name: str | None = None) -> Any:
    return client.post(endpoint, files={"file": (name or path.name, path.read_bytes())})


def _png(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    assert img.format == "PNG"
    return img


def _model_probs(model_dir: Path, path: Path) -> np.ndarray:
    model, meta = load_classifier(model_dir)
    x = frame_image(read_xray(path).image, meta)[None]
    return model.predict_proba(x)[0].double().numpy()


def test_health_describes_the_model(client: TestClient, model_dir: Path) -> None:
    r = client.get("/health")
    assert r.status_code == 200
    assert r.json() == {
        "status": "ok",
        "model": {"task": "pneumonia_vs_healthy", "class_names": ["healthy", "pneumonia"], "img_size": 32},
        "segmenter": True,
        "max_upload_mb": 20.0,
    }
    assert r.headers["cache-control"] == "no-store"


def test_png_upload_gives_the_probabilities_of_sscxr_predict(
    client: TestClient, model_dir: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    path = files["x0.png"]
    r = _post(client, "/predict", path)
    assert r.status_code == 200, r.text
    got = r.json()
    model, meta = load_classifier(model_dir)
    (row,) = predict_files(
        model, meta, [path], tmp_path, PredictOptions(device="cpu", progress=False, precision="fp32")
    )
    assert list(got["probabilities"]) == ["healthy", "pneumonia"]
    np.testing.assert_allclose(list(got["probabilities"].values()), row.probs, rtol=0, atol=1e-6)
    np.testing.assert_allclose(list(got["probabilities"].values()), _model_probs(model_dir, path), atol=1e-6)
    assert got["predicted"] == row.predicted
    assert got["threshold"] == 0.5 and got["shape"] == [40, 60] and got["file"] == "x0.png"
    assert set(got) == {"file", "probabilities", "predicted", "threshold", "shape"}


def test_a_named_threshold_moves_the_decision(model_dir: Path, files: dict[str, Path]) -> None:
    app = create_app(load_models(model_dir), ServeOptions(threshold="0", device="cpu"))
    with TestClient(app) as c:
        got = _post(c, "/predict", files["x1.png"]).json()
    assert got["threshold"] == 0.0 and got["predicted"] == "pneumonia"
    with pytest.raises(ConfigError, match="youden"):
        create_app(load_models(model_dir), ServeOptions(threshold="best", device="cpu"))


def test_dicom_upload_works_and_no_header_field_leaves_the_server(
    client: TestClient, model_dir: Path, files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    path = files["scan.dcm"]
    with caplog.at_level(logging.INFO, logger="sscxr.serve"):
        r = _post(client, "/explain", path, name="Doe_Jane_chest.dcm")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["shape"] == [48, 56] and got["file"] == "Doe_Jane_chest.dcm"
    np.testing.assert_allclose(list(got["probabilities"].values()), _model_probs(model_dir, path), atol=1e-6)
    lines = [rec.getMessage() for rec in caplog.records if rec.name.startswith("sscxr.serve")]
    assert len(lines) == 1 and lines[0].startswith("POST /explain 200 dicom 48x56"), lines
    text = str({k: v for k, v in got.items() if not k.endswith("_png")}).replace("Doe_Jane_chest.dcm", "")
    for secret in (*PATIENT, "Doe", "PID"):
        assert secret not in text  # only the name the user gave; the images are pixels only
        assert not any(secret in line for line in lines)  # not even the file name in the log


def test_a_file_that_is_not_an_image_is_refused_naming_it(client: TestClient, files: dict[str, Path]) -> None:
    r = _post(client, "/predict", files["notes.txt"])
    assert r.status_code == 415
    detail = r.json()["detail"]
    assert isinstance(detail, str) and detail.startswith("notes.txt: ")
    assert "sscxr-upload" not in detail and tempfile.gettempdir() not in detail  # no temporary path
    assert "Traceback" not in r.text
    # A truncated PNG, an empty file and a client path in the name: one line each, the base name only.
    png = files["x2.png"].read_bytes()
    r = client.post("/explain", files={"file": ("C:\\scans\\cut.png", png[: len(png) // 2])})
    assert r.status_code == 415 and r.json()["detail"].startswith("cut.png: ")
    r = client.post("/segment", files={"file": ("empty.dcm", b"")})
    assert r.status_code == 415 and r.json()["detail"].startswith("empty.dcm: ")
    r = client.post("/predict", data={"other": "x"})
    assert r.status_code == 422 and "'file'" in r.json()["detail"]


def _multipart(name: str, data: bytes) -> tuple[bytes, str]:
    boundary = "sscxr-test-boundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def test_an_oversize_upload_is_refused_with_413_however_it_is_sent(model_dir: Path) -> None:
    app = create_app(load_models(model_dir), ServeOptions(max_upload_mb=0.01, device="cpu"))
    limit = int(0.01 * 1024 * 1024)
    big = os.urandom(200_000)
    with TestClient(app) as c:
        r = c.post("/predict", files={"file": ("big.png", big)})  # honest Content-Length
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        r = c.post("/predict", files={"file": ("big.png", os.urandom(limit + 1))})  # just over the limit
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        body, ctype = _multipart("big.png", big)
        chunks = (body[i : i + 8192] for i in range(0, len(body), 8192))  # chunked: no Content-Length
        r = c.post("/predict", content=chunks, headers={"content-type": ctype})
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        r = c.post(
            "/explain", content=body, headers={"content-type": ctype, "content-length": "300"}
        )  # a lie
        assert r.status_code == 413 and "0.01 MB" in r.json()["detail"]
        r = c.post("/predict", files={"file": ("small.bin", os.urandom(limit))})  # at the limit: read
        assert r.status_code == 415 and r.json()["detail"].startswith("small.bin: ")
        assert c.get("/health").json()["max_upload_mb"] == 0.01


def test_concurrent_requests_are_serialised_and_equal_sequential_ones(
    client: TestClient, files: dict[str, Path]
) -> None:
    names = [f"x{i}.png" for i in range(8)]
    endpoints = ["/predict", "/explain"] * 4

    def answer(job: tuple[str, str]) -> dict[str, Any]:
        endpoint, name = job
        r = _post(client, endpoint, files[name])
        assert r.status_code == 200, r.text
        got = r.json()
        return {k: got[k] for k in ("file", "probabilities", "predicted", "shape", "mask_png") if k in got}

    jobs = list(zip(endpoints, names, strict=True))
    sequential = [answer(job) for job in jobs]
    model = client.app.state.engine.model  # type: ignore[attr-defined]
    active, peak, lock = [0], [0], threading.Lock()

    def enter(module: torch.nn.Module, args: Any) -> None:
        with lock:
            active[0] += 1
            peak[0] = max(peak[0], active[0])
        time.sleep(0.01)  # widen the window in which an unlocked second forward would overlap

    def leave(module: torch.nn.Module, args: Any, out: Any) -> None:
        with lock:
            active[0] -= 1

    handles = [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]
    try:
        with ThreadPoolExecutor(8) as pool:
            concurrent = list(pool.map(answer, jobs))
    finally:
        for h in handles:
            h.remove()
    assert concurrent == sequential
    assert peak[0] == 1 and active[0] == 0


def test_uploads_leave_no_file_behind(
    model_dir: Path,
    segmenter_dir: Path,
    files: dict[str, Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import sscxr.serve.app as serve_app

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    seen: list[tuple[str, int]] = []
    real = serve_app.read_xray

    def spy(path: str | os.PathLike[str]) -> Any:
        seen.append((os.path.dirname(path), os.stat(path).st_mode & 0o777))
        return real(path)

    monkeypatch.setattr(serve_app, "read_xray", spy)
    app = create_app(load_models(model_dir, segmenter_dir), ServeOptions(max_upload_mb=0.05, device="cpu"))
    with TestClient(app) as c:
        assert _post(c, "/predict", files["x0.png"]).status_code == 200
        assert _post(c, "/explain", files["scan.dcm"]).status_code == 200
        assert _post(c, "/segment", files["x3.png"]).status_code == 200
        assert _post(c, "/predict", files["notes.txt"]).status_code == 415
        assert c.post("/predict", files={"file": ("big.png", os.urandom(60_000))}).status_code == 413
        monkeypatch.setattr(app.state.engine, "classify", _boom)
        r = _post(c, "/predict", files["x1.png"])
        assert r.status_code == 500 and r.json() == {
            "detail": "x1.png: internal error while processing the image; see the server log"
        }
    assert [d for d, _ in seen] == [str(tmp)] * 5 and {m for _, m in seen} == {0o600}  # private temp files
    assert list(tmp.iterdir()) == []


def _boom(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("out of memory at /secret/path")


def test_keep_uploads_keeps_private_copies_not_named_after_the_upload(
    model_dir: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    keep = tmp_path / "kept"
    app = create_app(load_models(model_dir), ServeOptions(keep_uploads=keep, device="cpu"))
    with TestClient(app) as c:
        assert _post(c, "/predict", files["scan.dcm"], name="Doe_Jane.dcm").status_code == 200
    (kept,) = keep.iterdir()
    assert kept.suffix == ".dcm" and "Doe" not in kept.name
    assert kept.read_bytes() == files["scan.dcm"].read_bytes() and kept.stat().st_mode & 0o777 == 0o600


def test_segment_and_explain_return_pngs_of_the_right_size(
    client: TestClient, model_dir: Path, segmenter_dir: Path, files: dict[str, Path], tmp_path: Path
) -> None:
    path = files["x0.png"]  # 40 x 60
    image = read_xray(path).image
    seg = _post(client, "/segment", path).json()
    mask = np.asarray(_png(seg["mask_png"]))
    expected = predict_mask(load_segmenter(segmenter_dir), image)
    assert seg["shape"] == [40, 60] and mask.shape == (40, 60) and set(np.unique(mask)) <= {0, 255}
    np.testing.assert_array_equal(mask == 255, expected)
    assert seg["lung_fraction"] == pytest.approx(float(expected.mean()))

    got = _post(client, "/explain", path).json()
    assert got["mask_png"] == seg["mask_png"] and got["lung_fraction"] == seg["lung_fraction"]
    overlay = _png(got["lung_overlay_png"])
    assert overlay.size == (60, 40) and overlay.mode == "RGB"
    # The heat-map figure is `sscxr explain`'s, byte for byte (same maps, same caption).
    model, meta = load_classifier(model_dir)
    explain_files(
        model, meta, [path], tmp_path, PredictOptions(device="cpu", progress=False, precision="fp32")
    )
    (written,) = tmp_path.glob("*_heatmap.png")
    assert base64.b64decode(got["heatmap_png"]) == written.read_bytes()
    figure = _png(got["heatmap_png"])
    assert figure.width > 2 * figure.height > 0  # the X-ray and two maps side by side
    pred = _post(client, "/predict", path).json()
    assert {k: got[k] for k in pred} == pred


def test_without_a_segmenter_segment_says_how_to_get_one(model_dir: Path, files: dict[str, Path]) -> None:
    app = create_app(load_models(model_dir), ServeOptions(device="cpu", precision="fp32"))
    with TestClient(app) as c:
        assert c.get("/health").json()["segmenter"] is False
        r = _post(c, "/segment", files["x0.png"])
        assert r.status_code == 404 and "--segmenter" in r.json()["detail"]
        got = _post(c, "/explain", files["x0.png"]).json()
    assert got["mask_png"] is None and got["lung_overlay_png"] is None and got["lung_fraction"] is None
    assert _png(got["heatmap_png"]).width > 0


def test_openapi_lists_the_endpoints_and_the_page_is_self_contained(client: TestClient) -> None:
    schema = client.get("/openapi.json").json()
    assert {"/health", "/predict", "/segment", "/explain"} <= set(schema["paths"])
    assert set(schema["paths"]["/predict"]) == {"post"} and set(schema["paths"]["/health"]) == {"get"}
    body = schema["paths"]["/explain"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in body
    assert {"413", "415"} <= set(schema["paths"]["/predict"]["post"]["responses"])
    assert client.get("/docs").status_code == 404 and client.get("/redoc").status_code == 404
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    html = page.text
    for element in ('id="file"', 'id="dropzone"', 'id="probabilities"', 'id="predicted"', 'id="heatmap"'):
        assert element in html
    assert "http://" not in html and "https://" not in html and 'src="//' not in html


def test_serve_command_binds_locally_unless_told_and_warns(
    model_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import uvicorn

    parser = argparse.ArgumentParser(prog="sscxr")
    serve_cmds.register(parser.add_subparsers(dest="command"))
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: calls.append({"app": app, **kw}))
    args = parser.parse_args(["serve", str(model_dir), "--device", "cpu"])
    assert (args.host, args.port, args.max_upload_mb, args.keep_uploads) == ("127.0.0.1", 8000, 20.0, None)
    assert args.func(args) == 0
    assert calls[0]["host"] == "127.0.0.1" and calls[0]["port"] == 8000
    assert "warning" not in capsys.readouterr().err
    with TestClient(calls[0]["app"]) as c:
        assert c.get("/health").json()["model"]["class_names"] == ["healthy", "pneumonia"]
    args = parser.parse_args(
        ["serve", str(model_dir), "--host", "0.0.0.0", "--port", "9001", "--device", "cpu"]
    )
    assert args.func(args) == 0
    assert calls[1]["host"] == "0.0.0.0" and calls[1]["port"] == 9001
    assert "warning: listening on 0.0.0.0" in capsys.readouterr().err
    args = parser.parse_args(["serve", str(model_dir), "--threshold", "best", "--device", "cpu"])
    with pytest.raises(ConfigError, match="youden"):
        args.func(args)
    assert len(calls) == 2
    for bad in (["--max-upload-mb", "0"], ["--port", "70000"]):
        with pytest.raises(SystemExit):
            parser.parse_args(["serve", str(model_dir), *bad])
