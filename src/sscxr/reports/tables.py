"""Report tables built from evaluation documents (metrics.json): paper-style, Table 6-style and the rest.

A `Table` is plain strings (header groups, columns, rows) so that the Markdown and HTML renderers show
the same cells. Undefined metrics are written ``n/a (reason)``, never as a number; a cell for a
combination that was not evaluated is ``—``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sscxr.metrics import CLASSIFICATION_METRICS, MetricSpec

__all__ = [
    "NOT_RUN",
    "Table",
    "calibration_table",
    "confusion_tables",
    "counts_table",
    "fmt_metric",
    "metric_index",
    "paper_columns",
    "paper_tables",
    "summary_table",
    "table_markdown",
    "tasks_of",
    "threshold_table",
    "undefined_table",
]

NOT_RUN = "—"

Result = Mapping[str, Any]
Doc = Mapping[str, Any]


@dataclass
class Table:
    """A table of strings. ``groups`` are (label, span) pairs over ``columns`` (empty: no group row)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    groups: list[tuple[str, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def paper_columns() -> tuple[MetricSpec, ...]:
    """The columns of the paper-style tables, in order: the ``column`` entries of
    `CLASSIFICATION_METRICS` (Sens, Spec, FPR, FNR, AUC-PR, AUC-ROC of the class, then overall ACC %)."""
    return CLASSIFICATION_METRICS.select(column=True)


def _label(key: str) -> str:
    return CLASSIFICATION_METRICS[key].label


def metric_index(result: Result) -> dict[tuple[str, str], Mapping[str, Any]]:
    """``{(class, metric): metric row}`` of one (model, test set) result."""
    return {(m["class"], m["metric"]): m for m in result["metrics"]}


def fmt_metric(row: Mapping[str, Any] | None, ci: bool = True) -> str:
    """``0.975 [0.950, 0.990]`` (accuracy in %), ``n/a (reason)`` when undefined, ``—`` when absent.

    Metrics whose `CLASSIFICATION_METRICS` entry has ``percent`` (accuracy, as the paper prints ACC)
    are shown in %; every other metric as a fraction.
    """
    if row is None:
        return NOT_RUN
    if row["value"] is None:
        return f"n/a ({row['reason'] or 'undefined'})"
    percent = row["metric"] in CLASSIFICATION_METRICS and CLASSIFICATION_METRICS[row["metric"]].percent
    scale, spec = (100.0, ".2f") if percent else (1.0, ".3f")
    text = format(row["value"] * scale, spec)
    if ci and row.get("ci_low") is not None and row.get("ci_high") is not None:
        text += f" [{row['ci_low'] * scale:{spec}}, {row['ci_high'] * scale:{spec}}]"
    return text


def _results(doc: Doc, task: str | None = None) -> dict[tuple[str, str], Result]:
    return {(r["model"], r["test_set"]): r for r in doc["results"] if task is None or r["task"] == task}


def tasks_of(doc: Doc) -> list[str]:
    """The tasks of a document's models, in model order."""
    return list(dict.fromkeys(m["task"] for m in doc["models"].values()))


def _models_of(doc: Doc, task: str) -> list[str]:
    return [name for name, m in doc["models"].items() if m["task"] == task]


def _count_label(result: Result) -> str:
    counts = result["counts"]
    return " / ".join(str(counts[c]["images"]) for c in result["class_names"])


def _paper_table(doc: Doc, task: str, cls: str, binary: bool) -> Table:
    res, tests = _results(doc, task), list(doc["test_sets"])
    classes = doc["models"][_models_of(doc, task)[0]]["class_names"]
    what = f"positive class {cls!r}" if binary else f"class {cls!r} vs the rest"
    columns = paper_columns()
    table = Table(
        f"{task}: {what} (value [95% CI]; images per class {' / '.join(classes)} in the group headers)",
        ["Model"] + [c.label for _ in tests for c in columns],
    )
    table.groups = [("", 1)]
    for t in tests:
        first = next((r for (m, tt), r in res.items() if tt == t), None)
        table.groups.append((f"{t} ({_count_label(first)})" if first else t, len(columns)))
    for model in _models_of(doc, task):
        cells = [model]
        for t in tests:
            idx = metric_index(res[(model, t)]) if (model, t) in res else {}
            for c in columns:
                cells.append(fmt_metric(idx.get(("all" if c.scope == "overall" else cls, c.key))))
        table.rows.append(cells)
    return table


def paper_tables(doc: Doc) -> list[Table]:
    """Tables 1-4 of the paper: rows = models, column groups = test sets, one table per task (binary:
    the positive class, class index 1) or per class (multi-class, one-vs-rest; ACC is overall)."""
    tables = []
    for task in tasks_of(doc):
        classes = doc["models"][_models_of(doc, task)[0]]["class_names"]
        shown = classes[1:] if len(classes) == 2 else classes
        tables += [_paper_table(doc, task, c, len(classes) == 2) for c in shown]
    return tables


def summary_table(docs: Sequence[Doc]) -> Table:
    """Table 6-style summary: accuracy, sensitivity and specificity of every model of every run.

    Binary tasks show the positive class; multi-class tasks the mean over classes (balanced accuracy and
    mean specificity).
    """
    tests = list(dict.fromkeys(t for d in docs for t in d["test_sets"]))
    heads = [_label("accuracy"), _label("sensitivity"), _label("specificity")]
    table = Table(
        f"Summary across runs (Table 6 style): {heads[0]}, {heads[1]} and {heads[2]} with 95% CIs",
        ["Run", "Model", "Task"] + [h for _ in tests for h in heads],
        groups=[("", 3)] + [(t, 3) for t in tests],
        notes=[
            "Binary tasks: Sens and Spec of the positive class. Multi-class tasks: the mean over classes "
            '(Sens = balanced accuracy, Spec = mean one-vs-rest specificity). The paper\'s Table 6 "TPR" '
            "row is a specificity: compare it with Spec."
        ],
    )
    for doc in docs:
        res = _results(doc)
        for model, info in doc["models"].items():
            pos = info.get("positive_class")
            sens, spec = (
                ((pos, "sensitivity"), (pos, "specificity"))
                if pos
                else (("all", "balanced_accuracy"), ("all", "macro_specificity"))
            )
            cells = [str(doc.get("run", "")), model, info["task"]]
            for t in tests:
                idx = metric_index(res[(model, t)]) if (model, t) in res else None
                for key in (("all", "accuracy"), sens, spec):
                    cells.append(NOT_RUN if idx is None else fmt_metric(idx.get(key)))
            table.rows.append(cells)
    return table


def counts_table(doc: Doc) -> Table:
    """Images and patients per class of every test set, per task, and the images left out by label."""
    table = Table(
        "Test sets: images and patients per class (per task); images whose label the task does not use",
        ["Test set", "Task", "Class", "Images", "Patients", "Left out (label: images)"],
    )
    seen = set()
    for r in doc["results"]:
        if (r["test_set"], r["task"]) in seen:
            continue
        seen.add((r["test_set"], r["task"]))
        left = ", ".join(f"{k}: {v}" for k, v in r["excluded"].items()) or "none"
        for c in r["class_names"]:
            n = r["counts"][c]
            table.rows.append([r["test_set"], r["task"], c, str(n["images"]), str(n["patients"]), left])
        table.rows.append([r["test_set"], r["task"], "total", str(r["n_images"]), str(r["n_patients"]), left])
    return table


def threshold_table(doc: Doc) -> Table:
    """Each model's frozen operating threshold and where it was chosen."""
    table = Table(
        "Operating thresholds (frozen before any test set was predicted)",
        ["Model", "Task", "Rule", "Threshold on P(positive)", "Chosen on", "Note"],
    )
    for name, m in doc["models"].items():
        t = m["threshold"]
        value = "arg-max" if t["value"] is None else f"{t['value']:.4f}"
        table.rows.append([name, m["task"], t["rule"], value, t["chosen_on"], t.get("note") or ""])
    return table


def calibration_table(doc: Doc) -> Table:
    """Expected calibration error (15 equal-width bins) of every model on every test set."""
    tests = list(doc["test_sets"])
    table = Table("Calibration: expected calibration error (lower is better), 95% CI", ["Model", *tests])
    res = _results(doc)
    for model in doc["models"]:
        idx = {t: metric_index(res[(model, t)]) for t in tests if (model, t) in res}
        table.rows.append(
            [model, *(fmt_metric(idx[t].get(("all", "ece"))) if t in idx else NOT_RUN for t in tests)]
        )
    return table


def confusion_tables(doc: Doc) -> list[Table]:
    """One confusion matrix per (model, test set): rows = true class, columns = predicted class."""
    tables = []
    for r in doc["results"]:
        names = r["class_names"]
        t = Table(f"Confusion matrix: {r['model']} on {r['test_set']}", ["true \\ predicted", *names])
        t.rows = [[names[i], *map(str, row)] for i, row in enumerate(r["confusion"])]
        tables.append(t)
    return tables


def undefined_table(docs: Iterable[Doc]) -> Table:
    """Every undefined metric with the reason (so no n/a is left unexplained)."""
    table = Table("Undefined metrics (n/a) and why", ["Run", "Model", "Test set", "Class", "Metric", "Why"])
    for doc in docs:
        for r in doc["results"]:
            for m in r["metrics"]:
                if m["value"] is None:
                    table.rows.append(
                        [
                            str(doc.get("run", "")),
                            r["model"],
                            r["test_set"],
                            m["class"],
                            m["metric"],
                            f"n/a ({m['reason']})",
                        ]
                    )
    return table


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def table_markdown(table: Table) -> str:
    """GitHub Markdown; column groups are folded into the headers ("group: column")."""
    headers = list(table.columns)
    if table.groups:
        pos = 0
        for label, span in table.groups:
            for j in range(pos, pos + span):
                headers[j] = f"{label}: {headers[j]}" if label else headers[j]
            pos += span
    lines = [f"**{_md_cell(table.title)}**", "", "| " + " | ".join(map(_md_cell, headers)) + " |"]
    lines.append("|" + "---|" * len(headers))
    lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in table.rows]
    lines += [f"\n{note}" for note in table.notes]
    return "\n".join(lines) + "\n"
