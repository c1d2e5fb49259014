"""The grid report's pictures and page: Figure-1-style heatmaps and one self-contained HTML file.

Heatmaps show a mean metric over the first two hidden widths (rows N1, columns N2), one image
per metric and per group of networks that share everything else (variant, label noise, and for
LeNet-5 the third width N3). Matplotlib draws on an Agg canvas directly, with no pyplot state.
"""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from trainers.files import save_atomic
from trainers.stats import format_mean_ci

MAX_ANNOTATED_CELLS = 144  # write the value in each cell up to a 12×12 grid


def _groups(table: Sequence[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in table:
        key = (row["arch"], row["variant"], row["dropout_p"], row["label_noise"], tuple(row["widths"][2:]))
        groups.setdefault(key, []).append(row)
    return groups


def layer_metrics(rows: Sequence[dict[str, Any]]) -> list[str]:
    """``layer1_efficiency``, ``layer2_efficiency``, … present in ``rows`` (per network or per
    architecture, where they carry ``_mean``/``_ci95`` suffixes), in depth order."""
    names = {key.removesuffix("_mean").removesuffix("_ci95") for row in rows for key in row if key.startswith("layer")}
    return sorted(names, key=lambda name: int(name[len("layer") : name.index("_")]))


def _stem(key: tuple) -> str:
    arch, variant, _, noise, rest = key
    suffix = f"_N3-{'-'.join(map(str, rest))}" if rest else ""
    return f"heatmap_{arch}_{variant}_n{noise:g}{suffix}"


def _png(matrix: np.ndarray, rows: list[int], columns: list[int], title: str) -> bytes:
    """One heatmap as PNG bytes; missing cells (NaN) are left blank."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(2.5 + 0.55 * len(columns), 1.8 + 0.45 * len(rows)), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(matrix), origin="lower", cmap="viridis", aspect="auto")
    axes.set_xticks(range(len(columns)), [str(c) for c in columns])
    axes.set_yticks(range(len(rows)), [str(r) for r in rows])
    axes.set_xlabel("N2 (second hidden layer width)")
    axes.set_ylabel("N1 (first hidden layer width)")
    axes.set_title(title, fontsize=9)
    figure.colorbar(image, ax=axes)
    if matrix.size <= MAX_ANNOTATED_CELLS:
        for (i, j), value in np.ndenumerate(matrix):
            if np.isfinite(value):
                color = "black" if image.norm(value) > 0.5 else "white"  # readable on viridis
                axes.text(j, i, f"{value:.3f}", ha="center", va="center", fontsize=7, color=color)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def heatmaps(table: Sequence[dict[str, Any]], out: Path) -> tuple[list[Path], list[str]]:
    """Write the heatmaps of ``table`` (``report.summarize`` rows) to ``out``.

    Returns the files written and notes about groups that were skipped (a heatmap needs at least
    two cells) or split (LeNet-5: one set per third width).
    """
    written: list[Path] = []
    notes: list[str] = []
    for key, rows in _groups(table).items():
        arch, variant, _, noise, rest = key
        n1 = sorted({row["widths"][0] for row in rows})
        n2 = sorted({row["widths"][1] for row in rows})
        if len(n1) * len(n2) < 2:
            notes.append(f"no heatmap for {arch} {variant} noise {noise:g}: only one width combination")
            continue
        metrics = ["accuracy", "aiq", *layer_metrics(rows)]
        context = f"{arch} {variant}" + (f", noise {noise:g}" if noise else "") + (f", N3={rest[0]}" if rest else "")
        for metric in metrics:
            matrix = np.full((len(n1), len(n2)), np.nan)
            for row in rows:
                value = row.get(f"{metric}_mean")
                if value is not None:
                    matrix[n1.index(row["widths"][0]), n2.index(row["widths"][1])] = value
            path = out / f"{_stem(key)}_{metric}.png"
            save_atomic(path, _png(matrix, n1, n2, f"{metric.replace('_', ' ')}: {context}"))
            written.append(path)
        if rest:
            notes.append(f"{arch} heatmaps are over N1 x N2, one set per value of N3")
    return written, list(dict.fromkeys(notes))


def html_page(title: str, table: Sequence[dict[str, Any]], images: Sequence[Path], notes: Sequence[str]) -> str:
    """A single HTML file showing the table (mean ± 95% CI) and every heatmap, inlined as data URIs."""
    metrics = ["accuracy", "aiq", "network_efficiency", *layer_metrics(table)]
    head = ["architecture", "variant", "label noise", "replicates", "params", "fold decrease", *metrics]
    body = []
    for row in table:
        cells = [
            f"{row['arch']} ({','.join(map(str, row['widths']))})",
            row["variant"],
            f"{row['label_noise']:g}",
            str(row["replicates"]),
            f"{row['params']:,}",
            f"{row['fold_decrease']:.1f}",
            *(format_mean_ci(row.get(f"{m}_mean"), row.get(f"{m}_ci95")) for m in metrics),
        ]
        body.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    figures = [
        f'<figure><img alt="{html.escape(p.stem)}" src="data:image/png;base64,'
        f'{base64.b64encode(p.read_bytes()).decode("ascii")}"><figcaption>{html.escape(p.name)}</figcaption></figure>'
        for p in images
    ]
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            f"<title>{html.escape(title)}</title>",
            "<style>body{font-family:sans-serif;margin:2em}table{border-collapse:collapse;font-size:13px}"
            "td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}td:first-child{text-align:left}"
            "figure{display:inline-block;margin:8px}</style></head><body>",
            f"<h1>{html.escape(title)}</h1>",
            "<p>Mean ± 95% confidence interval over replicate seeds (Student's t); aIQ and efficiencies "
            "on the 0–1 scale; fold decrease is the largest network's parameter count over this one's.</p>",
            *(f"<p>{html.escape(note)}</p>" for note in notes),
            "<table><tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in head) + "</tr>",
            *body,
            "</table>",
            *figures,
            "</body></html>",
        ]
    )
