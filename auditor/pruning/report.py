"""The shrink report: per layer before and after and why, the model's cost, and the held-out figures.

Plain data (``ShrinkReport``) with three forms: JSON (schema ``auditor.shrink/v1``), a text
table for the terminal, and an HTML section that ``page.render_page`` places on the shrunk
model's audit page. ``model_cost`` counts parameters and multiply-adds from the graph alone.
"""

from __future__ import annotations

import html
import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper

from auditor.report import SHRINK_SCHEMA, Report, format_table

SCHEMA = SHRINK_SCHEMA


@dataclass(frozen=True)
class LayerShrink:
    """One hidden layer: its neurons before and after, how many went for each reason, the audit's
    suggested width (SPEC §6) before shrinking, and why it was left whole (None when it could be cut)."""

    name: str
    op: str
    activation: str | None
    neurons_before: int
    neurons_after: int
    dead: int
    duplicate: int
    budget: int
    suggested: int | None
    left_whole: str | None
    removed: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class ModelFigures:
    """A model's cost and its held-out figures. ``multiply_adds`` counts Conv, Gemm and MatMul per
    sample; ``latency_ms`` is the median of plain CPU inference on one batch (``latency_batch``)."""

    params: int
    multiply_adds: int
    latency_ms: float
    accuracy: float | None
    network_efficiency: float | None
    aiq: float | None


@dataclass(frozen=True)
class ShrinkReport:
    """A whole shrink: the shrunk model, the layers, before and after, and how the budget was met.

    ``max_abs_difference`` is the largest change of any model output over the audited data (0
    up to float rounding for exact removals), ``max_abs_output`` the largest output there.
    ``search`` lists each (neurons removed by the budget, held-out accuracy) tried.
    ``before_report`` and ``after_report`` are the held-out audits; the former is the baseline
    that ``auditor gate --baseline`` checks the shrunk model against.
    """

    model: onnx.ModelProto
    layers: list[LayerShrink]
    before: ModelFigures
    after: ModelFigures
    criterion: str
    align: int
    max_accuracy_drop: float | None
    audited: dict[str, Any]
    holdout: dict[str, Any]
    max_abs_difference: float
    max_abs_output: float
    search: list[tuple[int, float]]
    latency_batch: int
    before_report: Report
    after_report: Report

    @property
    def removed(self) -> int:
        return sum(layer.neurons_before - layer.neurons_after for layer in self.layers)

    def to_dict(self) -> dict[str, Any]:
        """The report as the ``auditor.shrink/v1`` JSON object (the model and audits left out)."""
        return {
            "schema": SCHEMA,
            "audited": self.audited,
            "holdout": self.holdout,
            "max_accuracy_drop_pp": self.max_accuracy_drop,
            "criterion": self.criterion,
            "align": self.align,
            "neurons_removed": self.removed,
            "max_abs_difference": self.max_abs_difference,
            "max_abs_output": self.max_abs_output,
            "layers": [asdict(layer) for layer in self.layers],
            "before": asdict(self.before),
            "after": asdict(self.after),
            "latency_batch": self.latency_batch,
            "search": [{"budget_removed": k, "accuracy": a} for k, a in self.search],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def render_text(report: ShrinkReport) -> str:
    """The shrink as plain text: per layer, then before/after figures, then layers left whole."""
    rows = [
        [
            str(i),
            _short(layer.name),
            str(layer.neurons_before),
            str(layer.neurons_after),
            str(layer.dead),
            str(layer.duplicate),
            str(layer.budget),
            "-" if layer.suggested is None else str(layer.suggested),
            "left whole" if layer.left_whole else "",
        ]
        for i, layer in enumerate(report.layers, 1)
    ]
    header = ["#", "layer", "before", "after", "dead", "dup", "budget", "suggest", ""]
    lines = [
        f"shrink: {report.removed} neurons removed "
        f"(audited {report.audited['split']} {report.audited['samples']} samples; "
        f"held out {report.holdout['split']} {report.holdout['samples']} samples)",
        *format_table(header, rows),
        "",
        *format_table(["", "before", "after", "change"], _figure_rows(report)),
        f"max |output difference| on the audited data: {report.max_abs_difference:.3g} "
        f"(outputs up to {report.max_abs_output:.3g})",
    ]
    whole = [(i, layer) for i, layer in enumerate(report.layers, 1) if layer.left_whole]
    if whole:
        lines += ["", "left whole:"] + [f"  {i} {_short(layer.name)}: {layer.left_whole}" for i, layer in whole]
    return "\n".join(lines)


def _figure_rows(report: ShrinkReport) -> list[list[str]]:
    b, a = report.before, report.after
    return [
        ["parameters", f"{b.params:,}", f"{a.params:,}", _ratio(a.params, b.params)],
        ["multiply-adds", f"{b.multiply_adds:,}", f"{a.multiply_adds:,}", _ratio(a.multiply_adds, b.multiply_adds)],
        [
            f"latency ms (batch {report.latency_batch})",
            f"{b.latency_ms:.3f}",
            f"{a.latency_ms:.3f}",
            _ratio(a.latency_ms, b.latency_ms),
        ],
        ["accuracy", _fmt(b.accuracy), _fmt(a.accuracy), _pp(b.accuracy, a.accuracy)],
        [
            "η_N",
            _fmt(b.network_efficiency),
            _fmt(a.network_efficiency),
            _delta(b.network_efficiency, a.network_efficiency),
        ],
        ["aIQ", _fmt(b.aiq), _fmt(a.aiq), _delta(b.aiq, a.aiq)],
    ]


def html_section(report: ShrinkReport) -> str:
    """The shrink as an HTML section for the shrunk model's audit page (cells escaped here)."""
    e = html.escape
    layer_rows = "".join(
        "<tr>"
        + f"<td>{i}</td><td><code>{e(layer.name)}</code></td>"
        + "".join(
            f'<td class="num">{v}</td>'
            for v in (
                layer.neurons_before,
                layer.neurons_after,
                layer.dead,
                layer.duplicate,
                layer.budget,
                "—" if layer.suggested is None else layer.suggested,
            )
        )
        + f"<td>{e(layer.left_whole or '')}</td></tr>"
        for i, layer in enumerate(report.layers, 1)
    )
    figure_rows = "".join(
        f"<tr><td>{e(row[0])}</td>" + "".join(f'<td class="num">{e(c)}</td>' for c in row[1:]) + "</tr>"
        for row in _figure_rows(report)
    )
    budget = (
        "exact removals only"
        if report.max_accuracy_drop is None
        else f"at most {report.max_accuracy_drop:g} percentage points of held-out accuracy; ranking: {report.criterion}"
    )
    return "\n".join(
        [
            '<section id="shrink"><h2>Shrink</h2>',
            f'<p class="note">{report.removed} neurons removed ({e(budget)}). Audited on '
            f"{e(report.audited['split'])} ({report.audited['samples']} samples); figures on "
            f"{e(report.holdout['split'])} ({report.holdout['samples']} samples). Largest output change on the "
            f"audited data: {report.max_abs_difference:.3g}.</p>",
            "<table><tr><th>#</th><th>layer</th><th>before</th><th>after</th><th>dead</th><th>duplicate</th>"
            f"<th>budget</th><th>suggested</th><th>left whole because</th></tr>{layer_rows}</table>",
            f"<table><tr><th></th><th>before</th><th>after</th><th>change</th></tr>{figure_rows}</table>",
            "</section>",
        ]
    )


def model_cost(model: onnx.ModelProto) -> tuple[int, int]:
    """(parameters, multiply-adds per sample) of a model, from the graph alone.

    Parameters are the elements of its float initializers and Constant tensors. Multiply-adds
    count Conv (output elements × input channels per group × kernel), Gemm and MatMul (output
    elements × the inner dimension), with an unknown batch taken as 1; ops whose shapes shape
    inference cannot give are left out.
    """
    from auditor.pruning.surgery import Constants, _static_shapes

    graph = model.graph
    params = sum(
        math.prod(init.dims)
        for init in graph.initializer
        if np.issubdtype(helper.tensor_dtype_to_np_dtype(init.data_type), np.floating)
    )
    constants = Constants(graph)
    for node in graph.node:
        if node.op_type in ("Constant", "ConstantOfShape"):
            value = constants.value(node.output[0])
            if value is not None and np.issubdtype(value.dtype, np.floating):
                params += value.size
    shapes = _static_shapes(model)
    macs = 0
    for node in graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out = shapes.get(node.output[0])
        weight = shapes.get(node.input[1])
        if not out or not weight or any(d is None for d in out[1:]) or any(d is None for d in weight):
            continue
        elements = math.prod(d for d in out[1:] if d is not None)
        if node.op_type == "Conv":
            macs += elements * math.prod(weight[1:])  # type: ignore[arg-type]
        elif node.op_type == "Gemm":
            trans_a = next((a.i for a in node.attribute if a.name == "transA"), 0)
            a_shape = shapes.get(node.input[0]) or []
            inner = a_shape[0 if trans_a else -1] if a_shape else None
            macs += elements * (inner or 0)
        else:
            macs += elements * (weight[-2] if len(weight) >= 2 else 1)  # type: ignore[operator]
    return params, macs


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _ratio(after: float, before: float) -> str:
    return "-" if not before else f"×{after / before:.3f}"


def _pp(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{(after - before) * 100:+.2f} pp"


def _delta(before: float | None, after: float | None) -> str:
    return "-" if before is None or after is None else f"{after - before:+.4f}"
