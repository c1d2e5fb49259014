"""Exposing found layers: a rewritten copy of the graph whose extra outputs carry their states.

Pure functions over ``onnx.ModelProto``; nothing here runs a model. ``expose`` returns a new model
whose extra outputs carry, per layer, the firing bits packed into small integers and the
per-sample sum of the pre-activations, so that only a few numbers per position leave the
runtime (FIELD-NOTES: packing in the graph is what keeps the audit near inference speed).
It names every output it adds in an ``Exposed`` record, and whoever reads the outputs reads
them by those names. Each step that adds nodes returns them as a ``Subgraph``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.config import STATE_POINTS, StatePoint
from auditor.engine.find import Layer, Structure
from auditor.errors import ModelError


@dataclass
class Subgraph:
    """Nodes and initializers to add to a graph, and the name of the tensor they compute."""

    output: str
    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: list[TensorProto] = field(default_factory=list)

    def then(self, more: Subgraph) -> Subgraph:
        """This subgraph followed by ``more``: both sets of nodes, computing ``more.output``."""
        return Subgraph(more.output, self.nodes + more.nodes, self.initializers + more.initializers)


GROUP_BITS = 24  # float32 sums of distinct powers of two stay exact below 2**24


WORD_BITS = 64


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


def expose(
    model: onnx.ModelProto,
    structure: Structure,
    states_at: str = StatePoint.PRE_ACTIVATION,
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
        keys, total = _layer_nodes(layer, model.graph, structure.opset, states_at, prefix, fast, integer)
        key_name, sum_name = keys.output, total.output
        for added in (keys, total):
            graph.node.extend(added.nodes)
            graph.initializer.extend(added.initializers)
            if exposed.ir_version < 4:  # IR 3 requires every initializer to be listed among the inputs
                graph.input.extend(
                    helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in added.initializers
                )
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


def with_outputs(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (untyped: onnxruntime types them)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    taken = {o.name for o in copy.graph.output}
    copy.graph.output.extend(_output(name, None, None) for name in names if name not in taken)
    return copy


def _output(name: str, elem_type: int | None, rank: int | None) -> onnx.ValueInfoProto:
    """A graph output typed as ``onnx.checker`` requires (element type and rank, dims unknown)."""
    if elem_type is None or rank is None:  # not inferable: leave it untyped, onnxruntime still runs it
        value = onnx.ValueInfoProto()
        value.name = name
        return value
    return helper.make_tensor_value_info(name, elem_type, [None] * rank)


def _layer_nodes(
    layer: Layer, graph: onnx.GraphProto, opset: int, states_at: str, prefix: str, fast: bool, integer: bool
) -> tuple[Subgraph, Subgraph]:
    """One layer's added nodes: those computing its packed keys, and those computing its sum φ.

    With ``fast``, φ goes through linearity where that is cheaper (``_linear_partial``); then the
    audit needs nothing of the pre-activation, so at the pre-activation state point the firing
    bits are read at the activation's output when it fires exactly where the pre-activation does
    (``Layer.firing_output``), and onnxruntime keeps its fused Conv/Gemm+activation kernel. Where
    φ needs the pre-activation, the bits are read there too: reading the output as well would
    make onnxruntime materialise (and reorder out of its blocked layout) both tensors.
    """
    partial = _linear_partial(layer, graph, prefix) if fast else None
    at_output = partial is not None and states_at == StatePoint.PRE_ACTIVATION and bool(layer.firing_output)
    keys = _pack_nodes(layer, states_at, prefix, at_output=at_output, integer=integer)
    return keys, _sum_nodes(layer, opset, prefix, partial)


def _pack_nodes(
    layer: Layer, states_at: str, prefix: str, *, at_output: bool = False, integer: bool = True
) -> Subgraph:
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
        return Subgraph(f"{prefix}/keys", nodes, inits)
    nodes += [
        helper.make_node("MatMul", product, [f"{prefix}/packed"]),
        helper.make_node("Cast", [f"{prefix}/packed"], [f"{prefix}/keys"], to=TensorProto.INT32),
    ]
    return Subgraph(f"{prefix}/keys", nodes, inits)


def _packing_weights(neurons: int, layout: list[tuple[int, int]], integer: bool) -> np.ndarray:
    """The (neurons, groups) matrix that sums each group's firing bits: column g holds 2**k at
    neuron ``start_g + k``, as uint8 for integer packing (groups are bytes), else float32."""
    weights = np.zeros((neurons, len(layout)), np.uint8 if integer else np.float32)
    for g, (start, stop) in enumerate(layout):
        weights[start:stop, g] = 2 ** np.arange(stop - start)
    return weights


def _sum_nodes(layer: Layer, opset: int, prefix: str, partial: Subgraph | None) -> Subgraph:
    """Nodes computing φ, the per-sample sum of the layer's pre-activations (SPEC §4).

    The sum runs over the pre-activation itself, or over the small ``partial`` sums that
    ``_linear_partial`` computed from the linear op's input (equal up to float rounding).
    ``aggregate=mean`` divides this sum by the layer's units after the run, so the graph, and
    the session built on it, do not depend on that metric setting.
    """
    start = partial or Subgraph(layer.name)
    if partial is None and layer.dtype != TensorProto.FLOAT:
        start = Subgraph(
            f"{prefix}/sum_in", [helper.make_node("Cast", [layer.name], [f"{prefix}/sum_in"], to=TensorProto.FLOAT)]
        )
    nodes, inits = [helper.make_node("Flatten", [start.output], [f"{prefix}/flat"], axis=1)], []
    if opset >= 13:  # ReduceSum takes its axes as an input from opset 13
        inits.append(numpy_helper.from_array(np.array([1], np.int64), f"{prefix}/axes"))
        nodes.append(helper.make_node("ReduceSum", [f"{prefix}/flat", f"{prefix}/axes"], [f"{prefix}/sum"], keepdims=0))
    else:
        nodes.append(helper.make_node("ReduceSum", [f"{prefix}/flat"], [f"{prefix}/sum"], axes=[1], keepdims=0))
    return start.then(Subgraph(f"{prefix}/sum", nodes, inits))


def _linear_partial(layer: Layer, graph: onnx.GraphProto, prefix: str) -> Subgraph | None:
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
    cast = Subgraph(linear.input[0])
    if layer.dtype != TensorProto.FLOAT:
        cast = Subgraph(
            f"{prefix}/sum_x", [helper.make_node("Cast", [linear.input[0]], [f"{prefix}/sum_x"], to=TensorProto.FLOAT)]
        )
    x = cast.output
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
    return None if found is None else cast.then(found)


def _dense_partial(
    layer: Layer, weight: TensorProto, outputs_axis: int, scale: float, bias: float, x: str, prefix: str
) -> Subgraph | None:
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
    return Subgraph(f"{prefix}/partial", nodes, inits)


def _conv_partial(layer: Layer, attrs: dict, weight: TensorProto, bias: float, x: str, prefix: str) -> Subgraph | None:
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
    return Subgraph(f"{prefix}/partial", nodes, inits)


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
