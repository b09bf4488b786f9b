"""The report of `sscxr segment evaluate`: a Table-5-like table, per-image CSV, overlays like Figure 3.

Rows of the main table are the models (encoder starts), with a "+ post-processing" row each when the
post-processed masks were scored; column groups are the test sets, each with IoU, Dice and HD95 (pixels
at the cache resolution, and mm where the spacing is known). A cell reads `mean ± std [95% CI]`; values
that are undefined (an HD95 against an empty mask) are left out of the mean and counted in the cell.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sscxr.data.cache import ImageCache
from sscxr.evaluation.segmentation import SegEvaluation
from sscxr.metrics.segmentation import SEG_METRICS, Summary, postprocess_lungs
from sscxr.reports.document import Block, Figure, Heading, Items, Text, to_markdown
from sscxr.reports.html import to_html
from sscxr.reports.tables import NOT_RUN, Table
from sscxr.utils import atomic_write_bytes, atomic_write_text
from sscxr.viz.overlay import OverlayCase, overlay_figure

__all__ = [
    "METRIC_COLUMNS",
    "fmt_summary",
    "overlay_figures",
    "paper_table",
    "per_image_csv",
    "summary_json",
    "write_segmentation_report",
]

TITLE = "SS-CXR lung segmentation"
# (header, metric, format) of the Table-5-like table.
METRIC_COLUMNS = (
    ("IoU", "iou", ".4f"),
    ("Dice", "dice", ".4f"),
    ("HD95 px", "hd95_px", ".2f"),
    ("HD95 mm", "hd95_mm", ".2f"),
)
# The paper's Table 5 (Montgomery, 138 scans), for reference only: other data, other resolution.
PAPER_TABLE5 = (
    ("UNETR", "0.8566", "0.9227", "16.70"),
    ("UNETR + SS-IN", "0.8963", "0.9453", "9.07"),
    ("UNETR + SS-CXR", "0.9160", "0.9561", "9.73"),
)


def fmt_summary(s: Summary, spec: str = ".4f", missing: str = "no defined value") -> str:
    """`mean ± std [low, high]`, plus `(k undefined)`; `n/a (...)` when no value is defined."""
    if s.mean is None:
        return f"n/a ({missing})"
    text = format(s.mean, spec) + (f" ± {format(s.std, spec)}" if s.std is not None else "")
    if s.ci is not None and s.ci.low is not None and s.ci.high is not None:
        text += f" [{format(s.ci.low, spec)}, {format(s.ci.high, spec)}]"
    return text + (f" ({s.n_undefined} undefined)" if s.n_undefined else "")


def _variants(ev: SegEvaluation) -> list[tuple[bool, dict[str, Summary]]]:
    return [(False, ev.summary)] + ([(True, ev.summary_pp)] if ev.summary_pp is not None else [])


def _cell(ev: SegEvaluation, summary: dict[str, Summary], metric: str, spec: str) -> str:
    missing = "pixel spacing unknown" if metric.endswith("_mm") and ev.n_spacing == 0 else "no defined value"
    return fmt_summary(summary[metric], spec, missing)


def paper_table(evals: Sequence[SegEvaluation]) -> Table:
    """Rows = models (and their post-processed variants), column groups = test sets (Table 5 layout)."""
    tests = list(dict.fromkeys(ev.test.name for ev in evals))
    by_key = {(ev.model, ev.test.name): ev for ev in evals}
    n_of = {ev.test.name: len(ev.records) for ev in evals}
    table = Table(
        title="Lung segmentation: mean ± std [95% bootstrap CI by patient]",
        columns=[c[0] for _ in tests for c in METRIC_COLUMNS],
        groups=[(f"{t} ({n_of[t]} images)", len(METRIC_COLUMNS)) for t in tests],
    )
    for model in dict.fromkeys(ev.model for ev in evals):
        for post in (False, True):
            cells, any_run = [], False
            for t in tests:
                ev = by_key.get((model, t))
                summary = None if ev is None else (ev.summary_pp if post else ev.summary)
                any_run |= summary is not None
                for _, metric, spec in METRIC_COLUMNS:
                    cells.append(NOT_RUN if summary is None else _cell(ev, summary, metric, spec))  # type: ignore[arg-type]
            if any_run:
                table.rows.append([model + (" + post-processing" if post else ""), *cells])
    table.columns.insert(0, "model")
    if table.groups:
        table.groups.insert(0, ("", 1))
    return table


def _reference_table() -> Table:
    return Table(
        title="Paper, Table 5 (Montgomery, 138 scans, 256 px; other data: for orientation only)",
        columns=["model", "IoU", "Dice", "HD95"],
        rows=[list(r) for r in PAPER_TABLE5],
    )


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", text)


def _metrics(ev: SegEvaluation, k: int) -> dict[str, Any]:
    """Case k's metrics of the masks the overlays show: post-processed when they were scored."""
    rec = ev.records[k]
    return rec.metrics_pp if ev.summary_pp is not None and rec.metrics_pp else rec.metrics


def _case(cache: ImageCache, ev: SegEvaluation, k: int, label: str) -> OverlayCase:
    rec, metrics = ev.records[k], _metrics(ev, k)
    dice, hd = metrics["dice"], metrics["hd95_px"]
    hd_text = f"{hd.value:.1f} px" if hd.value is not None else f"n/a ({hd.reason})"
    title = f"{label}: Dice {dice.format('.3f')}, HD95 {hd_text}\n{Path(rec.path).name}"
    mask = postprocess_lungs(ev.masks[k]) if ev.summary_pp is not None else ev.masks[k]
    return OverlayCase(cache.image_float(rec.row), cache.mask(rec.row), mask, title)


def _dice_array(ev: SegEvaluation) -> np.ndarray:
    return np.array([_metrics(ev, k)["dice"].value for k in range(len(ev.records))], dtype=np.float64)


def _shown(evals: Sequence[SegEvaluation]) -> str:
    return "post-processed prediction" if any(ev.summary_pp is not None for ev in evals) else "raw prediction"


def overlay_figures(evals: Sequence[SegEvaluation]) -> list[Figure]:
    """Best / median / worst case (by Dice) of every (model, test set); per test set with several
    models, the three images on which the models' Dice differ most, side by side (as Figure 3)."""
    figures = []
    for ev in evals:
        cache = ImageCache.open(ev.test.cache)
        order = np.argsort(_dice_array(ev), kind="stable")
        picks = [("best", order[-1]), ("median", order[len(order) // 2]), ("worst", order[0])]
        cases = [_case(cache, ev, int(k), label) for label, k in picks]
        png = overlay_figure([cases], title=f"{ev.model} on {ev.test.name}")
        figures.append(
            Figure(
                _safe(f"overlay_{ev.test.name}_{ev.model}"),
                png,
                f"{ev.model} on {ev.test.name}: best, median and worst image by Dice "
                f"(ground truth green, prediction yellow; {_shown([ev])})",
            )
        )
    for test in dict.fromkeys(ev.test.name for ev in evals):
        group = [ev for ev in evals if ev.test.name == test]
        if len(group) < 2:
            continue
        dice = np.stack([_dice_array(ev) for ev in group])
        worst_spread = np.argsort(-(dice.max(0) - dice.min(0)), kind="stable")[: min(3, dice.shape[1])]
        cache = ImageCache.open(group[0].test.cache)
        rows = [[_case(cache, ev, int(k), ev.model) for ev in group] for k in worst_spread]
        figures.append(
            Figure(
                _safe(f"compare_{test}"),
                overlay_figure(rows, title=f"models on {test}"),
                f"{test}: the images on which the models disagree most (rows), one model per column "
                f"({_shown(group)})",
            )
        )
    return figures


def _undefined_items(evals: Sequence[SegEvaluation]) -> list[str]:
    items = []
    for ev in evals:
        for post, key in ((False, "metrics"), (True, "metrics_pp")):
            reasons = Counter(
                getattr(r, key)["hd95_px"].reason for r in ev.records if getattr(r, key) is not None
            )
            reasons.pop(None, None)
            if reasons:
                what = ", ".join(f"{n} x {reason}" for reason, n in reasons.items())
                items.append(
                    f"{ev.model}{' + post-processing' if post else ''} on {ev.test.name}: HD undefined "
                    f"for {what}"
                )
    return items


def _method_text(evals: Sequence[SegEvaluation]) -> list[Block]:
    sizes = sorted({ev.size for ev in evals})
    n_boot = max((s.ci.n_boot for ev in evals for s in ev.summary.values() if s.ci is not None), default=0)
    return [
        Text(
            f"Metrics are computed per image at the cache resolution ({', '.join(map(str, sizes))} px "
            "square), on the cached ground-truth masks (resized, thresholded), then averaged. HD95 is "
            "MONAI's symmetric 95th-percentile Hausdorff distance between mask edges; in mm it uses the "
            "spacing of one cache pixel = original pixel spacing x original size / size in the cache, and "
            "only images whose files carry a pixel spacing (DICOM) have it."
        ),
        Text(
            "Empty masks: both empty = Dice 1, IoU 1, HD 0; one empty = Dice 0, IoU 0 and HD undefined "
            "(left out of the mean and counted, never reported as 0). Post-processing keeps the two largest "
            "connected components and fills holes. "
            f"Intervals: percentile bootstrap of the mean, resampling patients ({n_boot} resamples)."
        ),
    ]


def build_blocks(evals: Sequence[SegEvaluation], figures: Sequence[Figure]) -> list[Block]:
    """The report's content, shared by the Markdown and HTML renderings."""
    blocks: list[Block] = [Heading(TITLE, 1), *_method_text(evals), paper_table(evals), _reference_table()]
    undefined = _undefined_items(evals)
    blocks += [Heading("Undefined values"), Items(undefined or ["none: every HD95 was defined"])]
    blocks += [
        Heading("Models"),
        Items(
            [
                f"{ev.model}: {ev.model_path} (encoder start: {ev.meta.get('init')}, "
                f"weights: {ev.meta.get('weights_from')})"
                for ev in {e.model: e for e in evals}.values()
            ]
        ),
    ]
    if figures:
        blocks += [Heading("Overlays"), *figures]
    return blocks


def per_image_csv(evals: Sequence[SegEvaluation]) -> str:
    """Long CSV: one line per (model, test set, image, raw / post-processed), undefined values empty."""
    buf = io.StringIO()
    cols = ["model", "test", "postprocessed", "row", "patient_id", "path", *SEG_METRICS, "undefined"]
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(cols)
    for ev in evals:
        for rec in ev.records:
            variants = [(False, rec.metrics)] + ([(True, rec.metrics_pp)] if rec.metrics_pp else [])
            for post, m in variants:
                values = ["" if m[k].value is None else f"{m[k].value:.6g}" for k in SEG_METRICS]
                notes = "; ".join(f"{k}: {m[k].reason}" for k in SEG_METRICS if m[k].value is None)
                writer.writerow(
                    [ev.model, ev.test.name, post, rec.row, rec.patient_id, rec.path, *values, notes]
                )
    return buf.getvalue()


def summary_json(evals: Sequence[SegEvaluation]) -> list[dict[str, Any]]:
    """JSON-ready summaries (undefined = null, never NaN), one entry per (model, test set)."""

    def block(summary: Mapping[str, Summary]) -> dict[str, Any]:
        return {
            k: {
                "mean": s.mean,
                "std": s.std,
                "n": s.n,
                "n_undefined": s.n_undefined,
                "ci_low": s.ci.low if s.ci else None,
                "ci_high": s.ci.high if s.ci else None,
            }
            for k, s in summary.items()
        }

    return [
        {
            "model": ev.model,
            "model_path": ev.model_path,
            "test": ev.test.name,
            "cache": str(ev.test.cache),
            "split": ev.test.split,
            "size": ev.size,
            "threshold": ev.threshold,
            "n_spacing": ev.n_spacing,
            **ev.meta,
            "raw": block(ev.summary),
            "postprocessed": block(ev.summary_pp) if ev.summary_pp else None,
        }
        for ev in evals
    ]


def table_csv(evals: Sequence[SegEvaluation]) -> str:
    """Long CSV of the summaries: model, test, postprocessed, metric, mean, std, CI, counts."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(
        ["model", "test", "postprocessed", "metric", "mean", "std", "ci_low", "ci_high", "n", "n_undefined"]
    )
    for ev in evals:
        for post, summary in _variants(ev):
            for metric in SEG_METRICS:
                s = summary[metric]
                ci = (s.ci.low, s.ci.high) if s.ci is not None else (None, None)
                values = [s.mean, s.std, *ci]
                writer.writerow(
                    [
                        ev.model,
                        ev.test.name,
                        post,
                        metric,
                        *("" if v is None else f"{v:.6g}" for v in values),
                        s.n,
                        s.n_undefined,
                    ]
                )
    return buf.getvalue()


def write_segmentation_report(
    evals: Sequence[SegEvaluation], out_dir: str | os.PathLike[str], overlays: bool = True
) -> dict[str, Path]:
    """Write report.md, report.html (self-contained), table.csv, per_image.csv, summary.json, figures/.

    Returns:
        {"markdown", "html", "table", "per_image", "summary"} -> path, plus "figures" -> the folder.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figures = overlay_figures(evals) if overlays else []
    for fig in figures:
        atomic_write_bytes(out / "figures" / f"{fig.name}.png", fig.png)
    blocks = build_blocks(evals, figures)
    paths = {
        "markdown": out / "report.md",
        "html": out / "report.html",
        "table": out / "table.csv",
        "per_image": out / "per_image.csv",
        "summary": out / "summary.json",
        "figures": out / "figures",
    }
    atomic_write_text(paths["markdown"], to_markdown(blocks))
    atomic_write_text(paths["html"], to_html(blocks, TITLE))
    atomic_write_text(paths["table"], table_csv(evals))
    atomic_write_text(paths["per_image"], per_image_csv(evals))
    # allow_nan=False: an undefined value must be null in JSON, never NaN.
    atomic_write_text(paths["summary"], json.dumps(summary_json(evals), indent=1, allow_nan=False) + "\n")
    return paths
