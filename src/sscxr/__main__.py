"""`python -m sscxr` runs the command line (what `torchrun -m sscxr ...` uses)."""

from __future__ import annotations

from sscxr.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
