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
from auditor.engine.devrun import Device, counting_device
from auditor.engine.expose import Exposed, expose
from auditor.engine.find import Structure, describe, with_shape
from auditor.engine.modelfile import LoadedModel, load_model
from auditor.engine.run import CPU_ONLY, Session, probe_shapes, requested_providers
from auditor.report import LayerInfo, ModelInfo

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto
BATCH_BYTES = 128 << 20  # a batch's widest activations, about
BYTES_PER_UNIT = 8  # a float32 activation and its float32 firing bit
CACHE_BYTES = 1 << 20  # a CPU session call's widest activations, about: they stay in cache
MIN_CALL_ROWS = 8  # below this, per-call overhead outweighs what the cache saves


@dataclass(frozen=True)
class Prepared:
    """A loaded model, its layers (SPEC §1), the exposed copy and the runner over it."""

    model: LoadedModel
    structure: Structure
    exposed: Exposed
    runner: Session
    settings: SessionSettings
    max_rows: int | None = None  # samples per batch that keep activations near BATCH_BYTES
    device: Device | None = None  # where states are counted when not on the host (``devrun``)
    counting_warnings: tuple[str, ...] = ()  # the report's line when CUDA runs but counting cannot follow

    @property
    def providers(self) -> list[str]:
        return self.runner.providers

    @property
    def provider_options(self) -> dict[str, dict[str, str]] | None:
        """The CUDA provider's options when CUDA runs the session, else None (``Session.provider_options``)."""
        return self.runner.provider_options

    @property
    def model_info(self) -> ModelInfo:
        return model_info(self.model, self.structure)


def prepare(
    model: ModelSource | LoadedModel,
    *,
    device: str = "auto",
    states_at: str = "pre-activation",
    gpu_math: str = "exact",
) -> Prepared:
    """Load ``model``, find its layers, expose their states at ``states_at`` and start a session
    (a CUDA one computes with ``gpu_math``: ``run.cuda_provider_options``)."""
    settings = SessionSettings(device, states_at, gpu_math)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    structure = structure_of(loaded)
    # onnxruntime's CUDA MatMulInteger takes int8 × int8 only: CUDA sessions pack in float
    exposed = expose(loaded.proto, structure, states_at, integer_packing=requested_providers(device) == CPU_ONLY)
    runner = Session(exposed.model, structure.input, device, call_rows(structure), gpu_math)
    device, warnings = counting_device(runner.providers)
    return Prepared(loaded, structure, exposed, runner, settings, rows_per_batch(structure), device, tuple(warnings))


def rows_per_batch(structure: Structure) -> int | None:
    """How many samples one batch may hold so that its widest layer's activations, with their
    firing bits, stay near ``BATCH_BYTES``; None when sizes are unknown.

    ``--batch-size`` is the most samples per batch; this caps it further for models with large
    activations. LeNets are never capped (their widest layer fits thousands of samples), while
    an ImageNet CNN at batch 256 would hold gigabytes of activations, preprocessed inputs and
    packed outputs for each of the batches in flight.
    """
    widest = _widest_units(structure)
    return max(1, BATCH_BYTES // (widest * BYTES_PER_UNIT)) if widest else None


def call_rows(structure: Structure) -> int | None:
    """How many samples one CPU session call takes: enough that the widest layer's float32
    activations fill about ``CACHE_BYTES``, and at least ``MIN_CALL_ROWS``; None when sizes are
    unknown. A batch runs in several such calls (``run.Session``).

    Measured on LeNet-5 (docs/performance.md): plain inference in calls of 8–32 MNIST images costs
    10–20% less CPU than in calls of 256, the exposed graph a little less so.
    """
    widest = _widest_units(structure)
    return max(MIN_CALL_ROWS, CACHE_BYTES // (widest * 4)) if widest else None


def _widest_units(structure: Structure) -> int:
    """Neurons × positions of the model's widest layer, 0 when no layer's size is known."""
    sizes = [layer.neurons * layer.positions for layer in structure.layers if layer.neurons and layer.positions]
    return max(sizes, default=0)


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
