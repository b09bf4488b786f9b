"""argparse types shared by the subcommands: bad numbers are refused by the parser, in one line."""

from __future__ import annotations

import argparse
from collections.abc import Callable


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse `type` accepting integers >= `low` (e.g. `--n-boot -5` or `--batch-size 0` refused)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is below the smallest allowed value, {low}")
        return value

    parse.__name__ = f"integer >= {low}"  # what argparse names in its error
    return parse


def fractions(text: str) -> list[float]:
    """`--split 0.7,0.15,0.15`: three non-negative numbers summing to 1 (train, val, test)."""
    try:
        values = [float(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected three numbers, e.g. 0.7,0.15,0.15") from None
    if len(values) != 3 or min(values) < 0 or abs(sum(values) - 1.0) > 1e-6:
        raise argparse.ArgumentTypeError(
            f"{text!r}: expected three non-negative fractions train,val,test summing to 1, e.g. 0.7,0.15,0.15"
        )
    return values
