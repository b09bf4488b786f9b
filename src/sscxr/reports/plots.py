"""Report figures as PNG bytes: ROC + PR curves, confusion matrices, reliability diagrams.

Figures are drawn on matplotlib's object API with the Agg canvas (no pyplot, so no global backend or
figure registry is touched), from the JSON-ready results of `sscxr.evaluation` (so `sscxr report` can
redraw them from metrics.json alone).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from sscxr.viz.figure import figure_png as save_png

__all__ = ["confusion_figure", "figure_png", "reliability_figure", "roc_pr_figure"]

Entry = tuple[str, Mapping[str, Any]]  # (model label, one (model, test set) result)
_DPI = 96


def figure_png(fig: Figure) -> bytes:
    """The report figures' PNG bytes (`sscxr.viz.figure.figure_png` at the reports' resolution)."""
    return save_png(fig, _DPI)


def _undefined(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=8, wrap=True, transform=ax.transAxes)


def _curve_axes(ax_roc: Axes, ax_pr: Axes, cls: str) -> None:
    ax_roc.plot([0, 1], [0, 1], color="0.7", lw=0.8, ls="--")
    ax_roc.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="FPR (1 - specificity)",
        ylabel="sensitivity",
        title=f"ROC: {cls} vs rest",
    )
    ax_pr.set(
        xlim=(0, 1),
        ylim=(0, 1.02),
        xlabel="recall (sensitivity)",
        ylabel="precision",
        title=f"PR: {cls} vs rest",
    )


def _auc_text(result: Mapping[str, Any], cls: str, metric: str) -> str:
    row = next((m for m in result["metrics"] if m["class"] == cls and m["metric"] == metric), None)
    return "n/a" if row is None or row["value"] is None else f"{row['value']:.3f}"


def roc_pr_figure(entries: Sequence[Entry], classes: Sequence[str], title: str) -> bytes:
    """ROC (left) and precision-recall (right) curves of every model, one row per class shown.

    Args:
        entries: (model label, result) pairs on one test set.
        classes: classes plotted one-vs-rest (binary tasks: the positive class only).
        title: figure title (the test set).
    """
    fig = Figure(figsize=(9, 3.6 * len(classes)))
    axes = fig.subplots(len(classes), 2, squeeze=False)
    for (ax_roc, ax_pr), cls in zip(axes, classes, strict=True):
        _curve_axes(ax_roc, ax_pr, cls)
        drawn = 0
        for label, res in entries:
            c = res["curves"].get(cls)
            if c is None:
                continue
            drawn += 1
            ax_roc.plot(c["fpr"], c["tpr"], lw=1.4, label=f"{label} (AUC {_auc_text(res, cls, 'auc_roc')})")
            ax_pr.step(
                c["recall"],
                c["precision"],
                where="post",
                lw=1.4,
                label=f"{label} (AP {_auc_text(res, cls, 'auc_pr')})",
            )
        if drawn:
            ax_roc.legend(fontsize=7, loc="lower right")
            ax_pr.legend(fontsize=7, loc="lower left")
        else:
            for ax in (ax_roc, ax_pr):
                _undefined(ax, f"undefined: the test set has only one of {{{cls}, rest}}")
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)


def confusion_figure(entries: Sequence[Entry], title: str) -> bytes:
    """Confusion matrices (rows = true class, columns = predicted), one panel per model, counts written in."""
    fig = Figure(figsize=(3.3 * len(entries) + 0.5, 3.4))
    axes = fig.subplots(1, len(entries), squeeze=False)[0]
    for ax, (label, res) in zip(axes, entries, strict=True):
        cm = np.asarray(res["confusion"], dtype=float)
        names = res["class_names"]
        # Colour by row fraction so that a rare class's errors show as clearly as a common class's.
        frac = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(
                    j,
                    i,
                    f"{int(cm[i, j])}",
                    ha="center",
                    va="center",
                    color="white" if frac[i, j] > 0.6 else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=7)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.set(xlabel="predicted", ylabel="true", title=label)
    fig.suptitle(title)
    fig.tight_layout()
    return figure_png(fig)


def reliability_figure(entries: Sequence[Entry], title: str) -> bytes:
    """Reliability diagram: observed frequency against mean predicted probability per bin, all models."""
    fig = Figure(figsize=(4.6, 4.2))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--", label="perfect calibration")
    kind = "probability"
    for label, res in entries:
        rel = res["reliability"]
        if rel is None:  # no image of this test set has a label the task uses
            continue
        kind = rel["kind"]
        pts = [(c, o) for c, o, n in zip(rel["confidence"], rel["observed"], rel["counts"], strict=True) if n]
        if pts:
            xs, ys = zip(*pts, strict=True)
            ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=f"{label} (ECE {_auc_text(res, 'all', 'ece')})")
    what = "P(positive class)" if kind == "positive class" else "top-label confidence"
    ax.set(
        xlim=(-0.02, 1.02), ylim=(-0.02, 1.02), xlabel=f"mean predicted {what}", ylabel="observed frequency"
    )
    ax.legend(fontsize=7, loc="upper left")
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return figure_png(fig)
