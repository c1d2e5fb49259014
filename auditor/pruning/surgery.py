"""Cutting neurons out of an ONNX graph: where a layer can be cut safely, and the cut itself.

Pure functions over ``onnx.ModelProto``; nothing here runs a model or decides what to cut
(``auditor.pruning.plan`` does). ``find_sites`` follows each hidden layer (SPEC §1) from the linear op
that produces it down to the linear ops that consume it, through element-wise ops, BatchNorm,
pooling and Flatten/Reshape, and records every tensor that holds one slice per neuron: the
producer's weights and bias, per-channel constants and BatchNorm parameters on the way, the
consumers' input weights (through a Flatten, channel c is the block of features
``[c·P, (c+1)·P)``), and the Reshape targets that name the feature count. A layer whose path meets
anything else (a residual Add, a Concat, the model's output, a grouped Conv, quantized weights)
is a ``Site`` with a ``refusal`` that says why, and is left whole.

``cut`` applies ``Cut`` records: it deletes neurons, folds what a removed neuron sent on into
the consumers' biases (its mean, for mean-replacement; zero for a dead ReLU) and folds a
duplicate's outgoing weights into the neuron it duplicates. Edited parameters become new
initializers, so nothing outside the layer that shared them changes; the model's inputs,
outputs and opset stay as they were.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from auditor.engine.find import ACTIVATIONS, describe

POOLING = frozenset({"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "LpPool", "GlobalLpPool"})
UNARY = ACTIVATIONS | {"Clip", "Dropout", "Identity", "Relu"}
ELEMENTWISE_WITH_CONSTANT = frozenset({"Add", "Sub", "Mul", "Div", "Sum", "PRelu"})
# Ops through which a weight computed in the graph from constants alone is evaluated here.
FOLDABLE = frozenset({"Constant", "ConstantOfShape", "Reshape", "Transpose", "Identity", "Cast"})


@dataclass(frozen=True)
class Slice:
    """One tensor input of one node that holds a slice per neuron: ``block`` entries per neuron
    along ``axis`` (negative: from the end). Entries of size 1 on that axis broadcast and stay."""

    node: int
    input: int
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Consumer:
    """A linear op that reads the layer: node ``node`` reads it as ``tensor`` (its data input).

    ``kind`` is "conv", "gemm" or "matmul"; the weight's input axis ``axis`` holds ``block``
    entries per neuron. ``exact_fold`` tells whether a constant input folds into the bias
    exactly: always for Gemm and MatMul, for a Conv only without padding (at a padded border
    the constant would meet zeros).
    """

    node: int
    tensor: str
    kind: str
    axis: int
    block: int
    exact_fold: bool


@dataclass(frozen=True)
class Site:
    """A hidden layer as ``cut`` sees it: ``name`` is its pre-activation (SPEC §1).

    ``refusal`` is why it is left whole (None: it can be cut). ``slices`` are the per-neuron
    parameters from the producer down to the consumers' inputs (consumer weights excluded);
    ``post_slices`` those of them after the activation. ``reshapes`` are Reshape targets (node,
    block) to resize. ``output_axis`` is where the producer's weight holds its outputs.
    """

    name: str
    op: str
    activation: str | None
    neurons: int
    refusal: str | None = None
    producer: int = -1
    output_axis: int = 0
    slices: tuple[Slice, ...] = ()
    post_slices: tuple[Slice, ...] = ()
    consumers: tuple[Consumer, ...] = ()
    reshapes: tuple[tuple[int, int], ...] = ()
    pre_nodes: tuple[int, ...] = ()  # the element-wise nodes between the producer and the activation

    @property
    def cuttable(self) -> bool:
        return self.refusal is None


@dataclass(frozen=True)
class Cut:
    """What to take out of one site (by name), in the original neuron numbering.

    ``removed`` neurons go; what each sent on is replaced by ``fill[tensor][neuron]`` (one value
    per feature of its block) at each consumer's input ``tensor``, folded into that consumer's
    bias. ``merged`` neurons j go too, their output being ``a`` times neuron i's: i's outgoing
    weights take ``a`` times j's.
    """

    site: str
    removed: frozenset[int] = frozenset()
    merged: Mapping[int, tuple[int, float]] = field(default_factory=dict)
    fill: Mapping[str, np.ndarray] = field(default_factory=dict)

    @property
    def gone(self) -> frozenset[int]:
        return self.removed | frozenset(self.merged)


class ShrinkError(ValueError):
    """A cut that the site cannot take (a programming error in the plan, not bad input)."""


def find_sites(model: onnx.ModelProto) -> list[Site]:
    """Every hidden layer of ``model`` (``find.describe``), cuttable or refused with a reason."""
    structure = describe(model)
    graph = model.graph
    shapes = _static_shapes(model)
    constants = Constants(graph)
    consumers: dict[str, list[tuple[int, int]]] = {}
    for index, node in enumerate(graph.node):
        for slot, name in enumerate(node.input):
            if name:
                consumers.setdefault(name, []).append((index, slot))
    producers = {out: index for index, node in enumerate(graph.node) for out in node.output}
    outputs = {o.name for o in graph.output}
    sites = []
    for layer in structure.layers:
        if layer.role != "hidden":
            continue
        neurons = layer.neurons or 0
        site = Site(layer.name, layer.op, layer.activation, neurons)
        try:
            sites.append(_trace(site, graph, shapes, constants, consumers, producers, outputs))
        except _Refused as refusal:
            sites.append(Site(layer.name, layer.op, layer.activation, neurons, refusal=str(refusal)))
    return sites


class _Refused(Exception):
    """Why a layer is left whole."""


def _trace(
    site: Site,
    graph: onnx.GraphProto,
    shapes: Mapping[str, list[int | None]],
    constants: Constants,
    consumers: Mapping[str, list[tuple[int, int]]],
    producers: Mapping[str, int],
    outputs: set[str],
) -> Site:
    """The site with every per-neuron parameter on its path, or ``_Refused`` with the reason."""
    if not site.neurons:
        raise _Refused("its width is unknown before running; give the model static channel dimensions")
    producer, path_start = _producer(site.name, graph, producers, constants)
    node = graph.node[producer]
    attrs = _attrs(node)
    slices: list[Slice] = []
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1:
            raise _Refused("it comes from a grouped Conv, whose channels cannot be cut one by one")
        output_axis, axis = 0, 1
    elif node.op_type == "Gemm":
        if attrs.get("transA", 0):
            raise _Refused("it comes from a Gemm with transA, which shrink does not rewrite")
        output_axis, axis = (0 if attrs.get("transB", 0) else 1), -1
    elif node.op_type == "MatMul":
        output_axis, axis = 1, -1
    else:
        raise _Refused(f"it comes from a {node.op_type}, which shrink does not rewrite")
    _need_constant(constants, node, 1, "weights")
    weight = constants.value(node.input[1])
    if weight.ndim < 2 or weight.shape[output_axis] != site.neurons:
        raise _Refused(f"its {node.op_type} weight of shape {weight.shape} does not match its {site.neurons} neurons")
    if len(node.input) > 2 and node.input[2]:
        _need_constant(constants, node, 2, "bias")
        slices.append(Slice(producer, 2, 0 if node.op_type == "Conv" else -1))
    rank = len(shapes.get(path_start, [])) or (weight.ndim if node.op_type == "Conv" else 2)
    found: list[Consumer] = []
    reshapes: list[tuple[int, int]] = []
    post: list[Slice] = []
    pre_nodes: list[int] = []
    seen: set[int] = {producer}
    todo: list[tuple[str, int, int, int, bool]] = [(path_start, axis, 1, rank, False)]
    while todo:
        tensor, axis, block, rank, after_activation = todo.pop()
        if tensor in outputs:
            raise _Refused(f"it reaches the model's output {tensor!r}, which must keep its shape")
        for index, slot in consumers.get(tensor, []):
            if index in seen:
                raise _Refused(f"{graph.node[index].op_type} node {graph.node[index].name!r} reads it twice")
            seen.add(index)
            kind, payload, state = _step(
                graph, index, slot, tensor, axis, block, rank, site, shapes, constants, consumers
            )
            if kind == "consumer":
                found.append(payload)  # type: ignore[arg-type]
                continue
            if kind == "reshape":
                reshapes.append((index, state[1]))
            elif after_activation or kind == "activation":
                post.extend(payload)  # type: ignore[arg-type]
            else:
                slices.extend(payload)  # type: ignore[arg-type]
                pre_nodes.append(index)
            todo.append((graph.node[index].output[0], *state, after_activation or kind == "activation"))
    if not found:
        raise _Refused("nothing linear reads it, so there is no consumer to take its removal")
    return Site(
        name=site.name,
        op=site.op,
        activation=site.activation,
        neurons=site.neurons,
        producer=producer,
        output_axis=output_axis,
        slices=tuple(slices + post),
        post_slices=tuple(post),
        consumers=tuple(found),
        reshapes=tuple(reshapes),
        pre_nodes=tuple(pre_nodes),
    )


def _producer(name: str, graph: onnx.GraphProto, producers: Mapping[str, int], constants: Constants) -> tuple[int, str]:
    """The linear node that produces the layer, and the tensor where the walk down starts (the
    linear node's output, so that a bias Add or BatchNorm before the activation is on the path)."""
    tensor = name
    while tensor in producers:
        node = graph.node[producers[tensor]]
        if node.op_type in ("Conv", "Gemm", "MatMul", "ConvTranspose", "Einsum"):
            return producers[tensor], node.output[0]
        data = [i for i in node.input if i and i not in constants]
        if len(data) != 1:
            where = f"{node.op_type} node {node.name or node.output[0]!r}"
            raise _Refused(
                f"it is the sum of a residual block or other branches ({where}); their channels must stay aligned"
            )
        tensor = data[0]
    raise _Refused("no linear op produces it")


def _step(
    graph: onnx.GraphProto,
    index: int,
    slot: int,
    tensor: str,
    axis: int,
    block: int,
    rank: int,
    site: Site,
    shapes: Mapping[str, list[int | None]],
    constants: Constants,
    consumers: Mapping[str, list[tuple[int, int]]],
) -> tuple[str, object, tuple[int, int, int]]:
    """How node ``index``, reading the layer's tensor at input ``slot``, carries the neurons on:
    ("consumer", Consumer, _), ("reshape", [], state), ("activation" or "pass", slices, state)."""
    node = graph.node[index]
    op, attrs = node.op_type, _attrs(node)
    where = f"{op} node {node.name or node.output[0]!r}"
    state = (axis, block, rank)
    extra_outputs = [o for o in node.output[1:] if o and consumers.get(o)]
    if extra_outputs:
        raise _Refused(f"{where} has a second output in use")
    channel_axis = axis % rank == 1 and block == 1
    if op in ("Conv", "Gemm", "MatMul") and slot == 0:
        return "consumer", _consumer(index, node, tensor, axis, block, rank, site, attrs, constants, where), state
    if op in UNARY and op != "PRelu":
        if op == "Clip" and any(slot_name for slot_name in node.input[1:] if slot_name not in constants):
            raise _Refused(f"{where} has bounds computed from data")
        return ("activation" if op in ACTIVATIONS or op == "Clip" else "pass"), [], state
    if op in ELEMENTWISE_WITH_CONSTANT:
        others = [(i, name) for i, name in enumerate(node.input) if i != slot and name]
        if op == "PRelu" and slot != 0:
            raise _Refused(f"{where} takes it as its slope")
        if len(others) != 1 or others[0][1] not in constants:
            what = "a residual Add" if op in ("Add", "Sum") else f"a {op} with another branch"
            raise _Refused(f"it feeds {what} ({where}); the branches' channels must stay aligned")
        i, name = others[0]
        value = constants.value(name)
        if value is None:
            raise _Refused(f"{where} has a constant shrink cannot read")
        kind = "activation" if op == "PRelu" else "pass"
        return kind, _constant_slice(index, i, value, axis, block, rank, site.neurons, where), state
    if op == "BatchNormalization":
        if slot != 0 or axis % rank != 1 or block != 1:
            raise _Refused(f"{where} normalizes an axis other than the layer's neurons")
        for i in range(1, 5):
            if node.input[i] not in constants:
                raise _Refused(f"{where} has parameters computed from data")
        return "pass", [Slice(index, i, 0) for i in range(1, 5)], state
    if op in POOLING:
        if not channel_axis:
            raise _Refused(f"{where} pools a tensor whose neurons are not on axis 1")
        return "pass", [], state
    if op in ("Flatten", "Reshape"):
        return _flatten(index, node, tensor, axis, block, rank, site, shapes, constants, where)
    if op == "Concat":
        raise _Refused(f"it feeds a Concat ({where}); the concatenated channels would shift")
    raise _Refused(f"it feeds {where}, which shrink cannot rewrite")


def _consumer(
    index: int,
    node: onnx.NodeProto,
    tensor: str,
    axis: int,
    block: int,
    rank: int,
    site: Site,
    attrs: Mapping[str, object],
    constants: Constants,
    where: str,
) -> Consumer:
    _need_constant(constants, node, 1, "weights")
    if len(node.input) > 2 and node.input[2]:
        _need_constant(constants, node, 2, "bias")
    weight = constants.value(node.input[1])
    if node.op_type == "Conv":
        if attrs.get("group", 1) != 1:
            raise _Refused(f"it feeds a grouped Conv ({where})")
        if axis % rank != 1 or block != 1 or weight.shape[1] != site.neurons:
            raise _Refused(f"its neurons do not line up with the input channels of {where}")
        pads = list(attrs.get("pads", []))  # type: ignore[call-overload]
        auto = attrs.get("auto_pad", b"NOTSET")
        exact = not any(pads) and auto in (b"NOTSET", b"VALID", "NOTSET", "VALID")
        return Consumer(index, tensor, "conv", 1, 1, exact)
    if axis % rank != rank - 1:
        raise _Refused(f"its neurons are not on the last axis that {where} multiplies")
    if weight.ndim != 2:
        raise _Refused(f"{where} has a weight of rank {weight.ndim}")
    in_axis = 1 if node.op_type == "Gemm" and attrs.get("transB", 0) else 0
    if attrs.get("transA", 0):
        raise _Refused(f"{where} uses transA")
    if node.op_type == "Gemm" and float(attrs.get("beta", 1.0)) == 0.0:  # type: ignore[arg-type]
        raise _Refused(f"{where} has beta 0, so its bias cannot take what removed neurons sent")
    if weight.shape[in_axis] != site.neurons * block:
        raise _Refused(f"{where} reads {weight.shape[in_axis]} features, not {site.neurons}×{block}")
    return Consumer(index, tensor, node.op_type.lower(), in_axis, block, True)


def _flatten(
    index: int,
    node: onnx.NodeProto,
    tensor: str,
    axis: int,
    block: int,
    rank: int,
    site: Site,
    shapes: Mapping[str, list[int | None]],
    constants: Constants,
    where: str,
) -> tuple[str, object, tuple[int, int, int]]:
    """Flatten to (batch, features), or a Reshape that does the same: channel c → a block of P features."""
    if axis % rank == rank - 1 and rank == 2:
        per = block
    elif axis % rank == 1 and block == 1:
        dims = shapes.get(tensor, [])
        spatial = dims[2:]
        if len(dims) != rank or not all(isinstance(d, int) and d > 0 for d in spatial):
            raise _Refused(f"the size of what {where} flattens is unknown; give the model static shapes")
        per = math.prod(spatial)  # type: ignore[arg-type]
    else:
        raise _Refused(f"{where} would mix the layer's neurons with other axes")
    if node.op_type == "Flatten":
        if _attrs(node).get("axis", 1) != 1:
            raise _Refused(f"{where} flattens from an axis other than 1")
        return "pass", [], (-1, per, 2)
    target = constants.value(node.input[1]) if node.input[1] in constants else None
    features = site.neurons * per
    if target is None or target.ndim != 1 or len(target) != 2 or int(target[1]) not in (-1, features):
        raise _Refused(f"{where} reshapes to a shape other than (batch, features)")
    if int(target[0]) not in (0, -1, 1) and int(target[1]) == -1:
        raise _Refused(f"{where} reshapes to a shape other than (batch, features)")
    return "reshape", [], (-1, per, 2)


def _constant_slice(
    index: int, slot: int, value: np.ndarray, axis: int, block: int, rank: int, neurons: int, where: str
) -> list[Slice]:
    """The slice of a constant operand broadcast onto the layer: none when it is the same for
    every neuron, one along the neuron axis when it holds a value per neuron (or per feature)."""
    if value.size == 1:
        return []
    aligned = axis % rank - (rank - value.ndim)  # numpy broadcasting aligns shapes on the right
    if aligned < 0 or value.size != value.shape[aligned]:
        raise _Refused(f"{where} has a constant that varies along axes other than the layer's neurons")
    if value.shape[aligned] != neurons * block:
        raise _Refused(f"{where} has a constant of shape {value.shape} that does not match the neurons")
    return [Slice(index, slot, aligned - value.ndim, block)]


def _need_constant(constants: Constants, node: onnx.NodeProto, slot: int, what: str) -> None:
    name = node.input[slot]
    if constants.value(name) is None:
        how = constants.why(name)
        raise _Refused(f"the {what} of {node.op_type} node {node.name or node.output[0]!r} {how}")


class Constants:
    """Values of the graph's constant tensors: initializers, Constant nodes, and what ``FOLDABLE``
    ops compute from them alone (a CNTK export reshapes its dense weights in the graph).
    Quantized weights (DequantizeLinear) are not folded: shrink rewrites float weights only."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.initializers = {init.name: init for init in graph.initializer}
        self.producers = {out: node for node in graph.node for out in node.output}
        self.cache: dict[str, np.ndarray | None] = {}

    def __contains__(self, name: str) -> bool:
        return self.value(name) is not None

    def value(self, name: str) -> np.ndarray | None:
        if name not in self.cache:
            self.cache[name] = self._evaluate(name)
        return self.cache[name]

    def why(self, name: str) -> str:
        node = self.producers.get(name)
        if node is None:
            return "are data, not constants"
        if node.op_type in ("DequantizeLinear", "QuantizeLinear"):
            return "are quantized (DequantizeLinear); shrink rewrites float weights only"
        return f"are computed by a {node.op_type} node, which shrink does not evaluate"

    def _evaluate(self, name: str) -> np.ndarray | None:
        if name in self.initializers:
            return numpy_helper.to_array(self.initializers[name])
        node = self.producers.get(name)
        if node is None or node.op_type not in FOLDABLE:
            return None
        attrs = _attrs(node)
        if node.op_type == "Constant":
            value = attrs.get("value")
            return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else None
        inputs = [self.value(i) if i else None for i in node.input]
        if any(v is None for v, i in zip(inputs, node.input, strict=True) if i):
            return None
        if node.op_type == "ConstantOfShape":
            fill = attrs.get("value")
            base = numpy_helper.to_array(fill) if isinstance(fill, onnx.TensorProto) else np.zeros(1, np.float32)
            return np.full(tuple(int(d) for d in inputs[0]), base.reshape(-1)[0], base.dtype)
        if node.op_type == "Identity":
            return inputs[0]
        if node.op_type == "Cast":
            return inputs[0].astype(helper.tensor_dtype_to_np_dtype(attrs["to"]))
        if node.op_type == "Transpose":
            return np.transpose(inputs[0], attrs.get("perm"))
        shape = [int(d) for d in inputs[1]]
        if not attrs.get("allowzero", 0):
            shape = [inputs[0].shape[i] if d == 0 else d for i, d in enumerate(shape)]
        return inputs[0].reshape(shape)


def _attrs(node: onnx.NodeProto) -> dict[str, object]:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _static_shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Shapes that shape inference knows, with symbolic or unknown dimensions as None."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # inference "is not guaranteed to be complete"; unknown shapes refuse later
        inferred = model
    shapes = {}
    for info in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = info.type.tensor_type
        if tensor.HasField("shape"):
            shapes[info.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    for init in inferred.graph.initializer:
        shapes[init.name] = list(init.dims)
    return shapes


# --- The cut ----------------------------------------------------------------------------------


def cut(model: onnx.ModelProto, sites: Sequence[Site], cuts: Sequence[Cut]) -> onnx.ModelProto:
    """A copy of ``model`` with each cut applied to its site; ``model`` itself is not changed."""
    by_name = {site.name: site for site in sites}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    edits = _Edits(graph)
    for item in cuts:
        site = by_name.get(item.site)
        if site is None or not site.cuttable:
            raise ShrinkError(f"layer {item.site!r} cannot be cut")
        if not item.gone:
            continue
        keep = [c for c in range(site.neurons) if c not in item.gone]
        if not keep:
            raise ShrinkError(f"a cut of layer {item.site!r} would remove all its neurons")
        for consumer in site.consumers:
            _fold_consumer(graph, edits, site, consumer, item, keep)
        edits.slice(site.producer, 1, site.output_axis, 1, keep, site.neurons)
        for part in site.slices:
            edits.slice(part.node, part.input, part.axis, part.block, keep, site.neurons)
        for index, block in site.reshapes:
            target = edits.get(index, 1).copy()
            if int(target[1]) != -1:
                target[1] = len(keep) * block
            edits.set(index, 1, target)
    edits.write()
    _prune(out, model)
    del graph.value_info[:]  # shapes of intermediate tensors changed; onnxruntime infers them again
    return out


def _fold_consumer(
    graph: onnx.GraphProto, edits: _Edits, site: Site, consumer: Consumer, item: Cut, keep: list[int]
) -> None:
    """Merge duplicates into the weights they duplicate, fold removed neurons' fill into the bias,
    then drop their input weights."""
    weight = edits.get(consumer.node, 1).astype(np.float64)
    axis, block = consumer.axis, consumer.block
    moved = np.moveaxis(weight, axis, 0)  # (inputs, …) view
    for j, (i, scale) in item.merged.items():
        moved[i * block : (i + 1) * block] += scale * moved[j * block : (j + 1) * block]
    fill = item.fill.get(consumer.tensor)
    delta = None
    removed = sorted(item.removed)
    if removed and fill is not None:
        values = np.asarray(fill, np.float64).reshape(site.neurons, -1)
        rows = np.concatenate([np.arange(c * block, (c + 1) * block) for c in removed])
        feature_values = np.concatenate([np.broadcast_to(values[c], (block,)) for c in removed])
        if np.any(feature_values):
            taken = moved[rows]  # (features, …)
            product = np.tensordot(feature_values, taken, axes=(0, 0))  # (outputs, …)
            delta = product.reshape(len(product), -1).sum(axis=1)  # a Conv sums over its kernel taps
    weight = np.moveaxis(moved, 0, axis)
    edits.set(consumer.node, 1, weight)
    edits.slice(consumer.node, 1, axis, block, keep, site.neurons)
    if delta is not None:
        _add_to_bias(graph, edits, consumer, delta)


def _add_to_bias(graph: onnx.GraphProto, edits: _Edits, consumer: Consumer, delta: np.ndarray) -> None:
    """Add ``delta`` (one value per output) to the consumer's bias, creating one where it has none."""
    node = graph.node[consumer.node]
    attrs = _attrs(node)
    if consumer.kind == "gemm":  # Y = alpha·A·B + beta·C: the fill enters through alpha, the bias through beta
        beta = float(attrs.get("beta", 1.0))
        if beta == 0.0:
            raise ShrinkError(f"Gemm {node.name!r} has beta 0, so its bias cannot take a fill")
        delta = delta * float(attrs.get("alpha", 1.0)) / beta
    if len(node.input) > 2 and node.input[2] and consumer.kind != "matmul":
        bias = edits.get(consumer.node, 2).astype(np.float64)
        edits.set(consumer.node, 2, bias + delta.reshape(bias.shape) if bias.size == delta.size else bias + delta)
        return
    dtype = edits.dtype(consumer.node, 1)
    if consumer.kind != "matmul":
        edits.add_input(consumer.node, 2, delta.astype(dtype))
        return
    edits.add_bias_after(consumer.node, delta.astype(dtype))


class _Edits:
    """Parameter edits keyed by (node, input): each edited input gets its own new initializer,
    so a constant shared with nodes outside the cut never changes under them."""

    def __init__(self, graph: onnx.GraphProto) -> None:
        self.graph = graph
        self.constants = Constants(graph)
        self.values: dict[tuple[int, int], np.ndarray] = {}
        self.dtypes: dict[tuple[int, int], np.dtype] = {}
        self.taken = {n for node in graph.node for n in [*node.input, *node.output]} | {
            i.name for i in graph.initializer
        }
        self.added: list[onnx.NodeProto] = []

    def get(self, node: int, slot: int) -> np.ndarray:
        key = (node, slot)
        if key not in self.values:
            value = self.constants.value(self.graph.node[node].input[slot])
            if value is None:
                raise ShrinkError(f"input {slot} of node {node} is not a constant")
            self.values[key] = value
            self.dtypes[key] = value.dtype
        return self.values[key]

    def dtype(self, node: int, slot: int) -> np.dtype:
        self.get(node, slot)
        return self.dtypes[(node, slot)]

    def set(self, node: int, slot: int, value: np.ndarray) -> None:
        self.get(node, slot)
        self.values[(node, slot)] = value

    def slice(self, node: int, slot: int, axis: int, block: int, keep: list[int], neurons: int) -> None:
        value = self.get(node, slot)
        axis = axis % value.ndim
        if value.shape[axis] == 1:
            return
        if value.shape[axis] != neurons * block:
            raise ShrinkError(f"input {slot} of node {node} has {value.shape[axis]} entries, not {neurons}×{block}")
        rows = np.concatenate([np.arange(c * block, (c + 1) * block) for c in keep])
        self.values[(node, slot)] = np.take(value, rows, axis=axis)

    def add_input(self, node: int, slot: int, value: np.ndarray) -> None:
        """Give node ``node`` a new constant input at ``slot`` (a bias it lacked)."""
        inputs = self.graph.node[node].input
        while len(inputs) <= slot:
            inputs.append("")
        self.values[(node, slot)] = value
        self.dtypes[(node, slot)] = value.dtype

    def add_bias_after(self, node: int, value: np.ndarray) -> None:
        """Insert ``Add(output, value)`` after node ``node`` under its output's name."""
        target = self.graph.node[node]
        original = target.output[0]
        inner = self._fresh(f"{original}/unbiased")
        target.output[0] = inner
        name = self._fresh(f"{original}/fill")
        self.graph.initializer.append(numpy_helper.from_array(value, name))
        self.added.append(helper.make_node("Add", [inner, name], [original], name=self._fresh(f"{original}/add_fill")))

    def write(self) -> None:
        """Store every edited value as a new initializer and point its node's input at it."""
        for (node, slot), value in self.values.items():
            target = self.graph.node[node]
            old = target.input[slot] or f"{target.output[0]}/bias"
            name = self._fresh(f"{old}/shrunk")
            array = np.asarray(value).astype(self.dtypes[(node, slot)], copy=False)
            self.graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
            target.input[slot] = name
        for node in self.added:  # an Add after its MatMul: insert right after it, keeping topological order
            producer = next(i for i, n in enumerate(self.graph.node) if node.input[0] in n.output)
            self.graph.node.insert(producer + 1, node)

    def _fresh(self, stem: str) -> str:
        name, n = stem, 1
        while name in self.taken:
            n += 1
            name = f"{stem}{n}"
        self.taken.add(name)
        return name


def _prune(model: onnx.ModelProto, original: onnx.ModelProto) -> None:
    """Drop the nodes and initializers that the cut left unused (a weight's old value, the Reshape
    that computed it), and, under IR 3, list every initializer among the inputs with its new shape."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        used = {name for node in graph.node for name in node.input} | outputs
        dead = [i for i, node in enumerate(graph.node) if not any(o in used for o in node.output)]
        if not dead:
            break
        for i in reversed(dead):
            del graph.node[i]
    used = {name for node in graph.node for name in node.input} | outputs
    originally_used = {name for node in original.graph.node for name in node.input}
    keep = [init for init in graph.initializer if init.name in used or init.name not in originally_used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    inits = {init.name: init for init in keep}
    original_inits = {init.name for init in original.graph.initializer}
    data_inputs = [i for i in graph.input if i.name not in original_inits]
    listed = [i for i in graph.input if i.name in inits]
    if model.ir_version < 4:  # IR 3 lists every initializer among the inputs, with its shape
        listed = [helper.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in keep]
    else:
        listed = [
            helper.make_tensor_value_info(i.name, inits[i.name].data_type, list(inits[i.name].dims)) for i in listed
        ]
    del graph.input[:]
    graph.input.extend([*data_inputs, *listed])


def affine_rows(model: onnx.ModelProto, site: Site) -> tuple[np.ndarray, np.ndarray] | None:
    """Each neuron's pre-activation as an affine function of the producer's input: (rows, bias)
    with one flattened weight row and one bias per neuron, through the bias Adds, scalings and
    BatchNorm between the producer and the activation; None where that chain is not affine per
    neuron (a Sub of the layer from a constant flips the sign: it stays affine and is followed)."""
    graph = model.graph
    constants = Constants(graph)
    producer = graph.node[site.producer]
    weight = constants.value(producer.input[1]).astype(np.float64)
    rows = np.moveaxis(weight, site.output_axis, 0).reshape(site.neurons, -1)
    bias = np.zeros(site.neurons)
    if len(producer.input) > 2 and producer.input[2]:
        bias = bias + constants.value(producer.input[2]).astype(np.float64).reshape(-1)
    if producer.op_type == "Gemm":
        attrs = _attrs(producer)
        rows, bias = rows * float(attrs.get("alpha", 1.0)), bias * float(attrs.get("beta", 1.0))
    tensor = producer.output[0]
    for index in site.pre_nodes:
        node = graph.node[index]
        if tensor not in node.input:
            return None
        slot = list(node.input).index(tensor)
        values = [
            np.broadcast_to(constants.value(name).astype(np.float64).reshape(-1), (site.neurons,))
            for i, name in enumerate(node.input)
            if i != slot and name
        ]
        op = node.op_type
        if op == "BatchNormalization":
            scale, shift, mean, var = values
            s = scale / np.sqrt(var + float(_attrs(node).get("epsilon", 1e-5)))
            rows, bias = rows * s[:, None], (bias - mean) * s + shift
        elif op in ("Add", "Sum"):
            bias = bias + values[0]
        elif op == "Sub":
            rows, bias = (rows, bias - values[0]) if slot == 0 else (-rows, values[0] - bias)
        elif op == "Mul":
            rows, bias = rows * values[0][:, None], bias * values[0]
        elif op == "Div" and slot == 0:
            rows, bias = rows / values[0][:, None], bias / values[0]
        elif op not in ("Identity", "Dropout"):
            return None
        tensor = node.output[0]
    return (rows, bias) if tensor == site.name else None
