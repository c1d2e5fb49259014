"""Two reports side by side: headline metrics, per-layer figures and the model itself, with deltas.

``compare(base, new)`` matches splits and layers by name and says what changed in the model
(its file, layers added or removed, widths). Reports of different data or settings are still
compared, with a warning; ``setting_differences`` names the audit settings that change the
numbers, which the gate refuses outright when they differ from its baseline's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from auditor.config import AuditConfig
from auditor.report import Report, format_table

SCHEMA = "auditor.comparison/v1"
HEADLINE = ("samples", "accuracy", "network_efficiency", "aiq", "cna")
MARGIN = ("area", "margin_max", "cna_margin_max", "margin_p5", "cna_margin_p5")
MARGIN_SPLIT = "train+test"
# Settings that leave every figure unchanged (SPEC §2: results never depend on batching).
SETTINGS_WITHOUT_EFFECT = frozenset({"batch_size", "device", "memory_budget"})


@dataclass(frozen=True)
class Delta:
    """One figure in both reports; ``delta`` is new − base, None when either is null."""

    metric: str
    split: str
    base: float | None
    new: float | None

    @property
    def delta(self) -> float | None:
        return None if self.base is None or self.new is None else self.new - self.base

    def to_dict(self) -> dict[str, Any]:
        return {"metric": self.metric, "split": self.split, "base": self.base, "new": self.new, "delta": self.delta}


@dataclass(frozen=True)
class LayerDelta:
    """A layer found under the same name in both reports' split: its efficiency and entropy."""

    name: str
    split: str
    efficiency: Delta
    entropy_bits: Delta

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "split": self.split,
            "efficiency": self.efficiency.to_dict(),
            "entropy_bits": self.entropy_bits.to_dict(),
        }


@dataclass(frozen=True)
class ModelChanges:
    """What differs in the model: the file, the layers found, and the widths of layers in both."""

    base_name: str
    new_name: str
    base_sha256: str
    new_sha256: str
    added: list[str]
    removed: list[str]
    widths: list[tuple[str, int | None, int | None]]  # (layer, base neurons, new neurons) where they differ

    @property
    def same_file(self) -> bool:
        return self.base_sha256 == self.new_sha256

    def to_dict(self) -> dict[str, Any]:
        return {
            "base": {"name": self.base_name, "sha256": self.base_sha256},
            "new": {"name": self.new_name, "sha256": self.new_sha256},
            "same_file": self.same_file,
            "layers_added": self.added,
            "layers_removed": self.removed,
            "widths": [{"layer": name, "base": b, "new": n} for name, b, n in self.widths],
        }


@dataclass(frozen=True)
class Comparison:
    """The whole comparison of a new report against a base report."""

    model: ModelChanges
    metrics: list[Delta]
    layers: list[LayerDelta]
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The comparison as JSON-ready data (schema ``auditor.comparison/v1``)."""
        return {
            "schema": SCHEMA,
            "model": self.model.to_dict(),
            "metrics": [m.to_dict() for m in self.metrics],
            "layers": [layer.to_dict() for layer in self.layers],
            "warnings": self.warnings,
        }


def compare(base: Report, new: Report) -> Comparison:
    """``new`` against ``base``: every headline metric, per-layer deltas by name, model changes."""
    common = [split for split in new.splits if split in base.splits]
    warnings = [
        f"the {split} split is only in the {side} report; its figures are not compared"
        for side, report, other in (("base", base, new), ("new", new, base))
        for split in report.splits
        if split not in other.splits
    ]
    for split in common:
        b, n = base.splits[split].samples, new.splits[split].samples
        if b != n:
            warnings.append(
                f"the {split} split has {b} samples in the base report and {n} in the new one: different data, "
                "so the figures also differ for that reason"
            )
    differences = setting_differences(base.config, new.config)
    if differences:
        warnings.append(f"the reports were audited with different settings: {describe_settings(differences)}")
    metrics = [
        Delta(metric, split, base.metric(metric, split), new.metric(metric, split))
        for split in common
        for metric in HEADLINE
    ]
    if base.cna_margin is not None or new.cna_margin is not None:
        metrics += [
            Delta(metric, MARGIN_SPLIT, base.metric(metric, MARGIN_SPLIT), new.metric(metric, MARGIN_SPLIT))
            for metric in MARGIN
        ]
    layers = []
    for split in common:
        base_layers = {layer.name: layer for layer in base.splits[split].layers}
        for layer in new.splits[split].layers:
            old = base_layers.get(layer.name)
            if old is not None:
                layers.append(
                    LayerDelta(
                        layer.name,
                        split,
                        Delta("efficiency", split, old.efficiency, layer.efficiency),
                        Delta("entropy_bits", split, old.entropy_bits, layer.entropy_bits),
                    )
                )
    return Comparison(_model_changes(base, new), metrics, layers, warnings)


def setting_differences(base: Mapping[str, Any], new: Mapping[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(setting, base value, new value)`` for each audit setting that differs and changes the
    numbers. A setting missing from a report (written before it existed) takes its default."""
    defaults = AuditConfig().to_dict()
    differences = []
    for key in dict.fromkeys([*base, *new]):
        if key in SETTINGS_WITHOUT_EFFECT:
            continue
        b, n = base.get(key, defaults.get(key)), new.get(key, defaults.get(key))
        if _normal(b) != _normal(n):
            differences.append((key, b, n))
    return differences


def describe_settings(differences: list[tuple[str, Any, Any]], sides: tuple[str, str] = ("base", "new")) -> str:
    """``beta 2.0 (base) vs 1.0 (new); …`` for ``setting_differences`` output."""
    return "; ".join(f"{key} {_setting(b)} ({sides[0]}) vs {_setting(n)} ({sides[1]})" for key, b, n in differences)


def render_comparison(comparison: Comparison) -> str:
    """The comparison as plain text: the models, the headline table, per-layer deltas, changes, warnings."""
    model = comparison.model
    lines = [
        f"base  {model.base_name}  (sha256 {model.base_sha256[:12]}…)",
        f"new   {model.new_name}  (sha256 {model.new_sha256[:12]}…"
        + (", the same file)" if model.same_file else ", a different file)"),
        "",
    ]
    rows = [(m.metric, m.split, _text(m.base), _text(m.new), _signed(m.delta)) for m in comparison.metrics]
    lines += format_table(("metric", "split", "base", "new", "delta"), rows) if rows else ["no split in common"]
    if comparison.layers:
        rows = [
            (
                _short(layer.name),
                layer.split,
                _text(layer.efficiency.base),
                _text(layer.efficiency.new),
                _signed(layer.efficiency.delta),
                _text(layer.entropy_bits.base),
                _text(layer.entropy_bits.new),
                _signed(layer.entropy_bits.delta),
            )
            for layer in comparison.layers
        ]
        header = ("layer", "split", "effic. base", "new", "delta", "entropy base", "new", "delta")
        lines += ["", "layers matched by name:", *format_table(header, rows, indent="  ")]
    changes = []
    if model.added:
        changes.append(f"  layers added: {', '.join(model.added)}")
    if model.removed:
        changes.append(f"  layers removed: {', '.join(model.removed)}")
    changes += [f"  width of {name}: {_text(b)} -> {_text(n)}" for name, b, n in model.widths]
    lines += ["", "model changes:", *(changes or ["  none in the layers found"])]
    if comparison.warnings:
        lines += ["", "warnings:", *(f"  - {w}" for w in comparison.warnings)]
    return "\n".join(lines)


def _model_changes(base: Report, new: Report) -> ModelChanges:
    base_widths = {layer.name: layer.neurons for layer in base.model.layers}
    new_widths = {layer.name: layer.neurons for layer in new.model.layers}
    return ModelChanges(
        base_name=base.model.name,
        new_name=new.model.name,
        base_sha256=base.model.sha256,
        new_sha256=new.model.sha256,
        added=[name for name in new_widths if name not in base_widths],
        removed=[name for name in base_widths if name not in new_widths],
        widths=[(name, base_widths[name], n) for name, n in new_widths.items() if base_widths.get(name, n) != n],
    )


def _normal(value: Any) -> Any:
    return [_normal(v) for v in value] if isinstance(value, list | tuple) else value


def _text(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return " ".join(_text(v) for v in value)
    return str(value)


def _setting(value: Any) -> str:
    if isinstance(value, list | tuple):
        return " ".join(_setting(v) for v in value)
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def _signed(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:+d}" if isinstance(value, int) else f"{value:+.4f}"


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "…" + name[-(width - 1) :]
