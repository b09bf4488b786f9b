"""`sscxr evaluate`'s engine: every model on every named test set, thresholds frozen on validation first.

The order is the guarantee: (1) each model's threshold is chosen on the validation split (or taken
from the model / the command line), (2) only then are the test sets predicted, with that threshold
fixed. A validation split that shares rows with a test set is refused.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sscxr import __version__
from sscxr.data.cache import ImageCache
from sscxr.data.near_duplicates import require_no_leakage, unchecked_message
from sscxr.errors import DataError
from sscxr.evaluation.classification import (
    ThresholdChoice,
    ThresholdRule,
    choose_threshold,
    evaluate_arrays,
)
from sscxr.evaluation.guards import check_operating_point
from sscxr.evaluation.predict import (
    Model,
    SplitSpec,
    class_targets,
    label_map_of,
    open_split,
    predict,
    write_predictions,
)
from sscxr.metrics import predict as predict_classes
from sscxr.utils import display_path

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "EvalOptions",
    "ModelSpec",
    "TestSpec",
    "evaluate_models",
    "operating_point_flags",
    "slug",
]

log = logging.getLogger(__name__)

FORMAT = "sscxr-evaluation"
FORMAT_VERSION = 1


@dataclass
class ModelSpec:
    """A loaded model to evaluate: ``model(x: (B, 1, S, S)) -> logits (B, C)`` and its model.json."""

    name: str
    model: Model
    meta: dict[str, Any]
    run_dir: Path | None = None
    config_text: str | None = None  # the run's config.yaml, for the report's provenance


@dataclass(frozen=True)
class TestSpec:
    """A named test set ("training distribution", "unseen sites", ...): rows of a cache."""

    __test__ = False  # not a pytest test class, despite the name

    name: str
    split: SplitSpec


@dataclass
class EvalOptions:
    """Everything `evaluate_models` needs besides the models and the data."""

    threshold: ThresholdRule = field(default_factory=ThresholdRule)
    n_boot: int = 1000
    alpha: float = 0.05
    seed: int = 0
    n_bins: int = 15
    batch_size: int = 64
    device: str | None = None
    precision: str = "auto"
    progress: bool = True
    # A patient in two splits of a test cache, or near-duplicate images of different patients in two of
    # its splits: warn (flag) instead of refusing.
    allow_leakage: bool = False


def slug(name: str) -> str:
    """A file-name-safe version of a model or test-set name."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "unnamed"


def task_name(meta: Mapping[str, Any]) -> str:
    """The task's name from model.json ("task" as a string or a dict with "name"), else its classes."""
    task = meta.get("task")
    if isinstance(task, Mapping):
        task = task.get("name")
    return str(task) if task else " vs ".join(str(c) for c in meta["class_names"])


def _split_info(spec: SplitSpec, cache: ImageCache, idx: np.ndarray) -> dict[str, Any]:
    """Where a split comes from and its images / patients per manifest label (task-independent)."""
    rows = [cache.rows[int(i)] for i in idx]
    labels: dict[str, dict[str, Any]] = {}
    for r in rows:
        entry = labels.setdefault(r.label or "(unlabelled)", {"images": 0, "patients": set()})
        entry["images"] += 1
        entry["patients"].add(r.patient_id or r.path)
    return {
        "cache": display_path(cache.root),
        "splits": list(spec.splits),
        "manifest_hash": cache.index.get("manifest_hash"),
        "manifest_path": display_path(cache.manifest_path) if cache.index.get("manifest_path") else None,
        "n_images": int(idx.size),
        "n_patients": len({r.patient_id or r.path for r in rows}),
        "labels": {
            k: {"images": v["images"], "patients": len(v["patients"])} for k, v in sorted(labels.items())
        },
    }


def _check_disjoint(
    val: tuple[ImageCache, np.ndarray], tests: Mapping[str, tuple[ImageCache, np.ndarray]]
) -> None:
    """Refuse a validation split that shares images with a test set (the threshold would see the test)."""
    vcache, vidx = val
    for name, (cache, idx) in tests.items():
        if cache.root == vcache.root and np.intersect1d(idx, vidx).size:
            raise DataError(
                f"{cache.root}: the validation split shares {np.intersect1d(idx, vidx).size} images with "
                f"test set {name!r}; thresholds must be chosen on data disjoint from every test set."
            )


def _predict(
    m: ModelSpec, cache: ImageCache, indices: np.ndarray, opts: EvalOptions, where: str
) -> np.ndarray:
    """`m`'s class probabilities of the cache rows `indices` (progress bar: "<model> @ <where>")."""
    return predict(
        m.model,
        m.meta,
        cache,
        indices,
        opts.batch_size,
        opts.device,
        opts.precision,
        opts.progress,
        desc=f"{m.name} @ {where}",
    )


def _choose(
    m: ModelSpec, val: tuple[SplitSpec, ImageCache, np.ndarray] | None, opts: EvalOptions
) -> ThresholdChoice:
    """The model's frozen threshold; reads the validation split only when the rule needs it."""
    names = list(m.meta["class_names"])
    stored = m.meta.get("thresholds")
    if not (opts.threshold.needs_validation and len(names) == 2 and val is not None):
        return choose_threshold(opts.threshold, names, stored)
    spec, cache, idx = val
    t = class_targets(cache, idx, label_map_of(m.meta))
    p = _predict(m, cache, t.indices, opts, "validation")
    return choose_threshold(opts.threshold, names, stored, t.y, p, val_name=f"validation {spec}")


def operating_point_flags(result: Mapping[str, Any]) -> list[dict[str, str]]:
    """`check_operating_point` on a binary result's positive class (multi-class: arg-max, never flagged)."""
    names = result["class_names"]
    if len(names) != 2 or result.get("threshold") is None:
        return []
    value = {m["metric"]: m["value"] for m in result["metrics"] if m["class"] == names[1]}
    return [f.to_dict() for f in check_operating_point(value.get("sensitivity"), value.get("specificity"))]


def _model_info(m: ModelSpec, choice: ThresholdChoice) -> dict[str, Any]:
    names = list(m.meta["class_names"])
    return {
        "run_dir": None if m.run_dir is None else str(m.run_dir),
        "task": task_name(m.meta),
        "class_names": names,
        "positive_class": names[1] if len(names) == 2 else None,
        "command": m.meta.get("command"),
        "manifest_hash": m.meta.get("manifest_hash"),
        "config": m.meta,
        "config_yaml": m.config_text,
        "threshold": asdict(choice),
        # What `sscxr finetune` flagged about the training run (model.json "flags"), for the report.
        "training_flags": list(m.meta.get("flags") or []),
    }


def _evaluate_pair(
    m: ModelSpec,
    choice: ThresholdChoice,
    test: str,
    data: tuple[ImageCache, np.ndarray],
    opts: EvalOptions,
    out_dir: Path,
) -> dict[str, Any]:
    """One model on one test set: predict, save the predictions CSV, compute every metric."""
    cache, idx = data
    names = list(m.meta["class_names"])
    t = class_targets(cache, idx, label_map_of(m.meta))
    if t.excluded:
        log.info(
            "%s on %s: left out %d images whose label the task does not use: %s",
            m.name,
            test,
            sum(t.excluded.values()),
            t.excluded,
        )
    start = time.perf_counter()
    probs = _predict(m, cache, t.indices, opts, test)
    seconds = time.perf_counter() - start
    rel = Path("predictions") / f"{slug(m.name)}__{slug(test)}.csv"
    write_predictions(out_dir / rel, cache, t, probs, names, predict_classes(probs, choice.value))
    result = evaluate_arrays(
        t.y, probs, t.patients, names, choice.value, opts.n_boot, opts.alpha, opts.seed, opts.n_bins
    )
    flags = operating_point_flags(result)
    for f in flags:
        log.warning("%s on %s (threshold %s): %s", m.name, test, choice.value, f["message"])
    return {
        "model": m.name,
        "test_set": test,
        "task": task_name(m.meta),
        **result,
        "excluded": t.excluded,
        "n_excluded": int(sum(t.excluded.values())),
        "predictions_csv": str(rel),
        "seconds": round(seconds, 4),
        "images_per_s": round(t.indices.size / max(seconds, 1e-9), 2),
        "flags": flags,
    }


def evaluate_models(
    models: Sequence[ModelSpec],
    tests: Sequence[TestSpec],
    val: SplitSpec | None,
    options: EvalOptions,
    out_dir: str | Path,
    command: str = "",
    run_name: str | None = None,
) -> dict[str, Any]:
    """Run every model on every test set; return the metrics.json document (predictions CSVs are written).

    Args:
        models: loaded models with their model.json.
        tests: named test sets.
        val: the validation split thresholds are chosen on (needed for youden / sensitivity rules).
        options: threshold rule, bootstrap and inference settings.
        out_dir: report folder (predictions go to ``out_dir/predictions``).
        command: the command line, recorded for provenance.
        run_name: label of this evaluation in cross-run summaries (default: the folder's name).
    """
    out = Path(out_dir)
    if len({m.name for m in models}) != len(models) or len({t.name for t in tests}) != len(tests):
        raise DataError("model names and test-set names must be unique (NAME=... in --model / --test)")
    opened = {t.name: open_split(t.split) for t in tests}
    leaks = {
        name: require_no_leakage(cache, options.allow_leakage, "pass --allow-leakage")
        for name, (cache, _) in opened.items()
    }
    val_data = None
    if val is not None:
        vcache, vidx = open_split(val)
        _check_disjoint((vcache, vidx), opened)
        val_data = (val, vcache, vidx)
    # Step 1, for every model: freeze the threshold before any test image is predicted.
    choices = {m.name: _choose(m, val_data, options) for m in models}
    results = [
        _evaluate_pair(m, choices[m.name], t.name, opened[t.name], options, out)
        for m in models
        for t in tests
    ]
    for r in results:  # allowed leaks are reported with every result they may inflate
        r["flags"] += [{"code": "leakage", "message": text} for text in leaks[r["test_set"]]]
        cache = opened[r["test_set"]][0]
        if not cache.has_hashes:  # an older cache: its near-duplicates went unchecked
            r["flags"].append({"code": "near-duplicates-unchecked", "message": unchecked_message(cache)})
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "sscxr_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "run": run_name or out.resolve().name,
        "command": command,
        "options": {**asdict(options), "threshold": str(options.threshold)},
        "validation": None if val_data is None else _split_info(*val_data),
        "models": {m.name: _model_info(m, choices[m.name]) for m in models},
        "test_sets": {t.name: _split_info(t.split, *opened[t.name]) for t in tests},
        "results": results,
    }
