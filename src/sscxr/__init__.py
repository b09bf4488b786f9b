"""sscxr: self-supervised (GMML) representation learning on chest X-rays."""

from __future__ import annotations

__version__ = "0.1.0"
