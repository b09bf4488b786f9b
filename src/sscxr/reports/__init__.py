"""Reports of evaluations: paper-style tables, figures, Markdown + self-contained HTML, CSV and JSON."""

from __future__ import annotations

from sscxr.reports.classification import (
    ReportFiles,
    build_blocks,
    load_evaluations,
    mapping_note,
    metrics_rows,
    write_report,
)

__all__ = ["ReportFiles", "build_blocks", "load_evaluations", "mapping_note", "metrics_rows", "write_report"]
