"""Inference speed of a trained classifier: the model, `sscxr predict` on DICOM folders, `sscxr serve`.

    python benchmarks/bench_inference.py [--part all|model|predict|serve] [--size 256] [--threads N]

- model: ViT-S/16 classifier at --size px, latency at batch 1 (median of timed calls) and the best
  throughput over batch sizes, for PyTorch fp32 / bf16 autocast, eager / torch.compile, and ONNX Runtime
  (the graph `sscxr export` writes), beside the bare timm forward (no standardisation, no softmax).
- predict: `predict_files` on a folder of 2048 x 2048 16-bit DICOMs (decode + frame + classify + CSVs).
- serve: requests/s and p95 latency of POST /predict with 8 concurrent clients on loopback (uvicorn).

Weights are random (speed does not depend on them); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from sscxr.models.classifier import ViTClassifier, export_classifier, load_classifier
from sscxr.models.loading import Normalization
from sscxr.models.vit import build_vit, vit_preset


def _timed(fn: Callable[[], object], repeats: int) -> list[float]:
    fn()  # warm-up
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def _classifier(size: int, folder: Path) -> Path:
    cfg = vit_preset("vit_small", img_size=size)
    torch.manual_seed(0)
    model = ViTClassifier(build_vit(cfg), ["healthy", "pneumonia"], normalization=Normalization(0.5, 0.25))
    export_classifier(model, cfg, folder / "model", {"task": "pneumonia_vs_healthy", "fit": "stretch"})
    return folder


def bench_model(run: Path, size: int, batches: list[int]) -> None:
    model, _ = load_classifier(run)
    bare = model.encoder
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "bare timm forward fp32": bare,
        "pytorch fp32 eager": model,
    }

    def bf16(x: torch.Tensor) -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return model(x)

    variants["pytorch bf16 eager"] = bf16
    try:
        compiled = torch.compile(model)
        compiled(torch.rand(2, 1, size, size))
        variants["pytorch fp32 compiled"] = compiled
    except Exception as e:  # no C++ toolchain, unsupported platform
        print(f"torch.compile unavailable: {type(e).__name__}: {str(e)[:120]}")
    try:
        from sscxr.models.onnx_export import OnnxClassifier, export_onnx

        export_onnx(run, run / "onnx")
        onnx = OnnxClassifier(run / "onnx")
        variants["onnxruntime fp32"] = onnx
    except ImportError as e:
        print(f"ONNX Runtime unavailable: {e}")
    print(f"\nViT-S/16 classifier at {size} px, {torch.get_num_threads()} threads")
    print(f"{'variant':26s} {'batch-1 ms (median)':>20s}   best img/s (batch)")
    for name, fn in variants.items():
        with torch.inference_mode():
            x1 = torch.rand(1, 1, size, size)
            lat = statistics.median(_timed(lambda fn=fn, x1=x1: fn(x1), 20)) * 1e3
            best = (0.0, 0)
            for b in batches:
                xb = torch.rand(b, 1, size, size)
                t = statistics.median(_timed(lambda fn=fn, xb=xb: fn(xb), 3))
                best = max(best, (b / t, b))
        print(f"{name:26s} {lat:20.1f}   {best[0]:8.1f} ({best[1]})")


def _dicoms(folder: Path, n: int, side: int) -> None:
    from pydicom.dataset import FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    rng = np.random.default_rng(0)
    for i in range(n):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.1.1"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.Rows, ds.Columns = "DX", side, side
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, (side, side), dtype=np.uint16).tobytes()
        ds.save_as(str(folder / f"{i}.dcm"), enforce_file_format=True)


def bench_predict(run: Path, n: int) -> None:
    from sscxr.evaluation.files import PredictOptions, predict_files

    model, meta = load_classifier(run)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "dicoms"
        folder.mkdir()
        _dicoms(folder, n, 2048)
        options = PredictOptions(batch_size=16, progress=False)
        predict_files(model, meta, [folder], Path(tmp) / "warm", options)
        start = time.perf_counter()
        predict_files(model, meta, [folder], Path(tmp) / "out", options)
        seconds = time.perf_counter() - start
    print(f"\npredict on {n} DICOMs of 2048 x 2048 (16-bit): {n / seconds:.1f} images/s ({seconds:.2f} s)")


def bench_serve(run: Path, clients: int, requests: int) -> None:
    import httpx
    import uvicorn
    from PIL import Image

    from sscxr.serve import create_app, load_models

    app = create_app(load_models(run))
    config = uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    port = server.servers[0].sockets[0].getsockname()[1]
    buf = io.BytesIO()
    Image.fromarray((np.random.default_rng(0).random((1024, 1024)) * 255).astype(np.uint8)).save(buf, "PNG")
    png = buf.getvalue()

    def client(_: int) -> list[float]:
        times = []
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            for _ in range(requests):
                start = time.perf_counter()
                c.post("/predict", files={"file": ("x.png", png, "image/png")}).raise_for_status()
                times.append(time.perf_counter() - start)
        return times

    client(0)  # warm-up
    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        times = [t for ts in pool.map(client, range(clients)) for t in ts]
    wall = time.perf_counter() - start
    server.should_exit = True
    thread.join(timeout=10)
    p95 = float(np.percentile(times, 95)) * 1e3
    print(f"\nserve POST /predict (1024 px PNG), {clients} concurrent clients x {requests}: "
          f"{len(times) / wall:.1f} requests/s, p95 latency {p95:.0f} ms")  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["all", "model", "predict", "serve"], default="all")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--batches", default="1,2,4,8,16,32")
    p.add_argument("--n-dicoms", type=int, default=32)
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        run = _classifier(args.size, Path(tmp) / "run")
        if args.part in ("all", "model"):
            bench_model(run, args.size, [int(b) for b in args.batches.split(",")])
        if args.part in ("all", "predict"):
            bench_predict(run, args.n_dicoms)
        if args.part in ("all", "serve"):
            bench_serve(run, args.clients, args.requests)


if __name__ == "__main__":
    main()
