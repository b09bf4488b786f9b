"""Gathering a study's results: the predictions files of every row, fraction, draw and test set (from
`sscxr probe`'s probe.json and `sscxr evaluate`'s metrics.json), the flags the commands raised, and
the comparisons (`aggregate.compare_rows`) the report shows."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sscxr.study.aggregate import Comparison, Predictions, compare_rows, read_predictions
from sscxr.study.run import Layout, finetuned_rows, row_name
from sscxr.study.spec import StudySpec

__all__ = ["Cell", "StudyResults", "collect", "resolve_references", "row_kind"]

log = logging.getLogger(__name__)


@dataclass
class Cell:
    """One (task, fraction, test set): the comparison of every row that has predictions there."""

    task: str
    fraction: float
    test: str
    comparison: Comparison | None
    missing: list[str] = field(default_factory=list)  # rows without predictions (not run yet)


@dataclass
class StudyResults:
    """Everything the report needs."""

    cells: list[Cell]
    flags: dict[str, list[dict[str, str]]]  # row -> flags raised by its runs (with where)
    rows: dict[str, dict[str, str]]  # row -> {"start", "mode"}
    class_names: dict[str, tuple[str, ...]]  # task -> class names
    counts: dict[str, Any] = field(default_factory=dict)  # task -> labelled images per fraction


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None


def row_kind(name: str, start: str, mode: str) -> str:
    """ "reference" (pixels, random encoder), "probe" (frozen pre-trained encoder) or "finetune"."""
    if start in ("pixels", "random"):
        return "reference"
    return "probe" if mode in ("linear", "knn") else "finetune"


def _add_flags(flags: dict[str, list[dict[str, str]]], row: str, raised: Any, where: str) -> None:
    for f in raised or []:
        entry = {"code": str(f.get("code", "")), "message": str(f.get("message", "")), "where": where}
        if entry not in flags.setdefault(row, []):
            flags[row].append(entry)


def _probe_files(spec: StudySpec, layout: Layout, task: str, files: dict, rows: dict, flags: dict) -> None:
    doc = _read_json(layout.probe(task) / "probe.json")
    if doc is None:
        return
    base = layout.probe(task)
    for f in doc.get("flags", []):
        _add_flags(flags, f.get("row", "probe"), [f], "probe")
    for r in doc.get("rows", []):
        name = r["name"]
        rows.setdefault(name, {"start": str(r.get("start", "")), "mode": str(r.get("kind", ""))})
        _add_flags(flags, name, r.get("flags"), f"probe, {r['fraction']:g}, draw {r['seed']}")
        for test, rel in (r.get("predictions") or {}).items():
            if test == "val":
                continue
            key = (float(r["fraction"]), test)
            files.setdefault(key, {}).setdefault(name, {})[int(r["seed"])] = base / rel


def _finetune_files(spec: StudySpec, layout: Layout, task: str, files: dict, rows: dict, flags: dict) -> None:
    for start, mode in finetuned_rows(spec):
        rows.setdefault(row_name(start, mode), {"start": start, "mode": mode})
    for fraction in spec.fractions:
        for seed in spec.seeds_for(fraction):
            for start, mode in finetuned_rows(spec):
                meta = _read_json(layout.finetune(task, start, mode, fraction, seed) / "model.json")
                if meta:
                    where = f"fine-tuning, {fraction:g}, draw {seed}"
                    _add_flags(flags, row_name(start, mode), meta.get("flags"), where)
            ev_dir = layout.evaluate(task, fraction, seed)
            doc = _read_json(ev_dir / "metrics.json")
            if doc is None:
                continue
            for res in doc["results"]:
                name, test = res["model"], res["test_set"]
                _add_flags(flags, name, res.get("flags"), f"evaluate, {test}, {fraction:g}, draw {seed}")
                files.setdefault((fraction, test), {}).setdefault(name, {})[seed] = (
                    ev_dir / res["predictions_csv"]
                )


def collect(spec: StudySpec, out: Path, n_boot: int | None = None) -> StudyResults:
    """Read every finished part of the study under `out` and compare the rows of each cell.

    Parts still missing are listed per cell, not fatal: a report can be written mid-way.
    """
    layout = Layout(out)
    cells: list[Cell] = []
    flags: dict[str, list[dict[str, str]]] = {}
    rows: dict[str, dict[str, str]] = {}
    class_names: dict[str, tuple[str, ...]] = {}
    for task in spec.tasks:
        files: dict[tuple[float, str], dict[str, dict[int, Path]]] = {}
        if spec.probe.enabled:
            _probe_files(spec, layout, task, files, rows, flags)
        if spec.finetune.enabled:
            _finetune_files(spec, layout, task, files, rows, flags)
        for fraction in spec.fractions:
            seeds = set(spec.seeds_for(fraction))
            for test in spec.tests:
                found = files.get((fraction, test), {})
                preds: dict[str, dict[int, Predictions]] = {
                    row: {s: read_predictions(p) for s, p in by_seed.items() if s in seeds}
                    for row, by_seed in found.items()
                }
                preds = {r: v for r, v in preds.items() if v}
                missing = [r for r in rows if r not in preds and _expected(spec, r, rows)]
                comparison = None
                if preds:
                    first = next(iter(next(iter(preds.values())).values()))
                    class_names[task] = first.class_names
                    refs = resolve_references(spec.compare_to, rows)
                    comparison = compare_rows(preds, refs, n_boot=n_boot or spec.n_boot, seed=spec.seed)
                cells.append(Cell(task, fraction, test, comparison, missing))
    return StudyResults(cells, flags, rows, class_names)


def resolve_references(names: list[str], rows: dict[str, dict[str, str]]) -> list[str]:
    """Row names of the references: a row's own name, or "START MODE" (e.g. "pixels linear" is the
    pixel row whatever its size)."""
    out = []
    for ref in names:
        hits = [r for r, info in rows.items() if ref in (r, f"{info['start']} {info['mode']}")]
        out += hits[:1]
    return out


def _expected(spec: StudySpec, row: str, rows: dict[str, dict[str, str]]) -> bool:
    kind = row_kind(row, rows[row]["start"], rows[row]["mode"])
    return spec.finetune.enabled if kind == "finetune" else spec.probe.enabled
