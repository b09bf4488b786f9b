"""`sscxr serve`: a trained classifier (and optionally a lung segmenter) behind a local HTTP API and a page.

Endpoints (JSON; documented by FastAPI's schema at /openapi.json; /docs and /redoc are off because
their pages load scripts from a CDN):

- ``GET /health``: the model's task, class names and input size, and whether a segmenter is loaded.
- ``POST /predict`` (multipart, field ``file``): class probabilities and the decision.
- ``POST /segment``: the lung mask (base64 PNG at the image's own size) and the lung fraction.
- ``POST /explain``: the prediction, the attention heat-map figure (`heatmap_figure`) and, with a
  segmenter, the mask and the X-ray with the lung contour drawn in (``lung_overlay_png``).
- ``GET /``: the browser page (``static/index.html``, no external resources).

Each upload is written to a private temporary file (mode 0600) for `read_xray` and deleted before the
answer; only ``keep_uploads`` keeps a copy. Bodies larger than the limit are refused with 413 from the
Content-Length header and, for bodies without an honest one, by counting the bytes as they arrive. The
models run under one lock, so concurrent requests give the numbers sequential ones give. One log line
per request: method, path, status, image format and size, time; never a file name or a header field.
"""

from __future__ import annotations

import base64
import contextlib
import io
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import numpy as np
import torch
from fastapi import FastAPI, File, HTTPException, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from PIL import Image, ImageChops, ImageFilter
from pydantic import BaseModel, Field

from sscxr import __version__
from sscxr.data.io import IMAGE_SUFFIXES, XRay, XRayReadError, read_xray
from sscxr.engine.distributed import precision_autocast, resolve_device
from sscxr.errors import SSCXRError
from sscxr.evaluation.files import attention_maps, decide_class, decision_threshold, frame_image
from sscxr.evaluation.predict import logits_to_probs
from sscxr.models.attention import capture_attention
from sscxr.models.classifier import ViTClassifier, load_classifier

if TYPE_CHECKING:
    from starlette.types import ASGIApp, Message, Receive, Scope, Send

    from sscxr.models.unetr import Segmenter

__all__ = ["Engine", "Models", "ServeOptions", "create_app", "load_models"]

log = logging.getLogger(__name__)

_MB = 1024 * 1024
# Room for the multipart framing (boundaries, part headers) around the file in a request body.
_FRAMING_SLACK = 64 * 1024
# The lung overlay is drawn at the image's size, down-scaled so its long side is at most this.
_OVERLAY_MAX_SIDE = 1024
_LOG_KEY = "sscxr.serve.log"
_PAGE_HEADERS = {
    # The page is self-contained: scripts, styles and requests stay on this server (images: data: URLs).
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
}


@dataclass
class Models:
    """What `sscxr serve` serves.

    Attributes:
        classifier: the classifier (`load_classifier`).
        meta: its model.json (class names, img_size, fit, thresholds, task).
        segmenter: a lung segmenter (`load_segmenter`), or None.
    """

    classifier: ViTClassifier
    meta: dict[str, Any]
    segmenter: Segmenter | None = None


def load_models(model: str | os.PathLike[str], segmenter: str | os.PathLike[str] | None = None) -> Models:
    """Load the classifier (a bundle, a fine-tuning run folder or its model.json) and the segmenter:
    the one given, else a bundle's own.

    Raises:
        CheckpointError: files missing, foreign or not matching their metadata.
    """
    from sscxr.models.bundle import bundled_segmenter

    classifier, meta = load_classifier(model)
    seg = None
    segmenter = segmenter if segmenter is not None else bundled_segmenter(model)
    if segmenter is not None:
        from sscxr.models.unetr import load_segmenter

        seg = load_segmenter(segmenter)
    return Models(classifier, meta, seg)


@dataclass(frozen=True)
class ServeOptions:
    """How the service answers.

    Attributes:
        max_upload_mb: largest accepted upload, in MB (2**20 bytes).
        threshold: binary models: a threshold name of model.json or a number in [0, 1]; None = "default".
        keep_uploads: folder that keeps a copy of every upload (mode 0600, named by time and a random
            id, never by the uploaded name); None = nothing stays on disk.
        device: "auto" | "cpu" | "cuda".
        precision: "auto" | "bf16" | "fp32" (as `sscxr predict`).
        postprocess: lung masks: keep the two largest components, fill holes.
    """

    max_upload_mb: float = 20.0
    threshold: str | None = None
    keep_uploads: Path | None = None
    device: str = "auto"
    precision: str = "auto"
    postprocess: bool = False

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * _MB)


class Engine:
    """The loaded models on their device, run one request at a time (a lock around every forward)."""

    def __init__(self, models: Models, options: ServeOptions) -> None:
        self.device = resolve_device(options.device)
        self.precision = options.precision
        precision_autocast(self.device, self.precision)  # refuses an unknown precision now, not per request
        self.meta = models.meta
        self.class_names = [str(n) for n in models.meta["class_names"]]
        self.threshold = decision_threshold(models.meta, options.threshold)
        self.model = models.classifier.eval().to(self.device)
        self.segmenter = None if models.segmenter is None else models.segmenter.to(self.device)
        self.postprocess = options.postprocess
        self._lock = threading.Lock()

    def classify(
        self, image: np.ndarray, want_maps: bool = False
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """(C,) float64 probabilities of one (H, W) [0, 1] image and, with `want_maps`, the heat maps
        ("last_block", "rollout": (H, W) in [0, 1] over the image, as `explain_files` computes them)."""
        x = frame_image(image, self.meta)[None].to(self.device)
        with self._lock, torch.inference_mode(), precision_autocast(self.device, self.precision):
            if want_maps:
                with capture_attention(self.model.encoder) as maps:
                    logits = self.model(x)
            else:
                logits, maps = self.model(x), []
            probs = logits_to_probs(logits, len(self.class_names)).cpu().double().numpy()[0]
        heat = attention_maps(maps, self.model, [image.shape], self.meta)[0] if maps else {}
        return probs, heat

    def decide(self, probs: np.ndarray) -> str:
        return decide_class(probs, self.class_names, self.threshold)

    def lung_mask(self, image: np.ndarray) -> np.ndarray:
        """(H, W) bool lung mask at the image's size (`predict_mask`)."""
        from sscxr.evaluation.segmentation import predict_mask

        if self.segmenter is None:
            raise RuntimeError("no segmenter loaded")
        with self._lock:
            return predict_mask(self.segmenter, image, self.postprocess)


# --- answers (their schemas document the API in /openapi.json) ---------------------------------------


class ModelInfo(BaseModel):
    task: str | None = Field(description="the classifier's task, from its model.json")
    class_names: list[str] = Field(description="class names in output order (binary: index 1 is positive)")
    img_size: int = Field(description="the model's square input size in pixels")


class Health(BaseModel):
    status: str = Field(description='"ok"')
    model: ModelInfo
    segmenter: bool = Field(description="a lung segmenter is loaded (/segment works, /explain adds lungs)")
    max_upload_mb: float = Field(description="largest accepted upload, in MB (2**20 bytes)")


class Prediction(BaseModel):
    file: str = Field(description="the uploaded file's name")
    probabilities: dict[str, float] = Field(description="class name -> probability")
    predicted: str = Field(description="the predicted class")
    threshold: float | None = Field(
        description="binary models: the P(positive class) threshold of the decision; null: arg-max"
    )
    shape: list[int] = Field(description="[H, W] of the decoded image")


class Segmentation(BaseModel):
    file: str
    shape: list[int] = Field(description="[H, W] of the decoded image (and of the mask)")
    lung_fraction: float = Field(description="fraction of the image's pixels inside the lung mask")
    mask_png: str = Field(description="base64 PNG, 8-bit grey, H x W: 255 = lung, 0 = background")


class Explanation(Prediction):
    heatmap_png: str = Field(
        description="base64 PNG: the X-ray, last-block class-token attention and attention rollout overlaid"
    )
    lung_fraction: float | None = Field(default=None, description="with a segmenter; else null")
    mask_png: str | None = Field(default=None, description="with a segmenter: as /segment; else null")
    lung_overlay_png: str | None = Field(
        default=None,
        description="with a segmenter: base64 PNG of the X-ray with the lung contour drawn in green, at "
        f"the image's size (long side at most {_OVERLAY_MAX_SIDE}); else null",
    )


class Problem(BaseModel):
    detail: str = Field(description="what went wrong, naming the uploaded file where there is one")


_Upload = Annotated[UploadFile, File(description="one X-ray: DICOM, PNG, JPEG or TIFF")]

_ERRORS: dict[int | str, dict[str, Any]] = {
    413: {"model": Problem, "description": "the upload is larger than the limit"},
    415: {"model": Problem, "description": "the upload is not an image sscxr can read"},
    422: {"model": Problem, "description": "no file in the request's `file` field"},
}


# --- uploads --------------------------------------------------------------------------------------------


def _display_name(filename: str | None) -> str:
    """The uploaded file's base name (no client folders), printable, at most 200 characters."""
    name = re.split(r"[\\/]", filename or "")[-1]
    name = "".join(ch for ch in name if ch.isprintable()).strip()[:200]
    return name or "upload"


def _too_large(limit_mb: float) -> HTTPException:
    return HTTPException(
        413,
        f"upload too large: the limit is {limit_mb:g} MB (start the server with a larger --max-upload-mb)",
    )


def _keep(folder: Path, data: bytes, suffix: str) -> None:
    name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}{suffix}"
    fd = os.open(folder / name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _decode(data: bytes, name: str, keep: Path | None) -> XRay:
    """`read_xray` on the bytes, through a private temporary file deleted before returning.

    Raises:
        HTTPException: 415 for anything `read_xray` refuses, with its message naming `name` (never the
            temporary path).
    """
    suffix = Path(name).suffix.lower()
    suffix = suffix if suffix in IMAGE_SUFFIXES else ""  # the reader sniffs content; the suffix only helps
    if keep is not None:
        _keep(keep, data, suffix)
    fd, tmp = tempfile.mkstemp(prefix="sscxr-upload-", suffix=suffix)  # 0600, in tempfile.gettempdir()
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return read_xray(tmp)
    except SSCXRError as e:
        message = str(e).replace(tmp, name).replace(os.path.basename(tmp), name)
        if not message.startswith(name):
            message = f"{name}: {message}"
        raise HTTPException(415 if isinstance(e, XRayReadError) else 422, message) from None
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _b64(png: bytes) -> str:
    return base64.b64encode(png).decode("ascii")


def _lung_overlay(image: np.ndarray, mask: np.ndarray) -> bytes:
    """PNG of the X-ray (1-99 percentile contrast) with the lung mask's contour drawn in green."""
    lo, hi = np.percentile(image, [1, 99])
    grey = np.clip((image - lo) / (hi - lo if hi > lo else 1.0), 0.0, 1.0)
    base = Image.fromarray((grey * 255).round().astype(np.uint8), mode="L")
    lungs = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
    h, w = image.shape
    scale = min(1.0, _OVERLAY_MAX_SIDE / max(h, w))
    if scale < 1.0:
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        base, lungs = (
            base.resize(size, Image.Resampling.BILINEAR),
            lungs.resize(size, Image.Resampling.NEAREST),
        )
    k = 2 * max(1, round(max(base.size) / 400)) + 1  # line width grows with the image
    edge = ImageChops.difference(
        lungs.filter(ImageFilter.MaxFilter(k)), lungs.filter(ImageFilter.MinFilter(k))
    )
    rgb = base.convert("RGB")
    rgb.paste((0, 230, 118), mask=edge)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


# --- middleware -------------------------------------------------------------------------------------------


class _BodyLimit:
    """413 for request bodies over `max_bytes`: at once from Content-Length, else while they arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int, limit_mb: float) -> None:
        self.app, self.max_bytes, self.limit_mb = app, max_bytes, limit_mb

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and not declared.isdigit():
            await JSONResponse({"detail": "invalid Content-Length header"}, 400)(scope, receive, send)
            return
        if declared is not None and int(declared) > self.max_bytes:
            await JSONResponse({"detail": _too_large(self.limit_mb).detail}, 413)(scope, receive, send)
            return
        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    # FastAPI re-raises an HTTPException met while reading the body; its handler answers.
                    raise _too_large(self.limit_mb)
            return message

        async def watching_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, watching_send)
        except HTTPException as e:  # raised outside a route's body parsing (e.g. a bare ASGI route)
            if started or e.status_code != 413:
                raise
            await JSONResponse({"detail": e.detail}, 413)(scope, receive, send)


class _RequestLog:
    """One log line per request (method, path, status, what the endpoint noted, ms) and no-store headers."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0, status = time.perf_counter(), 500

        async def logging_send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
                headers = list(message.get("headers") or [])
                headers += [(b"cache-control", b"no-store"), (b"x-content-type-options", b"nosniff")]
                message = {**message, "headers": headers}
            await send(message)

        try:
            await self.app(scope, receive, logging_send)
        finally:
            note = scope.get(_LOG_KEY, "")
            ms = (time.perf_counter() - t0) * 1000
            log.info(
                "%s %s %d%s %.0f ms", scope["method"], scope["path"], status, f" {note}" if note else "", ms
            )


# --- the app ----------------------------------------------------------------------------------------------


def create_app(models: Models, options: ServeOptions | None = None) -> FastAPI:
    """The FastAPI app serving `models` (see the module docstring for the endpoints).

    Raises:
        ConfigError: an unknown threshold name or precision.
    """
    o = options or ServeOptions()
    if not o.max_upload_mb > 0:
        raise ValueError(f"max_upload_mb must be positive, got {o.max_upload_mb}")
    engine = Engine(models, o)
    keep = None
    if o.keep_uploads is not None:
        keep = Path(o.keep_uploads)
        keep.mkdir(parents=True, exist_ok=True, mode=0o700)
    limit = o.max_upload_bytes
    page = resources.files("sscxr.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    info = ModelInfo(
        task=models.meta.get("task"), class_names=engine.class_names, img_size=int(models.meta["img_size"])
    )

    app = FastAPI(
        title="sscxr serve",
        version=__version__,
        description="A chest X-ray classifier (and lung segmenter) trained with sscxr. Research use only: "
        "not a medical device. Upload one image (DICOM, PNG, JPEG, TIFF) per request in the form field "
        "`file`.",
        docs_url=None,
        redoc_url=None,
    )
    app.state.engine = engine
    app.add_middleware(_BodyLimit, max_bytes=limit + _FRAMING_SLACK, limit_mb=o.max_upload_mb)
    app.add_middleware(_RequestLog)  # added last = outermost: it logs the 413s too

    @app.exception_handler(RequestValidationError)
    async def _no_file(request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": "no file uploaded: send multipart/form-data with the image in the field 'file'"}, 422
        )

    def upload(request: Request, file: UploadFile) -> tuple[str, XRay]:
        name = _display_name(file.filename)
        data = file.file.read(limit + 1)
        if len(data) > limit:
            raise _too_large(o.max_upload_mb)
        xray = _decode(data, name, keep)
        h, w = xray.image.shape
        request.scope[_LOG_KEY] = f"{xray.meta.format} {h}x{w} ({len(data)} bytes)"
        return name, xray

    def guarded(name: str, work: Any) -> Any:
        """Run the models; an unexpected failure is logged with its traceback and answered in one line."""
        try:
            return work()
        except HTTPException:
            raise
        except Exception:
            log.exception("processing an upload failed")
            detail = f"{name}: internal error while processing the image; see the server log"
            raise HTTPException(500, detail) from None

    def prediction(name: str, xray: XRay, want_maps: bool) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        probs, heat = engine.classify(xray.image, want_maps)
        answer = {
            "file": name,
            "probabilities": {n: float(p) for n, p in zip(engine.class_names, probs, strict=True)},
            "predicted": engine.decide(probs),
            "threshold": engine.threshold,
            "shape": list(xray.image.shape),
        }
        return answer, heat

    @app.get("/health", response_model=Health, summary="the model served")
    def health() -> Health:
        return Health(
            status="ok", model=info, segmenter=engine.segmenter is not None, max_upload_mb=o.max_upload_mb
        )

    @app.post("/predict", response_model=Prediction, responses=_ERRORS, summary="classify one X-ray")
    def predict(request: Request, file: _Upload) -> dict[str, Any]:
        name, xray = upload(request, file)
        return guarded(name, lambda: prediction(name, xray, want_maps=False)[0])

    @app.post(
        "/segment",
        response_model=Segmentation,
        responses={**_ERRORS, 404: {"model": Problem, "description": "no segmenter loaded"}},
        summary="lung mask of one X-ray",
    )
    def segment(request: Request, file: _Upload) -> dict[str, Any]:
        if engine.segmenter is None:
            raise HTTPException(404, "no segmenter loaded: start the server with --segmenter SEGMENTER_RUN")
        name, xray = upload(request, file)

        def work() -> dict[str, Any]:
            from sscxr.evaluation.segmentation import mask_png

            mask = engine.lung_mask(xray.image)
            return {"file": name, "shape": list(mask.shape), "lung_fraction": float(mask.mean()),
                    "mask_png": _b64(mask_png(mask))}  # fmt: skip

        return guarded(name, work)

    @app.post(
        "/explain",
        response_model=Explanation,
        responses=_ERRORS,
        summary="prediction with attention heat maps (and the lungs, with a segmenter)",
    )
    def explain(request: Request, file: _Upload) -> dict[str, Any]:
        name, xray = upload(request, file)

        def work() -> dict[str, Any]:
            from sscxr.viz.heatmap import heatmap_figure

            answer, heat = prediction(name, xray, want_maps=True)
            p = answer["probabilities"][answer["predicted"]]
            caption = f"{name}: predicted {answer['predicted']} (p = {p:.2f})"
            answer["heatmap_png"] = _b64(heatmap_figure(xray.image, heat, caption))
            if engine.segmenter is not None:
                from sscxr.evaluation.segmentation import mask_png

                mask = engine.lung_mask(xray.image)
                answer.update(lung_fraction=float(mask.mean()), mask_png=_b64(mask_png(mask)),
                              lung_overlay_png=_b64(_lung_overlay(xray.image, mask)))  # fmt: skip
            return answer

        return guarded(name, work)

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index() -> HTMLResponse:
        return HTMLResponse(page, headers=_PAGE_HEADERS)

    return app
