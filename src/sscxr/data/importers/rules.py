"""Row filters (`--where`) and label maps (`--label-map`, `--label-map-file`) for metadata CSVs.

Both compare values case-insensitively, with surrounding spaces dropped and runs of spaces or `_` read
as one space, so `X-ray`, ` x-ray ` and `X_RAY` are the same value.

Row filters: `COLUMN=V1,V2` keeps the rows whose value is one of those listed, `COLUMN!=V1,V2` drops
them. A value holding `*` or `?` is a shell-style wildcard (`view=AP*` keeps `AP`, `AP Supine`,
`AP erect`); `\\,` is a comma inside a value; an empty list (`finding=` / `finding!=`) means the empty
value. Several filters must all hold.

Label maps turn a dataset's raw label strings into the project's canonical labels. A raw value is
looked up in three steps; the first that decides wins:

1. the whole value (`COVID-19, ARDS`, `Pneumonia/Viral/SARS`) is an entry of the map;
2. else the value is a list of findings separated by `,` or `;`, and each finding is a path of levels
   separated by `/`, general to specific (`Pneumonia/Viral/COVID-19`). A finding takes the class of
   its most specific level that the map names, walking up from the last level: at each level, first
   the path up to it (`Pneumonia/Viral`), then the level's own name (`Viral`). Findings the map does
   not name are ignored (`COVID-19, ARDS` with only `COVID-19` mapped is covid-19);
3. the value's findings name no class (unmapped) or several different ones (ambiguous): the row is
   not labelled. Importers drop such rows and count them (or keep them unlabelled when asked); an
   entry for the whole value (step 1) settles an ambiguous one.

There is no substring matching: `SARS` does not match `SARS-CoV-2`.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sscxr.data.manifest import canonical_label
from sscxr.errors import ConfigError

__all__ = [
    "CANONICAL_LABELS",
    "LabelMap",
    "RowFilter",
    "label_map_from",
    "normalise",
    "read_label_map_file",
]

# The labels `canonical_label` maps the known spellings to (manifest.py): a label map must map onto
# these, so that a typo ('pnemonia') cannot quietly create a class of its own.
CANONICAL_LABELS: tuple[str, ...] = ("healthy", "pneumonia", "covid-19", "non-covid", "tuberculosis")

_FINDING_SEPARATORS = re.compile(r"[,;]")
_UNESCAPED_COMMA = re.compile(r"(?<!\\),")


def normalise(value: str) -> str:
    """A value as filters and label maps compare it: case-folded, spaces and `_` folded, trimmed."""
    folded = re.sub(r"[\s_]+", " ", value.strip().casefold())
    # 'COVID-19,ARDS' and 'COVID-19, ARDS' (and 'A / B' and 'A/B') are the same value.
    return re.sub(r" ?([,;/]) ?", r"\1", folded)


# ------------------------------------------------------------------------------------- row filters
@dataclass(frozen=True)
class RowFilter:
    """`column=values` (keep rows with one of the values) or `column!=values` (drop them)."""

    column: str
    values: tuple[str, ...]
    exclude: bool = False

    @classmethod
    def parse(cls, text: str) -> RowFilter:
        """Read `COLUMN=V1,V2` or `COLUMN!=V1,V2` (the `--where` syntax)."""
        column, sep, rest = text.partition("=")
        exclude = column.endswith("!")
        column = column.removesuffix("!").strip()
        if not sep or not column:
            raise ConfigError(
                f"--where {text!r}: expected COLUMN=VALUE[,VALUE...] (keep) or COLUMN!=VALUE[,VALUE...] "
                "(drop), e.g. --where modality=X-ray"
            )
        values = tuple(v.strip().replace("\\,", ",") for v in _UNESCAPED_COMMA.split(rest))
        return cls(column, values, exclude)

    def __str__(self) -> str:
        listed = ",".join(v.replace(",", "\\,") for v in self.values)
        return f"{self.column}{'!=' if self.exclude else '='}{listed}"

    def matches(self, value: str) -> bool:
        """True when `value` is one of the listed values (a wildcard one matching counts)."""
        cell = normalise(value)
        for wanted in self.values:
            pattern = normalise(wanted)
            hit = fnmatch.fnmatchcase(cell, pattern) if any(c in pattern for c in "*?") else cell == pattern
            if hit:
                return True
        return False

    def keeps(self, value: str) -> bool:
        """Whether a row whose `column` holds `value` passes this filter."""
        return self.matches(value) != self.exclude


# -------------------------------------------------------------------------------------- label maps
@dataclass(frozen=True)
class LabelMatch:
    """What a label map makes of one raw value: `label` ("" when none), and the classes it named."""

    label: str
    classes: tuple[str, ...] = ()

    @property
    def ambiguous(self) -> bool:
        """The value's findings name several different classes."""
        return len(self.classes) > 1


@dataclass(frozen=True)
class LabelMap:
    """Normalised raw value -> canonical label; `lookup` applies the rules of the module docstring."""

    table: Mapping[str, str] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return bool(self.table)

    def lookup(self, raw: str) -> LabelMatch:
        """The canonical label of a raw value, or "" with the reason (see the module docstring)."""
        whole = normalise(raw)
        if not whole:
            return LabelMatch("")
        if whole in self.table:
            return LabelMatch(self.table[whole], (self.table[whole],))
        found = [self._finding(f) for f in _FINDING_SEPARATORS.split(whole)]
        classes = tuple(sorted({c for c in found if c}))
        return LabelMatch(classes[0] if len(classes) == 1 else "", classes)

    def _finding(self, finding: str) -> str:
        """Class of the most specific level of a `/` path the map names ("" = none)."""
        levels = [p for p in finding.split("/") if p]
        for k in range(len(levels), 0, -1):
            for key in ("/".join(levels[:k]), levels[k - 1]):
                if key in self.table:
                    return self.table[key]
        return ""


def _canonical_class(name: str, where: str) -> str:
    label = canonical_label(name)
    if label not in CANONICAL_LABELS:
        raise ConfigError(
            f"{where}: {name!r} is not one of the labels the tasks know ({', '.join(CANONICAL_LABELS)}); "
            "map raw values onto one of them"
        )
    return label


def _add(table: dict[str, str], raw: str, label: str, where: str) -> None:
    key = normalise(raw)
    if not key:
        raise ConfigError(f"{where}: an empty raw value cannot be mapped; name the value, e.g. 'COVID-19'")
    if table.get(key, label) != label:
        raise ConfigError(
            f"{where}: {raw!r} is mapped to both {table[key]!r} and {label!r}; keep one of the two entries"
        )
    table[key] = label


def read_label_map_file(path: str | os.PathLike[str]) -> dict[str, list[str]]:
    """A YAML label map: `class: [raw value, ...]` (a single string is one value).

    Raises:
        ConfigError: unreadable file, not YAML, or not a mapping of class -> list of strings.
    """
    import yaml

    file = Path(path)
    try:
        data = yaml.safe_load(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--label-map-file {file}: unreadable ({e}); check the path") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        line = f" (line {where.line + 1})" if where is not None else ""
        raise ConfigError(
            f"--label-map-file {file}: not valid YAML{line}; see `sscxr import csv --help`"
        ) from None
    example = "e.g. 'covid-19: [COVID-19, Pneumonia/Viral/COVID-19]'"
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"--label-map-file {file}: expected a mapping of class -> list of raw values, {example}"
        )
    out: dict[str, list[str]] = {}
    for cls, values in data.items():
        values = [values] if isinstance(values, str) else values
        if not isinstance(values, list) or not all(isinstance(v, str | int | float) for v in values):
            raise ConfigError(f"--label-map-file {file}: class {cls!r} needs a list of raw values, {example}")
        out[str(cls)] = [str(v) for v in values]
    return out


def label_map_from(
    entries: Iterable[str] = (),
    file: str | os.PathLike[str] | None = None,
    classes: Mapping[str, Sequence[str]] | None = None,
) -> LabelMap:
    """The label map of a `--label-map-file`, `--label-map RAW=CLASS` entries and/or `classes`
    (class -> raw values, as in the file); empty when none is given.

    `RAW=CLASS` splits at the last `=`, so a raw value may itself hold one. A raw value mapped to two
    different classes (in one source or across them) is refused: no entry silently overrides another.
    """
    table: dict[str, str] = {}
    sources = [(f"--label-map-file {file}", read_label_map_file(file))] if file is not None else []
    sources += [("label_map", {str(k): list(v) for k, v in classes.items()})] if classes else []
    for where, by_class in sources:
        for cls, values in by_class.items():
            label = _canonical_class(cls, where)
            for raw in values:
                _add(table, raw, label, where)
    for entry in entries:
        raw, sep, cls = entry.rpartition("=")
        where = f"--label-map {entry!r}"
        if not sep or not raw.strip():
            raise ConfigError(
                f"{where}: expected RAW=CLASS, e.g. --label-map 'Pneumonia/Viral/SARS=pneumonia'"
            )
        _add(table, raw, _canonical_class(cls, where), where)
    return LabelMap(table)


def parse_filters(texts: Sequence[str | RowFilter]) -> list[RowFilter]:
    """`RowFilter`s from `--where` texts (filters given as objects pass through)."""
    return [t if isinstance(t, RowFilter) else RowFilter.parse(t) for t in texts]
