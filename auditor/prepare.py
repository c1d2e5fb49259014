"""A model made ready to audit, once: loaded, its layers found, exposed, its session started.

``prepare`` is the per-model work that every audit of the model shares; a ``Prepared`` is
reusable and safe to share between threads (the server keeps a few warm). ``describe_model``
is the one rule for what the auditor finds in a model: ``auditor layers``, the service's
DescribeModel and every report's ``model`` block all come from ``model_info``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace

import onnx

from auditor.config import SessionSettings
from auditor.graph import Exposed, Structure, describe, expose, with_shape
from auditor.modelfile import LoadedModel, load_model
from auditor.report import LayerInfo, ModelInfo
from auditor.run import Runner, probe_shapes

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto


@dataclass(frozen=True)
class Prepared:
    """A loaded model, its layers (SPEC §1), the exposed copy and the runner over it."""

    model: LoadedModel
    structure: Structure
    exposed: Exposed
    runner: Runner
    settings: SessionSettings

    @property
    def providers(self) -> list[str]:
        return self.runner.providers

    @property
    def model_info(self) -> ModelInfo:
        return model_info(self.model, self.structure)


def prepare(model: ModelSource | LoadedModel, *, device: str = "auto", states_at: str = "pre-activation") -> Prepared:
    """Load ``model``, find its layers, expose their states at ``states_at`` and start a session."""
    settings = SessionSettings(device, states_at)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    structure = structure_of(loaded)
    exposed = expose(loaded.proto, structure, states_at)
    return Prepared(loaded, structure, exposed, Runner(exposed.model, structure.input, device), settings)


def structure_of(model: LoadedModel) -> Structure:
    """The model's structure (SPEC §1), with layer sizes that shape inference missed measured on
    one zero sample (``run.probe_shapes``)."""
    structure = describe(model.proto)
    unknown = [layer.name for layer in structure.layers if layer.axis is not None and layer.neurons is None]
    seen = probe_shapes(model.proto, structure.input, unknown)
    return replace(structure, layers=[with_shape(layer, seen.get(layer.name)) for layer in structure.layers])


def describe_model(model: ModelSource | LoadedModel) -> ModelInfo:
    """What the auditor finds in a model, without preparing it for an audit."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    return model_info(loaded, structure_of(loaded))


def model_info(model: LoadedModel, structure: Structure) -> ModelInfo:
    """The report's description of a model: identity, input, and every layer with its sizes."""
    proto = model.proto
    return ModelInfo(
        sha256=model.sha256,
        name=model.name,
        producer=f"{proto.producer_name} {proto.producer_version}".strip(),
        opset=structure.opset,
        input_name=structure.input.name,
        input_shape=list(structure.input.shape),
        input_dtype=str(structure.input.dtype),
        layers=[
            LayerInfo(
                layer.name, layer.op, layer.activation, layer.role, layer.neurons, layer.positions, layer.block_output
            )
            for layer in structure.layers
        ],
    )
