"""Studies: a whole comparison of encoder starts, evaluation modes and label fractions, run as ordinary
`sscxr` commands (`run`), then aggregated with honest uncertainty (`aggregate`, `results`) into one
report (`sscxr.reports.study`). The YAML format is in `spec`."""

from sscxr.study.aggregate import Comparison, Estimate, compare_rows, read_predictions
from sscxr.study.spec import StudySpec, load_study

__all__ = ["Comparison", "Estimate", "StudySpec", "compare_rows", "load_study", "read_predictions"]
