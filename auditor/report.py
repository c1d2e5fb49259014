"""The audit report: plain data, its JSON form (schema ``auditor.report/v1``), and its renderings.

The JSON key names are a contract that CI users parse; ``to_dict``/``from_dict`` are the one
place that spells them. A metric that could not be computed is ``None`` (JSON ``null``) and the
reason is in ``warnings``.
"""

from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA = "auditor.report/v1"


@dataclass(frozen=True)
class LayerInfo:
    """A layer found in the graph (SPEC §1): its pre-activation tensor ``name``, what produced it,
    and ``block_output``, the tensor where ``states_at=block-output`` reads its state (``name``
    itself when no BatchNorm, Dropout or affine op follows the activation)."""

    name: str
    op: str
    activation: str | None
    role: str  # "hidden" or "output"
    neurons: int | None
    positions: int | None
    block_output: str | None = None


@dataclass(frozen=True)
class ModelInfo:
    """What identifies the audited model."""

    sha256: str
    name: str
    producer: str
    opset: int
    input_name: str
    input_shape: list[int | str | None]
    input_dtype: str
    layers: list[LayerInfo]


@dataclass(frozen=True)
class LayerStats:
    """State-space figures of one layer on one split (SPEC §2, §6)."""

    name: str
    neurons: int
    positions: int
    states_total: int
    states_distinct: int
    entropy_bits: float
    efficiency: float
    max_entropy_bits: float
    suggested_neurons: int
    wider_than_data: bool


@dataclass(frozen=True)
class SplitReport:
    """Figures for one data split (SPEC §2–§4)."""

    samples: int
    accuracy: float | None
    layers: list[LayerStats]
    network_efficiency: float | None
    aiq: float | None
    beta: float
    cna: float | None


@dataclass(frozen=True)
class CnaMargin:
    """CNA-Margin and its parts (SPEC §5)."""

    area: float
    margin_max: float
    margin_p5: float | None
    cna_margin_max: float
    cna_margin_p5: float | None
    window: int
    points: int


@dataclass(frozen=True)
class Report:
    """A whole audit: the model, the providers that actually ran, and figures per split."""

    model: ModelInfo
    providers: list[str]
    splits: dict[str, SplitReport]
    cna_margin: CnaMargin | None
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The report as the ``auditor.report/v1`` JSON object."""
        return {"schema": SCHEMA, **asdict(self)}

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_dict`` output; refuses other schemas."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} report (schema={data.get('schema')!r})")
        model = dict(data["model"])
        model["layers"] = [LayerInfo(**layer) for layer in model["layers"]]
        splits = {
            name: SplitReport(**{**split, "layers": [LayerStats(**s) for s in split["layers"]]})
            for name, split in data["splits"].items()
        }
        margin = data.get("cna_margin")
        return cls(
            model=ModelInfo(**model),
            providers=list(data["providers"]),
            splits=splits,
            cna_margin=CnaMargin(**margin) if margin else None,
            config=dict(data["config"]),
            warnings=list(data.get("warnings", [])),
        )

    @classmethod
    def from_json(cls, text: str) -> Report:
        return cls.from_dict(json.loads(text))


def render_table(report: Report) -> str:
    """A plain-text summary: per-layer figures per split, then the network figures."""
    model = report.model
    lines = [
        f"model     {model.name}  (sha256 {model.sha256[:12]}…, {model.producer or 'unknown producer'}, "
        f"opset {model.opset})",
        f"providers {', '.join(report.providers)}",
    ]
    header = ("layer", "neurons", "positions", "states", "distinct", "entropy", "max H", "effic.", "suggest")
    for name, split in report.splits.items():
        rows = [
            (
                _short(s.name),
                str(s.neurons),
                str(s.positions),
                str(s.states_total),
                str(s.states_distinct),
                f"{s.entropy_bits:.3f}",
                f"{s.max_entropy_bits:.2f}",
                f"{s.efficiency:.4f}",
                f"{s.suggested_neurons}{'*' if s.wider_than_data else ''}",
            )
            for s in split.layers
        ]
        lines += ["", f"{name}: {split.samples} samples", *format_table(header, rows, indent="  ")]
        lines.append(
            f"  accuracy {_fmt(split.accuracy)}   network efficiency {_fmt(split.network_efficiency)}   "
            f"aIQ (beta={split.beta:g}, 0-1 scale) {_fmt(split.aiq)}   CNA {_fmt(split.cna)}"
        )
    if any(s.wider_than_data for split in report.splits.values() for s in split.layers):
        lines.append("  * wider than log2(states): this data cannot use the layer's extra state space (SPEC §2)")
    margin = report.cna_margin
    if margin is not None:
        lines += [
            "",
            f"CNA-Margin  area {margin.area:.4f}   margin_max {margin.margin_max:.4f} -> {margin.cna_margin_max:.4f}"
            f"   margin_p5 {_fmt(margin.margin_p5)} -> {_fmt(margin.cna_margin_p5)}",
        ]
    if report.warnings:
        lines += ["", "warnings:", *(f"  - {w}" for w in report.warnings)]
    return "\n".join(lines)


def format_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "") -> list[str]:
    """Aligned text columns: numbers right-aligned, text left-aligned."""
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = [all(_is_number(row[i]) for row in rows) for i in range(len(header))]
    aligned = [
        [c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True)]
        for row in [header, *rows]
    ]
    return [(indent + "  ".join(cells)).rstrip() for cells in aligned]


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("*"))
    except ValueError:
        return cell in ("-", "?", "null")
    return True


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]


def _fmt(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


@dataclass(frozen=True)
class Check:
    """One gate threshold and whether the report meets it."""

    metric: str
    split: str
    value: float | None
    threshold: float
    op: str  # ">=" or "<="

    @property
    def passed(self) -> bool:
        if self.value is None:
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    def describe(self) -> str:
        shown = "null (see warnings)" if self.value is None else f"{self.value:.4f}"
        verdict = "ok  " if self.passed else "FAIL"
        return f"{verdict} {self.metric} on {self.split}: {shown} (needs {self.op} {self.threshold:g})"


GATE_METRICS = {
    "min_aiq": ("aiq", ">="),
    "min_efficiency": ("network_efficiency", ">="),
    "min_accuracy": ("accuracy", ">="),
    "min_cna": ("cna", ">="),
    "max_cna_margin": ("cna_margin_max", "<="),
}


def gate_checks(report: Report, thresholds: dict[str, float | None], split: str) -> list[Check]:
    """One check per threshold given; metrics that are null fail their check."""
    if split not in report.splits:
        raise ValueError(f"the report has no {split!r} split (it has {sorted(report.splits)})")
    checks = []
    for key, threshold in thresholds.items():
        if threshold is None:
            continue
        metric, op = GATE_METRICS[key]
        if metric == "cna_margin_max":
            value = report.cna_margin.cna_margin_max if report.cna_margin else None
            checks.append(Check(metric, "train+test", value, threshold, op))
        else:
            checks.append(Check(metric, split, getattr(report.splits[split], metric), threshold, op))
    return checks


def junit_xml(checks: list[Check], report: Report) -> str:
    """JUnit XML with one testcase per threshold, so CI systems show the gate natively."""
    failures = [c for c in checks if not c.passed]
    suites = ET.Element("testsuites", tests=str(len(checks)), failures=str(len(failures)))
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=f"auditor.gate {report.model.name}",
        tests=str(len(checks)),
        failures=str(len(failures)),
    )
    for check in checks:
        case = ET.SubElement(
            suite, "testcase", classname="auditor.gate", name=f"{check.metric} {check.op} {check.threshold:g}"
        )
        if not check.passed:
            ET.SubElement(case, "failure", message=check.describe()).text = check.describe()
    ET.SubElement(suite, "system-out").text = render_table(report)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)
