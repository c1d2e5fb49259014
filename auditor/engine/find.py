"""Finding the layers of an ONNX graph (SPEC §1): pure functions over ``onnx.ModelProto``.

``describe`` reads the data input, the layers in depth order (the output layer included, with
``Role.OUTPUT``) and the prediction output; ``find_layers`` returns just the layers. Nothing here
rewrites or runs a model: ``expose.py`` rewrites a copy so the layers' states come out.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.config import StatePoint
from auditor.errors import ModelError


class Role(StrEnum):
    """What a layer is to the audit: a hidden layer, or the output layer that gives the logits."""

    HIDDEN = "hidden"
    OUTPUT = "output"


ACTIVATIONS = frozenset(
    [
        "Relu",
        "LeakyRelu",
        "PRelu",
        "Elu",
        "Selu",
        "Celu",
        "Gelu",
        "Sigmoid",
        "Tanh",
        "HardSigmoid",
        "HardSwish",
        "Softplus",
        "Softsign",
        "ThresholdedRelu",
        "Mish",
    ]
)


LINEAR = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"})


PASS_THROUGH = frozenset(
    [
        "Add",
        "Sum",
        "Sub",
        "Mul",
        "Div",
        "BatchNormalization",
        "Identity",
        "Dropout",
        "Cast",
        "DequantizeLinear",
        "QuantizeLinear",
        "Transpose",
    ]
)


TO_LOGITS = frozenset({"Softmax", "LogSoftmax", "Identity", "Flatten", "Reshape", "Squeeze"})


# Element-wise affine ops a block may apply after its activation (SPEC §1, state point).
BLOCK_AFFINE = frozenset({"BatchNormalization", "Dropout", "Identity"})


BLOCK_AFFINE_WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div"})


CONV_FAMILY = frozenset({"Conv", "ConvTranspose"})


@dataclass(frozen=True)
class Layer:
    """One layer: its pre-activation tensor ``name`` (SPEC §1) and where its state can be read.

    ``block_output`` is the tensor at the end of the element-wise affine chain that follows the
    activation (BatchNorm, Dropout, …; SPEC §1's state point); it is ``name`` itself when no
    such op follows, so both state points agree on networks without them. ``firing_output`` is
    the activation's output when ``output > 0`` holds exactly where ``name > 0`` does, for every
    float (``_same_sign_outputs``), so firing can be read where the fused kernel writes; else "".
    ``linear_input_shape`` lets φ be taken through linearity from the linear op's input (SPEC §4).
    """

    name: str
    op: str
    activation: str | None
    role: Role
    axis: int | None  # the neuron axis (negative from the end); None when Transposes hide it
    rank: int | None
    dtype: int | None  # ONNX element type, when shape inference knows it
    neurons: int | None
    positions: int | None
    depth: int
    block_output: str = ""
    block_dtype: int | None = None
    firing_output: str = ""  # the activation's output when it fires exactly where ``name`` does
    linear_input_shape: tuple[int | str | None, ...] = ()  # of the linear op's data input, as inferred

    def state_tensor(self, states_at: str) -> str:
        """The tensor whose sign pattern is the layer's state at ``states_at`` (SPEC §1)."""
        return self.block_output if states_at == StatePoint.BLOCK_OUTPUT and self.block_output else self.name


# Element types the audit can feed from numeric data: floats, integers and bools that numpy holds
# natively. Strings, complex numbers, bfloat16, 8- and 4-bit floats and 4-bit ints it cannot.
FEEDABLE_TYPES = (
    TensorProto.FLOAT,
    TensorProto.DOUBLE,
    TensorProto.FLOAT16,
    TensorProto.UINT8,
    TensorProto.INT8,
    TensorProto.UINT16,
    TensorProto.INT16,
    TensorProto.UINT32,
    TensorProto.INT32,
    TensorProto.UINT64,
    TensorProto.INT64,
    TensorProto.BOOL,
)


@dataclass(frozen=True)
class ModelInput:
    """The one data input of the model."""

    name: str
    dtype: np.dtype
    shape: tuple[int | str | None, ...]


@dataclass(frozen=True)
class Structure:
    """What the audit needs to know about a graph before running it."""

    input: ModelInput
    layers: list[Layer]
    output: str
    output_is_probability: bool
    opset: int

    @property
    def output_layer(self) -> Layer | None:
        return next((layer for layer in self.layers if layer.role == Role.OUTPUT), None)


def find_layers(model: onnx.ModelProto) -> list[Layer]:
    """The model's layers in depth order, the output layer (if any) included with role "output"."""
    return describe(model).layers


def describe(model: onnx.ModelProto) -> Structure:
    """Find the data input, the layers and the prediction output of a model; refuse unusable ones."""
    graph = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    shapes, dtypes = _infer(model)
    constants = _constant_tensors(graph)
    producers = {out: (i, node) for i, node in enumerate(graph.node) for out in node.output}
    model_input = _data_input(graph, constants)

    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    hidden: dict[str, Layer] = {}
    same_sign = _same_sign_outputs(graph)
    for tensor, activation, activation_output in _pre_activations(graph, producers, constants):
        found = _walk_to_linear(tensor, producers, constants)
        if found is not None and tensor not in hidden:
            layer = _make_layer(tensor, activation, Role.HIDDEN, found, producers, shapes, dtypes)
            block = _block_output(activation_output, consumers, constants, graph_outputs)
            hidden[tensor] = replace(
                layer,
                block_output=block or tensor,
                block_dtype=dtypes.get(block or tensor),
                firing_output=activation_output if activation_output in same_sign else "",
            )

    output, logits, is_probability = _logits(graph, producers)
    found = _walk_to_linear(logits, producers, constants) if logits else None
    layers = [layer for name, layer in hidden.items() if name != logits]
    if found is not None:
        layer = _make_layer(logits, None, Role.OUTPUT, found, producers, shapes, dtypes)
        layers.append(replace(layer, block_output=logits, block_dtype=layer.dtype))
    if not any(layer.role == Role.HIDDEN for layer in layers):
        raise ModelError(
            "no layers the auditor can use: no activation (Relu, Elu, Sigmoid, …) follows a Conv, Gemm, "
            "MatMul or Einsum; the auditor measures networks with hidden activation layers"
        )
    return Structure(
        input=model_input,
        layers=sorted(layers, key=lambda layer: layer.depth),
        output=output,
        output_is_probability=is_probability,
        opset=opset,
    )


def _infer(model: onnx.ModelProto) -> tuple[dict[str, list[int | str | None]], dict[str, int]]:
    """Static shapes and element types of every tensor that shape inference can type."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # shape inference "is not guaranteed to be complete"; the run still works
        inferred = model
    graph = inferred.graph
    shapes: dict[str, list[int | str | None]] = {}
    dtypes: dict[str, int] = {}
    for info in [*graph.input, *graph.value_info, *graph.output]:
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            dtypes[info.name] = tensor_type.elem_type
        if tensor_type.HasField("shape"):
            shapes[info.name] = _dims(tensor_type)
    for init in graph.initializer:
        shapes[init.name] = list(init.dims)
        dtypes[init.name] = init.data_type
    return shapes, dtypes


def _dims(tensor_type: onnx.TypeProto.Tensor) -> list[int | str | None]:
    """A tensor type's dimensions: sizes, symbolic names, or None where unknown."""
    return [d.dim_value if d.HasField("dim_value") else (d.dim_param or None) for d in tensor_type.shape.dim]


def _constant_tensors(graph: onnx.GraphProto) -> set[str]:
    """Tensors that do not depend on the data: initializers and everything computed from them alone."""
    constants = {init.name for init in graph.initializer}
    for node in graph.node:
        if all(not name or name in constants for name in node.input):
            constants.update(node.output)
    return constants


def _data_input(graph: onnx.GraphProto, constants: set[str]) -> ModelInput:
    inputs = [i for i in graph.input if i.name not in constants]
    if len(inputs) != 1:
        names = [i.name for i in inputs]
        raise ModelError(f"model has {len(inputs)} data inputs {names}; the auditor supports models with exactly one")
    value = inputs[0]
    kind = value.type.WhichOneof("value")
    if kind != "tensor_type" or not value.type.tensor_type.elem_type:
        shown = (kind or "no type").removesuffix("_type")
        raise ModelError(
            f"model input {value.name!r} is a {shown}, not a tensor; the auditor feeds one numeric tensor input"
        )
    tensor_type = value.type.tensor_type
    if tensor_type.elem_type not in FEEDABLE_TYPES:
        raise ModelError(
            f"model input {value.name!r} takes {_type_name(tensor_type.elem_type)} tensors, which the auditor "
            f"cannot feed; it feeds inputs of {', '.join(_type_name(t) for t in FEEDABLE_TYPES)}"
        )
    dims = tuple(_dims(tensor_type))
    return ModelInput(value.name, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type), dims)


def _type_name(elem_type: int) -> str:
    """``float``, ``string``, … for an element type; its number when the enum does not know it."""
    try:
        return onnx.TensorProto.DataType.Name(elem_type).lower()
    except ValueError:
        return f"element type {elem_type}"


def _pre_activations(
    graph: onnx.GraphProto, producers: dict[str, tuple[int, onnx.NodeProto]], constants: set[str]
) -> Iterator[tuple[str, str, str | None]]:
    """(pre-activation tensor, activation op, activation output) for every activation, in node order.

    The activation output is None where a decomposed activation has no single output node to
    follow (erf-GELU), so its state point stays at the pre-activation.
    """
    silu_gates = {
        (x, gate): node for node in graph.node if node.op_type == "Mul" for x, gate in (node.input, node.input[::-1])
    }
    for node in graph.node:
        if node.op_type == "Sigmoid" and (node.input[0], node.output[0]) in silu_gates:  # x · σ(x)
            yield node.input[0], "Silu", silu_gates[node.input[0], node.output[0]].output[0]
        elif node.op_type in ACTIVATIONS or (node.op_type == "Clip" and _clip_min(node, graph) <= 0):
            yield node.input[0], node.op_type, node.output[0]
        elif node.op_type == "Erf":  # erf-GELU: Div(x, √2) → Erf → Add → Mul → Mul
            _, scaled = producers.get(node.input[0], (None, None))
            if scaled is not None and scaled.op_type in ("Div", "Mul"):
                x = next((t for t in scaled.input if t not in constants), node.input[0])
                yield x, "Gelu", None


def _block_output(
    activation_output: str | None,
    consumers: dict[str, list[onnx.NodeProto]],
    constants: set[str],
    graph_outputs: set[str],
) -> str | None:
    """Where the block ends: the activation's output followed through its single consumer while
    that consumer is an element-wise affine op (SPEC §1, state point); None when none follows."""
    tensor, moved = activation_output, False
    while tensor is not None and tensor not in graph_outputs and len(consumers.get(tensor, [])) == 1:
        node = consumers[tensor][0]
        inputs = [name for name in node.input if name]
        rest = [name for name in inputs if name != tensor]
        if node.op_type in BLOCK_AFFINE:  # the data first, its parameters constant
            affine = inputs[0] == tensor and all(name in constants for name in rest)
        else:  # x op c or c op x, with one constant c
            affine = node.op_type in BLOCK_AFFINE_WITH_CONSTANT and len(rest) == 1 and rest[0] in constants
        if not affine:
            break
        tensor, moved = node.output[0], True
    return tensor if moved else None


def _clip_min(node: onnx.NodeProto, graph: onnx.GraphProto) -> float:
    """Clip's lower bound (attribute before opset 11, input after); −inf when absent."""
    for attr in node.attribute:
        if attr.name == "min":
            return attr.f
    if len(node.input) > 1 and node.input[1]:
        bound = _constant_scalar(node.input[1], graph)
        return 0.0 if bound is None else bound  # a data-dependent bound: treat it like ReLU6
    return -math.inf


def _constant_scalar(name: str, graph: onnx.GraphProto) -> float | None:
    """The value of a one-element initializer or Constant node named ``name``, if it is one."""
    value = None
    for init in graph.initializer:
        if init.name == name:
            value = numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name and node.attribute:
            value = helper.get_attribute_value(node.attribute[0])
            value = numpy_helper.to_array(value) if isinstance(value, TensorProto) else value
    array = np.asarray(value) if value is not None else None
    if array is None or array.size != 1 or not np.issubdtype(array.dtype, np.number):
        return None
    return float(array.item())


def _walk_to_linear(
    tensor: str, producers: dict[str, tuple[int, onnx.NodeProto]], constants: set[str]
) -> tuple[onnx.NodeProto, list[onnx.NodeProto]] | None:
    """The linear op reached upward from ``tensor`` through pass-through ops, and the path taken.

    The path lists the pass-through nodes from the linear op down to ``tensor``, so that
    Transposes on it can be replayed to find the neuron axis (channels-last exports).
    """
    seen: set[str] = set()
    stack: list[tuple[str, list[onnx.NodeProto]]] = [(tensor, [])]
    while stack:
        name, path = stack.pop()
        if name in seen or name not in producers:
            continue
        seen.add(name)
        _, node = producers[name]
        if node.op_type in LINEAR:
            return node, path
        if node.op_type in PASS_THROUGH:
            stack.extend((i, [node, *path]) for i in reversed(node.input) if i and i not in constants)
    return None


def _logits(graph: onnx.GraphProto, producers: dict[str, tuple[int, onnx.NodeProto]]) -> tuple[str, str | None, bool]:
    """The prediction output, the tensor behind its Softmax/Flatten chain, and whether it is probabilities."""
    output = graph.output[0].name
    tensor, is_probability = output, False
    while tensor in producers and producers[tensor][1].op_type in TO_LOGITS:
        node = producers[tensor][1]
        is_probability = is_probability or node.op_type == "Softmax"
        tensor = node.input[0]
    return output, tensor, is_probability


def _make_layer(
    tensor: str,
    activation: str | None,
    role: Role,
    found: tuple[onnx.NodeProto, list[onnx.NodeProto]],
    producers: dict[str, tuple[int, onnx.NodeProto]],
    shapes: dict[str, list[int | str | None]],
    dtypes: dict[str, int],
) -> Layer:
    linear, path = found
    layer = Layer(
        name=tensor,
        op=linear.op_type,
        activation=activation,
        role=role,
        axis=_neuron_axis(linear, path, shapes),
        rank=None,
        dtype=dtypes.get(tensor),
        neurons=None,
        positions=None,
        depth=producers[tensor][0],
        linear_input_shape=tuple(shapes.get(linear.input[0]) or ()),
    )
    return with_shape(layer, shapes.get(tensor))


def with_shape(layer: Layer, shape: Sequence[int | str | None] | None) -> Layer:
    """The layer with rank, neurons and positions read off a shape: static, or seen on a batch."""
    if layer.axis is None or not shape or len(shape) < 2:
        return layer
    rank = len(shape)
    axis = layer.axis % rank
    width = shape[axis]
    rest = [d for i, d in enumerate(shape) if i not in (0, axis)]
    return replace(
        layer,
        axis=axis,
        rank=rank,
        neurons=width if isinstance(width, int) and width > 0 else None,
        positions=math.prod(rest) if all(isinstance(d, int) and d > 0 for d in rest) else None,
    )


def _neuron_axis(
    linear: onnx.NodeProto, path: list[onnx.NodeProto], shapes: dict[str, list[int | str | None]]
) -> int | None:
    """The neuron axis after replaying the Transposes below the linear op; None if untraceable."""
    axis = 1 if linear.op_type in CONV_FAMILY else -1
    for node in path:
        if node.op_type == "Transpose":
            perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None)
            rank = len(perm) if perm else len(shapes.get(node.input[0], []))
            if rank == 0:  # no perm and no static rank: the axis cannot be followed
                return None
            perm = perm or list(reversed(range(rank)))
            axis = perm.index(axis % rank)
    return axis


def _same_sign_outputs(graph: onnx.GraphProto) -> set[str]:
    """Outputs of the activations that fire exactly where their input does: ``y > 0`` ⟺ ``x > 0``
    for every float x, NaN, ±inf and subnormals included (docs/performance.md).

    - Relu, LeakyRelu (alpha ≥ 0) and ThresholdedRelu (alpha ≤ 0) return x or a non-positive
      multiple of it; Clip with min 0 (ReLU6) clamps without arithmetic.
    - Elu (alpha ≥ 0), Selu (alpha ≥ 0, gamma > 0.5) and Celu return x (Selu: gamma·x, which a
      gamma > 0.5 keeps above zero even for the smallest subnormal) for x > 0, and
      alpha·(exp(x) − 1) ≤ 0 otherwise, since exp(x) ≤ 1 for x ≤ 0: checked for every negative
      float32 with onnxruntime's CPU kernels.
    - Not Gelu, SiLU or HardSwish: x·Φ(x) rounds to 0 at the smallest subnormal x. Not Tanh:
      onnxruntime's tanh returns 0 for subnormals below 1.4e-43. Not tanh-Gelu, which onnxruntime
      makes slightly positive near x = −5. Not Sigmoid, HardSigmoid, Softplus (positive at 0),
      Softsign (NaN at +inf), PRelu (data-dependent slopes), Mish or any other Clip.
    """
    found = set()
    for node in graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Clip":
            same = _clip_min(node, graph) == 0 and _clip_max(node, graph) > 0
        else:
            same = node.op_type in _SAME_SIGN and _SAME_SIGN[node.op_type](attrs)
        if same:
            found.add(node.output[0])
    return found


# Activation → whether its attributes keep y > 0 ⟺ x > 0 (defaults as in the ONNX operators).
_SAME_SIGN: dict[str, Callable[[dict], bool]] = {
    "Relu": lambda attrs: True,
    "LeakyRelu": lambda attrs: attrs.get("alpha", 0.01) >= 0,
    "ThresholdedRelu": lambda attrs: attrs.get("alpha", 1.0) <= 0,
    "Elu": lambda attrs: attrs.get("alpha", 1.0) >= 0,
    "Selu": lambda attrs: attrs.get("alpha", 1.67326) >= 0 and attrs.get("gamma", 1.0507) > 0.5,
    "Celu": lambda attrs: attrs.get("alpha", 1.0) > 0,
}


def _clip_max(node: onnx.NodeProto, graph: onnx.GraphProto) -> float:
    """Clip's upper bound (attribute before opset 11, input after); +inf when absent, −inf when
    it is not a constant (so that no rule relies on it)."""
    for attr in node.attribute:
        if attr.name == "max":
            return attr.f
    if len(node.input) > 2 and node.input[2]:
        bound = _constant_scalar(node.input[2], graph)
        return -math.inf if bound is None else bound
    return math.inf
