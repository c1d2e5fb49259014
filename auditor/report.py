"""The audit report: plain data, its JSON form (schema ``auditor.report/v1``), and its text table.

The JSON key names are a contract that CI users parse; ``to_dict``/``from_dict`` are the one
place that spells them, and ``Report.load`` is the one reader of report JSON from outside. A
metric that could not be computed is ``None`` (JSON ``null``) and the reason is in ``warnings``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from typing import Any

from auditor.errors import AuditError, first_line
from auditor.sinks import for_terminal

SCHEMA = "auditor.report/v1"
SHRINK_SCHEMA = "auditor.shrink/v1"  # what `auditor shrink --json` writes (auditor.pruning.report)
REPORT_MAX_BYTES = 64 << 20  # a report with every optional key is well under 1 MiB


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
    top_probabilities: list[float] | None = None  # the most frequent states' probabilities, descending
    probability_quantiles: dict[str, float] | None = None  # per-state probability at quantiles 0…1


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
    cna_points: dict[str, list[float]] | None = None  # per-sample α and β, evenly thinned


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
    curves: dict[str, list[float]] | None = None  # the shared α grid and both resampled β curves


@dataclass(frozen=True)
class LayerNorms:
    """The norms of one layer's weight: which tensor, as stored, and read as (outputs, inputs)."""

    layer: str  # the layer's pre-activation tensor, as in ``model.layers``
    op: str
    weight: str  # the weight tensor's name in the graph
    shape: list[int]  # as stored
    matrix: list[int]  # (outputs, inputs) it was read as
    frobenius: float
    spectral: float


@dataclass(frozen=True)
class MissingWeights:
    """A layer with no weight figures, and why."""

    layer: str
    reason: str


@dataclass(frozen=True)
class WeightNorms:
    """Data-free baselines from the weights (``auditor.engine.weights``): per-layer norms, their products
    across the layers named in ``covers``, and the ℓ2 path norm."""

    layers: list[LayerNorms]
    without_weights: list[MissingWeights]
    covers: list[str]  # the layers (pre-activation tensors) the products multiply over
    frobenius_product: float | None
    spectral_product: float | None
    path_norm: float | None
    path_norm_note: str | None = None


@dataclass(frozen=True)
class Report:
    """A whole audit: the model, the providers that actually ran, and figures per split."""

    model: ModelInfo
    providers: list[str]
    splits: dict[str, SplitReport]
    cna_margin: CnaMargin | None
    config: dict[str, Any]
    warnings: list[str] = field(default_factory=list)
    spilled_bytes: int | None = None  # bytes of state counts written to spill files
    sharding: dict[str, Any] | None = None  # how a sharded audit ran: Ray address, shards, partitions
    # The CUDA provider's options as they ran, when CUDA ran; absent from the JSON otherwise.
    provider_options: dict[str, dict[str, str]] | None = None
    weights: WeightNorms | None = None  # norm baselines read from the weights alone

    def to_dict(self) -> dict[str, Any]:
        """The report as the ``auditor.report/v1`` JSON object (``provider_options`` only when CUDA ran)."""
        out = {"schema": SCHEMA, **asdict(self)}
        if self.provider_options is None:
            del out["provider_options"]
        return out

    def to_json(self, indent: int | None = 2) -> str:
        return json.dumps(self.to_dict(), indent=indent)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Report:
        """Rebuild a report from ``to_dict`` output; refuses other schemas."""
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not an {SCHEMA} report (schema={data.get('schema')!r})")
        model = _known(ModelInfo, data["model"], "model")
        model["layers"] = [_record(LayerInfo, layer, "model.layers[]") for layer in model["layers"]]
        splits = {
            name: SplitReport(
                **{
                    **_known(SplitReport, split, f"splits.{name}"),
                    "layers": [_record(LayerStats, s, f"splits.{name}.layers[]") for s in split["layers"]],
                }
            )
            for name, split in _mapping(data["splits"], "splits").items()
        }
        margin = data.get("cna_margin")
        return cls(
            model=ModelInfo(**model),
            providers=list(data["providers"]),
            splits=splits,
            cna_margin=_record(CnaMargin, margin, "cna_margin") if margin else None,
            config=dict(data["config"]),
            warnings=list(data.get("warnings", [])),
            spilled_bytes=data.get("spilled_bytes"),
            sharding=data.get("sharding"),
            provider_options=data.get("provider_options"),
            weights=_weights(data.get("weights")),
        )

    @classmethod
    def load(cls, raw: str | bytes, *, strict: bool = True) -> Report:
        """A report from its JSON text: the one reader the CLI, the client and the store use.

        Anything that is not an ``auditor.report/v1`` report (not JSON, another schema, a missing
        key) raises ``ReportError`` with a one-line reason. ``strict`` also checks every field's
        declared scalar type and that every float is finite, as a report from outside must be.
        """
        if len(raw) > REPORT_MAX_BYTES:
            raise ReportError(f"it is larger than {REPORT_MAX_BYTES >> 20} MiB")
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("schema") != SCHEMA:
                schema = data.get("schema") if isinstance(data, dict) else None
                if schema == SHRINK_SCHEMA:
                    raise ValueError(
                        f"it is {SHRINK_SCHEMA}, what auditor shrink --json writes; the audit report of the "
                        "original model is what its --baseline-json writes"
                    )
                raise ValueError(f"its schema is {schema!r}")
            report = cls.from_dict(data)
            if strict:
                _check_fields(report, "report")
        except KeyError as exc:
            raise ReportError(f"it lacks {exc}") from None
        except (ValueError, TypeError, AttributeError, RecursionError) as exc:
            raise ReportError(first_line(exc)) from None
        return report

    def metric(self, name: str, split: str) -> float | None:
        """A headline figure by name: a split's ``samples``, ``accuracy``, ``network_efficiency``,
        ``aiq`` or ``cna``, or a ``cna_margin`` figure (``area``, ``margin_max``, ``cna_margin_max``,
        …), which covers train and test together and so ignores ``split``. None where it could not
        be computed or the split was not audited; an unknown name is a ``KeyError``."""
        if name in _MARGIN_FIGURES:
            return None if self.cna_margin is None else getattr(self.cna_margin, name)
        if name not in _SPLIT_FIGURES:
            raise KeyError(f"no report metric is called {name!r}")
        figures = self.splits.get(split)
        return None if figures is None else getattr(figures, name)


def _weights(data: dict[str, Any] | None) -> WeightNorms | None:
    """The ``weights`` section of a report dict (absent in reports written before it existed)."""
    if data is None:
        return None
    return WeightNorms(
        **{
            **_known(WeightNorms, data, "weights"),
            "layers": [_record(LayerNorms, layer, "weights.layers[]") for layer in data["layers"]],
            "without_weights": [
                _record(MissingWeights, missing, "weights.without_weights[]") for missing in data["without_weights"]
            ],
        }
    )


def _mapping(data: object, where: str) -> dict[str, Any]:
    """``data`` when it is a JSON object; otherwise a ``ValueError`` naming where it stood."""
    if not isinstance(data, dict):
        raise ValueError(f"report.{where} is {type(data).__name__}, not an object")
    return data


def _known(record: type, data: object, where: str) -> dict[str, Any]:
    """The keys of ``data`` that ``record`` has fields for. v1 changes only by adding keys, so a key
    this version does not know comes from a later writer and is left out, not refused."""
    names = {item.name for item in fields(record)}
    return {key: value for key, value in _mapping(data, where).items() if key in names}


def _record(record: type, data: object, where: str) -> Any:
    """``record`` built from the keys of ``data`` it knows (``_known``); each key it needs must be there."""
    known = _known(record, data, where)
    for item in fields(record):
        if item.name not in known and item.default is MISSING:
            raise ValueError(f"report.{where} lacks {item.name!r}")
    return record(**known)


class ReportError(AuditError):
    """A text that is not an ``auditor.report/v1`` report; the message says why, in one line."""


_SPLIT_FIGURES = frozenset({"samples", "accuracy", "network_efficiency", "aiq", "cna"})
_MARGIN_FIGURES = frozenset({"area", "margin_max", "margin_p5", "cna_margin_max", "cna_margin_p5"})
_FIELD_TYPES = {"int": (int,), "float": (int, float), "str": (str,), "bool": (bool,), "None": (type(None),)}


def _check_fields(value: object, where: str) -> None:
    """Raise ``ValueError`` at the first field of a report dataclass whose value does not have its
    declared scalar type (booleans are not numbers; floats must be finite). Nested reports, lists
    and dicts are checked inside."""
    if is_dataclass(value):
        for item in fields(value):
            inner, path = getattr(value, item.name), f"{where}.{item.name}"
            declared = str(item.type)
            if "[" not in declared and not is_dataclass(inner):
                allowed = tuple(t for kind in declared.split(" | ") for t in _FIELD_TYPES.get(kind, (object,)))
                if not isinstance(inner, allowed) or (isinstance(inner, bool) and bool not in allowed):
                    raise ValueError(f"{path} is {inner!r}, not {declared}")
                if isinstance(inner, int) and not isinstance(inner, bool) and declared.startswith("int") and inner < 0:
                    raise ValueError(f"{path} is {inner}, not a count (every whole number in a report is >= 0)")
            _check_fields(inner, path)
    elif isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where} is {value}, not a finite number")
    elif isinstance(value, list | tuple):
        for i, inner in enumerate(value):
            _check_fields(inner, f"{where}[{i}]")
    elif isinstance(value, dict):
        for key, inner in value.items():
            _check_fields(inner, f"{where}.{key}")


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
    """Aligned text columns: numbers right-aligned, text left-aligned; every cell escaped for a
    terminal (``auditor.sinks``), so that names from the model keep the columns aligned."""
    header = [for_terminal(cell) for cell in header]
    rows = [[for_terminal(cell) for cell in row] for row in rows]
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
