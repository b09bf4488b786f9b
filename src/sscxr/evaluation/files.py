"""A trained classifier on image files: `sscxr predict` (probabilities, the decision, lung masks) and
`sscxr explain` (attention heat maps, the paper's Figure 4).

Inputs are files, folders (recursive) or manifests, DICOM or PNG/JPEG/TIFF (`collect_inputs`). Each
image is read with `read_xray`, framed the way the training cache framed its images (the model's `fit`
and input size, from model.json) and classified in batches. A file that cannot be read gets a row that
says why and the others go on. Rows name images by the path the user gave.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from sscxr.data.cache_format import fit_geometry, resize_to_cache
from sscxr.data.io import read_xray
from sscxr.engine.distributed import precision_autocast, resolve_device
from sscxr.errors import ConfigError, SSCXRError
from sscxr.evaluation.inputs import collect_inputs
from sscxr.evaluation.predict import logits_to_probs
from sscxr.models.attention import (
    attention_rollout,
    capture_attention,
    last_block_attention,
    patch_maps_to_image,
)
from sscxr.models.classifier import ViTClassifier
from sscxr.utils import atomic_write_bytes, atomic_write_json, atomic_write_text

__all__ = [
    "FileResult",
    "PredictOptions",
    "attention_maps",
    "attention_on_image",
    "decide_class",
    "decision_threshold",
    "explain_files",
    "frame_image",
    "predict_files",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PredictOptions:
    """How `predict_files` / `explain_files` run.

    Attributes:
        threshold: binary models: a name in model.json's `thresholds` or a number (P(positive) >= t);
            None = the model's "default". Ignored for 3+ classes (arg-max).
        batch_size: images per forward pass.
        device: "auto" | "cpu" | "cuda".
        precision: "auto" | "bf16" | "fp32" (as `sscxr evaluate`).
        progress: show a progress bar.
    """

    threshold: str | None = None
    batch_size: int = 16
    device: str = "auto"
    precision: str = "auto"
    progress: bool = True


@dataclass
class FileResult:
    """One input: its probabilities and decision, or why it could not be read.

    Attributes:
        input: the path as the user gave it (a folder input joined with the file's relative path).
        probs: (C,) probabilities, None when unreadable.
        predicted: the predicted class name ("" when unreadable).
        error: why the file was not classified ("" when it was).
        shape: (H, W) of the decoded image, (0, 0) when unreadable.
        extra: outputs written for this image (mask, heat map), by kind.
    """

    input: str
    probs: np.ndarray | None = None
    predicted: str = ""
    error: str = ""
    shape: tuple[int, int] = (0, 0)
    extra: dict[str, Any] = field(default_factory=dict)


def decision_threshold(meta: Mapping[str, Any], choice: str | None) -> float | None:
    """The probability threshold of the positive class, or None for arg-max (3+ classes).

    Args:
        meta: the classifier's model.json.
        choice: a name in `meta["thresholds"]`, a number in [0, 1], or None: the model's decision
            threshold (`decision_threshold` in model.json: a bundle's, chosen by an evaluation), else
            its "default".

    Raises:
        ConfigError: an unknown name or a number outside [0, 1].
    """
    if len(meta["class_names"]) != 2:
        return None
    thresholds = {str(k): float(v) for k, v in dict(meta.get("thresholds") or {"default": 0.5}).items()}
    name = _default_rule(meta) if choice is None else choice
    if name in thresholds:
        return thresholds[name]
    try:
        value = float(name)
    except ValueError:
        raise ConfigError(
            f"--threshold {name}: the model has the thresholds {sorted(thresholds)}; give one of them or a "
            "number in [0, 1]"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"--threshold {name}: a probability threshold must be in [0, 1]")
    return value


def frame_image(image: np.ndarray, meta: Mapping[str, Any]) -> torch.Tensor:
    """An image framed as the training cache framed its images, at the model's input size.

    Args:
        image: (H, W) float32 in [0, 1] (`read_xray`).
        meta: model.json (`img_size`, and `fit`: "stretch" or "pad"; older models: "stretch").

    Returns:
        (1, S, S) float32 in [0, 1].
    """
    return torch.from_numpy(resize_to_cache(image, int(meta["img_size"]), str(meta.get("fit", "stretch"))))[
        None
    ]


def _default_rule(meta: Mapping[str, Any]) -> str:
    return str(meta.get("decision_threshold", "default"))


def decide_class(probs: np.ndarray, class_names: Sequence[str], threshold: float | None) -> str:
    """The predicted class of (C,) probabilities: the positive class (index 1) when its probability
    reaches `threshold`, else the other; arg-max when `threshold` is None (3+ classes)."""
    if threshold is None:
        return str(class_names[int(np.argmax(probs))])
    return str(class_names[1] if probs[1] >= threshold else class_names[0])


@dataclass
class _Item:
    src: Path
    rel: Path
    image: np.ndarray | None = None
    error: str = ""


def _read_all(pairs: Sequence[tuple[Path, Path]]) -> Iterator[_Item]:
    """Each input decoded, or with the reason it could not be (a bad file never stops the others)."""
    for src, rel in pairs:
        try:
            yield _Item(src, rel, read_xray(src).image)
        except SSCXRError as e:
            log.warning("%s: skipped (%s)", src, e)
            yield _Item(src, rel, error=str(e))


def _chunks(items: Iterator[_Item], n: int) -> Iterator[list[_Item]]:
    chunk: list[_Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == n:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _run(
    model: ViTClassifier | Any,
    meta: Mapping[str, Any],
    inputs: Sequence[str | os.PathLike[str]],
    options: PredictOptions,
    suffix: str,
    desc: str,
    want_maps: bool,
) -> Iterator[tuple[list[_Item], np.ndarray | None, list[torch.Tensor] | None]]:
    """Batches of inputs (decoded or failed) with the probabilities (B', C) of the decoded ones and,
    with `want_maps`, every block's attention (`capture_attention`) for them."""
    dev = resolve_device(options.device)
    model = model.eval().to(dev)
    pairs = collect_inputs(inputs, suffix)
    bar = tqdm(total=len(pairs), disable=not options.progress, unit="img", desc=desc, dynamic_ncols=True)
    for chunk in _chunks(_read_all(pairs), options.batch_size):
        good = [it for it in chunk if it.image is not None]
        if not good:
            bar.update(len(chunk))
            yield chunk, None, None
            continue
        x = torch.stack([frame_image(it.image, meta) for it in good]).to(dev)  # type: ignore[arg-type]
        with torch.inference_mode(), precision_autocast(dev, options.precision):
            if want_maps:
                with capture_attention(model.encoder) as maps:
                    logits = model(x)
            else:
                logits, maps = model(x), None
        probs = logits_to_probs(logits, len(meta["class_names"])).cpu().double().numpy()
        bar.update(len(chunk))
        yield chunk, probs, maps
    bar.close()


def _result(
    item: _Item, probs: np.ndarray | None, meta: Mapping[str, Any], threshold: float | None
) -> FileResult:
    if probs is None or item.image is None:
        return FileResult(str(item.src), error=item.error)
    predicted = decide_class(probs, meta["class_names"], threshold)
    return FileResult(str(item.src), probs, predicted, shape=tuple(item.image.shape))


def predict_files(
    model: ViTClassifier | Any,
    meta: Mapping[str, Any],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: PredictOptions | None = None,
    segmenter: Any | None = None,
    postprocess: bool = False,
) -> list[FileResult]:
    """Classify every input image; write `predictions.csv` and `predictions.json` to `out_dir`.

    Args:
        model: a loaded classifier (`load_classifier`, or an `OnnxClassifier`); it takes [0, 1] images
            and standardises them.
        meta: its model.json.
        inputs: files, folders (recursive) and manifests (see `collect_inputs`).
        out_dir: output folder; with `segmenter`, lung masks go to `out_dir/masks/<rel>_mask.png`.
        options: threshold, batch size, device, precision, progress.
        segmenter: a loaded `Segmenter`, to also write each image's lung mask at its own size.
        postprocess: keep the mask's two largest components and fill holes.

    Returns:
        One `FileResult` per input, in input order (unreadable files included, with their reason).
    """
    from sscxr.evaluation.segmentation import mask_png, predict_mask

    o, out = options or PredictOptions(), Path(out_dir)
    threshold = decision_threshold(meta, o.threshold)
    results = []
    for chunk, probs, _ in _run(model, meta, inputs, o, "_mask.png", "predict", want_maps=False):
        k = 0
        for item in chunk:
            row_probs = None
            if item.image is not None and probs is not None:
                row_probs, k = probs[k], k + 1
            res = _result(item, row_probs, meta, threshold)
            if segmenter is not None and item.image is not None:
                mask = predict_mask(segmenter, item.image, postprocess)
                atomic_write_bytes(out / "masks" / item.rel, mask_png(mask))
                res.extra.update(mask=str(Path("masks") / item.rel), lung_fraction=float(mask.mean()))
            results.append(res)
    _write_tables(results, meta, threshold, out, o, "predictions")
    return results


def _write_tables(
    results: Sequence[FileResult],
    meta: Mapping[str, Any],
    threshold: float | None,
    out: Path,
    options: PredictOptions,
    name: str,
) -> None:
    """`<name>.csv` (a row per input: probabilities, decision, outputs, error) and `<name>.json`."""
    names = list(meta["class_names"])
    extra_keys = sorted({k for r in results for k in r.extra})
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["input", *(f"p_{n}" for n in names), "predicted", *extra_keys, "error"])
    for r in results:
        probs = [f"{p:.6f}" for p in r.probs] if r.probs is not None else [""] * len(names)
        extras = [_cell(r.extra.get(k, "")) for k in extra_keys]
        writer.writerow([r.input, *probs, r.predicted, *extras, r.error])
    atomic_write_text(out / f"{name}.csv", buf.getvalue())
    doc = {
        "model": {"task": meta.get("task"), "class_names": names, "img_size": meta["img_size"],
                  "fit": meta.get("fit", "stretch")},
        "decision": "argmax" if threshold is None else {"positive_class": names[1], "threshold": threshold,
                                                        "rule": options.threshold or _default_rule(meta)},
        "n_images": len(results), "n_unreadable": sum(bool(r.error) for r in results),
        "rows": [_json_row(r, names) for r in results],
    }  # fmt: skip
    atomic_write_json(out / f"{name}.json", doc)


def _json_row(r: FileResult, names: Sequence[str]) -> dict[str, Any]:
    probs = None if r.probs is None else {n: float(p) for n, p in zip(names, r.probs, strict=True)}
    return {"input": r.input, "probabilities": probs, "predicted": r.predicted or None, **r.extra,
            "error": r.error or None}  # fmt: skip


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else str(value)


def explain_files(
    model: ViTClassifier,
    meta: Mapping[str, Any],
    inputs: Sequence[str | os.PathLike[str]],
    out_dir: str | os.PathLike[str],
    options: PredictOptions | None = None,
    save_maps: bool = False,
) -> list[FileResult]:
    """Attention heat maps of every input image: the class token's attention in the last block (mean
    over heads) and attention rollout through all blocks, up-sampled to the image and overlaid, with
    the predicted class in the caption (`<rel>_heatmap.png`); `explain.csv` lists them.

    Args:
        model, meta, inputs, options: as `predict_files`.
        out_dir: output folder.
        save_maps: also write the two maps at the image's size as `<rel>_heatmap.npz` (float32 arrays
            `last_block`, `rollout` in [0, 1]; plain arrays, no pickle).

    Returns:
        One `FileResult` per input; `extra["heatmap"]` names the figure written.
    """
    from sscxr.viz.heatmap import heatmap_figure

    o, out = options or PredictOptions(), Path(out_dir)
    threshold = decision_threshold(meta, o.threshold)
    results = []
    for chunk, probs, maps in _run(model, meta, inputs, o, "_heatmap.png", "explain", want_maps=True):
        good = [item for item in chunk if item.image is not None]
        heats = attention_maps(maps, model, [it.image.shape for it in good], meta) if maps else []
        k = 0
        for item in chunk:
            if item.image is None or probs is None:
                results.append(_result(item, None, meta, threshold))
                continue
            res, heat = _result(item, probs[k], meta, threshold), heats[k]
            k += 1
            p = float(res.probs[list(meta["class_names"]).index(res.predicted)])  # type: ignore[index]
            caption = f"{item.src.name}: predicted {res.predicted} (p = {p:.2f})"
            heatmap_figure(item.image, heat, caption, out / item.rel)
            res.extra["heatmap"] = str(item.rel)
            if save_maps:
                buf = io.BytesIO()
                np.savez_compressed(buf, **heat)
                atomic_write_bytes((out / item.rel).with_suffix(".npz"), buf.getvalue())
            results.append(res)
    _write_tables(results, meta, threshold, out, o, "explain")
    return results


def attention_maps(
    maps: list[torch.Tensor], model: ViTClassifier, shapes: Sequence[tuple[int, int]], meta: Mapping[str, Any]
) -> list[dict[str, np.ndarray]]:
    """The heat maps of a batch: per image, "last_block" (the class token's attention in the last block,
    mean over heads) and "rollout", each (H, W) in [0, 1] over the image at its own size.

    Args:
        maps: `capture_attention`'s list for one forward of the batch.
        model: the classifier that ran (its encoder's patch grid and prefix tokens).
        shapes: (H, W) of each image of the batch, in batch order.
        meta: its model.json (input size and framing).
    """
    grid = tuple(model.encoder.patch_embed.grid_size)
    prefix = int(model.encoder.num_prefix_tokens)
    weights = {
        "last_block": last_block_attention(maps, prefix).cpu(),
        "rollout": attention_rollout(maps, prefix).cpu(),
    }
    return [
        {name: attention_on_image(w[k : k + 1], grid, shape, meta) for name, w in weights.items()}
        for k, shape in enumerate(shapes)
    ]


def attention_on_image(
    weights: torch.Tensor, grid: tuple[int, int], shape: tuple[int, int], meta: Mapping[str, Any]
) -> np.ndarray:
    """(1, N) patch weights as an (H, W) map in [0, 1] over the original image (letterbox removed)."""
    size = int(meta["img_size"])
    framed = patch_maps_to_image(weights, grid, (size, size))[0]
    h, w, top, left = fit_geometry(shape, size, str(meta.get("fit", "stretch")))
    inner = framed[top : top + h, left : left + w][None, None]
    return torch.nn.functional.interpolate(inner, size=shape, mode="bilinear", align_corners=False)[
        0, 0
    ].numpy()
