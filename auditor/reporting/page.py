"""The report as one self-contained HTML page: the headline, per-layer tables and the figures.

The page is drawn from a ``Report``'s attributes only, so a report read back from JSON
(``Report.load``) or fetched from a server renders exactly as the audit that wrote it. Styles
and figures are inline and nothing points at the network, so the file works offline and as an
e-mail attachment. Every figure's numbers are also in a table, for readers and printers without
the figures.

The figures are matplotlib drawings saved as SVG and inlined; matplotlib is imported only when a
page is rendered, and draws on its own Figure objects (no pyplot state). A figure whose data
the report lacks (the field is None: a report written before the key existed, or one split
only) is replaced by a short note saying why. No text from the model (layer names) is drawn
into a figure: figures number the layers, and the tables name them. The split names a figure
shows come from the report, so every text of a figure is drawn literally (no mathtext),
escaped and elided.
"""

from __future__ import annotations

import io
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from auditor.report import CnaMargin, LayerInfo, LayerStats, Report, SplitReport, WeightNorms
from auditor.sinks import for_figure, for_html

SPLIT_COLORS = {"train": "#0072b2", "test": "#d55e00"}  # Okabe–Ito blue and vermillion: colour-blind safe
OTHER_COLORS = ("#009e73", "#cc79a7", "#e69f00", "#56b4e9")
QUANTILES = ("0", "0.25", "0.5", "0.75", "1")
PANEL_COLUMNS = 3  # rank–frequency panels per row
SHORT_RANKS = 20  # a rank–frequency line this short also marks each state
_NO_METADATA = {"Creator": None, "Date": None, "Format": None, "Type": None}  # keeps URLs and dates out of the SVG

STYLE = """
:root{--ink:#1b1b1b;--muted:#5c5c5c;--rule:#d0d0d0;--band:#f4f4f4;--warn:#9a6700;--warn-bg:#fff8e5}
body{font:15px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,sans-serif;color:var(--ink);
max-width:1120px;margin:2rem auto;padding:0 1rem}
h1{font-size:1.6rem;margin-bottom:.2rem}h2{font-size:1.25rem;margin-top:2.2rem;border-bottom:1px solid var(--rule)}
h3{font-size:1.05rem;margin-bottom:.3rem}.sub,.note,figcaption{color:var(--muted)}
table{border-collapse:collapse;margin:.6rem 0 1rem;font-size:.9rem}
th,td{padding:.25rem .6rem;border-bottom:1px solid var(--rule);text-align:left;vertical-align:top}
th{background:var(--band)}td.num,th.num{text-align:right;font-variant-numeric:tabular-nums}
tr.wide td{background:var(--warn-bg)}code{font-size:.85rem;word-break:break-all}
.warnings{border:1px solid var(--warn);background:var(--warn-bg);padding:.4rem 1rem;margin:1rem 0}
.warnings h2{border:0;margin-top:.4rem;color:var(--warn)}.mark{color:var(--warn);font-weight:600;white-space:nowrap}
figure{margin:1.2rem 0;break-inside:avoid}figure svg{display:block;max-width:100%;height:auto}
details{margin:.4rem 0 1rem}summary{cursor:pointer;color:var(--muted)}
@media print{body{margin:0;max-width:none;font-size:11pt}h2{break-after:avoid}table,figure{break-inside:avoid}
summary{display:none}}
"""


def render_page(report: Report, sections: Sequence[str] = ()) -> str:
    """The whole page for ``report``, as HTML text.

    ``sections`` are ready HTML sections placed after the headline (``auditor shrink`` adds its own).
    """
    figures = _Figures()
    title = f"Audit of {report.model.name}"
    body = [
        f"<h1>{_e(title)}</h1>",
        '<p class="sub">onnx-auditor report (schema <code>auditor.report/v1</code>). Metrics follow the '
        "auditor's SPEC: aIQ is on the 0–1 scale; entropies are in bits.</p>",
        _warnings(report.warnings),
        _headline(report),
        *sections,
        _layers(report, figures),
        _states(report.splits, figures),
        _cna(report.splits, report.cna_margin, figures),
        _weights(report.weights),
        _settings(report.config),
    ]
    return "\n".join(
        [
            "<!doctype html>",
            '<html lang="en"><head><meta charset="utf-8">',
            '<meta name="viewport" content="width=device-width, initial-scale=1">',
            f"<title>{_e(title)}</title>",
            f"<style>{STYLE}</style>",
            "</head><body>",
            *body,
            "</body></html>",
            "",
        ]
    )


# --- Sections ---------------------------------------------------------------------------------


def _warnings(warnings: Sequence[str]) -> str:
    if not warnings:
        return '<p class="note">No warnings.</p>'
    items = "".join(f"<li>{_e(w)}</li>" for w in warnings)
    return f'<section class="warnings"><h2>Warnings ({len(warnings)})</h2><ul>{items}</ul></section>'


def _headline(report: Report) -> str:
    model, splits = report.model, report.splits
    shape = " × ".join("?" if d is None else str(d) for d in model.input_shape or [])
    identity = [
        ("model", _e(model.name)),
        ("file sha256", f"<code>{_e(model.sha256)}</code>"),
        ("producer", _e(model.producer or "unknown")),
        ("opset", _e(model.opset)),
        ("input", f"{_e(model.input_name)} ({_e(shape)}, {_e(model.input_dtype)})"),
        ("providers that ran", _e(", ".join(report.providers or []))),
        ("layers found", _e(_layer_count(model.layers or []))),
    ]
    identity_rows = [[f"<th>{key}</th>", value] for key, value in identity]
    parts = ["<h2>Headline</h2>", _table(["", ""], identity_rows, head=False, align=False)]
    names = list(splits)
    beta_text = ", ".join(_num(b, "g") for b in dict.fromkeys(split.beta for split in splits.values()))
    rows = [
        ["samples", *(_num(splits[s].samples) for s in names)],
        ["accuracy (top-1)", *(_num(splits[s].accuracy) for s in names)],
        ["network efficiency η_N", *(_num(splits[s].network_efficiency) for s in names)],
        [f"aIQ (β = {beta_text}, 0–1 scale)", *(_num(splits[s].aiq) for s in names)],
        ["CNA", *(_num(splits[s].cna) for s in names)],
    ]
    parts.append(_table(["metric", *names], rows))
    margin = report.cna_margin
    if margin is not None:
        rows = [
            ["area between the curves CNA_A", _num(margin.area)],
            [
                "margin_max (paper: largest softmax margin on a random fraction of training samples)",
                _num(margin.margin_max),
            ],
            ["CNA-Margin with margin_max", _num(margin.cna_margin_max)],
            ["margin_p5 (reference code: 5th percentile of the logit margin)", _num(margin.margin_p5)],
            ["CNA-Margin with margin_p5", _num(margin.cna_margin_p5)],
            ["smoothing window, curve points", f"{_num(margin.window)}, {_num(margin.points)}"],
        ]
        parts += ["<h3>CNA-Margin</h3>", _table(["", "value"], rows)]
    else:
        parts.append('<p class="note">CNA-Margin needs a train and a test split (audit with --split both).</p>')
    return "\n".join(parts)


def _layers(report: Report, figures: _Figures) -> str:
    splits = report.splits
    order = _layer_order(splits)
    info = {layer.name: layer for layer in report.model.layers or []}
    parts = [
        "<h2>Layers</h2>",
        '<p class="sub">Efficiency layers in depth order (layer 1 is the shallowest). The entropy of a layer\'s '
        "states is bounded by its width N_l and by log2 T, the states seen; η_l = entropy ÷ N_l. The suggested "
        "width is ⌈entropy ÷ target efficiency⌉; a layer marked ▲ is wider than ⌈log2 T⌉, so this data cannot "
        "show what its extra neurons would do.</p>",
    ]
    if not order:
        return "\n".join([*parts, '<p class="note">The report has no efficiency layers.</p>'])
    parts += [
        figures.add(
            "Efficiency per layer; dashed lines are the network efficiency η_N (geometric mean).",
            _efficiency_figure,
            splits,
            order,
        ),
        figures.add(
            "Entropy against its ceilings: the layer's width N_l and log2 T for each split.",
            _entropy_figure,
            splits,
            order,
        ),
        figures.add(
            "Neurons against the suggested width; ▲ marks layers wider than ⌈log2 T⌉.", _width_figure, splits, order
        ),
    ]
    header = [
        "#",
        "layer",
        "op → activation",
        "neurons N_l",
        "suggested",
        "positions",
        "states T",
        "distinct",
        "entropy (bits)",
        "log2 T",
        "efficiency η_l",
        "",
    ]
    for split, figures_of_split in splits.items():
        by_name = {layer.name: layer for layer in figures_of_split.layers}
        rows = []
        for index, name in enumerate(order, 1):
            layer = by_name.get(name)
            if layer is None:
                continue
            kind = _kind(info.get(name))
            wide = bool(layer.wider_than_data)
            rows.append(
                (
                    wide,
                    [
                        str(index),
                        _e(name),
                        _e(kind),
                        _num(layer.neurons),
                        _num(layer.suggested_neurons),
                        _num(layer.positions),
                        _num(layer.states_total),
                        _num(layer.states_distinct),
                        _num(layer.entropy_bits),
                        _num(layer.max_entropy_bits, ".2f"),
                        _num(layer.efficiency),
                        '<span class="mark">▲ wider than the data</span>' if wide else "",
                    ],
                )
            )
        parts += [
            f"<h3>{_e(split)}: {_num(figures_of_split.samples)} samples</h3>",
            _table(header, [cells for _, cells in rows], marked=[wide for wide, _ in rows]),
        ]
    return "\n".join(parts)


def _states(splits: Mapping[str, SplitReport], figures: _Figures) -> str:
    order = _layer_order(splits)
    parts = [
        "<h2>State distributions</h2>",
        '<p class="sub">The probabilities of each layer\'s most frequent states, by rank, on log–log axes. A '
        "uniform use of the states is a flat line; an exponential (geometric) one falls ever faster; a power law "
        "is a straight line.</p>",
    ]
    tops = {
        (split, layer.name): _floats(layer.top_probabilities)
        for split, figures_of_split in splits.items()
        for layer in figures_of_split.layers
    }
    if not order or all(top is None for top in tops.values()):
        return "\n".join(
            [
                *parts,
                '<p class="note">Not in this report: it carries no per-layer state probabilities '
                "(<code>top_probabilities</code>; reports from older auditors lack them). Audit again to see them.</p>",
            ]
        )
    parts.append(
        figures.add(
            "Rank–frequency of the most frequent states per layer, train and test overlaid.",
            _rank_figure,
            splits,
            order,
            tops,
        )
    )
    rows = []
    for index, name in enumerate(order, 1):
        for split, figures_of_split in splits.items():
            layer = _layer_named(figures_of_split, name)
            top = tops.get((split, name))
            if layer is None or top is None:
                continue
            quantiles = layer.probability_quantiles or {}
            rows.append(
                [
                    str(index),
                    _e(name),
                    _e(split),
                    _num(layer.states_distinct),
                    _num(len(top)),
                    *(_num(quantiles.get(q), ".3g") for q in QUANTILES),
                ]
            )
    parts.append(_table(["#", "layer", "split", "distinct states", "shown", *(f"q{q}" for q in QUANTILES)], rows))
    listing = "".join(
        f"<tr><td>{index}</td><td>{_e(split)}</td><td>{_e(', '.join(f'{p:.3g}' for p in top))}</td></tr>"
        for index, name in enumerate(order, 1)
        for split in splits
        if (top := tops.get((split, name))) is not None
    )
    parts.append(
        "<details><summary>Every plotted probability, by layer and split (descending)</summary>"
        f"<table><tr><th>#</th><th>split</th><th>probabilities</th></tr>{listing}</table></details>"
    )
    return "\n".join(parts)


def _cna(splits: Mapping[str, SplitReport], margin: CnaMargin | None, figures: _Figures) -> str:
    parts = [
        "<h2>CNA</h2>",
        '<p class="sub">Each sample is a point (α, β): α is the entropy of its input values, β the slope of its '
        "summed pre-activations across depth; CNA is their correlation. CNA-Margin is the area between the "
        "train and test slope–entropy curves (smoothed, jointly normalised, resampled; SPEC §5) times the "
        "margin.</p>",
    ]
    curves = (None if margin is None else margin.curves) or {}
    grid, train, test = (_floats(curves.get(key)) for key in ("alpha", "train", "test"))
    if margin is None:
        parts.append(
            '<p class="note">No slope–entropy curves: they need a train and a test split (audit with --split both).</p>'
        )
    elif grid is None or train is None or test is None or not len(grid) == len(train) == len(test) > 1:
        parts.append(
            '<p class="note">Not in this report: it carries no slope–entropy curves '
            "(<code>cna_margin.curves</code>; reports from older auditors lack them).</p>"
        )
    else:
        parts.append(
            figures.add(
                f"Slope–entropy curves of train and test; the shaded area is CNA_A = {margin.area:.4f}.",
                _curves_figure,
                grid,
                train,
                test,
                margin.area,
            )
        )
        rows = "".join(
            f"<tr><td class='num'>{a:.4f}</td><td class='num'>{b:.4f}</td><td class='num'>{c:.4f}</td></tr>"
            for a, b, c in zip(grid, train, test, strict=True)
        )
        parts.append(
            "<details><summary>The curves' points</summary><table><tr><th>α (normalised)</th>"
            f"<th>β train</th><th>β test</th></tr>{rows}</table></details>"
        )
    points = {}
    for split, figures_of_split in splits.items():
        pairs = figures_of_split.cna_points or {}
        alpha, beta = _floats(pairs.get("alpha")), _floats(pairs.get("beta"))
        if alpha is not None and beta is not None and len(alpha) == len(beta) > 0:
            points[split] = (alpha, beta)
    if not points:
        parts.append(
            '<p class="note">Not in this report: it carries no per-sample (α, β) points '
            "(<code>cna_points</code>; reports from older auditors lack them).</p>"
        )
        return "\n".join(parts)
    parts.append(
        figures.add(
            "Per-sample input entropy α against slope β (a downsample of each split).",
            _scatter_figure,
            points,
            {s: splits[s].cna for s in points},
        )
    )
    rows = [
        [
            _e(split),
            _num(len(alpha)),
            _num(float(alpha.min()), ".4g"),
            _num(float(alpha.max()), ".4g"),
            _num(float(beta.min()), ".4g"),
            _num(float(beta.max()), ".4g"),
            _num(splits[split].cna),
        ]
        for split, (alpha, beta) in points.items()
    ]
    parts.append(_table(["split", "points shown", "α min", "α max", "β min", "β max", "CNA"], rows))
    return "\n".join(parts)


def _weights(weights: WeightNorms | None) -> str:
    parts = [
        "<h2>Weights</h2>",
        '<p class="sub">Data-free baselines, read from the weights alone: each layer\'s weight as a matrix '
        "(outputs × inputs; a Conv kernel bank as C_out × C_in·kH·kW), its Frobenius norm ‖W‖_F and spectral "
        "norm ‖W‖₂, their products over the layers listed, and the ℓ2 path norm (biases excluded).</p>",
    ]
    if weights is None:
        return "\n".join(
            [
                *parts,
                '<p class="note">Not in this report: it carries no <code>weights</code> section '
                "(reports from older auditors lack it).</p>",
            ]
        )
    rows = [
        [
            _e(layer.layer),
            _e(layer.op),
            f"<code>{_e(layer.weight)}</code>",
            _e(" × ".join(str(d) for d in layer.matrix or [])),
            _num(layer.frobenius),
            _num(layer.spectral),
        ]
        for layer in weights.layers
    ]
    parts.append(_table(["layer", "op", "weight", "matrix", "‖W‖_F", "‖W‖₂"], rows))
    covers = ", ".join(str(name) for name in weights.covers or []) or "no layer"
    note = weights.path_norm_note
    totals = [
        [f"<th>Π ‖W‖_F over {_e(covers)}</th>", _num(weights.frobenius_product)],
        [f"<th>Π ‖W‖₂ over {_e(covers)}</th>", _num(weights.spectral_product)],
        ["<th>ℓ2 path norm</th>", _num(weights.path_norm) + (f" ({_e(note)})" if note else "")],
    ]
    parts.append(_table(["", ""], totals, head=False, align=False))
    missing = weights.without_weights
    if missing:
        items = "".join(f"<li>{_e(m.layer)}: {_e(m.reason)}</li>" for m in missing)
        parts.append(f'<p class="note">Layers without weight figures ({len(missing)}):</p><ul>{items}</ul>')
    return "\n".join(parts)


def _settings(config: Mapping[str, Any]) -> str:
    rows = [[_e(key), _e(_setting(value))] for key, value in config.items()]
    return "\n".join(["<h2>Settings</h2>", _table(["setting", "value"], rows, align=False)])


# --- Figures ----------------------------------------------------------------------------------


class _Figures:
    """Numbers the page's figures and keeps the ids inside each inlined SVG apart."""

    def __init__(self) -> None:
        self.count = 0

    def add(self, caption: str, draw: Callable[..., Any], *args: Any) -> str:
        """``<figure>`` with the SVG that ``draw(*args)`` returns as a matplotlib Figure."""
        self.count += 1
        svg = _inline_svg(draw(*args), f"fig{self.count}", caption)
        return f"<figure>{svg}<figcaption>Figure {self.count}. {_e(caption)}</figcaption></figure>"


def _new_figure(width: float, height: float, layout: str | None = "constrained") -> Any:
    """A matplotlib Figure on its own Agg canvas (no pyplot, no global state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout=layout)
    FigureCanvasAgg(figure)
    return figure


def _inline_svg(figure: Any, prefix: str, label: str) -> str:
    """The figure as an ``<svg>`` element fit for inlining: no XML prolog or doctype, and every id
    renamed ``prefix-N`` so that figures never share one (matplotlib reuses glyph ids across files)."""
    buffer = io.StringIO()
    _literal_texts(figure)
    with warnings.catch_warnings():
        # Layout that cannot fit every legend entry, glyphs a font lacks: the figure is drawn
        # anyway, and a page rendered in CI must not fill its log with library warnings.
        warnings.simplefilter("ignore")
        figure.savefig(buffer, format="svg", metadata=_NO_METADATA)
    text = buffer.getvalue()
    text = text[text.index("<svg") :]
    names = {old: f"{prefix}-{i}" for i, old in enumerate(dict.fromkeys(re.findall(r'\bid="([^"]+)"', text)))}
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{names[m[1]]}"', text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{names.get(m[1], m[1])}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{names.get(m[1], m[1])})", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{_e(label)}" ', 1).strip()


def _literal_texts(figure: Any) -> None:
    """Every text in the figure shown as written: split names and other strings from the report
    are escaped and elided (``auditor.sinks.for_figure``) and never parsed as mathtext, in which
    ``$\\frac{}$`` is an error and ``$...$`` a formula."""
    from matplotlib.text import Text

    for text in figure.findobj(Text):
        text.set_parse_math(False)
        text.set_text(for_figure(text.get_text()))


def _split_color(split: str, index: int) -> str:
    return SPLIT_COLORS.get(split, OTHER_COLORS[index % len(OTHER_COLORS)])


def _layers_figure(count: int, height: float) -> tuple[Any, Any, np.ndarray]:
    """A figure with one axes over ``count`` layers in depth order, and the layers' x positions."""
    figure = _new_figure(7.5, height)
    axes = figure.add_subplot()
    x = np.arange(1, count + 1)
    step = max(1, math.ceil(count / 30))
    axes.set_xticks(x[::step])
    axes.set_xlabel("layer (depth order)")
    return figure, axes, x


def _legend_outside(axes: Any) -> None:
    axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))


def _widths(splits: Mapping[str, SplitReport], order: Sequence[str]) -> np.ndarray:
    """Each layer's neuron count, from whichever split has the layer."""
    return np.nanmax(np.vstack(list(_per_split(splits, order, _neurons).values())), axis=0)


def _per_split(
    splits: Mapping[str, SplitReport], order: Sequence[str], figure: Callable[[LayerStats], float | None]
) -> dict[str, np.ndarray]:
    """``figure`` of each layer in ``order`` for every split, NaN where a split lacks the layer."""
    values = {}
    for split, figures_of_split in splits.items():
        by_name = {layer.name: figure(layer) for layer in figures_of_split.layers}
        values[split] = np.array([_finite(by_name.get(name)) for name in order], dtype=float)
    return values


def _neurons(layer: LayerStats) -> float | None:
    return layer.neurons


def _bar_offsets(count: int, width: float = 0.8) -> tuple[float, list[float]]:
    bar = width / max(count, 1)
    return bar, [(i - (count - 1) / 2) * bar for i in range(count)]


def _efficiency_figure(splits: Mapping[str, SplitReport], order: Sequence[str]) -> Any:
    figure, axes, x = _layers_figure(len(order), 3.0)
    efficiency = _per_split(splits, order, lambda layer: layer.efficiency)
    bar, offsets = _bar_offsets(len(efficiency))
    for i, (split, values) in enumerate(efficiency.items()):
        color = _split_color(split, i)
        axes.bar(x + offsets[i], values, bar, color=color, label=split)
        network = _finite(splits[split].network_efficiency)
        if not math.isnan(network):
            axes.axhline(network, color=color, linestyle="--", linewidth=1, label=f"η_N {split} = {network:.3f}")
    axes.set_ylim(0, 1)
    axes.set_ylabel("efficiency η_l")
    _legend_outside(axes)
    return figure


def _entropy_figure(splits: Mapping[str, SplitReport], order: Sequence[str]) -> Any:
    figure, axes, x = _layers_figure(len(order), 3.2)
    entropy = _per_split(splits, order, lambda layer: layer.entropy_bits)
    ceiling = _per_split(splits, order, lambda layer: layer.max_entropy_bits)
    neurons = _widths(splits, order)
    bar, offsets = _bar_offsets(len(entropy))
    for i, split in enumerate(entropy):
        color = _split_color(split, i)
        axes.bar(x + offsets[i], entropy[split], bar, color=color, label=f"entropy, {split}")
        axes.plot(x, ceiling[split], color=color, linestyle=":", marker=".", label=f"log2 T, {split}")
    axes.scatter(x, neurons, marker="_", s=400, color="black", linewidths=2, label="width N_l", zorder=3)
    axes.set_ylim(0, None)
    axes.set_ylabel("bits")
    _legend_outside(axes)
    return figure


def _width_figure(splits: Mapping[str, SplitReport], order: Sequence[str]) -> Any:
    figure, axes, x = _layers_figure(len(order), 3.2)
    neurons = _widths(splits, order)
    suggested = _per_split(splits, order, lambda layer: layer.suggested_neurons)
    bar, offsets = _bar_offsets(len(suggested) + 1)
    axes.bar(x + offsets[0], neurons, bar, color="#999999", label="neurons N_l")
    for i, (split, values) in enumerate(suggested.items()):
        axes.bar(x + offsets[i + 1], values, bar, color=_split_color(split, i), label=f"suggested, {split}")
    wide = np.zeros(len(order), dtype=bool)
    for figures_of_split in splits.values():
        flags = {layer.name: bool(layer.wider_than_data) for layer in figures_of_split.layers}
        wide |= np.array([flags.get(name, False) for name in order])
    if wide.any():
        axes.scatter(x[wide], neurons[wide] * 1.08, marker="^", color="#9a6700", label="wider than ⌈log2 T⌉", zorder=3)
    finite = neurons[np.isfinite(neurons)]
    if finite.size and finite.max() / max(finite.min(), 1) > 32:
        axes.set_yscale("log", base=2)
    axes.set_ylabel("neurons")
    _legend_outside(axes)
    return figure


def _rank_figure(
    splits: Mapping[str, SplitReport], order: Sequence[str], tops: Mapping[tuple[str, str], np.ndarray | None]
) -> Any:
    columns = min(PANEL_COLUMNS, len(order))
    rows = math.ceil(len(order) / columns)
    width, height = 2.6 * columns + 0.4, 2.1 * rows + 0.3
    figure = _new_figure(width, height, layout=None)  # fixed margins: a layout engine costs a draw per panel
    figure.subplots_adjust(
        left=0.75 / width, right=1 - 0.15 / width, bottom=0.5 / height, top=1 - 0.3 / height, wspace=0.4, hspace=0.55
    )
    for index, name in enumerate(order, 1):
        axes = figure.add_subplot(rows, columns, index)
        neurons = None
        for i, split in enumerate(splits):
            top = tops.get((split, name))
            if top is None or not (top > 0).any():
                continue
            top = top[top > 0]
            axes.plot(
                np.arange(1, len(top) + 1),
                top,
                color=_split_color(split, i),
                marker="." if len(top) <= SHORT_RANKS else None,  # on long tails markers only add bytes
                markersize=3,
                linewidth=1,
                label=split,
            )
            layer = _layer_named(splits[split], name)
            neurons = neurons if layer is None else layer.neurons
        _log_axes(axes)
        axes.set_title(f"layer {index}" + (f" (N = {neurons})" if neurons is not None else ""), fontsize=9)
        axes.tick_params(labelsize=7)
        if index == 1:
            axes.legend(fontsize=7)
        if (index - 1) % columns == 0:
            axes.set_ylabel("probability", fontsize=8)
        if index > len(order) - columns:
            axes.set_xlabel("rank", fontsize=8)
    return figure


def _log_axes(axes: Any) -> None:
    """Log–log axes with a few major ticks labelled in plain numbers: matplotlib's default 10^k
    labels go through its mathtext typesetter and its minor ticks are objects each, which made
    these small panels cost over half a second apiece."""
    from matplotlib.ticker import FuncFormatter, LogLocator, NullLocator

    for axis, scale in ((axes.xaxis, axes.set_xscale), (axes.yaxis, axes.set_yscale)):
        scale("log")
        axis.set_major_locator(LogLocator(numticks=5))
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
        axis.set_minor_locator(NullLocator())


def _curves_figure(grid: np.ndarray, train: np.ndarray, test: np.ndarray, area: float) -> Any:
    figure = _new_figure(6.0, 3.6)
    axes = figure.add_subplot()
    axes.fill_between(grid, train, test, color="#bbbbbb", alpha=0.6, linewidth=0, label=f"CNA_A = {area:.4f}")
    axes.plot(grid, train, color=SPLIT_COLORS["train"], linewidth=1.6, label="train")
    axes.plot(grid, test, color=SPLIT_COLORS["test"], linewidth=1.6, label="test")
    axes.text(0.98, 0.04, f"shaded area CNA_A = {area:.4f}", transform=axes.transAxes, ha="right", fontsize=9)
    axes.set_xlabel("α, input entropy (normalised)")
    axes.set_ylabel("β, slope (normalised)")
    axes.legend(fontsize=8)
    return figure


def _scatter_figure(points: Mapping[str, tuple[np.ndarray, np.ndarray]], cna: Mapping[str, float | None]) -> Any:
    figure = _new_figure(6.0, 3.8)
    axes = figure.add_subplot()
    for i, (split, (alpha, beta)) in enumerate(points.items()):
        value = _finite(cna.get(split))
        label = f"{split} ({len(alpha)} points" + ("" if math.isnan(value) else f", CNA = {value:.3f}") + ")"
        axes.scatter(alpha, beta, s=5, alpha=0.45, color=_split_color(split, i), linewidths=0, label=label)
    axes.set_xlabel("α, input entropy (bits)")
    axes.set_ylabel("β, slope of summed pre-activations")
    axes.legend(fontsize=8, markerscale=3)
    return figure


# --- Small helpers ----------------------------------------------------------------------------


def _layer_order(splits: Mapping[str, SplitReport]) -> list[str]:
    """Layer names in depth order: each split lists its layers in that order; merge them."""
    order: list[str] = []
    for figures_of_split in splits.values():
        for layer in figures_of_split.layers:
            if layer.name not in order:
                order.append(layer.name)
    return order


def _layer_named(split: SplitReport, name: str) -> LayerStats | None:
    """The split's figures of the layer ``name``, None where the split lacks it."""
    return next((layer for layer in split.layers if layer.name == name), None)


def _layer_count(layers: Sequence[LayerInfo]) -> str:
    hidden = sum(1 for layer in layers if layer.role != "output")
    return f"{len(layers)} ({hidden} hidden, {len(layers) - hidden} output)"


def _kind(found: LayerInfo | None) -> str:
    """``op → activation`` of a layer the graph search found ("?" for a layer the model lacks)."""
    if found is None:
        return "? → none"
    return f"{found.op} → {found.activation or 'none'}"


def _floats(value: Any) -> np.ndarray | None:
    """A 1-D array of finite floats, or None when ``value`` is absent or malformed."""
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=float)
    except (TypeError, ValueError):
        return None
    return array if array.ndim == 1 and array.size and np.isfinite(array).all() else None


def _finite(value: Any) -> float:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else math.nan


def _num(value: Any, spec: str = ".4f") -> str:
    """A cell for a number: integers exact, floats to ``spec``; null as a dash."""
    if value is None:
        return "—"
    if isinstance(value, bool) or not isinstance(value, int | float):
        return _e(value)
    if isinstance(value, int):
        return str(value)
    return format(value, spec)


def _setting(value: Any) -> str:
    """A setting as the command line spells it (JSON's true/false, lists space-separated)."""
    if isinstance(value, list | tuple):
        return " ".join(_setting(v) for v in value)
    if isinstance(value, bool):
        return str(value).lower()
    return "default" if value is None else str(value)


def _e(value: Any) -> str:
    return for_html(value)


def _table(
    header: Sequence[str],
    rows: Sequence[Sequence[str]],
    *,
    head: bool = True,
    align: bool = True,
    marked: Sequence[bool] = (),
) -> str:
    """An HTML table of ready HTML cells (callers escape what they put in). With ``align``, cells
    that read as numbers are right-aligned; a row whose ``marked`` flag is set is highlighted."""

    def cell(text: str) -> str:
        if text.startswith("<th>"):
            return text
        return f'<td class="num">{text}</td>' if align and _numeric(text) else f"<td>{text}</td>"

    lines = ["<table>"]
    if head:
        lines.append("<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>")
    for i, row in enumerate(rows):
        attribute = ' class="wide"' if i < len(marked) and marked[i] else ""
        lines.append(f"<tr{attribute}>" + "".join(cell(c) for c in row) + "</tr>")
    lines.append("</table>")
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    if text == "—":
        return True
    try:
        float(text.replace(",", ""))
    except ValueError:
        return False
    return True
