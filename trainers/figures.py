"""The study's figures as PNG bytes: Figure-1-style heatmaps and one scatter per generalization metric.

- **Heatmaps.** One figure per metric (accuracy, aIQ, η_N, each layer's efficiency) and
  architecture family (for LeNet-5, per third width N3): a panel per variant (rows) and label
  noise (columns), each panel the mean over replicates on N1 (rows) × N2 (columns). All panels of
  a metric, in every figure, share one colour scale, so they can be compared by eye.
- **Scatters.** The train − test accuracy gap against each metric of the generalization test,
  one point per network, with Kendall's τ in the title.
- **CNA-study scatters.** Each predictor of ``trainers.generalization`` against its target, every
  network and checkpoint, with r and τ and their bootstrap intervals in the title.

Matplotlib draws on an Agg canvas directly, with no pyplot state.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from trainers.generalization import POOLED, PREDICTORS, TARGETS, CnaCorrelation, Interval, Point
from trainers.records import VARIANTS
from trainers.tables import Cell, GapCorrelation, Scale, label, layer_metrics, split_metric

if TYPE_CHECKING:
    from matplotlib.figure import Figure as MplFigure

    from trainers.study import AuditedNetwork

MAX_ANNOTATED_CELLS = 144  # write the value in each heatmap cell up to a 12×12 panel
HEATMAP_METRICS = ("accuracy", "aiq", "network_efficiency")
SPLIT_COLOURS = {"train": "tab:blue", "test": "tab:orange", "train+test": "tab:green"}


@dataclass(frozen=True)
class Figure:
    """One picture of the report: its file name, what it shows, and the PNG bytes."""

    file: str
    title: str
    png: bytes


def _canvas(width: float, height: float) -> MplFigure:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure as MplFigure

    figure = MplFigure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: MplFigure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _limits(cells: Sequence[Cell], metric: str, scale: Scale) -> tuple[float, float] | None:
    """One colour scale for ``metric``: the range of its cell means over every variant and noise."""
    values = [scale.value(metric, c.mean(metric)) for c in cells]
    present = [v for v in values if v is not None and math.isfinite(v)]
    if not present:
        return None
    low, high = min(present), max(present)
    return (low, high) if high > low else (low - 0.5, high + 0.5)


def _panel_key(cell: Cell) -> tuple:
    return VARIANTS.index(cell.architecture.variant), cell.dropout_p or 0.0


def _panel_title(cell: Cell) -> str:
    variant = cell.architecture.variant
    if cell.dropout_p is not None:
        variant += f" p={cell.dropout_p:g}"
    return f"{variant}, noise {cell.label_noise:g}"


def _heatmap(cells: Sequence[Cell], metric: str, limits: tuple[float, float], scale: Scale, title: str) -> bytes:
    """One figure: a panel per (variant, noise), N1 × N2 each, on the shared ``limits``."""
    rows = sorted({_panel_key(c) for c in cells})
    noises = sorted({c.label_noise for c in cells})
    n1 = sorted({c.architecture.widths[0] for c in cells})
    n2 = sorted({c.architecture.widths[1] for c in cells})
    panel_w, panel_h = max(2.2, 1.2 + 0.5 * len(n2)), 1.0 + 0.4 * len(n1)
    figure = _canvas(max(4.5, 1.2 + panel_w * len(noises)), 0.8 + panel_h * len(rows))
    axes = figure.subplots(len(rows), len(noises), squeeze=False)
    image = None
    for (r, key), (c, noise) in ((rk, cn) for rk in enumerate(rows) for cn in enumerate(noises)):
        ax = axes[r][c]
        panel = [cell for cell in cells if _panel_key(cell) == key and cell.label_noise == noise]
        if not panel:
            ax.set_axis_off()
            ax.text(0.5, 0.5, "not trained", ha="center", va="center", fontsize=8, transform=ax.transAxes)
            continue
        matrix = np.full((len(n1), len(n2)), np.nan)
        for cell in panel:
            value = scale.value(metric, cell.mean(metric))
            if value is not None:
                matrix[n1.index(cell.architecture.widths[0]), n2.index(cell.architecture.widths[1])] = value
        image = ax.imshow(
            np.ma.masked_invalid(matrix), origin="lower", cmap="viridis", aspect="auto", vmin=limits[0], vmax=limits[1]
        )
        ax.set_xticks(range(len(n2)), [str(w) for w in n2], fontsize=7)
        ax.set_yticks(range(len(n1)), [str(w) for w in n1], fontsize=7)
        ax.set_title(_panel_title(panel[0]), fontsize=8)
        if r == len(rows) - 1:
            ax.set_xlabel("N2", fontsize=8)
        if c == 0:
            ax.set_ylabel("N1", fontsize=8)
        if matrix.size <= MAX_ANNOTATED_CELLS:
            digits = 1 if scale.scales(metric) else 3
            for (i, j), value in np.ndenumerate(matrix):
                if np.isfinite(value):
                    colour = "black" if image.norm(value) > 0.5 else "white"  # readable on viridis
                    ax.text(j, i, f"{value:.{digits}f}", ha="center", va="center", fontsize=7, color=colour)
    if image is not None:
        figure.colorbar(image, ax=axes, shrink=0.9, label=label(metric) + (" (×100)" if scale.scales(metric) else ""))
    figure.suptitle(title, fontsize=9)
    return _png(figure)


def heatmaps(cells: Sequence[Cell], scale: Scale) -> list[Figure]:
    """Every heatmap of the study: per metric, per family (and LeNet-5 third width)."""
    figures = []
    metrics = [*HEATMAP_METRICS, *layer_metrics(cells)]
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        a = cell.architecture
        groups.setdefault((a.arch, a.widths[2:]), []).append(cell)
    for metric in metrics:
        limits = _limits(cells, metric, scale)
        if limits is None:
            continue
        for (arch, rest), group in sorted(groups.items()):
            if all(c.mean(metric) is None for c in group):
                continue
            where = f"_N3-{'-'.join(map(str, rest))}" if rest else ""
            title = f"{label(metric)}: {arch}" + (f", N3 = {rest[0]}" if rest else "") + "\nmean over replicates"
            png = _heatmap(group, metric, limits, scale, title)
            figures.append(Figure(f"heatmap_{arch}{where}_{metric}.png", title.replace("\n", ", "), png))
    return figures


def scatters(networks: Sequence[AuditedNetwork], found: Sequence[GapCorrelation], scale: Scale) -> list[Figure]:
    """One scatter per metric of the generalization test: the gap against the metric, per network."""
    by_metric: dict[str, list[GapCorrelation]] = {}
    for correlation in found:
        by_metric.setdefault(correlation.metric, []).append(correlation)
    gaps = [scale.value("gap", n.gap) for n in networks]
    figures = []
    for metric, correlations in by_metric.items():
        figure = _canvas(4.6, 3.6)
        ax = figure.add_subplot()
        taus = []
        for correlation in correlations:
            xs = [scale.value(metric, split_metric(n, metric, correlation.split)) for n in networks]
            points = [(x, y) for x, y in zip(xs, gaps, strict=True) if x is not None and y is not None]
            tau = correlation.result.tau
            taus.append(f"{correlation.split} τ = {'n/a' if tau is None else f'{tau:+.2f}'}")
            if points:
                x, y = zip(*points, strict=True)
                ax.scatter(x, y, s=14, alpha=0.75, color=SPLIT_COLOURS[correlation.split], label=correlation.split)
        unit = " (×100)" if scale.percent else ""
        ax.set_xlabel(label(metric) + (unit if scale.scales(metric) else ""))
        ax.set_ylabel(f"train − test accuracy{unit}")
        if len(correlations) > 1:
            ax.legend(fontsize=7, title="measured on", title_fontsize=7)
        title = f"gap vs {label(metric)}: " + ", ".join(taus)
        ax.set_title(title, fontsize=8)
        figures.append(Figure(f"scatter_{metric}.png", title, _png(figure)))
    return figures


NOISE_COLOURS = ("#0072b2", "#e69f00", "#009e73", "#d55e00", "#cc79a7", "#56b4e9", "#f0e442", "#000000")
DATASET_MARKERS = ("o", "s", "^", "D", "v")


def cna_scatters(points: Sequence[Point], found: Sequence[CnaCorrelation]) -> list[Figure]:
    """One scatter per predictor of the CNA study: its target against it, every network and checkpoint.

    Colour is the label-noise level, the marker the data set; final networks are drawn larger
    than checkpoints. The title gives r and τ with their intervals over every point (pooled over
    data sets when there are several).
    """
    levels = sorted({p.label_noise for p in points})
    datasets = sorted({p.dataset for p in points})
    overall = POOLED if len(datasets) > 1 else (datasets[0] if datasets else "")
    figures = []
    for key, name, target in PREDICTORS:
        shown = [p for p in points if p.value(key) is not None and p.value(target) is not None]
        if not shown:
            continue
        figure = _canvas(5.2, 4.0)
        ax = figure.add_subplot()
        for d, dataset in enumerate(datasets):
            for level in levels:
                group = [p for p in shown if p.dataset == dataset and p.label_noise == level]
                if not group:
                    continue
                colour = NOISE_COLOURS[levels.index(level) % len(NOISE_COLOURS)]
                sizes = [30 if p.final else 12 for p in group]
                ax.scatter(
                    [p.value(key) for p in group],
                    [p.value(target) for p in group],
                    s=sizes,
                    color=colour,
                    marker=DATASET_MARKERS[d % len(DATASET_MARKERS)],
                    alpha=0.8,
                    label=f"{dataset}, noise {level:g}",
                )
        ax.set_xlabel(name)
        ax.set_ylabel(TARGETS[target])
        ax.legend(fontsize=6, loc="best")
        match = next((c for c in found if c.predictor == key and c.subset == "all" and c.dataset == overall), None)
        stats = "" if match is None else f"\nr {_interval_text(match.pearson)}, τ {_interval_text(match.kendall)}"
        title = f"{TARGETS[target]} vs {name}{stats}"
        ax.set_title(title, fontsize=8)
        figures.append(Figure(f"cna_scatter_{key}.png", title.replace("\n", ": "), _png(figure)))
    return figures


def _interval_text(interval: Interval) -> str:
    if interval.value is None:
        return "n/a"
    if interval.low is None:
        return f"{interval.value:+.2f}"
    return f"{interval.value:+.2f} [{interval.low:+.2f}, {interval.high:+.2f}]"
