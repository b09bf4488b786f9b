"""The importer registry: importer name -> `Importer` (its summary, the options it takes, the function
that runs it). `sscxr import` has one sub-subcommand per registered importer, built from here, so
adding an importer is one `register_importer(Importer(...))` call and no change to the CLI:

    def _run_toy(args: argparse.Namespace) -> Manifest:
        return read_toy(args.root, count=args.count)

    register_importer(Importer(
        "toy", "toy images, one class per folder", _run_toy, root_help="the toy folder",
        add_arguments=lambda p: p.add_argument("--count", type=int, default=1, help="images per class"),
    ))

The CLI gives every importer ROOT, `--out` and (unless `splits=False`) the split options; the
importer adds the rest. The built-in importers register themselves in `builtin.py`.

This module and `builtin.py` stay light (argparse and dataclasses only): building the CLI parser reads
the registry and must not import torch, numpy or pydicom. An importer's `run` imports its reader.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from sscxr.errors import ConfigError

if TYPE_CHECKING:
    from sscxr.data.manifest import Manifest

__all__ = [
    "Importer",
    "Option",
    "importer",
    "importer_names",
    "register_importer",
    "registered_importers",
    "unregister_importer",
]

_NAME = re.compile(r"[a-z0-9][a-z0-9_-]*")


@dataclass(frozen=True)
class Option:
    """A command-line option of an importer: `parser.add_argument(*flags, **kwargs)`. `needed` ones are
    checked after parsing rather than by argparse, so that every missing one is named in one line
    (exit 2), not only the first."""

    flags: tuple[str, ...]
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    needed: bool = False

    @property
    def dest(self) -> str:
        """The attribute of the parsed arguments that holds this option's value."""
        return str(self.kwargs.get("dest") or self.flags[0].removeprefix("--").replace("-", "_"))


@dataclass(frozen=True)
class Importer:
    """One importer: `run` turns the parsed arguments of `sscxr import NAME ROOT ...` into a manifest.

    Attributes:
        name: the sub-subcommand (`sscxr import NAME`).
        summary: one line, listed by `sscxr import --help` and heading `sscxr import NAME --help`.
        run: parsed arguments (`args.root`, `args.out` and the importer's own options) -> manifest.
        root_help: what ROOT is.
        options: declared options (`needed` ones are checked after parsing, all named at once).
        add_arguments: adds any further options to the importer's own parser.
        splits: takes --split / --hold-out-site / --seed / --resplit, applied to what `run` returns.
        paths: how the rows' paths outside the manifest's folder are written: "like_root" (absolute
            when ROOT is, else relative) or "as_given" (each row keeps its own form: ROOT is a manifest).
    """

    name: str
    summary: str
    run: Callable[[argparse.Namespace], Manifest]
    root_help: str = "data set folder"
    options: tuple[Option, ...] = ()
    add_arguments: Callable[[argparse.ArgumentParser], None] | None = None
    splits: bool = True
    paths: Literal["like_root", "as_given"] = "like_root"

    def __post_init__(self) -> None:
        if not _NAME.fullmatch(self.name):
            raise ValueError(f"importer name {self.name!r}: use lower-case letters, digits, '-' and '_'")
        if self.paths not in ("like_root", "as_given"):
            raise ValueError(f"importer {self.name!r}: paths must be 'like_root' or 'as_given'")

    def add_options(self, parser: argparse.ArgumentParser) -> None:
        """Add this importer's own options (its `options`, then `add_arguments`) to `parser`."""
        for o in self.options:
            parser.add_argument(*o.flags, **o.kwargs)
        if self.add_arguments is not None:
            self.add_arguments(parser)

    def missing(self, args: argparse.Namespace) -> list[str]:
        """The flags of the needed options that `args` leaves unset or empty."""
        return [o.flags[0] for o in self.options if o.needed and getattr(args, o.dest, None) in (None, "")]


_REGISTRY: dict[str, Importer] = {}


def register_importer(entry: Importer, *, replace: bool = False) -> Importer:
    """Add `entry` to the registry (after those registered before it) and return it.

    Raises:
        ValueError: an importer of that name is registered already and `replace` is false.
    """
    if entry.name in _REGISTRY and not replace:
        raise ValueError(f"an importer named {entry.name!r} is registered already (replace=True replaces it)")
    _REGISTRY[entry.name] = entry
    return entry


def unregister_importer(name: str) -> Importer:
    """Remove the importer `name` from the registry and return it (ConfigError if there is none)."""
    entry = importer(name)
    del _REGISTRY[name]
    return entry


def importer(name: str) -> Importer:
    """The registered importer `name`.

    Raises:
        ConfigError: no importer has that name; the message lists the known ones.
    """
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(importer_names()) or "none"
        raise ConfigError(f"unknown importer {name!r}; known importers: {known}") from None


def importer_names() -> tuple[str, ...]:
    """The registered importers' names, in the order they were registered."""
    return tuple(_REGISTRY)


def registered_importers() -> tuple[Importer, ...]:
    """The registered importers, in the order they were registered."""
    return tuple(_REGISTRY.values())
