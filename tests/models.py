"""Small real ONNX models built with ``onnx.helper``: the one place tests get their models from.

Every model here passes ``onnx.checker`` and runs in onnxruntime; weights are given or fixed by a
seed, so that a test's numbers never change between runs. ``Net`` builds any graph a test needs;
``mlp``, ``dense_model`` and ``lenet_model`` are the networks most tests share. The reference
helpers compute layer states the slow, obvious way (SPEC §2) from tensors that onnxruntime itself
produced.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

FLOAT = TensorProto.FLOAT
FLOAT16 = TensorProto.FLOAT16
IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; onnx 1.23 would write 14 (FIELD-NOTES)


class Net:
    """A graph under construction: each method adds nodes and returns the name of their output.

    ``dtype`` is the element type of the input and of every weight (FLOAT or FLOAT16).
    """

    def __init__(
        self,
        shape: Sequence[int | str | None] = ("batch", 4),
        *,
        input_name: str = "x",
        dtype: int = FLOAT,
        opset: int = 13,
        seed: int = 0,
    ) -> None:
        self.dtype = dtype
        self.np_dtype = helper.tensor_dtype_to_np_dtype(dtype)
        self.opset = opset
        self.inputs = [helper.make_tensor_value_info(input_name, dtype, list(shape))]
        self.input = input_name
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []
        self.rng = np.random.default_rng(seed)
        self.count = 0

    def _name(self, stem: str) -> str:
        self.count += 1
        return f"{stem}{self.count}"

    def const(self, value: object, stem: str = "w", *, dtype: object = None) -> str:
        """An initializer holding ``value`` (in the net's dtype unless ``dtype`` says otherwise)."""
        name = self._name(stem)
        array = np.asarray(value, dtype=dtype or self.np_dtype)
        self.inits.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs: object) -> str:
        """One node; its single output is named ``out`` or after the op."""
        name = out or self._name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [name], **attrs))
        return name

    def random(self, *shape: int) -> np.ndarray:
        return self.rng.standard_normal(shape).astype(self.np_dtype)

    def dense(
        self, x: str, n_in: int, n_out: int, *, weight: object = None, bias: object = True, out: str | None = None
    ) -> str:
        """``Gemm(x, W, b)`` with ``W`` of shape (n_in, n_out): random unless ``weight`` is given.

        ``bias`` is True for a random bias, False for none, or the bias values themselves.
        """
        w = self.const(self.random(n_in, n_out) if weight is None else weight)
        if bias is False:
            return self.op("Gemm", x, w, out=out)
        b = self.const(self.random(n_out) * 0.5 if bias is True else bias, "b")
        return self.op("Gemm", x, w, b, out=out)

    def matmul(self, x: str, n_in: int, n_out: int, *, out: str | None = None) -> str:
        """``Add(MatMul(x, W), b)``: a dense layer as PyTorch and Keras often export it."""
        product = self.op("MatMul", x, self.const(self.random(n_in, n_out)))
        return self.op("Add", product, self.const(self.random(n_out) * 0.5, "b"), out=out)

    def conv(
        self,
        x: str,
        c_in: int,
        c_out: int,
        *,
        kernel: int = 3,
        bias: bool = True,
        same: bool = True,
        scale: float | None = None,
        out: str | None = None,
    ) -> str:
        """A ``Conv`` with a random ``kernel``×``kernel`` filter bank (weights × ``scale``, by default
        1/kernel), same-padded unless ``same`` is False."""
        w = self.const(self.random(c_out, c_in, kernel, kernel) * (1 / kernel if scale is None else scale))
        inputs = [x, w, self.const(self.random(c_out) * 0.5, "b")] if bias else [x, w]
        pad = kernel // 2 if same else 0
        return self.op("Conv", *inputs, out=out, pads=[pad] * 4)

    def build(
        self, *outputs: str, ir_version: int = IR_VERSION, inits_as_inputs: bool = False, name: str = "test"
    ) -> onnx.ModelProto:
        """The finished, checked model with ``outputs`` as its graph outputs.

        ``inits_as_inputs`` also lists every initializer as a graph input, as IR 3 requires.
        """
        inputs = list(self.inputs)
        if inits_as_inputs:
            inputs += [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in self.inits]
        graph = helper.make_graph(
            self.nodes,
            name,
            inputs,
            [helper.make_tensor_value_info(name, self.dtype, None) for name in outputs],
            self.inits,
        )
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)], ir_version=ir_version)
        # The checker wants a shape on every graph output: let shape inference fill them in.
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
        del model.graph.value_info[:]
        onnx.checker.check_model(model, full_check=True)
        return model


def mlp(
    widths: Sequence[int],
    *,
    activation: str = "Relu",
    head: str | None = None,
    seed: int = 0,
    opset: int = 13,
    batch: int | str = "batch",
) -> onnx.ModelProto:
    """``Gemm → activation → … → Gemm`` with layer widths ``widths`` (input first, logits last).

    Pre-activations are ``pre1``, ``pre2``, …, the last Gemm gives ``logits`` and a ``head``
    (Softmax, LogSoftmax) gives ``probs``. ``batch`` is the input's batch dimension: a name, or a
    fixed size; the weights depend only on ``widths`` and ``seed``.
    """
    net = Net((batch, widths[0]), seed=seed, opset=opset)
    x = net.input
    for i, (n_in, n_out) in enumerate(itertools.pairwise(widths)):
        last = i == len(widths) - 2
        x = net.dense(x, n_in, n_out, out="logits" if last else f"pre{i + 1}")
        if not last:
            x = net.op(activation, x, out=f"act{i + 1}")
    if head is not None:
        x = net.op(head, x, out="probs", axis=-1)
    return net.build(x)


def dense_model(
    layers: Sequence[tuple[object, object]], *, batch: int | str = "N", softmax: bool = False, name: str = "dense"
) -> onnx.ModelProto:
    """``x → Gemm → Relu → … → Gemm (→ Softmax)`` with the weights given: (W of shape (in, out), b)
    per Gemm, so that a test can work out every figure by hand.

    Pre-activations are named ``h1``, ``h2``, …; the last Gemm gives ``logits``, the Softmax
    ``probs``. Opset 17.
    """
    n_in = np.shape(layers[0][0])[0]
    net = Net((batch, n_in), opset=17)
    x = net.input
    for i, (w, b) in enumerate(layers, 1):
        last = i == len(layers)
        x = net.dense(x, *np.shape(w), weight=w, bias=b, out="logits" if last else f"h{i}")
        if not last:
            x = net.op("Relu", x, out=f"a{i}")
    if softmax:
        x = net.op("Softmax", x, out="probs", axis=1)
    return net.build(x, name=name)


def mnist_layers(seed: int = 1) -> list[tuple[np.ndarray, np.ndarray]]:
    """Random weights for a 784 → 16 → 12 → 10 ``dense_model`` on MNIST, fixed by ``seed``."""
    rng = np.random.default_rng(seed)
    return [
        (rng.standard_normal((784, 16)) * 0.1, rng.standard_normal(16) * 0.1),
        (rng.standard_normal((16, 12)) * 0.5, rng.standard_normal(12) * 0.1),
        (rng.standard_normal((12, 10)) * 0.5, rng.standard_normal(10) * 0.1),
    ]


def lenet_model(batch: int | str = "N", seed: int = 0) -> onnx.ModelProto:
    """A LeNet-5-shaped model with random weights, input (batch, 1, 28, 28) float32:
    Conv(4, 5×5) ``c1`` → Relu → MaxPool → Conv(8, 5×5) ``c2`` → Relu → MaxPool → Flatten →
    Gemm(16) ``f1`` → Relu → Gemm(10) ``logits``. Positions per layer: 576, 64, 1."""
    net = Net((batch, 1, 28, 28), opset=17, seed=seed)

    def block(x: str, c_in: int, c_out: int, scale: float, out: str) -> str:
        conv = net.conv(x, c_in, c_out, kernel=5, same=False, scale=scale, out=out)
        return net.op("MaxPool", net.op("Relu", conv), kernel_shape=[2, 2], strides=[2, 2])

    flat = net.op("Flatten", block(block(net.input, 1, 4, 0.3, "c1"), 4, 8, 0.1, "c2"), axis=1)
    f1 = net.dense(flat, 128, 16, weight=net.random(128, 16) * 0.1, out="f1")
    return net.build(net.dense(net.op("Relu", f1), 16, 10, weight=net.random(16, 10) * 0.3, out="logits"), name="lenet")


def qdq_mlp(hidden: np.ndarray, output: np.ndarray) -> onnx.ModelProto:
    """``x → Gemm → Relu → Gemm`` as a QDQ exporter writes it: the hidden Gemm's weight (``hidden``,
    shape (in, out), int8) is a ``Constant`` node behind a ``DequantizeLinear`` (scale 0.5); the
    output Gemm's weight ``output`` is a plain float initializer. Pre-activations ``h1``, ``logits``."""
    hidden, output = np.asarray(hidden, np.int8), np.asarray(output, np.float32)
    net = Net(("N", hidden.shape[0]), opset=17)
    quantized = net.op("Constant", out="w_q", value=numpy_helper.from_array(hidden, "w_q"))
    weight = net.op("DequantizeLinear", quantized, net.const(0.5, "scale"), out="w_dq")
    h1 = net.op("Gemm", net.input, weight, out="h1")
    return net.build(net.dense(net.op("Relu", h1), *output.shape, weight=output, bias=False, out="logits"))


def conv_flatten_net(dead: tuple[int, ...] = (), activation: str = "Relu") -> onnx.ModelProto:
    """Conv(1→4, 3×3 valid) ``c1`` → ``activation`` → MaxPool 2×2 → Flatten (4 × 3×3 = 36) →
    Gemm(36→5) ``f1`` → Relu → Gemm(5→3) ``logits``; channels in ``dead`` have zero weights and
    bias −1 (so they never fire). ``activation`` "Clip" is ReLU6, Clip(0, 6)."""
    net = Net(("N", 1, 8, 8), opset=17, seed=3)
    w = net.random(4, 1, 3, 3)
    b = np.abs(net.random(4)) + 0.1
    for c in dead:
        w[c], b[c] = 0, -1
    conv = net.op("Conv", net.input, net.const(w), net.const(b), out="c1")
    fired = net.op("Clip", conv, net.const(0.0), net.const(6.0)) if activation == "Clip" else net.op(activation, conv)
    pooled = net.op("MaxPool", fired, kernel_shape=[2, 2], strides=[2, 2])
    flat = net.op("Flatten", pooled, axis=1)
    hidden = net.dense(flat, 36, 5, out="f1")
    return net.build(net.dense(net.op("Relu", hidden), 5, 3, out="logits"))
# Names an attacker writes into a model file: terminal escapes (colour, clear screen, window
# title, OSC 52 clipboard), NUL and other C0/C1 controls, bidi overrides and isolates, zero-width
# characters, a lone surrogate's look-alike, mathtext, XML's terminators, markup, and length.
HOSTILE_NAMES = [
    "red\x1b[31mALERT\x1b[0m",
    "clear\x1b[2J\x1b[H",
    "title\x1b]0;pwned\x07",
    "clip\x1b]52;c;cm0gLXJmIH4=\x07",
    "nul\x00byte",
    "bell\x07back\x08space\x7fdel",
    "c1\x9b31mcsi\x85nel",
    "line\nbreak\rreturn\ttab",
    "bidi\u202eexe.txt",
    "iso\u2066late\u2069",
    "zero\u200bwidth\ufeff",
    "sep\u2028line\u2029para",
    "$\\frac{}$",
    "$x^{2$",
    "a$b$c\\",
    "]]><x/>&amp;<![CDATA[",
    "<script>alert(1)</script>",
    "\"quoted' &",
    "long" * 200,
]


def with_names(model: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of ``model`` whose every tensor (inputs and outputs included), node and the graph
    itself is named after ``name``, with ``name`` as its doc strings too: each tensor ``t`` becomes
    ``name + "/" + t``, so names stay distinct."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    renamed = {t: f"{name}/{t}" for t in _tensor_names(graph)}
    for i, node in enumerate(graph.node):
        node.input[:] = [renamed.get(t, t) for t in node.input]
        node.output[:] = [renamed[t] for t in node.output]
        node.name = f"{name}/{node.op_type}{i}"
        node.doc_string = name
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = renamed[value.name]
        value.doc_string = name
    for init in graph.initializer:
        init.name = renamed[init.name]
    graph.name, graph.doc_string, copy.doc_string = name, name, name
    return copy


def _tensor_names(graph: onnx.GraphProto) -> list[str]:
    names = [v.name for v in graph.input] + [t.name for t in graph.initializer]
    names += [t for node in graph.node for t in node.output]
    return list(dict.fromkeys(names))


def input_of_type(model: onnx.ModelProto, elem_type: int, *, opset: int = 21) -> onnx.ModelProto:
    """``model`` with its input taking ``elem_type`` tensors: the input, renamed nowhere, is cast
    to the model's float first (``Cast`` reads strings, bfloat16, 8- and 4-bit numbers alike)."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    [value] = [i for i in graph.input if i.name not in {t.name for t in graph.initializer}]
    name, inner = value.name, f"{value.name}_as_float"
    for node in graph.node:
        node.input[:] = [inner if t == name else t for t in node.input]
    graph.node.insert(0, helper.make_node("Cast", [name], [inner], to=value.type.tensor_type.elem_type))
    value.type.tensor_type.elem_type = elem_type
    del copy.opset_import[:]
    copy.opset_import.append(helper.make_opsetid("", opset))
    return copy


def wide_conv_model(seed: int = 0) -> onnx.ModelProto:
    """Conv(16, 3×3) ``c1`` → Relu → Conv(64, 3×3) ``c2`` → Relu → GlobalAveragePool → Flatten →
    Gemm(10) ``logits`` on (N, 1, 28, 28) float32, same-padded: on noise nearly each of a sample's
    784 positions is a new state of ``c2``, so an audit under a 64M budget spills within a few
    thousand samples."""
    net = Net(("N", 1, 28, 28), opset=17, seed=seed)
    c1 = net.op("Relu", net.conv(net.input, 1, 16, out="c1"))
    pooled = net.op("GlobalAveragePool", net.op("Relu", net.conv(c1, 16, 64, out="c2")))
    flat = net.op("Flatten", pooled, axis=1)
    return net.build(net.dense(flat, 64, 10, out="logits"), name="wide_conv")


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``model`` to ``path`` and return the path."""
    path.write_bytes(model.SerializeToString())
    return path


def run(model: onnx.ModelProto, x: np.ndarray, names: Sequence[str]) -> list[np.ndarray]:
    """Run ``model`` on ``x`` in onnxruntime and return the tensors ``names``, intermediate or not.

    Intermediate tensors are made graph outputs on a copy, which also blocks the fusions that
    would otherwise hide them (FIELD-NOTES).
    """
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    dtypes = _dtypes(copy)
    for name in names:
        if name not in present:
            copy.graph.output.append(helper.make_tensor_value_info(name, dtypes.get(name, FLOAT), None))
    session = ort.InferenceSession(copy.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(list(names), {session.get_inputs()[0].name: x})


def _dtypes(model: onnx.ModelProto) -> dict[str, int]:
    inferred = onnx.shape_inference.infer_shapes(model)
    values = [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]
    return {v.name: v.type.tensor_type.elem_type for v in values if v.type.tensor_type.elem_type}


def state_rows(pre_activation: np.ndarray, axis: int) -> np.ndarray:
    """SPEC §2: one row of N firing bits (``> 0``) per (sample, position)."""
    bits = np.moveaxis(np.asarray(pre_activation) > 0, axis, -1)
    return bits.reshape(-1, bits.shape[-1])


def reference_counts(pre_activation: np.ndarray, axis: int) -> np.ndarray:
    """The sorted count of each distinct state, by ``np.unique`` over whole bit rows."""
    rows = state_rows(pre_activation, axis)
    return np.sort(np.unique(rows, axis=0, return_counts=True)[1])


def reference_entropy(counts: np.ndarray) -> float:
    """``−Σ p log2 p`` in bits, straight from the definition."""
    p = np.asarray(counts, np.float64) / np.sum(counts)
    return float(-(p * np.log2(p)).sum())


# The real third-party models in ../shared/models, by file stem (see its README).
SHARED_MODELS = (
    "mnist-8_cntk_opset8",
    "cnn_pytorch25_opset17",
    "qdq_int8_pytorch21_opset17",
    "squeezenet1.0_fp16_opset7",
    "light_resnet50_opset9",
)


# --- Models whose firing bits the data controls ------------------------------------------------

NEURONS = [1, 3, 16, 20, 21, 24, 25, 32, 33, 64, 65, 130]  # every group and word boundary of the packing
POSITIONS = (3, 3)  # the conv layout's H × W


def patterns(neurons: int, rng: np.random.Generator, count: int = 40) -> np.ndarray:
    """Sign patterns with magnitudes in [0.5, 1.5], plus near twins that differ in one bit.

    The twins differ at the bits where packing could go wrong: the top of a 24-bit group, word
    boundaries 63/64, and the last neuron. A counter that loses any group merges twins.
    """
    signs = rng.choice([-1.0, 1.0], size=(count, neurons))
    twins = []
    for bit in sorted({0, 23, 24, 47, 48, 63, 64, 127, 128, neurons - 1}):
        if bit < neurons:
            twin = signs[rng.integers(count)].copy()
            twin[bit] *= -1
            twins.append(twin)
    signs = np.vstack([signs, *twins])
    return (signs * rng.uniform(0.5, 1.5, signs.shape)).astype(np.float32)


def near_identity(net: Net, neurons: int) -> np.ndarray:
    """Random positive diagonal plus off-diagonal noise too small to flip a sign of the data."""
    weight = np.diag(net.rng.uniform(0.8, 1.2, neurons)) + net.rng.uniform(-5e-4, 5e-4, (neurons, neurons))
    return weight.astype(np.float32)


def dense_case(neurons: int, samples: int = 300, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """``Gemm(near-identity) → Relu`` on (B, N) data drawn with repeats from a pattern pool."""
    net = Net(("batch", neurons), seed=seed)
    pre = net.dense(net.input, neurons, neurons, weight=near_identity(net, neurons), bias=False, out="pre")
    model = net.build(net.op("Relu", pre))
    pool = patterns(neurons, net.rng)
    x = pool[net.rng.integers(len(pool), size=samples)]
    return model, x, 1


def conv_case(neurons: int, samples: int = 60, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """``Conv 1×1(near-identity) → Relu`` on (B, N, H, W) data; each position draws a pattern."""
    net = Net(("batch", neurons, *POSITIONS), seed=seed)
    kernel = near_identity(net, neurons).T.reshape(neurons, neurons, 1, 1)
    pre = net.op("Conv", net.input, net.const(kernel), out="pre")
    model = net.build(net.op("Relu", pre))
    pool = patterns(neurons, net.rng)
    x = pool[net.rng.integers(len(pool), size=(samples, *POSITIONS))]  # (B, H, W, N)
    return model, np.ascontiguousarray(np.moveaxis(x, -1, 1)), 1


CASES = {"dense": dense_case, "conv": conv_case}


def pack(bits: np.ndarray, axis: int, groups: list[tuple[int, int]], layout: str) -> tuple[np.ndarray, int]:
    """What the exposed graph emits: int32 group sums of bits × 2^k, in the given layout
    (``last``: groups on the last axis; ``nchw``: (B, G, H, W); else (B, G, H·W))."""
    rows = np.moveaxis(bits, axis, -1).astype(np.int64)  # (..., N)
    packed = np.stack([(rows[..., a:b] << np.arange(b - a)).sum(axis=-1) for a, b in groups], axis=-1).astype(
        np.int32
    )  # (..., G)
    if layout == "last":
        return packed, -1
    if layout == "nchw":
        return np.moveaxis(packed, -1, 1), 1  # (B, G, H, W)
    return np.moveaxis(packed, -1, 1).reshape(len(bits), len(groups), -1), 1  # (B, G, H·W)
