"""Finding the layers of an ONNX graph (SPEC §1) and exposing them on a rewritten copy.

Pure functions over ``onnx.ModelProto``; nothing here runs a model. ``find_layers`` returns the
pre-activation tensors in depth order, plus the output layer. ``expose`` returns a new model
whose extra outputs carry, per layer, the firing bits packed into small integers and the
per-sample sum of the pre-activations, so that only a few numbers per position leave the
runtime (FIELD-NOTES: packing in the graph is what keeps the audit near inference speed).
It names every output it adds in an ``Exposed`` record, and whoever reads the outputs reads
them by those names.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.config import STATE_POINTS
from auditor.errors import ModelError

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

GROUP_BITS = 24  # float32 sums of distinct powers of two stay exact below 2**24
WORD_BITS = 64


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
    role: str  # "hidden" or "output"
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
        return self.block_output if states_at == "block-output" and self.block_output else self.name


# Element types the audit can feed from numeric data: floats, integers and bools that numpy holds
# natively. Strings, complex numbers, bfloat16, 8- and 4-bit floats and 4-bit ints it cannot.
FEEDABLE_TYPES = (
    onnx.TensorProto.FLOAT,
    onnx.TensorProto.DOUBLE,
    onnx.TensorProto.FLOAT16,
    onnx.TensorProto.UINT8,
    onnx.TensorProto.INT8,
    onnx.TensorProto.UINT16,
    onnx.TensorProto.INT16,
    onnx.TensorProto.UINT32,
    onnx.TensorProto.INT32,
    onnx.TensorProto.UINT64,
    onnx.TensorProto.INT64,
    onnx.TensorProto.BOOL,
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
        return next((layer for layer in self.layers if layer.role == "output"), None)


@dataclass(frozen=True)
class LayerOutputs:
    """The outputs ``expose`` adds for one layer, and how to read them.

    ``keys`` holds the firing bits of the state tensor packed into int32 groups: bit k of group
    g is neuron ``groups[g][0] + k``, and the groups sit on axis ``group_axis`` of the output.
    ``sum`` holds φ, the per-sample float32 sum of the pre-activations (SPEC §4).
    """

    layer: Layer
    keys: str
    sum: str
    groups: list[tuple[int, int]]
    group_axis: int


@dataclass(frozen=True)
class Exposed:
    """The rewritten model and, by name, every output the audit reads from it.

    ``prediction`` is the model's own first output; ``logits`` is the output layer's tensor
    (SPEC §1), or None when the graph has none the auditor can read.
    """

    model: onnx.ModelProto
    prediction: str
    logits: str | None
    layers: list[LayerOutputs]
    states_at: str

    @property
    def output_names(self) -> list[str]:
        """Every output to fetch: the prediction, each layer's keys and sum, the logits once."""
        names = [self.prediction, *(name for out in self.layers for name in (out.keys, out.sum))]
        return names if self.logits in (None, self.prediction) else [*names, self.logits]


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
            layer = _make_layer(tensor, activation, "hidden", found, producers, shapes, dtypes)
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
        layer = _make_layer(logits, None, "output", found, producers, shapes, dtypes)
        layers.append(replace(layer, block_output=logits, block_dtype=layer.dtype))
    if not any(layer.role == "hidden" for layer in layers):
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


def expose(
    model: onnx.ModelProto,
    structure: Structure,
    states_at: str = "pre-activation",
    *,
    fast: bool = True,
    integer_packing: bool = True,
) -> Exposed:
    """A copy of ``model`` whose outputs add, per layer, packed firing bits and per-sample sums.

    The firing bits are those of each layer's state tensor for ``states_at`` (SPEC §1); φ is
    always the sum of the pre-activations over all units (SPEC §4), whatever the state point.
    The original outputs stay first. Every added output is named in the result.

    ``fast`` lets each layer take cheaper nodes that give the same numbers (docs/performance.md):
    φ through linearity where that reads less than a pass over the pre-activation (equal up to
    float rounding), and then firing read where the fused Conv/Gemm+activation kernel writes
    (``_layer_nodes``). ``fast=False`` builds the straightforward graph, the tests' oracle.
    ``integer_packing`` packs with MatMulInteger, the fastest way on onnxruntime's CPU provider;
    a CUDA session wants False (onnxruntime's CUDA MatMulInteger takes only int8 × int8).
    """
    if states_at not in STATE_POINTS:
        raise ModelError(f"states_at must be one of {STATE_POINTS}, got {states_at!r}")
    exposed = onnx.ModelProto()
    exposed.CopyFrom(model)
    graph = exposed.graph
    taken = {o.name for o in graph.output}
    integer = fast and integer_packing and structure.opset >= 10  # MatMulInteger came in opset 10
    outputs = []
    for index, layer in enumerate(structure.layers):
        if layer.axis is None:
            raise ModelError(
                f"the neuron axis of layer {layer.name!r} cannot be traced through a Transpose without perm "
                "on a tensor of unknown rank; give the Transpose a perm or the model static shapes"
            )
        if layer.neurons is None or layer.rank is None:
            raise ModelError(
                f"the shape of layer {layer.name!r} is unknown before running; give the model static "
                "channel/feature dimensions"
            )
        prefix = f"auditor/{index}"
        groups, group_axis = packing(layer, integer=integer)
        nodes, inits, key_name, sum_name = _layer_nodes(
            layer, model.graph, structure.opset, states_at, prefix, fast, integer
        )
        graph.node.extend(nodes)
        graph.initializer.extend(inits)
        if exposed.ir_version < 4:  # IR 3 requires every initializer to be listed among the inputs
            graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits)
        key_rank = layer.rank if group_axis == -1 else 3  # (batch, groups, positions) when not last
        graph.output.extend([_output(key_name, TensorProto.INT32, key_rank), _output(sum_name, TensorProto.FLOAT, 1)])
        outputs.append(LayerOutputs(layer, key_name, sum_name, groups, group_axis))
    logits = structure.output_layer
    if logits is not None and logits.name not in taken:
        graph.output.append(_output(logits.name, logits.dtype, logits.rank))
    return Exposed(
        model=exposed,
        prediction=structure.output,
        logits=None if logits is None else logits.name,
        layers=outputs,
        states_at=states_at,
    )


def packing(layer: Layer, *, integer: bool) -> tuple[list[tuple[int, int]], int]:
    """How ``expose`` packs a layer: its bit groups, and the packed output's axis that holds them.

    Integer packing gives one byte per 8 neurons (``byte_groups``), float packing groups of at
    most 24 bits (``word_groups``). Neurons on the last axis give (batch, …, groups); otherwise
    (batch, groups, positions).
    """
    last = layer.axis % layer.rank == layer.rank - 1
    groups = byte_groups(layer.neurons) if integer else word_groups(layer.neurons)
    return groups, -1 if last else 1


def word_groups(neurons: int) -> list[tuple[int, int]]:
    """Bit ranges [start, stop) of the float-packed groups: at most 24 bits, never straddling 64-bit words."""
    return [
        (start, min(start + GROUP_BITS, word + WORD_BITS, neurons))
        for word in range(0, neurons, WORD_BITS)
        for start in range(word, min(word + WORD_BITS, neurons), GROUP_BITS)
    ]


def byte_groups(neurons: int) -> list[tuple[int, int]]:
    """Bit ranges [start, stop) of the integer-packed groups: one per 8 neurons."""
    return [(start, min(start + 8, neurons)) for start in range(0, neurons, 8)]


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
    """``FLOAT``, ``STRING``, … for an element type; its number when the enum does not know it."""
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
    role: str,
    found: tuple[onnx.NodeProto, list[onnx.NodeProto]],
    producers: dict[str, tuple[int, onnx.NodeProto]],
    shapes: dict[str, list[int | str | None]],
    dtypes: dict[str, int],
) -> Layer:
    linear, path = found
    axis = _neuron_axis(linear, path, shapes)
    layer = Layer(
        tensor, linear.op_type, activation, role, axis, None, dtypes.get(tensor), None, None, producers[tensor][0]
    )
    layer = replace(layer, linear_input_shape=tuple(shapes.get(linear.input[0]) or ()))
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


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (untyped: onnxruntime types them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {o.name for o in copy.graph.output}
    copy.graph.output.extend(_output(name, None, None) for name in names if name not in taken)
    return copy


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


def _output(name: str, elem_type: int | None, rank: int | None) -> onnx.ValueInfoProto:
    """A graph output typed as ``onnx.checker`` requires (element type and rank, dims unknown)."""
    if elem_type is None or rank is None:  # not inferable: leave it untyped, onnxruntime still runs it
        value = onnx.ValueInfoProto()
        value.name = name
        return value
    return helper.make_tensor_value_info(name, elem_type, [None] * rank)


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


def _layer_nodes(
    layer: Layer, graph: onnx.GraphProto, opset: int, states_at: str, prefix: str, fast: bool, integer: bool
) -> tuple[list[onnx.NodeProto], list[TensorProto], str, str]:
    """One layer's added nodes and initializers, and the names of its keys and its sum.

    With ``fast``, φ goes through linearity where that is cheaper (``_linear_partial``); then the
    audit needs nothing of the pre-activation, so at the pre-activation state point the firing
    bits are read at the activation's output when it fires exactly where the pre-activation does
    (``Layer.firing_output``), and onnxruntime keeps its fused Conv/Gemm+activation kernel. Where
    φ needs the pre-activation, the bits are read there too: reading the output as well would
    make onnxruntime materialise (and reorder out of its blocked layout) both tensors.
    """
    partial = _linear_partial(layer, graph, prefix) if fast else None
    at_output = partial is not None and states_at == "pre-activation" and bool(layer.firing_output)
    nodes, inits, keys = _pack_nodes(layer, states_at, prefix, at_output=at_output, integer=integer)
    sum_nodes, sum_inits, total = _sum_nodes(layer, opset, prefix, partial)
    return nodes + sum_nodes, inits + sum_inits, keys, total


def _pack_nodes(
    layer: Layer, states_at: str, prefix: str, *, at_output: bool = False, integer: bool = True
) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Nodes that turn a layer's state tensor into int32 groups of firing bits (``packing``).

    ``x > 0`` gives the bits, read at ``Layer.firing_output`` when ``at_output`` (the same bits).
    Then each group's bits are summed with powers of two, exactly:
    - ``integer``: a MatMulInteger of 8-bit bits against one byte weight per neuron gives one
      byte per 8 neurons, which ``count.join_groups`` joins into keys. On the CPU this costs
      less than the float path (2.5–3 ms against 4–5 ms on LeNet-5's first layer, with the join
      then still in the graph: docs/performance.md); the weights are uint8 on the left of the
      product and the bits int8 on the right, onnxruntime's fastest pairing.
    - otherwise a float MatMul against a block-diagonal matrix of powers of two, in groups of at
      most 24 bits (float32 is exact below 2**24), cast to int32.
    Neurons on the last axis give bits × W; otherwise W × bits viewed as (batch, neurons,
    positions). A MatMul, unlike a 1×1 Conv, needs no layout reorders.
    """
    nodes, inits = [], []
    source = layer.state_tensor(states_at)
    dtype = layer.dtype if source == layer.name else layer.block_dtype
    if at_output:  # every same-sign activation keeps its input's element type
        source = layer.firing_output
    if dtype is None:  # unknown element type: compare in float32
        nodes.append(helper.make_node("Cast", [source], [f"{prefix}/as_float"], to=TensorProto.FLOAT))
        source, dtype = f"{prefix}/as_float", TensorProto.FLOAT
    zero = numpy_helper.from_array(np.zeros((), helper.tensor_dtype_to_np_dtype(dtype)), f"{prefix}/zero")
    layout, group_axis = packing(layer, integer=integer)
    last = group_axis == -1
    bits_type = TensorProto.FLOAT if not integer else TensorProto.UINT8 if last else TensorProto.INT8
    inits.append(zero)
    nodes += [
        helper.make_node("Greater", [source, zero.name], [f"{prefix}/fires"]),
        helper.make_node("Cast", [f"{prefix}/fires"], [f"{prefix}/bits"], to=bits_type),
    ]
    rank, axis = layer.rank, layer.axis % layer.rank
    bits = f"{prefix}/bits"
    if not last:
        if axis != 1:
            perm = [0, axis, *(i for i in range(1, rank) if i != axis)]
            nodes.append(helper.make_node("Transpose", [bits], [f"{prefix}/bits_t"], perm=perm))
            bits = f"{prefix}/bits_t"
        inits.append(numpy_helper.from_array(np.array([0, layer.neurons, -1], np.int64), f"{prefix}/rows"))
        nodes.append(helper.make_node("Reshape", [bits, f"{prefix}/rows"], [f"{prefix}/bits_rows"]))
        bits = f"{prefix}/bits_rows"
    weights = _packing_weights(layer.neurons, layout, integer)
    inits.append(numpy_helper.from_array(weights if last else np.ascontiguousarray(weights.T), f"{prefix}/pack_w"))
    product = [bits, f"{prefix}/pack_w"] if last else [f"{prefix}/pack_w", bits]
    if integer:
        nodes.append(helper.make_node("MatMulInteger", product, [f"{prefix}/keys"]))
        return nodes, inits, f"{prefix}/keys"
    nodes += [
        helper.make_node("MatMul", product, [f"{prefix}/packed"]),
        helper.make_node("Cast", [f"{prefix}/packed"], [f"{prefix}/keys"], to=TensorProto.INT32),
    ]
    return nodes, inits, f"{prefix}/keys"


def _packing_weights(neurons: int, layout: list[tuple[int, int]], integer: bool) -> np.ndarray:
    """The (neurons, groups) matrix that sums each group's firing bits: column g holds 2**k at
    neuron ``start_g + k``, as uint8 for integer packing (groups are bytes), else float32."""
    weights = np.zeros((neurons, len(layout)), np.uint8 if integer else np.float32)
    for g, (start, stop) in enumerate(layout):
        weights[start:stop, g] = 2 ** np.arange(stop - start)
    return weights


def _sum_nodes(
    layer: Layer, opset: int, prefix: str, partial: tuple[list[onnx.NodeProto], list[TensorProto], str] | None
) -> tuple[list[onnx.NodeProto], list[TensorProto], str]:
    """Nodes computing φ, the per-sample sum of the layer's pre-activations (SPEC §4).

    The sum runs over the pre-activation itself, or over the small ``partial`` sums that
    ``_linear_partial`` computed from the linear op's input (equal up to float rounding).
    ``aggregate=mean`` divides this sum by the layer's units after the run, so the graph, and
    the session built on it, do not depend on that metric setting.
    """
    nodes, inits = [], []
    if partial is not None:
        nodes, inits, source = partial
    else:
        source = layer.name
        if layer.dtype != TensorProto.FLOAT:
            nodes.append(helper.make_node("Cast", [source], [f"{prefix}/sum_in"], to=TensorProto.FLOAT))
            source = f"{prefix}/sum_in"
    nodes.append(helper.make_node("Flatten", [source], [f"{prefix}/flat"], axis=1))
    if opset >= 13:  # ReduceSum takes its axes as an input from opset 13
        inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axes"))
        nodes.append(helper.make_node("ReduceSum", [f"{prefix}/flat", f"{prefix}/axes"], [f"{prefix}/sum"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [f"{prefix}/flat"], [f"{prefix}/sum"], axes=[1], keepdims=0))
    return nodes, inits, f"{prefix}/sum"


def _linear_partial(
    layer: Layer, graph: onnx.GraphProto, prefix: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], str] | None:
    """Nodes giving per sample (and position, for a dense layer) the sum of the pre-activation over
    its neurons, computed from the linear op's input; None where that is not both exact algebra
    and cheaper than a pass over the pre-activation.

    It holds where the pre-activation is a Gemm, MatMul or Conv output with constant weights,
    optionally plus a constant bias that is the same at every position: the sum over outputs of
    ``x·W + b`` is ``x·(W summed over outputs) + Σb``. A Conv's sum is then the kernels summed
    over output channels, dotted with the window sums of its input (``_conv_partial``). BatchNorm,
    residual Adds, Transposes, ConvTranspose, Einsum and grouped Convs keep the exact ReduceSum.
    """
    if layer.dtype is None or layer.neurons is None or layer.positions is None:
        return None
    producers = {out: node for node in graph.node for out in node.output}
    constants = {init.name: init for init in graph.initializer}  # read as arrays only when used
    linear, bias = producers.get(layer.name), 0.0
    if linear is not None and linear.op_type == "Add":
        data = [name for name in linear.input if name not in constants]
        known = [name for name in linear.input if name in constants]
        if len(data) != 1 or len(known) != 1:
            return None
        bias = _neuron_total(numpy_helper.to_array(constants[known[0]]), layer)
        linear = producers.get(data[0])
    if bias is None or linear is None or linear.op_type not in ("Gemm", "MatMul", "Conv"):
        return None
    inputs = [*linear.input, "", ""]
    if inputs[1] not in constants or (inputs[2] and inputs[2] not in constants):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
    weight, own_bias = constants[inputs[1]], numpy_helper.to_array(constants[inputs[2]]) if inputs[2] else None
    nodes, x = [], linear.input[0]
    if layer.dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", [x], [f"{prefix}/sum_x"], to=TensorProto.FLOAT))
        x = f"{prefix}/sum_x"
    found = None
    if linear.op_type == "Conv":
        conv_bias = 0.0 if own_bias is None else float(own_bias.astype(np.float64).sum())
        found = _conv_partial(layer, attrs, weight, bias + conv_bias, x, prefix)
    elif linear.op_type == "MatMul" and len(weight.dims) == 2:
        found = _dense_partial(layer, weight, 1, 1.0, bias, x, prefix)
    elif linear.op_type == "Gemm" and not attrs.get("transA", 0) and len(weight.dims) == 2:
        gemm_bias = 0.0 if own_bias is None else _neuron_total(own_bias, layer)
        if gemm_bias is not None:
            total = bias + gemm_bias * attrs.get("beta", 1.0)
            found = _dense_partial(
                layer, weight, 0 if attrs.get("transB", 0) else 1, attrs.get("alpha", 1.0), total, x, prefix
            )
    if found is None:
        return None
    more_nodes, inits, partial = found
    return nodes + more_nodes, inits, partial


def _dense_partial(
    layer: Layer, weight: TensorProto, outputs_axis: int, scale: float, bias: float, x: str, prefix: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], str] | None:
    """``x · (scale · weight summed over its outputs axis) + bias``: one value per position
    instead of one per neuron, where the product reads few enough values (``_LINEAR_READS``)."""
    reads = weight.dims[1 - outputs_axis] * (1 if layer.dtype == TensorProto.FLOAT else 2)
    if layer.axis % layer.rank != layer.rank - 1 or reads * _LINEAR_READS >= layer.neurons:
        return None
    summed = numpy_helper.to_array(weight).astype(np.float64).sum(axis=outputs_axis) * scale
    inits = [
        numpy_helper.from_array(summed.reshape(-1, 1).astype(np.float32), f"{prefix}/sum_w"),
        numpy_helper.from_array(np.array([bias], np.float32), f"{prefix}/sum_b"),
    ]
    nodes = [
        helper.make_node("MatMul", [x, f"{prefix}/sum_w"], [f"{prefix}/partial_w"]),
        helper.make_node("Add", [f"{prefix}/partial_w", f"{prefix}/sum_b"], [f"{prefix}/partial"]),
    ]
    return nodes, inits, f"{prefix}/partial"


def _conv_partial(
    layer: Layer, attrs: dict, weight: TensorProto, bias: float, x: str, prefix: str
) -> tuple[list[onnx.NodeProto], list[TensorProto], str] | None:
    """φ of a 1-D or 2-D Conv from its input, through window sums, for one value per sample.

    Σ over channels and positions of ``conv(x, W) + b`` is ``Σ_{c,i,j} V[c,i,j] · S[c,i,j] + P·Σb``
    where V is the kernels summed over output channels and S[c,i,j] the sum of the input over the
    positions that kernel tap (i, j) sees. S is ``A_hᵀ · x · A_w`` with 0/1 matrices that encode
    padding, stride and dilation: two narrow MatMuls that read the input once, then (C, kw, H).
    It is used where that is cheaper than a pass over the pre-activation (``_LINEAR_READS``):
    LeNet-5's first layer reads 924 values per sample instead of 9,216; SqueezeNet's fire modules
    keep the ReduceSum. Static input shapes only; SAME padding keeps the ReduceSum.
    """
    shape = layer.linear_input_shape
    spatial = shape[2:]
    if (
        attrs.get("group", 1) != 1
        or attrs.get("auto_pad", b"NOTSET") not in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        or len(spatial) not in (1, 2)
        or len(weight.dims) != len(shape)
        or not all(isinstance(d, int) and d > 0 for d in shape[1:])
    ):
        return None
    channels, kernel = shape[1], list(weight.dims[2:])
    valid = attrs.get("auto_pad", b"NOTSET") in (b"VALID", "VALID")
    pads = [0] * 2 * len(spatial) if valid else list(attrs.get("pads", [0] * 2 * len(spatial)))
    strides = list(attrs.get("strides", [1] * len(spatial)))
    dilations = list(attrs.get("dilations", [1] * len(spatial)))
    taps = [
        _window_matrix(size, k, stride, dilation, pads[axis], pads[axis + len(spatial)])
        for axis, (size, k, stride, dilation) in enumerate(zip(spatial, kernel, strides, dilations, strict=True))
    ]
    cast = 1 if layer.dtype == TensorProto.FLOAT else 2  # a Cast to float32 reads the input once more
    reads = channels * (math.prod(spatial) * cast + (spatial[0] * kernel[-1] if len(spatial) == 2 else 0))
    if any(t is None for t in taps) or reads * _LINEAR_READS >= layer.neurons * layer.positions:
        return None
    summed = numpy_helper.to_array(weight).astype(np.float64).sum(axis=0)  # (channels, *kernel)
    inits = [numpy_helper.from_array(taps[-1].astype(np.float32), f"{prefix}/taps_w")]
    nodes = [helper.make_node("MatMul", [x, f"{prefix}/taps_w"], [f"{prefix}/window_w"])]  # (B, C, [H,] kw)
    window = f"{prefix}/window_w"
    if len(spatial) == 2:  # rows last, then (B, C, kw, H) · A_h → (B, C, kw, kh)
        inits.append(numpy_helper.from_array(taps[0].astype(np.float32), f"{prefix}/taps_h"))
        nodes += [
            helper.make_node("Transpose", [window], [f"{prefix}/window_t"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", [f"{prefix}/window_t", f"{prefix}/taps_h"], [f"{prefix}/window"]),
        ]
        window, summed = f"{prefix}/window", summed.transpose(0, 2, 1)
    inits += [
        numpy_helper.from_array(summed.reshape(-1, 1).astype(np.float32), f"{prefix}/sum_w"),
        numpy_helper.from_array(np.array([bias * layer.positions], np.float32), f"{prefix}/sum_b"),
    ]
    nodes += [
        helper.make_node("Flatten", [window], [f"{prefix}/window_flat"], axis=1),
        helper.make_node("MatMul", [f"{prefix}/window_flat", f"{prefix}/sum_w"], [f"{prefix}/partial_w"]),
        helper.make_node("Add", [f"{prefix}/partial_w", f"{prefix}/sum_b"], [f"{prefix}/partial"]),
    ]
    return nodes, inits, f"{prefix}/partial"


def _window_matrix(size: int, kernel: int, stride: int, dilation: int, before: int, after: int) -> np.ndarray | None:
    """The (size, kernel) 0/1 matrix whose column t marks the input positions kernel tap t sees
    along one axis, padding excluded; None when the geometry leaves no output position."""
    outputs = (size + before + after - dilation * (kernel - 1) - 1) // stride + 1
    if outputs < 1:
        return None
    matrix = np.zeros((size, kernel))
    for tap in range(kernel):
        seen = np.arange(outputs) * stride + tap * dilation - before
        matrix[seen[(seen >= 0) & (seen < size)], tap] = 1.0
    return matrix


_LINEAR_READS = 4
"""φ goes through linearity only where its products read a quarter or less of the values per
sample that the pre-activation holds: a MatMul with one to 16 output columns costs two to three
times a ReduceSum per value read, and each node has its own overhead (docs/performance.md)."""


def _neuron_total(bias: np.ndarray, layer: Layer) -> float | None:
    """Σ over the neurons of a constant bias broadcast onto the layer, when it is the same at every
    position and sample (a scalar, or N values along the neuron axis); None otherwise."""
    b = np.asarray(bias, dtype=np.float64)
    if b.size == 1:
        return float(b.reshape(())) * layer.neurons
    axis = layer.axis % layer.rank
    aligned = layer.rank - b.ndim  # numpy broadcasting aligns shapes on the right
    if b.size != layer.neurons or aligned < 0 or axis < aligned or b.shape[axis - aligned] != layer.neurons:
        return None
    return float(b.sum())
