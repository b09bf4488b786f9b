"""A matplotlib figure as PNG bytes, optionally written to a file: the one way every figure is saved."""

from __future__ import annotations

import io
import os

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from sscxr.utils import atomic_write_bytes

__all__ = ["figure_png"]


def figure_png(fig: Figure, dpi: int = 96, path: str | os.PathLike[str] | None = None) -> bytes:
    """The PNG bytes of `fig` (Agg, no "Software" metadata: no URL in the file); written atomically to
    `path` (folders created) when given."""
    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    data = buf.getvalue()
    if path is not None:
        atomic_write_bytes(path, data)
    return data
