"""A console log handler that follows `sys.stderr` (no heavy imports: the CLI loads it for every command)."""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["StderrHandler"]


class StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A console handler that writes to whatever `sys.stderr` is when a record is emitted.

    A plain StreamHandler keeps the stream it was created with; when that stream is replaced and closed
    (the CLI run in-process by `sscxr study` or a test harness capturing output), every later record
    would fail with "I/O operation on closed file".
    """

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:  # StreamHandler.__init__ assigns it; the property ignores it
        pass
