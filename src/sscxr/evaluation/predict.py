"""Inference for evaluation: which rows a model's task uses, batched prediction, predictions CSV.

Prediction is kept apart from metrics: `predict` turns cache rows into class probabilities, and
everything downstream (`sscxr.evaluation.classification`, `sscxr.reports`) works on arrays.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from sscxr.data.cache import ImageCache
from sscxr.engine.distributed import precision_autocast, resolve_device
from sscxr.errors import ConfigError, DataError
from sscxr.utils import atomic_write_text

__all__ = [
    "SplitSpec",
    "Targets",
    "class_targets",
    "label_map_of",
    "logits_to_probs",
    "open_split",
    "parse_split_spec",
    "predict",
    "resolve_device",
    "write_predictions",
]

log = logging.getLogger(__name__)

Model = Callable[[torch.Tensor], torch.Tensor]
_MAX = 65535.0
# Key names under which model.json may hold the manifest-label -> class-index mapping.
_LABEL_MAP_KEYS = ("label_map", "label_mapping", "labels")


@dataclass(frozen=True)
class SplitSpec:
    """Rows of a cache to evaluate on: ``CACHE_DIR:SPLIT[,SPLIT...]`` (``*`` = every decoded row)."""

    cache_dir: Path
    splits: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.cache_dir}:{','.join(self.splits)}"


def parse_split_spec(text: str) -> SplitSpec:
    """Parse ``CACHE_DIR:SPLIT`` (split names separated by commas; ``*`` or ``all`` for all rows).

    Raises:
        ConfigError: no ``:SPLIT`` part (a split must be named so a test never silently includes train).
    """
    cache, sep, splits = text.rpartition(":")
    if not sep or not cache or not splits:
        raise ConfigError(
            f"{text!r}: expected CACHE_DIR:SPLIT (e.g. cache/covidx:test, or cache/x:* for all rows)"
        )
    names = tuple(s.strip() for s in splits.split(",") if s.strip())
    return SplitSpec(Path(cache), names)


def open_split(spec: SplitSpec) -> tuple[ImageCache, np.ndarray]:
    """Open the cache and select the decoded rows of the split(s).

    Raises:
        DataError: no such cache, or the split selects no rows (the message lists the splits present).
    """
    cache = ImageCache.open(spec.cache_dir)
    # "*" and "all" both mean every row, as in `sscxr segment evaluate`.
    idx = cache.indices() if spec.splits in (("*",), ("all",)) else cache.indices(split=spec.splits)
    if idx.size == 0:
        present = sorted({r.split for r in cache.rows})
        raise DataError(
            f"{cache.root}: split {','.join(spec.splits)!r} selects no decoded rows; "
            f"splits present: {present}. Name one of them (or '*' for all rows)."
        )
    return cache, idx


def label_map_of(meta: Mapping[str, Any]) -> dict[str, int]:
    """The model's manifest-label -> class-index mapping (model.json), or class name -> index if absent."""
    for key in _LABEL_MAP_KEYS:
        value = meta.get(key)
        if isinstance(value, Mapping):
            return {str(k): int(v) for k, v in value.items()}
    return {str(name): k for k, name in enumerate(meta["class_names"])}


@dataclass(frozen=True)
class Targets:
    """The rows of a split that a task uses, with their class indices.

    Attributes:
        indices: (N,) cache rows kept, in row order.
        y: (N,) int64 class index of each kept row.
        patients: (N,) object patient ids (the path when a row has none: then it is its own patient).
        excluded: manifest label -> number of rows left out because the task does not use that label.
    """

    indices: np.ndarray
    y: np.ndarray
    patients: np.ndarray
    excluded: dict[str, int]


def class_targets(cache: ImageCache, indices: np.ndarray, label_map: Mapping[str, int]) -> Targets:
    """Keep the rows whose manifest label the task maps to a class; count the others by label."""
    rows = [cache.rows[int(i)] for i in indices]
    keep = np.array([r.label in label_map for r in rows], dtype=bool)
    excluded = Counter(r.label or "(unlabelled)" for r, k in zip(rows, keep, strict=True) if not k)
    kept = [r for r, k in zip(rows, keep, strict=True) if k]
    return Targets(
        indices=np.asarray(indices, dtype=np.int64)[keep],
        y=np.array([label_map[r.label] for r in kept], dtype=np.int64),
        patients=np.array([r.patient_id or r.path for r in kept], dtype=object),
        excluded=dict(sorted(excluded.items())),
    )


def _batches(
    cache: ImageCache, indices: np.ndarray, batch_size: int, norm: tuple[float, float] | None
) -> Iterator[torch.Tensor]:
    """(B, 1, S, S) float32 batches read straight from the memmap: [0, 1], or standardised with ``norm``."""
    for start in range(0, indices.size, batch_size):
        raw = cache.images[indices[start : start + batch_size]]
        x = torch.from_numpy(raw.astype(np.float32)) / _MAX
        yield (x if norm is None else (x - norm[0]) / norm[1])[:, None]


def logits_to_probs(logits: torch.Tensor, n_classes: int) -> torch.Tensor:
    """Softmax of (B, C) logits; a single logit column is read as P(class 1) through a sigmoid."""
    logits = logits.float()
    if logits.ndim != 2 or logits.shape[1] not in (1, n_classes):
        raise ValueError(f"model returned logits of shape {tuple(logits.shape)}; expected (B, {n_classes})")
    if logits.shape[1] == 1 and n_classes == 2:
        p1 = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p1, p1], dim=1)
    return torch.softmax(logits, dim=1)


def _normalization(model: Model, meta: Mapping[str, Any]) -> tuple[float, float] | None:
    """The standardisation to apply before the model, or None when the model applies its own.

    `ViTClassifier` standardises inside `forward` (its ``norm_mean`` / ``norm_std`` buffers) and takes
    [0, 1] images; any other callable gets images standardised with model.json's normalization.
    """
    if hasattr(model, "norm_mean") and hasattr(model, "standardize"):
        return None
    norm = meta.get("normalization")
    if not isinstance(norm, Mapping) or "mean" not in norm or "std" not in norm:
        raise ConfigError(
            "model.json has no normalization {mean, std}; the classifier must remember the intensity "
            "statistics it was trained with (re-export it with `sscxr finetune`)."
        )
    return float(norm["mean"]), float(norm["std"])


def predict(
    model: Model,
    meta: Mapping[str, Any],
    cache: ImageCache,
    indices: np.ndarray | Sequence[int],
    batch_size: int = 64,
    device: str | torch.device | None = None,
    precision: str = "auto",
    progress: bool = True,
    desc: str = "predict",
) -> np.ndarray:
    """Class probabilities of cache rows.

    Args:
        model: ``model(x: (B, 1, S, S)) -> logits (B, C)``; a `ViTClassifier` gets [0, 1] images (it
            standardises them itself), any other callable images standardised with ``meta``'s
            normalization. An nn.Module is put in eval mode and on ``device``.
        meta: model.json contents: ``class_names``, ``normalization`` {mean, std}, optional ``img_size``.
        cache: an opened `ImageCache`.
        indices: (N,) cache rows.
        batch_size: images per forward pass.
        device: "auto" / None (CUDA if present), "cpu", "cuda", ...
        precision: "auto" | "bf16" | "fp16" | "fp32" (`precision_autocast`: the training policy).
        progress: show a tqdm bar.
    Returns:
        (N, C) float64 probabilities, rows in ``indices`` order.
    """
    idx = np.asarray(indices, dtype=np.int64)
    n_classes, norm, dev = len(meta["class_names"]), _normalization(model, meta), resolve_device(device)
    size = int(meta.get("img_size") or cache.size)
    if size != cache.size:
        log.warning(
            "%s: cache images are %d px, the model expects %d px: resizing", cache.root, cache.size, size
        )
    if isinstance(model, torch.nn.Module):
        model = model.eval().to(dev)
    out = np.empty((idx.size, n_classes), dtype=np.float64)
    start, done = time.perf_counter(), 0
    bar = tqdm(total=idx.size, disable=not progress, unit="img", desc=desc, dynamic_ncols=True, leave=False)
    with torch.inference_mode(), precision_autocast(dev, precision):
        for x in _batches(cache, idx, batch_size, norm):
            x = x.to(dev, non_blocking=True)
            if size != cache.size:
                x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[done : done + len(x)] = logits_to_probs(model(x), n_classes).cpu().double().numpy()
            done += len(x)
            bar.update(len(x))
    bar.close()
    seconds = time.perf_counter() - start
    log.info("%s: %d images in %.2f s (%.1f img/s)", desc, idx.size, seconds, idx.size / max(seconds, 1e-9))
    return out


def write_predictions(
    path: str | os.PathLike[str],
    cache: ImageCache,
    targets: Targets,
    probs: np.ndarray,
    class_names: Sequence[str],
    pred: np.ndarray,
) -> Path:
    """Write one row per image: index, path, patient, label, class, p_<class>..., pred (atomically)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["index", "path", "patient", "label", "class", *[f"p_{c}" for c in class_names], "pred"])
    for k, i in enumerate(targets.indices):
        row = cache.rows[int(i)]
        cls = class_names[int(targets.y[k])]
        probs_k = [f"{p:.6f}" for p in probs[k]]
        writer.writerow(
            [int(i), row.path, targets.patients[k], row.label, cls, *probs_k, class_names[pred[k]]]
        )
    atomic_write_text(path, buf.getvalue())
    return Path(path)
