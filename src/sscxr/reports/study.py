"""The report of a study (`sscxr study`): which encoder start, at which label fraction, beats which
baseline, by how much, with what confidence.

Order of the report: the headline tables (AUC-ROC per row with its two-level interval and the paired
differences to the references, reference rows first), a plot of AUC-ROC against the label fraction,
the flags raised by the runs, then the paper-shaped tables (Tables 1-4 of SS-CXR: Sens, Spec, FPR,
FNR, AUC-PR, AUC-ROC, ACC per test set; Table 6: ACC and specificity), and how the numbers were made.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure as MplFigure

from sscxr.metrics import CLASSIFICATION_METRICS
from sscxr.reports.classification import mapping_note
from sscxr.reports.document import Block, Code, Figure, Heading, Items, Text, to_markdown
from sscxr.reports.html import to_html
from sscxr.reports.plots import figure_png
from sscxr.reports.tables import NOT_RUN, Table, paper_columns
from sscxr.study.aggregate import Estimate, study_metrics
from sscxr.study.results import Cell, StudyResults, resolve_references, row_kind
from sscxr.study.spec import StudySpec
from sscxr.utils import atomic_write_bytes, atomic_write_text

__all__ = ["StudyReport", "build_blocks", "write_study_report"]

_KIND_ORDER = {"reference": 0, "probe": 1, "finetune": 2}


def _paper_columns() -> list[tuple[str, str]]:
    """(label, metric) of the paper-shaped tables: the evaluation report's paper columns (one table,
    `sscxr.metrics.CLASSIFICATION_METRICS`) that the study aggregates (`sscxr.study.aggregate.study_metrics`);
    a metric the study does not aggregate has no column here."""
    aggregated = study_metrics()
    return [(c.label, c.key) for c in paper_columns() if c.key in aggregated]


@dataclass(frozen=True)
class StudyReport:
    markdown: Path
    html: Path
    json: Path
    csv: Path


def _f(v: float, spec: str = ".3f", sign: bool = False) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "n/a"
    return format(v, ("+" if sign else "") + spec)


def fmt_estimate(e: Estimate, sign: bool = False) -> str:
    """`0.912 [0.887, 0.934]` (mean over draws [interval]); with sign for differences."""
    return f"{_f(e.mean, sign=sign)} [{_f(e.low, sign=sign)}, {_f(e.high, sign=sign)}]"


def verdict(d: Estimate) -> str:
    """'better' / 'worse' when the paired interval excludes 0, else 'no clear difference'."""
    if math.isnan(d.low) or math.isnan(d.high):
        return "undetermined"
    if d.low > 0:
        return "better"
    if d.high < 0:
        return "worse"
    return "no clear difference"


def _ordered(rows: Sequence[str], results: StudyResults) -> list[str]:
    def key(r: str) -> tuple[int, str]:
        info = results.rows.get(r, {"start": "", "mode": ""})
        return _KIND_ORDER[row_kind(r, info["start"], info["mode"])], r

    return sorted(rows, key=key)


def _flag_codes(results: StudyResults, row: str) -> str:
    codes = sorted({f["code"] for f in results.flags.get(row, [])})
    return ("⚠ " + ", ".join(codes)) if codes else ""


def headline_table(cell: Cell, results: StudyResults, refs: Sequence[str]) -> Table:
    """AUC-ROC of every row with its interval and SD between draws, and paired differences to `refs`."""
    c = cell.comparison
    assert c is not None
    refs = [r for r in refs if r in c.rows]
    columns = ["row", "AUC-ROC mean [95% CI]", "SD between draws", "AUC-PR mean [95% CI]"]
    for ref in refs:
        columns += [f"Δ AUC-ROC vs {ref} [95% CI]", f"vs {ref}"]
    columns.append("flags")
    table = Table(
        f"{cell.task}, {cell.fraction:.0%} of the labels, test set '{cell.test}' "
        f"({c.n_images} images, {c.n_patients} patients; {len(c.seeds)} draws: {list(c.seeds)})",
        columns,
    )
    for r in _ordered(list(c.rows), results):
        m = c.rows[r].metrics
        line = [r, fmt_estimate(m["auc_roc"]), _f(m["auc_roc"].sd), fmt_estimate(m["auc_pr"])]
        for ref in refs:
            d = c.diffs.get(r, {}).get(ref)
            line += [fmt_estimate(d["auc_roc"], sign=True), verdict(d["auc_roc"])] if d else [NOT_RUN, ""]
        line.append(_flag_codes(results, r))
        table.rows.append(line)
    for r in cell.missing:
        table.rows.append([r, *["not run yet"] + [""] * (len(columns) - 2)])
    table.notes.append(
        "mean over labelled-subset draws; [a, b]: 95% two-level bootstrap (draws and test patients "
        "resampled together, the same resamples for every row, so the differences are paired)"
    )
    return table


def _paper_value(e: Estimate | None, metric: str) -> str:
    if e is None:
        return NOT_RUN
    percent = metric in CLASSIFICATION_METRICS and CLASSIFICATION_METRICS[metric].percent  # ACC in %
    scale, spec = (100.0, ".2f") if percent else (1.0, ".3f")
    return f"{_f(e.mean * scale, spec)} ±{_f(e.sd * scale, spec)}"


def _paper_metric(cell: Cell, row: str, metric: str) -> Estimate | None:
    c = cell.comparison
    if c is None or row not in c.rows:
        return None
    return c.rows[row].metrics[metric]


def paper_table(cells: Sequence[Cell], results: StudyResults) -> Table:
    """Tables 1-4 shape for one task and fraction: column groups = test sets, means ± SD over draws."""
    first = cells[0]
    names = results.class_names.get(first.task, ())
    title = f"{first.task} ({' / '.join(names)}), {first.fraction:.0%} of the labels: paper-style table"
    paper = _paper_columns()
    columns = ["row"]
    groups: list[tuple[str, int]] = [("", 1)]
    for cell in cells:
        columns += [h for h, _ in paper]
        n = cell.comparison.n_images if cell.comparison else 0
        groups.append((f"{cell.test} ({n} images)", len(paper)))
    rows = sorted({r for cell in cells if cell.comparison for r in cell.comparison.rows})
    table = Table(title, columns, groups=groups)
    for r in _ordered(rows, results):
        table.rows.append([r, *[_paper_value(_paper_metric(c, r, m), m) for c in cells for _, m in paper]])
    table.notes.append("mean ± SD between labelled-subset draws; operating threshold chosen on validation")
    return table


def table6(cells: Sequence[Cell], results: StudyResults) -> Table:
    """Table 6 shape: ACC and specificity (the paper's "TPR") of every row, on the first test set."""
    cell = cells[0]
    rows = _ordered(list(cell.comparison.rows), results) if cell.comparison else []
    table = Table(
        f"Table 6 shape: {cell.task}, {cell.fraction:.0%} of the labels, '{cell.test}'", ["", *rows]
    )
    for label, metric in (("ACC %", "accuracy"), ("Spec (paper's TPR)", "specificity")):
        table.rows.append([label, *[_paper_value(_paper_metric(cell, r, metric), metric) for r in rows]])
    return table


def fraction_figure(cells: Sequence[Cell], results: StudyResults, title: str) -> bytes:
    """AUC-ROC (mean over draws, 95% interval) against the label fraction, one line per row."""
    fig = MplFigure(figsize=(7.5, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    rows = _ordered(sorted({r for c in cells if c.comparison for r in c.comparison.rows}), results)
    for k, r in enumerate(rows):
        pts = [(c.fraction, c.comparison.rows[r].metrics["auc_roc"]) for c in cells
               if c.comparison and r in c.comparison.rows]  # fmt: skip
        if not pts:
            continue
        x = np.array([p[0] for p in pts]) * (1 + 0.03 * (k - len(rows) / 2))  # dodge the error bars
        y = np.array([p[1].mean for p in pts])
        err = np.array([[p[1].mean - p[1].low for p in pts], [p[1].high - p[1].mean for p in pts]])
        kind = row_kind(r, results.rows.get(r, {}).get("start", ""), results.rows.get(r, {}).get("mode", ""))
        ax.errorbar(x, y, yerr=np.nan_to_num(err), marker="o", capsize=3,
                    linestyle=":" if kind == "reference" else "-", label=r)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("fraction of the training labels")
    ax.set_ylabel("test AUC-ROC")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return figure_png(fig)


def _summary_items(spec: StudySpec, results: StudyResults) -> list[str]:
    """One sentence per (task, fraction, test set): the best pre-trained row against each reference."""
    items = []
    refs_all = resolve_references(spec.compare_to, results.rows)
    for cell in results.cells:
        c = cell.comparison
        if c is None:
            continue
        candidates = [
            r for r in c.rows
            if row_kind(**_info(results, r)) != "reference"
            and results.rows.get(r, {}).get("start") != "scratch" and r not in refs_all
        ]  # fmt: skip
        if not candidates:
            continue
        best = max(candidates, key=lambda r: c.rows[r].metrics["auc_roc"].mean)
        parts = [f"{cell.task}, {cell.fraction:.0%} labels, {cell.test}: best pre-trained row '{best}' "
                 f"AUC-ROC {fmt_estimate(c.rows[best].metrics['auc_roc'])}"]  # fmt: skip
        for ref, d in c.diffs.get(best, {}).items():
            parts.append(f"vs {ref} {fmt_estimate(d['auc_roc'], sign=True)} ({verdict(d['auc_roc'])})")
        items.append("; ".join(parts))
    return items


def _info(results: StudyResults, row: str) -> dict[str, str]:
    info = results.rows.get(row, {"start": "", "mode": ""})
    return {"name": row, "start": info["start"], "mode": info["mode"]}


def _flag_items(results: StudyResults) -> list[str]:
    items = []
    for row in _ordered(list(results.flags), results):
        for f in results.flags[row]:
            items.append(f"⚠ {row} ({f['where']}): {f['code']}: {f['message']}")
    return items


def build_blocks(
    spec: StudySpec, results: StudyResults, commands: str, timings: dict[str, float]
) -> list[Block]:
    """The whole report as blocks (rendered to Markdown and HTML)."""
    blocks: list[Block] = [Heading(f"Study: {spec.name}", 1)]
    starts = ", ".join(f"{n} ({s.init})" for n, s in spec.starts.items())
    blocks.append(Text(
        f"Tasks {', '.join(spec.tasks)}; encoder starts {starts}; label fractions "
        f"{', '.join(f'{f:.0%}' for f in spec.fractions)}; draws {spec.seeds}; test sets "
        f"{', '.join(spec.tests)}; reference rows: pixels (logistic regression on downsampled raw pixels) "
        "and random encoder (the same ViT, randomly initialised, frozen) computed on exactly the same "
        "labelled subsets as every other row."
    ))  # fmt: skip
    summary = _summary_items(spec, results)
    if summary:
        blocks += [Heading("Summary", 2), Items(summary)]
    refs = resolve_references(spec.compare_to, results.rows)
    for task in spec.tasks:
        task_cells = [c for c in results.cells if c.task == task]
        blocks.append(Heading(f"{task}: AUC-ROC with intervals over draws and test patients", 2))
        for cell in task_cells:
            if cell.comparison is None:
                blocks.append(Text(f"{cell.fraction:.0%} labels, {cell.test}: nothing finished yet."))
                continue
            blocks.append(headline_table(cell, results, refs))
        for test in spec.tests:
            cells = [c for c in task_cells if c.test == test and c.comparison]
            if len(cells) > 1:
                png = fraction_figure(cells, results, f"{task}, test set '{test}'")
                name = f"fractions_{task}_{test}".replace(" ", "_").replace("/", "_")
                blocks.append(Figure(name, png, f"{task}: test AUC-ROC against the label fraction ({test})"))
    flags = _flag_items(results)
    blocks.append(Heading("Flags raised by the runs", 2))
    blocks.append(Items(flags) if flags else Text("No run raised a flag."))
    blocks.append(Heading("Paper-style tables", 2))
    for task in spec.tasks:
        for fraction in spec.fractions:
            cells = [c for c in results.cells if c.task == task and c.fraction == fraction and c.comparison]
            if cells:
                blocks += [paper_table(cells, results), table6(cells, results)]
    blocks += mapping_note()
    blocks.append(Heading("How the numbers were made", 2))
    blocks.append(Items([
        "each draw (seed) is one labelled subset of the training patients at that fraction, the same "
        "for every row (sscxr.tasks.labels.select_rows); fine-tunings also use it as their training seed",
        "point estimate: the mean over draws of the metric on the whole test set",
        "interval: two-level bootstrap, each resample drawing the draws and the test patients with "
        f"replacement ({spec.n_boot} resamples, seed {spec.seed}); it includes the spread between draws, "
        "which a one-run patient bootstrap leaves out",
        "Δ: the paired difference to a reference row on the same resamples; 'better' / 'worse' when its "
        "interval excludes 0",
        "thresholds (Sens, Spec, ACC) are chosen on the validation split by the rule "
        f"'{spec.threshold}' and frozen before any test image is scored",
    ]))  # fmt: skip
    if timings:
        blocks.append(Items([f"{k}: {v:.0f} s" for k, v in timings.items()]))
    blocks.append(Code(commands, "Commands of this study (OUT/commands.sh)", "bash"))
    return blocks


def results_json(spec: StudySpec, results: StudyResults) -> dict[str, Any]:
    cells = []
    for cell in results.cells:
        c = cell.comparison
        entry: dict[str, Any] = {"task": cell.task, "fraction": cell.fraction, "test": cell.test,
                                 "missing": cell.missing}  # fmt: skip
        if c is not None:
            entry |= {
                "seeds": list(c.seeds), "n_images": c.n_images, "n_patients": c.n_patients,
                "n_boot": c.n_boot, "alpha": c.alpha,
                "rows": {r: {m: e.to_dict() for m, e in rr.metrics.items()} for r, rr in c.rows.items()},
                "diffs": {r: {ref: {m: e.to_dict() for m, e in d.items()} for ref, d in by.items()}
                          for r, by in c.diffs.items()},
            }  # fmt: skip
        cells.append(entry)
    return {"format": "sscxr-study", "version": 1, "name": spec.name, "rows": results.rows,
            "flags": results.flags, "cells": cells}  # fmt: skip


def results_csv(results: StudyResults) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["task", "fraction", "test", "row", "metric", "mean", "low", "high", "sd", "n_draws"])
    for cell in results.cells:
        if cell.comparison is None:
            continue
        for r, rr in cell.comparison.rows.items():
            for m, e in rr.metrics.items():
                w.writerow([cell.task, cell.fraction, cell.test, r, m, *(_f(v, ".6f") for v in
                            (e.mean, e.low, e.high, e.sd)), len(e.per_draw)])  # fmt: skip
    return buf.getvalue()


def write_study_report(
    spec: StudySpec,
    results: StudyResults,
    out: Path,
    commands: str = "",
    timings: dict[str, float] | None = None,
) -> StudyReport:
    """Write report.md (+ figures/), report.html, results.json and results.csv into `out`."""
    blocks = build_blocks(spec, results, commands, timings or {})
    for b in blocks:
        if isinstance(b, Figure):
            atomic_write_bytes(out / "figures" / f"{b.name}.png", b.png)
    paths = StudyReport(out / "report.md", out / "report.html", out / "results.json", out / "results.csv")
    atomic_write_text(paths.json, json.dumps(results_json(spec, results), indent=1, allow_nan=False) + "\n")
    atomic_write_text(paths.csv, results_csv(results))
    atomic_write_text(paths.markdown, to_markdown(blocks))
    atomic_write_text(paths.html, to_html(blocks, f"sscxr study: {spec.name}"))
    return paths
