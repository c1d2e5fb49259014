"""The study's ``index.html``: one self-contained page with every table and figure.

Images are inlined as data URIs, so the page can be mailed or archived on its own. Each figure
of a metric is shown with its caption; each table with the caption that says what was done.
Intervals are written ``mean ± half-width`` with two flags: † when the interval rests on two
replicates only, ‡ when the half-width is larger than the mean (the interval is shown in full,
never clipped at zero).
"""

from __future__ import annotations

import base64
import html
from collections.abc import Sequence

from trainers.figures import Figure
from trainers.stats import Estimate
from trainers.tables import Column, Table

FEW = "†"
WIDE = "‡"
LEGEND = (
    f"± is the half-width of the 95% Student-t interval over replicate seeds; with one replicate no interval "
    f"is given. {FEW}: only two replicates, so the interval is very wide by construction. {WIDE}: the half-width "
    "is larger than the mean; the interval is shown in full."
)
STYLE = (
    "body{font-family:sans-serif;margin:2em;max-width:110em}table{border-collapse:collapse;font-size:13px;"
    "margin:0.5em 0 1.5em}caption{caption-side:bottom;text-align:left;font-size:12px;color:#444;padding-top:4px;"
    "max-width:80em}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td.text,th{text-align:left}"
    "figure{display:inline-block;margin:8px;vertical-align:top}figcaption{font-size:12px;max-width:40em}"
    ".flag{color:#b00}"
)
# Where each table and figure goes: (section heading, table names, figure file prefix).
SECTIONS = (
    ("The paper's tables", ("table1", "table2", "table3"), None),
    ("Heatmaps", (), "heatmap_"),
    ("Do the metrics predict generalization?", ("generalization",), "scatter_"),
    ("Every cell", ("cells",), None),
    ("Every network", ("networks",), None),
    ("The CNA study: correlations with bootstrap intervals", ("cna_study",), "cna_scatter_"),
    ("Every network and checkpoint of the CNA study", ("cna_points",), None),
)


def format_estimate(value: Estimate | None, digits: int) -> str:
    """``0.9512 ± 0.0031`` with its flags, as HTML; the mean alone without an interval."""
    if value is None or value.mean is None:
        return "–"
    if value.ci95 is None:
        return f"{value.mean:.{digits}f}"
    flags = (FEW if value.few else "") + (WIDE if value.wide else "")
    mark = f' <span class="flag">{flags}</span>' if flags else ""
    return f"{value.mean:.{digits}f} ± {value.ci95:.{digits}f}{mark}"


def _cell(column: Column, value: object) -> str:
    if column.kind == "estimate":
        return f"<td>{format_estimate(value if isinstance(value, Estimate) else None, column.digits)}</td>"
    if value is None:
        return "<td>–</td>"
    if column.kind == "int":
        return f"<td>{value:,}</td>"
    if column.kind == "fold":
        return f"<td>{value:.1f}</td>"
    if column.kind == "number":
        return f"<td>{value:.{column.digits}f}</td>"
    if column.kind == "p":
        return f"<td>{value:.3g}</td>"
    return f'<td class="text">{html.escape(str(value))}</td>'


def table_html(table: Table) -> str:
    """One table with its title as a heading and its caption under it."""
    head = "".join(f"<th>{html.escape(c.header)}</th>" for c in table.columns)
    body = ["<tr>" + "".join(_cell(c, row.get(c.key)) for c in table.columns) + "</tr>" for row in table.rows]
    return "\n".join(
        [
            f'<h3 id="{table.name}">{html.escape(table.title)}</h3>',
            f'<table data-name="{table.name}"><caption>{html.escape(table.caption)} '
            f"Files: {table.name}.csv, {table.name}.json.</caption>",
            f"<tr>{head}</tr>",
            *body,
            "</table>",
        ]
    )


def figure_html(figure: Figure) -> str:
    data = base64.b64encode(figure.png).decode("ascii")
    return (
        f'<figure><img alt="{html.escape(figure.title)}" src="data:image/png;base64,{data}">'
        f"<figcaption>{html.escape(figure.title)} ({html.escape(figure.file)})</figcaption></figure>"
    )


def html_page(
    title: str, caption: str, tables: Sequence[Table], figures: Sequence[Figure], notes: Sequence[str]
) -> str:
    """The whole page: caption, notes, then each section's tables and figures."""
    by_name = {table.name: table for table in tables}
    parts = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(caption)}</p>",
        f"<p>{html.escape(LEGEND)}</p>",
        *(f'<p class="note">{html.escape(note)}</p>' for note in notes),
    ]
    for heading, names, prefix in SECTIONS:
        shown = [by_name[name] for name in names if name in by_name]
        pictures = [f for f in figures if prefix and f.file.startswith(prefix)]
        if not shown and not pictures:
            continue
        parts.append(f"<h2>{html.escape(heading)}</h2>")
        if prefix == "heatmap_":
            parts.append(f"<p>{html.escape(caption)} One colour scale per metric across all panels and figures.</p>")
        parts += [table_html(table) for table in shown]
        parts += [figure_html(figure) for figure in pictures]
    parts.append("</body></html>")
    return "\n".join(parts)
