"""The classification report: report.md, report.html, metrics.csv, metrics.json and figures/.

Built from one or several evaluation documents (the metrics.json that `sscxr evaluate` writes), so
`sscxr report` can rebuild it, and summarise several runs (Table 6 style), from saved files alone.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sscxr import __version__
from sscxr.errors import DataError
from sscxr.evaluation.runner import FORMAT, slug
from sscxr.metrics import paper_accuracy
from sscxr.reports import plots
from sscxr.reports.document import Block, Code, Figure, Heading, Items, Text, to_markdown
from sscxr.reports.html import to_html
from sscxr.reports.tables import (
    Table,
    calibration_table,
    confusion_tables,
    counts_table,
    paper_tables,
    summary_table,
    tasks_of,
    threshold_table,
    undefined_table,
)
from sscxr.utils import atomic_write_bytes, atomic_write_text

__all__ = [
    "COLLECTION_FORMAT",
    "CSV_COLUMNS",
    "ReportFiles",
    "build_blocks",
    "flag_lines",
    "load_evaluations",
    "mapping_note",
    "metrics_rows",
    "write_report",
]

COLLECTION_FORMAT = "sscxr-evaluation-collection"
CSV_COLUMNS = (
    "run",
    "model",
    "test_set",
    "task",
    "class",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "reason",
    "ci_note",
)
TITLE = "SS-CXR classification report"

Doc = Mapping[str, Any]


@dataclass(frozen=True)
class ReportFiles:
    """Paths of what `write_report` wrote."""

    markdown: Path
    html: Path
    csv: Path
    json: Path
    figures: tuple[Path, ...]


def mapping_note() -> list[Block]:
    """How our standard columns map onto the SS-CXR paper's (whose "TPR" column is the specificity)."""
    acc = 100 * paper_accuracy(200, 200, 0.975, 0.190)
    text = (
        'We report standard metric names. The SS-CXR paper\'s Tables 1-4 head a column "TPR", but its '
        "values are always 1 - FPR: that column is the specificity (true negative rate), not the "
        "sensitivity. Its FNR is the positive class's miss rate. Its ACC follows from those two: "
        f'Table 1, ViT-S: (200 x 0.975 + 200 x (1 - 0.190)) / 400 = {acc:.2f}%. Its Table 6 "TPR" '
        "row is the same specificity."
    )
    items = [
        'our Spec (specificity, TNR) = the paper\'s "TPR" column',
        "our Sens (sensitivity, TPR, recall) = 1 - the paper's FNR (the paper has no sensitivity column)",
        "our FPR = the paper's FPR = 1 - Spec; our FNR = the paper's FNR = 1 - Sens",
        "AUC-PR (average precision) and AUC-ROC: of the positive class's score (binary) or of each "
        "class against the rest (3-class); same meaning as the paper's",
        "ACC: overall accuracy at the frozen operating threshold (binary) or arg-max (multi-class)",
        "positive class of a binary task = class index 1 (the second class name, e.g. covid-19 in "
        'non-covid / covid-19), as in the paper\'s "Non-Covid / Covid" headers',
        "[a, b] = 95% bootstrap percentile interval, resampling patients (all images of a drawn "
        "patient together)",
    ]
    return [Heading("How our columns map onto the paper's", 2), Text(text), Items(items)]


def _figures(doc: Doc, prefix: str) -> list[Block]:
    """ROC + PR, confusion matrices and reliability diagrams per (task, test set), all models overlaid."""
    blocks: list[Block] = []
    for task in tasks_of(doc):
        for test in doc["test_sets"]:
            entries = [(r["model"], r) for r in doc["results"] if r["task"] == task and r["test_set"] == test]
            if not entries:
                continue
            names = entries[0][1]["class_names"]
            shown = names[1:] if len(names) == 2 else names
            stem, where = f"{prefix}{slug(task)}__{slug(test)}", f"{task}, test set {test!r}"
            blocks += [
                Heading(f"{task} on {test}", 4),
                Figure(
                    f"{stem}__roc_pr",
                    plots.roc_pr_figure(entries, shown, where),
                    f"ROC and PR curves: {where}",
                ),
                Figure(
                    f"{stem}__confusion",
                    plots.confusion_figure(entries, where),
                    f"Confusion matrices: {where}",
                ),
                Figure(
                    f"{stem}__reliability",
                    plots.reliability_figure(entries, where),
                    f"Reliability diagram: {where}",
                ),
            ]
    return blocks


def _label_table(doc: Doc) -> Table:
    t = Table(
        "Test sets by manifest label (before any task mapping)",
        ["Test set", "Cache", "Splits", "Manifest hash", "Label", "Images", "Patients"],
    )
    for name, info in doc["test_sets"].items():
        for label, n in info["labels"].items():
            t.rows.append(
                [
                    name,
                    info["cache"],
                    ",".join(info["splits"]),
                    str(info["manifest_hash"]),
                    label,
                    str(n["images"]),
                    str(n["patients"]),
                ]
            )
    return t


def _provenance(doc: Doc) -> list[Block]:
    blocks: list[Block] = [
        Heading("Provenance", 3),
        Code(doc.get("command") or "(not recorded)", "Evaluate command"),
    ]
    if doc.get("validation"):
        v = doc["validation"]
        blocks.append(
            Text(
                f"Thresholds chosen on validation: {v['cache']} splits {','.join(v['splits'])} "
                f"(manifest hash {v['manifest_hash']}, {v['n_images']} images)."
            )
        )
    for name, m in doc["models"].items():
        blocks.append(
            Items(
                [
                    f"model {name}: run folder {m['run_dir']}",
                    f"task {m['task']}: classes {', '.join(m['class_names'])}",
                    f"training data manifest hash: {m.get('manifest_hash')}",
                    f"training command: {m.get('command')}",
                ]
            )
        )
        blocks.append(Code(json.dumps(m["config"], indent=2, default=str), f"{name}: model.json", "json"))
        if m.get("config_yaml"):
            blocks.append(Code(m["config_yaml"], f"{name}: config.yaml of the run", "yaml"))
    return blocks


WARN = "\u26a0"  # the warning sign that marks a flag in the report


def flag_lines(doc: Doc) -> list[str]:
    """One line per flag: each (model, test set)'s operating point, then each model's training flags.

    Old documents (written before flags existed) have none: nothing is shown for them.
    """
    lines = []
    for r in doc["results"]:
        t = r.get("threshold")
        at = "" if t is None else f" (threshold {t:.3g})"
        lines += [f"{WARN} {r['model']} on {r['test_set']}{at}: {f['message']}" for f in r.get("flags") or []]
    for name, m in doc["models"].items():
        flags = m.get("training_flags") or (m.get("config") or {}).get("flags") or []
        lines += [f"{WARN} {name} (training, {f['code']}): {f['message']}" for f in flags]
    return lines


def _flag_blocks(doc: Doc, level: int) -> list[Block]:
    lines = flag_lines(doc)
    if not lines:
        return []
    return [Heading("Flags", level), Text("Results that should not be trusted as they stand:"), Items(lines)]


def _ci_notes(doc: Doc) -> list[str]:
    return [
        f"{r['model']} on {r['test_set']}, {m['class']} {m['metric']}: {m['ci_note']}"
        for r in doc["results"]
        for m in r["metrics"]
        if m.get("ci_note") and m["value"] is not None
    ]


def _run_blocks(doc: Doc, multi: bool, figures: bool) -> list[Block]:
    run = str(doc.get("run", ""))
    level = 3 if multi else 2
    blocks: list[Block] = [Heading(f"Run {run}", 2)] if multi else []
    blocks += [Heading("Results (paper-style tables)", level), *paper_tables(doc)]
    blocks += [*_flag_blocks(doc, level + 1), threshold_table(doc)]
    blocks += [Heading("Test sets", level), counts_table(doc), _label_table(doc)]
    blocks += [Heading("Calibration", level), calibration_table(doc)]
    notes = _ci_notes(doc)
    if notes:
        blocks += [Text("Intervals conditional on the metric being defined:"), Items(notes)]
    if figures:
        blocks += [Heading("Figures", level), *_figures(doc, f"{slug(run)}__" if multi else "")]
    blocks += [Heading("Confusion matrices", level), *confusion_tables(doc), *_provenance(doc)]
    return blocks


def build_blocks(docs: Sequence[Doc], figures: bool = True) -> list[Block]:
    """The whole report: mapping note, Table 6-style summary, per-run results (with figures unless
    ``figures`` is False), undefined metrics."""
    runs = ", ".join(str(d.get("run", "")) for d in docs)
    when = datetime.now(UTC).isoformat(timespec="seconds")
    blocks: list[Block] = [Heading(TITLE, 1), Text(f"Runs: {runs}. Built {when} by sscxr {__version__}.")]
    blocks += mapping_note()
    blocks += [Heading("Summary", 2), summary_table(docs)]
    for doc in docs:
        blocks += _run_blocks(doc, len(docs) > 1, figures)
    undefined = undefined_table(docs)
    blocks += [Heading("Undefined metrics", 2)]
    blocks += [undefined] if undefined.rows else [Text("Every metric was defined on every test set.")]
    return blocks


def metrics_rows(docs: Iterable[Doc]) -> list[dict[str, Any]]:
    """Every metric of every (run, model, test set) in long format (`CSV_COLUMNS`)."""
    return [
        {"run": d.get("run", ""), "model": r["model"], "test_set": r["test_set"], "task": r["task"], **m}
        for d in docs
        for r in d["results"]
        for m in r["metrics"]
    ]


def _csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    return buf.getvalue()


def write_report(
    docs: Doc | Sequence[Doc], out_dir: str | os.PathLike[str], figures: bool = True
) -> ReportFiles:
    """Write report.md, report.html, metrics.csv, metrics.json and figures/*.png into ``out_dir``.

    Args:
        docs: one evaluation document, or several (a cross-run report).
        out_dir: the report folder (created).
        figures: draw the figures (about 0.3 s each; off for quick summaries of many runs).
    """
    docs = [docs] if isinstance(docs, Mapping) else list(docs)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    payload = docs[0] if len(docs) == 1 else {"format": COLLECTION_FORMAT, "runs": docs}
    # allow_nan=False: an undefined metric must be null in JSON, never NaN.
    atomic_write_text(out / "metrics.json", json.dumps(payload, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "metrics.csv", _csv(metrics_rows(docs)))
    blocks = build_blocks(docs, figures)
    figures = []
    for b in blocks:
        if isinstance(b, Figure):
            figures.append(out / "figures" / f"{b.name}.png")
            atomic_write_bytes(figures[-1], b.png)
    atomic_write_text(out / "report.md", to_markdown(blocks))
    atomic_write_text(out / "report.html", to_html(blocks, TITLE))
    return ReportFiles(
        out / "report.md", out / "report.html", out / "metrics.csv", out / "metrics.json", tuple(figures)
    )


def load_evaluations(paths: Iterable[str | os.PathLike[str]]) -> list[dict[str, Any]]:
    """Read evaluation documents from metrics.json files (or folders holding one); collections are flattened.

    Raises:
        DataError: a path without metrics.json, or a file that is not an sscxr evaluation.
    """
    docs: list[dict[str, Any]] = []
    for p in map(Path, paths):
        f = p / "metrics.json" if p.is_dir() else p
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise DataError(
                f"{f}: cannot read an evaluation ({e}); give metrics.json written by `sscxr evaluate`."
            ) from e
        if data.get("format") == COLLECTION_FORMAT:
            docs += data["runs"]
        elif data.get("format") == FORMAT:
            docs.append(data)
        else:
            raise DataError(
                f"{f}: format {data.get('format')!r} is not an sscxr evaluation; give the "
                "metrics.json that `sscxr evaluate` wrote."
            )
    runs = [d.get("run") for d in docs]
    if len(set(runs)) != len(runs):
        # Two runs of the same name would be indistinguishable in the summary: number them.
        for k, d in enumerate(docs):
            d["run"] = f"{d.get('run')} ({k + 1})"
    return docs
