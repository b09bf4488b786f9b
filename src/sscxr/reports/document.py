"""A report as a list of blocks (headings, paragraphs, lists, tables, figures, code), rendered twice:
to Markdown here and to self-contained HTML by `sscxr.reports.html`, so both show the same content."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from sscxr.reports.tables import Table, table_markdown

__all__ = ["Block", "Code", "Figure", "Heading", "Items", "Text", "to_markdown"]


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Text:
    """A paragraph of plain text (escaped in HTML; no markup)."""

    text: str


@dataclass
class Items:
    """A bulleted list of plain-text items."""

    items: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """A PNG figure: saved as ``figures/<name>.png`` beside report.md, embedded in report.html."""

    name: str
    png: bytes
    caption: str


@dataclass
class Code:
    """Preformatted text (a command, a config), folded away in HTML under ``summary``."""

    text: str
    summary: str
    lang: str = ""


Block = Heading | Text | Items | Table | Figure | Code


def _md(block: Block) -> str:
    if isinstance(block, Heading):
        return f"{'#' * block.level} {block.text}\n"
    if isinstance(block, Text):
        return block.text + "\n"
    if isinstance(block, Items):
        return "\n".join(f"- {item}" for item in block.items) + "\n"
    if isinstance(block, Table):
        return table_markdown(block)
    if isinstance(block, Figure):
        return f"![{block.caption}](figures/{block.name}.png)\n\n*{block.caption}*\n"
    fence = "````" if "```" in block.text else "```"
    return f"{block.summary}:\n\n{fence}{block.lang}\n{block.text.rstrip()}\n{fence}\n"


def to_markdown(blocks: Sequence[Block]) -> str:
    """The whole report as Markdown (figures referenced as ``figures/<name>.png``)."""
    return "\n".join(_md(b) for b in blocks)
