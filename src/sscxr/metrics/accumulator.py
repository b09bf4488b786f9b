"""Metric accumulators (``update`` / ``compute`` / ``reset``) that gather across ranks without duplicates.

Every record carries its dataset sample index. Under ``torch.distributed`` each rank's records are
gathered with ``all_gather_object`` and de-duplicated by index, so a sampler that pads its last shard
(repeating samples to even out ranks) cannot count an image twice. ``compute`` is therefore a
collective call: every rank must call it.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from sscxr.metrics.classification import ClassificationResult, MetricValue, classification_metrics
from sscxr.metrics.segmentation import SEG_METRICS, Summary, segmentation_metrics, summarize

log = logging.getLogger(__name__)


def _numpy(x: Any) -> np.ndarray:
    """Tensor / array / list -> numpy on the CPU (float tensors in bf16/fp16 upcast to float32)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        if x.is_floating_point() and x.dtype != torch.float64:
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def _dedupe(indices: np.ndarray) -> np.ndarray:
    """Positions of the first occurrence of each index, sorted by index."""
    _, first = np.unique(indices, return_index=True)
    return first


class Accumulator(ABC):
    """Collects per-sample records keyed by sample index; subclasses say what a record holds."""

    def __init__(self) -> None:
        self._indices: list[np.ndarray] = []
        self._records: list[list[Any]] = []

    def reset(self) -> None:
        """Forget everything (call at the start of each evaluation)."""
        self._indices, self._records = [], []

    def _add(self, indices: Any, records: Sequence[Any]) -> None:
        idx = _numpy(indices).astype(np.int64).reshape(-1)
        if idx.size != len(records):
            raise ValueError(f"{idx.size} indices for {len(records)} records")
        self._indices.append(idx)
        self._records.append(list(records))

    def gathered(self) -> tuple[np.ndarray, list[Any]]:
        """All ranks' (indices, records), de-duplicated by index and sorted by it. Collective."""
        idx = np.concatenate(self._indices) if self._indices else np.zeros(0, np.int64)
        recs = [r for chunk in self._records for r in chunk]
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, (idx, recs))
            idx = np.concatenate([p[0] for p in parts])
            recs = [r for p in parts for r in p[1]]
        keep = _dedupe(idx)
        if keep.size < idx.size:
            log.debug("dropped %d duplicate samples (padded shards)", idx.size - keep.size)
        return idx[keep], [recs[i] for i in keep]

    def __len__(self) -> int:
        """Records held locally (before gathering and de-duplication)."""
        return sum(i.size for i in self._indices)

    @abstractmethod
    def compute(self) -> Any:
        """The metrics over every rank's records (collective)."""


class ClassificationAccumulator(Accumulator):
    """Stores labels, class probabilities and patient ids; computes `classification_metrics`.

    Args:
        class_names: the C class names.
        threshold: binary tasks: predict class 1 when P(class 1) >= threshold (None = arg-max).
    """

    def __init__(self, class_names: Sequence[str], threshold: float | None = None) -> None:
        super().__init__()
        if len(class_names) < 2:
            raise ValueError(f"need at least 2 classes, got {list(class_names)}")
        self.class_names = tuple(class_names)
        self.threshold = threshold

    def update(
        self, indices: Any, labels: Any, scores: Any, patient_ids: Sequence[Any] | None = None
    ) -> None:
        """Add a batch.

        Args:
            indices: (B,) dataset sample indices.
            labels: (B,) class indices, -1 = unknown.
            scores: (B, C) probabilities (softmax already applied).
            patient_ids: B patient ids (None: each sample its own patient, id = its index).
        """
        idx = _numpy(indices).reshape(-1)
        y, s = _numpy(labels).reshape(-1), _numpy(scores)
        if s.shape != (idx.size, len(self.class_names)) or y.size != idx.size:
            raise ValueError(
                f"batch of {idx.size}: labels {y.shape}, scores {s.shape} (want C={len(self.class_names)})"
            )
        pids = list(patient_ids) if patient_ids is not None else [int(i) for i in idx]
        self._add(idx, [(y[i], s[i], pids[i]) for i in range(idx.size)])

    def arrays(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Gathered (indices (N,), labels (N,), scores (N, C), patient ids (N,) object). Collective."""
        idx, recs = self.gathered()
        c = len(self.class_names)
        if not recs:
            return idx, np.zeros(0, np.int64), np.zeros((0, c)), np.zeros(0, object)
        labels = np.array([r[0] for r in recs])
        scores = np.stack([r[1] for r in recs]).astype(np.float64)
        pids = np.empty(len(recs), dtype=object)
        pids[:] = [r[2] for r in recs]
        return idx, labels, scores, pids

    def compute(self) -> ClassificationResult:
        """`classification_metrics` over all ranks' samples. Collective."""
        _, labels, scores, _ = self.arrays()
        return classification_metrics(labels, scores, self.class_names, self.threshold)


class SegmentationAccumulator(Accumulator):
    """Computes `segmentation_metrics` per image at ``update`` and keeps the per-image dicts."""

    def update(
        self,
        indices: Any,
        preds: Any,
        targets: Any,
        spacings: Sequence[tuple[float, float] | None] | None = None,
        patient_ids: Sequence[Any] | None = None,
    ) -> None:
        """Add a batch.

        Args:
            indices: (B,) dataset sample indices.
            preds: (B, H, W) or (B, 1, H, W) binary masks (bool, or probabilities thresholded at 0.5).
            targets: same shape as preds.
            spacings: per image (row, column) mm spacing of the mask grid, or None.
            patient_ids: B patient ids (None: the sample index).
        """
        idx = _numpy(indices).reshape(-1)
        p, g = _numpy(preds), _numpy(targets)
        p = (p > 0.5) if p.dtype != bool else p
        g = (g > 0.5) if g.dtype != bool else g
        p, g = p.reshape(idx.size, *p.shape[-2:]), g.reshape(idx.size, *g.shape[-2:])
        sp = list(spacings) if spacings is not None else [None] * idx.size
        pids = list(patient_ids) if patient_ids is not None else [int(i) for i in idx]
        recs = [(segmentation_metrics(p[i], g[i], sp[i]), pids[i]) for i in range(idx.size)]
        self._add(idx, recs)

    def records(self) -> tuple[np.ndarray, list[dict[str, MetricValue]], list[Any]]:
        """Gathered (indices, per-image metric dicts, patient ids). Collective."""
        idx, recs = self.gathered()
        return idx, [r[0] for r in recs], [r[1] for r in recs]

    def compute(self, n_boot: int = 0, seed: int = 0) -> dict[str, Summary]:
        """Per-metric `Summary` (mean of defined values, count of undefined, optional CI). Collective.

        Args:
            n_boot: patient-level bootstrap resamples for the CIs (0 = none, e.g. during training).
            seed: bootstrap seed.
        """
        _, per_image, pids = self.records()
        groups = np.empty(len(pids), dtype=object)
        groups[:] = pids
        return {k: summarize([m[k] for m in per_image], groups, n_boot, seed=seed) for k in SEG_METRICS}
