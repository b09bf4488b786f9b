"""Self-contained HTML rendering of report blocks: inline CSS, figures as base64 PNG, no external links.

The page must open offline, from an e-mail attachment or an archive years later: nothing is fetched
(no fonts, scripts, stylesheets or images by URL).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from sscxr.reports.document import Block, Code, Figure, Heading, Items, Text
from sscxr.reports.tables import Table

__all__ = ["CSS", "figure_html", "table_html", "to_html"]

CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #bbb; margin-top: 2em; }
table { border-collapse: collapse; margin: .6em 0 1.4em; font-size: 12px; }
caption { text-align: left; font-weight: 600; padding: .3em 0; }
th, td { border: 1px solid #ccc; padding: 3px 6px; text-align: left; vertical-align: top; }
th { background: #f0f0f0; }
tr.group th { background: #e2e8f0; text-align: center; }
td.na { color: #a33; font-style: italic; }
.scroll { overflow-x: auto; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { font-size: 12px; color: #555; }
pre { background: #f6f6f6; padding: .6em; overflow-x: auto; font-size: 12px; }
details summary { cursor: pointer; color: #335; }
"""


def _esc(text: str) -> str:
    return html.escape(text, quote=True)


def table_html(table: Table) -> str:
    """A `Table` as an HTML table with a caption, a column-group header row and n/a cells marked."""
    parts = ['<div class="scroll"><table>', f"<caption>{_esc(table.title)}</caption>", "<thead>"]
    if table.groups:
        cells = "".join(f'<th colspan="{span}">{_esc(label)}</th>' for label, span in table.groups)
        parts.append(f'<tr class="group">{cells}</tr>')
    parts.append("<tr>" + "".join(f"<th>{_esc(c)}</th>" for c in table.columns) + "</tr></thead><tbody>")
    for row in table.rows:
        tds = "".join(
            f'<td class="na">{_esc(c)}</td>' if c.startswith("n/a") else f"<td>{_esc(c)}</td>" for c in row
        )
        parts.append(f"<tr>{tds}</tr>")
    parts.append("</tbody></table></div>")
    parts += [f"<p>{_esc(n)}</p>" for n in table.notes]
    return "\n".join(parts)


def figure_html(fig: Figure) -> str:
    """The figure embedded as a base64 data URI."""
    data = base64.b64encode(fig.png).decode("ascii")
    return (
        f'<figure><img alt="{_esc(fig.caption)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{_esc(fig.caption)}</figcaption></figure>"
    )


def _block(block: Block) -> str:
    if isinstance(block, Heading):
        level = min(max(block.level, 1), 6)
        return f"<h{level}>{_esc(block.text)}</h{level}>"
    if isinstance(block, Text):
        return f"<p>{_esc(block.text)}</p>"
    if isinstance(block, Items):
        return "<ul>" + "".join(f"<li>{_esc(i)}</li>" for i in block.items) + "</ul>"
    if isinstance(block, Table):
        return table_html(block)
    if isinstance(block, Figure):
        return figure_html(block)
    assert isinstance(block, Code)
    return f"<details><summary>{_esc(block.summary)}</summary><pre>{_esc(block.text)}</pre></details>"


def to_html(blocks: Sequence[Block], title: str) -> str:
    """A complete HTML page (UTF-8) of the blocks."""
    body = "\n".join(_block(b) for b in blocks)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>{_esc(title)}</title><style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
