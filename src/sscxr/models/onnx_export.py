"""ONNX export of the classifier and the segmenter, its parity check against PyTorch, and the ONNX
Runtime backend that `sscxr predict --backend onnx` runs on.

Each graph takes what the PyTorch model takes, (B, 1, S, S) float32 intensities in [0, 1] with a
dynamic batch, and standardises inside, so a hospital system feeds the same framed images:
- `classifier.onnx`: outputs `logits` (B, C) and `probabilities` (B, C, softmax);
- `segmenter.onnx`: outputs `lung_probability` (B, S, S).
Beside each graph its model.json (`classifier.json`, `segmenter.json`: class names, thresholds, input
size and framing) and `export.json` with the parity measured at export: the largest absolute
difference of the outputs between PyTorch and ONNX Runtime on the given images (or on synthetic
radiographs when none are given), against a stated tolerance.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from sscxr.errors import CheckpointError, ConfigError
from sscxr.utils import atomic_write_json

__all__ = ["PARITY_TOLERANCE", "OnnxClassifier", "export_onnx"]

log = logging.getLogger(__name__)

#: Largest accepted |PyTorch - ONNX Runtime| on probabilities, both in float32: kernels differ in their
#: summation order (1e-6 relative), so a tolerance 100x above what is seen still catches a wrong graph.
PARITY_TOLERANCE = 1e-4
OPSET = 18


class _ClassifierGraph(nn.Module):
    """The classifier as exported: [0, 1] images -> (logits, softmax probabilities)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(image).float()
        return logits, logits.softmax(dim=-1)


class _SegmenterGraph(nn.Module):
    """The segmenter as exported: [0, 1] images at the model's size -> lung probability (B, S, S)
    (the UNETR standardises them itself)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        from sscxr.models.unetr import lung_probability

        return lung_probability(self.model(image))


def _export(graph: nn.Module, example: torch.Tensor, path: Path, outputs: list[str]) -> None:
    """Export with a dynamic batch; `example` must hold >= 2 images (torch.export specialises size 1)."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    tmp = path.with_suffix(".onnx.tmp")
    # The exporter prints its progress and onnx_ir logs each optimisation at INFO: keep them off the
    # user's terminal (errors still raise).
    quiet = logging.getLogger("onnx_ir")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            torch.onnx.export(
                graph.eval(), (example,), str(tmp), input_names=["image"], output_names=outputs,
                dynamic_shapes={"image": {0: batch}}, dynamo=True, opset_version=OPSET, verbose=False,
            )  # fmt: skip
    finally:
        quiet.setLevel(level)
    os.replace(tmp, path)


def _session(path: Path) -> Any:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _parity_images(
    inputs: Sequence[str | os.PathLike[str]], meta: dict[str, Any]
) -> tuple[torch.Tensor, str]:
    """(B, 1, S, S) images to compare the two runtimes on: the user's files framed as for prediction,
    else four synthetic radiographs of the built-in cohort."""
    from sscxr.evaluation.files import frame_image

    size = int(meta["img_size"])
    if inputs:
        from sscxr.data.io import read_xray
        from sscxr.evaluation.inputs import collect_inputs

        files = [src for src, _ in collect_inputs(inputs)]
        framed = torch.stack([frame_image(read_xray(f).image, meta) for f in files])
        return framed, f"{len(files)} given images"
    from sscxr.synthetic import SynthConfig, plan_cohort, render_job

    cfg = SynthConfig(n_adult=4, n_pediatric=0, size=size, seed=0)
    images = [render_job(cfg, job).image for job in plan_cohort(cfg)[:4]]
    return torch.from_numpy(np.stack(images)[:, None].astype(np.float32)), "4 synthetic radiographs"


def _max_diff(a: Sequence[np.ndarray], b: Sequence[np.ndarray]) -> float:
    diffs = [np.abs(np.asarray(x, np.float64) - np.asarray(y, np.float64)) for x, y in zip(a, b, strict=True)]
    return max(float(d.max()) for d in diffs)


def export_onnx(
    model: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    segmenter: str | os.PathLike[str] | None = None,
    parity_inputs: Sequence[str | os.PathLike[str]] = (),
) -> dict[str, Any]:
    """Export a classifier (run folder or bundle; with a bundle's segmenter, or `segmenter`) to ONNX.

    Args:
        model: a fine-tuning run folder, model.json or bundle.
        out_dir: where classifier.onnx (+ segmenter.onnx), their JSONs and export.json go.
        segmenter: a segmenter to export too (default: the bundle's, when it has one).
        parity_inputs: image files / folders to check parity on (default: synthetic radiographs).

    Returns:
        export.json's content: per graph, the file, max |PyTorch - ONNX Runtime|, tolerance and verdict.

    Raises:
        CheckpointError: a parity difference above `PARITY_TOLERANCE` (the files stay for inspection).
    """
    from sscxr.models.bundle import bundled_segmenter
    from sscxr.models.classifier import load_classifier
    from sscxr.models.unetr import load_segmenter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    clf, meta = load_classifier(model)
    images, source = _parity_images(parity_inputs, meta)
    report: dict[str, Any] = {
        "opset": OPSET,
        "tolerance": PARITY_TOLERANCE,
        "parity_inputs": source,
        "graphs": {},
    }
    graph = _ClassifierGraph(clf)
    _export(graph, images[:2], out / "classifier.onnx", ["logits", "probabilities"])
    atomic_write_json(out / "classifier.json", meta)
    with torch.no_grad():
        expected = [t.numpy() for t in graph(images)]
    got = _session(out / "classifier.onnx").run(None, {"image": images.numpy()})
    report["graphs"]["classifier"] = _verdict(
        "classifier.onnx", _max_diff(expected[1:], got[1:]), len(images)
    )
    segmenter = segmenter if segmenter is not None else bundled_segmenter(model)
    if segmenter is not None:
        seg = load_segmenter(segmenter)
        size = seg.spec.vit.img_size
        sgraph = _SegmenterGraph(seg.model.eval())
        x = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        _export(sgraph, x[:2], out / "segmenter.onnx", ["lung_probability"])
        atomic_write_json(out / "segmenter.json", seg.meta)
        with torch.no_grad():
            expected_seg = sgraph(x).numpy()
        got_seg = _session(out / "segmenter.onnx").run(None, {"image": x.numpy()})[0]
        report["graphs"]["segmenter"] = _verdict(
            "segmenter.onnx", _max_diff([expected_seg], [got_seg]), len(x)
        )
    atomic_write_json(out / "export.json", report)
    bad = {k: v for k, v in report["graphs"].items() if not v["ok"]}
    if bad:
        raise CheckpointError(
            f"ONNX parity failed for {', '.join(bad)}: max |PyTorch - ONNX Runtime| "
            f"{', '.join(format(v['max_abs_diff'], '.2e') for v in bad.values())} > {PARITY_TOLERANCE:g} "
            f"(see {out / 'export.json'}); do not use these graphs"
        )
    return report


def _verdict(file: str, diff: float, n: int) -> dict[str, Any]:
    return {"file": file, "max_abs_diff": diff, "n_images": n, "ok": diff <= PARITY_TOLERANCE}


class OnnxClassifier:
    """An exported classifier run by ONNX Runtime, called like the PyTorch model: (B, 1, S, S) float
    images in [0, 1] -> (B, C) logits.

    Args:
        folder: an `sscxr export --format onnx` output folder (classifier.onnx + classifier.json).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        folder = Path(folder)
        graph, meta_path = folder / "classifier.onnx", folder / "classifier.json"
        if not graph.is_file() or not meta_path.is_file():
            raise ConfigError(
                f"{folder}: --backend onnx needs the folder `sscxr export --format onnx` wrote "
                "(classifier.onnx + classifier.json)"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.session = _session(graph)

    def eval(self) -> OnnxClassifier:
        return self

    def to(self, device: Any) -> OnnxClassifier:
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.session.run(["logits"], {"image": x.detach().float().cpu().numpy()})[0]
        return torch.from_numpy(logits)
