"""The fast paths of ``expose.expose`` against its straightforward graph, ``expose(..., fast=False)``.

Every fast path must give the oracle's firing bits bit for bit and φ up to float rounding:
firing read at the activation's output (only where ``y > 0`` ⟺ ``x > 0`` for every float),
integer packing, and φ through linearity (only where the pre-activation is a linear op's own
output). Models are real ONNX graphs run in onnxruntime; the data includes exact zeros,
subnormal pre-activations and large values.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from models import FLOAT16, Net, run
from onnx import helper

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Batch
from auditor.datasets.splits import load_arrays
from auditor.engine import metrics
from auditor.engine.expose import Exposed, LayerOutputs, expose
from auditor.engine.find import describe
from auditor.engine.keys import join_groups
from auditor.engine.modelfile import load_model
from auditor.engine.prepare import structure_of
from auditor.engine.run import Session


def outputs(model: onnx.ModelProto, x: np.ndarray, **options: object) -> tuple[Exposed, dict[str, np.ndarray]]:
    """The exposed model and every output it adds, run in onnxruntime on ``x``."""
    exposed = expose(model, describe(model), **options)  # type: ignore[arg-type]
    names = exposed.output_names
    return exposed, dict(zip(names, run(exposed.model, x, names), strict=True))


def keys_of(got: dict[str, np.ndarray], out: LayerOutputs) -> np.ndarray:
    """A layer's keys, joined from its packed groups (byte groups and 24-bit groups alike)."""
    return join_groups(got[out.keys], out.groups, out.group_axis)


def assert_like_oracle(model: onnx.ModelProto, x: np.ndarray, **options: object) -> Exposed:
    """Keys bit-identical to the oracle's, φ equal up to float rounding; returns the fast graph."""
    fast, got = outputs(model, x, **options)
    oracle, want = outputs(model, x, fast=False, states_at=options.get("states_at", "pre-activation"))
    for mine, theirs in zip(fast.layers, oracle.layers, strict=True):
        assert mine.group_axis == theirs.group_axis
        assert got[mine.keys].dtype == np.int32
        np.testing.assert_array_equal(keys_of(got, mine), keys_of(want, theirs), err_msg=mine.layer.name)
        phi, exact = got[mine.sum], want[theirs.sum]
        assert phi.dtype == np.float32 and phi.shape == exact.shape == (len(x),)
        finite = np.isfinite(exact)
        np.testing.assert_array_equal(np.isfinite(phi), finite)
        # float rounding, per sample: relative to the sample's own φ or, where φ cancels to near
        # zero, to a typical φ of the batch
        scale = np.maximum(np.abs(exact[finite]), max(float(np.median(np.abs(exact[finite]))), 1.0))
        assert np.all(np.abs(phi[finite] - exact[finite]) <= 2e-6 * scale), mine.layer.name
    return fast


def nodes_of(exposed: Exposed, out: LayerOutputs) -> dict[str, onnx.NodeProto]:
    """The nodes ``expose`` added for one layer, by the last part of their output's name."""
    prefix = out.keys.rsplit("/", 1)[0] + "/"
    return {
        node.output[0][len(prefix) :]: node for node in exposed.model.graph.node if node.output[0].startswith(prefix)
    }


def fires_from(exposed: Exposed, name: str) -> str:
    """The tensor whose sign gives the firing bits of layer ``name``."""
    out = next(out for out in exposed.layers if out.layer.name == name)
    return nodes_of(exposed, out)["fires"].input[0]


def through_linearity(exposed: Exposed, name: str) -> bool:
    """Whether layer ``name``'s φ is computed from the linear op's input."""
    out = next(out for out in exposed.layers if out.layer.name == name)
    return "partial" in nodes_of(exposed, out)


def awkward_rows(x: np.ndarray) -> np.ndarray:
    """``x`` with rows that give exact zeros, subnormal and huge pre-activations appended."""
    rows = np.stack([np.zeros(x.shape[1:]), np.full(x.shape[1:], 1e-41), np.full(x.shape[1:], -3e-42)])
    big = np.random.default_rng(1).standard_normal((2, *x.shape[1:])) * 1e30
    return np.concatenate([x, rows.astype(x.dtype), big.astype(x.dtype)])


# --- Firing at the activation's output ---------------------------------------------------------

# (activation, opset, attributes, whether its output fires exactly where its input does)
ACTIVATIONS = [
    ("Relu", 13, {}, True),
    ("LeakyRelu", 13, {"alpha": 0.1}, True),
    ("LeakyRelu", 13, {"alpha": -0.1}, False),
    ("Elu", 13, {}, True),
    ("Elu", 13, {"alpha": -1.0}, False),
    ("Selu", 13, {}, True),
    ("Selu", 13, {"gamma": 0.25}, False),
    ("Celu", 13, {}, True),
    ("ThresholdedRelu", 13, {"alpha": -0.5}, True),
    ("ThresholdedRelu", 13, {"alpha": 0.5}, False),
    ("Clip", 13, {"bounds": (0.0, 6.0)}, True),
    ("Clip", 13, {"bounds": (-1.0, 1.0)}, False),
    ("Gelu", 20, {}, False),
    ("Gelu", 20, {"approximate": "tanh"}, False),
    ("Silu", 13, {}, False),
    ("Tanh", 13, {}, False),
    ("Sigmoid", 13, {}, False),
    ("Softplus", 13, {}, False),
    ("HardSigmoid", 13, {}, False),
    ("HardSwish", 14, {}, False),
    ("Softsign", 13, {}, False),
    ("Mish", 18, {}, False),
    ("PRelu", 13, {}, False),
]


def activation_net(activation: str, opset: int, attrs: dict) -> onnx.ModelProto:
    """x (4 values) → Gemm(40), no bias → activation → Gemm(3): φ of the hidden layer goes through
    linearity (it reads 4 values per sample, the pre-activation holds 40)."""
    net = Net(("batch", 4), opset=opset, seed=7)
    pre = net.dense(net.input, 4, 40, bias=np.zeros(40), out="pre")
    attrs = dict(attrs)
    if activation == "Silu":  # x · Sigmoid(x), as exporters write it
        act = net.op("Mul", pre, net.op("Sigmoid", pre))
    elif activation == "Clip":
        low, high = attrs.pop("bounds")
        act = net.op("Clip", pre, net.const(np.float32(low), "lo"), net.const(np.float32(high), "hi"))
    elif activation == "PRelu":
        act = net.op("PRelu", pre, net.const(np.full(40, 0.25, np.float32), "slope"))
    else:
        act = net.op(activation, pre, **attrs)
    return net.build(net.dense(act, 40, 3, out="logits"))


@pytest.mark.parametrize(
    ("activation", "opset", "attrs", "same_sign"),
    ACTIVATIONS,
    ids=[
        f"{a}{'-' + '-'.join(f'{k}={v}' for k, v in attrs.items()) if attrs else ''}" for a, _, attrs, _ in ACTIVATIONS
    ],
)
def test_firing_is_read_at_the_output_only_where_it_fires_like_the_input(
    activation: str, opset: int, attrs: dict, same_sign: bool
) -> None:
    """Same-sign activations are read at their output; every other one (Sigmoid, Softplus, …)
    takes the general path and is read at the pre-activation. Bits match the oracle either way."""
    model = activation_net(activation, opset, attrs)
    x = awkward_rows(np.random.default_rng(8).standard_normal((300, 4)).astype(np.float32))
    fast = assert_like_oracle(model, x)
    layer = next(out.layer for out in fast.layers if out.layer.name == "pre")
    assert layer.activation == activation
    assert through_linearity(fast, "pre")
    assert bool(layer.firing_output) is same_sign
    assert fires_from(fast, "pre") == (layer.firing_output if same_sign else "pre")


def one_node(op: str, opset: int, x: np.ndarray, **attrs: object) -> np.ndarray:
    """``op`` applied by onnxruntime to the float32 values ``x``."""
    node = helper.make_node(op, ["x"], ["y"], **attrs)
    value = [helper.make_tensor_value_info(n, onnx.TensorProto.FLOAT, [None]) for n in ("x", "y")]
    graph = helper.make_graph([node], "one", value[:1], value[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=9)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"x": x})[0]


SMALLEST = np.array([2.0**-149], np.float32)  # the smallest positive subnormal


@pytest.mark.parametrize(
    ("op", "opset", "x", "fires_at_output"),
    [
        ("Sigmoid", 13, np.zeros(1, np.float32), True),  # σ(0) = 0.5: fires where x does not
        ("Softplus", 13, np.zeros(1, np.float32), True),  # log 2
        ("HardSigmoid", 13, np.zeros(1, np.float32), True),  # 0.5
        ("Gelu", 20, SMALLEST, False),  # x·Φ(x) = 2**-150 rounds to 0: x fires, the output does not
        ("HardSwish", 14, SMALLEST, False),
    ],
)
def test_the_general_path_is_needed_for_activations_that_move_the_sign(
    op: str, opset: int, x: np.ndarray, fires_at_output: bool
) -> None:
    """Why those activations are read at their input: their output fires differently."""
    assert bool(one_node(op, opset, x)[0] > 0) is fires_at_output
    assert bool(x[0] > 0) is not fires_at_output


def test_block_output_states_are_never_read_at_the_activation_output() -> None:
    """At states_at=block-output the state tensor (after the activation and a constant shift) is read."""
    net = Net(("batch", 4), seed=9)
    act = net.op("Relu", net.dense(net.input, 4, 40, out="pre"))
    block = net.op("Sub", act, net.const(np.full(40, 0.3)), out="block")
    model = net.build(net.dense(block, 40, 3, out="logits"))
    x = np.random.default_rng(9).standard_normal((200, 4)).astype(np.float32)
    fast = assert_like_oracle(model, x, states_at="block-output")
    assert through_linearity(fast, "pre")
    assert fires_from(fast, "pre") == "block"


# --- φ through linearity, and where it must not be used ------------------------------------------


def conv_model(pads: int, strides: int, dilations: int) -> onnx.ModelProto:
    """Conv(1 → 40, 3×3) with the given geometry → Relu → global pooling → Gemm(3)."""
    net = Net(("batch", 1, 12, 10), seed=10)
    conv = net.op(
        "Conv", net.input, net.const(net.random(40, 1, 3, 3)), net.const(net.random(40)), out="c1",
        pads=[pads] * 4, strides=[strides] * 2, dilations=[dilations] * 2,
    )  # fmt: skip
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", conv)), axis=1)
    return net.build(net.dense(pooled, 40, 3, out="logits"))


@pytest.mark.parametrize(("pads", "strides", "dilations"), [(0, 1, 1), (1, 1, 1), (1, 2, 1), (2, 1, 2)])
def test_conv_sum_through_window_sums_matches_the_reduce_sum(pads: int, strides: int, dilations: int) -> None:
    model = conv_model(pads, strides, dilations)
    x = awkward_rows(np.random.default_rng(11).standard_normal((64, 1, 12, 10)).astype(np.float32))
    fast = assert_like_oracle(model, x)
    assert through_linearity(fast, "c1")
    assert fires_from(fast, "c1") != "c1"  # read at the Relu's output: the Conv+Relu fusion stays


def test_one_dimensional_conv_sum_through_linearity() -> None:
    net = Net(("batch", 2, 20), seed=12)
    conv = net.op("Conv", net.input, net.const(net.random(30, 2, 3)), net.const(net.random(30)), out="c", pads=[1, 0])
    model = net.build(net.dense(net.op("Flatten", net.op("Elu", conv), axis=1), 30 * 19, 3, out="logits"))
    fast = assert_like_oracle(model, np.random.default_rng(13).standard_normal((50, 2, 20)).astype(np.float32))
    assert through_linearity(fast, "c")


@pytest.mark.parametrize("rank", [2, 3])
def test_matmul_add_sum_through_linearity(rank: int) -> None:
    """MatMul + constant bias, on (batch, features) and (batch, tokens, features)."""
    shape = ("batch", 4) if rank == 2 else ("batch", 5, 4)
    net = Net(shape, seed=14)
    hidden = net.op("Relu", net.matmul(net.input, 4, 30, out="pre"))
    model = net.build(net.matmul(hidden, 30, 3, out="logits"))
    x = np.random.default_rng(15).standard_normal((40, *[d for d in shape[1:]])).astype(np.float32)
    fast = assert_like_oracle(model, x)
    assert through_linearity(fast, "pre")
    assert not through_linearity(fast, "logits")  # 30 inputs for 3 outputs: the ReduceSum is cheaper


def test_gemm_with_transposed_weights_alpha_beta_and_a_row_bias() -> None:
    net = Net(("batch", 6), seed=16)
    w, c = net.const(net.random(40, 6)), net.const(net.random(1, 40))
    pre = net.op("Gemm", net.input, w, c, out="pre", transB=1, alpha=0.5, beta=2.0)
    model = net.build(net.dense(net.op("LeakyRelu", pre), 40, 3, out="logits"))
    fast = assert_like_oracle(model, np.random.default_rng(17).standard_normal((60, 6)).astype(np.float32))
    assert through_linearity(fast, "pre")


def test_a_bias_that_varies_by_position_keeps_the_reduce_sum() -> None:
    """A (tokens, 1) bias on (batch, tokens, features) is not one constant per neuron."""
    net = Net(("batch", 5, 4), seed=18)
    product = net.op("MatMul", net.input, net.const(net.random(4, 30)))
    pre = net.op("Add", product, net.const(net.random(5, 1)), out="pre")
    model = net.build(net.matmul(net.op("Relu", pre), 30, 3, out="logits"))
    fast = assert_like_oracle(model, np.random.default_rng(19).standard_normal((20, 5, 4)).astype(np.float32))
    assert not through_linearity(fast, "pre")
    assert fires_from(fast, "pre") == "pre"


def residual_model() -> onnx.ModelProto:
    net = Net(("batch", 4), seed=20)
    pre = net.op("Add", net.dense(net.input, 4, 4), net.input, out="pre")  # x + Gemm(x)
    return net.build(net.dense(net.op("Relu", pre), 4, 3, out="logits"))


def batchnorm_model() -> onnx.ModelProto:
    net = Net(("batch", 1, 12, 10), seed=21)
    conv = net.conv(net.input, 1, 16)
    stats = [
        net.const(net.random(16) + 2.0),
        net.const(net.random(16)),
        net.const(net.random(16)),
        net.const(np.ones(16)),
    ]
    pre = net.op("BatchNormalization", conv, *stats, out="pre")
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", pre)), axis=1)
    return net.build(net.dense(pooled, 16, 3, out="logits"))


def channels_last_model() -> onnx.ModelProto:
    net = Net(("batch", 1, 12, 10), seed=22)
    pre = net.op("Transpose", net.conv(net.input, 1, 16), perm=[0, 2, 3, 1], out="pre")
    pooled = net.op("ReduceMean", net.op("Relu", pre), axes=[1, 2], keepdims=0)
    return net.build(net.dense(pooled, 16, 3, out="logits"))


def group_conv_model() -> onnx.ModelProto:
    net = Net(("batch", 4, 12, 10), seed=23)
    conv = net.op("Conv", net.input, net.const(net.random(32, 2, 3, 3)), out="pre", group=2, pads=[1] * 4)
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", conv)), axis=1)
    return net.build(net.dense(pooled, 32, 3, out="logits"))


@pytest.mark.parametrize(
    ("build", "sample"),
    [
        (residual_model, (4,)),
        (batchnorm_model, (1, 12, 10)),
        (channels_last_model, (1, 12, 10)),
        (group_conv_model, (4, 12, 10)),
    ],
    ids=["residual-add", "batchnorm", "channels-last", "group-conv"],
)
def test_layers_that_are_not_a_linear_ops_own_output_keep_the_exact_sum(build, sample: tuple[int, ...]) -> None:
    """Residual Adds, BatchNorm, Transposes and grouped Convs: ReduceSum, and firing at the input."""
    model = build()
    fast = assert_like_oracle(model, np.random.default_rng(24).standard_normal((50, *sample)).astype(np.float32))
    assert not through_linearity(fast, "pre")
    assert fires_from(fast, "pre") == "pre"


def test_fp16_conv_sum_through_linearity_casts_to_float32() -> None:
    net = Net(("batch", 1, 12, 10), dtype=FLOAT16, seed=25)
    pre = net.conv(net.input, 1, 16, out="pre")
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", pre)), axis=1)
    model = net.build(net.dense(pooled, 16, 3, out="logits"))
    x = np.random.default_rng(26).standard_normal((30, 1, 12, 10)).astype(np.float16)
    fast, got = outputs(model, x)
    oracle, want = outputs(model, x, fast=False)
    assert through_linearity(fast, "pre")
    np.testing.assert_array_equal(keys_of(got, fast.layers[0]), keys_of(want, oracle.layers[0]))
    # the oracle sums fp16-rounded pre-activations; the linear path works in float32 throughout
    np.testing.assert_allclose(got[fast.layers[0].sum], want[oracle.layers[0].sum], rtol=2e-3, atol=0.05)


def test_squeezenet_fp16_keys_and_sums_match_the_oracle(shared_models: Path) -> None:
    loaded = load_model(shared_models / "squeezenet1.0_fp16_opset7.onnx")
    structure = structure_of(loaded)
    x = (np.random.default_rng(27).integers(0, 256, (1, 3, 224, 224)) / 255).astype(np.float16)
    results = {}
    for fast in (True, False):
        exposed = expose(loaded.proto, structure, fast=fast)
        results[fast] = (
            exposed,
            dict(zip(exposed.output_names, run(exposed.model, x, exposed.output_names), strict=True)),
        )
    (mine, got), (theirs, want) = results[True], results[False]
    assert not any(node.op_type == "MatMulInteger" for node in mine.model.graph.node)  # opset 7: float packing
    for a, b in zip(mine.layers, theirs.layers, strict=True):
        np.testing.assert_array_equal(keys_of(got, a), keys_of(want, b))
        np.testing.assert_allclose(got[a.sum], want[b.sum], rtol=1e-6)


# --- Packing ---------------------------------------------------------------------------------


@pytest.mark.parametrize("neurons", [1, 7, 8, 9, 16, 23, 24, 25, 48, 63, 64, 65, 100, 130])
@pytest.mark.parametrize("layout", ["dense", "conv"])
def test_integer_packing_gives_the_float_packings_keys(neurons: int, layout: str) -> None:
    """Keys joined from MatMulInteger bytes equal those joined from the float MatMul's 24-bit groups."""
    net = Net(("batch", 3) if layout == "dense" else ("batch", 3, 4, 5), seed=neurons)
    if layout == "dense":
        hidden = net.op("Relu", net.dense(net.input, 3, neurons, out="pre"))
    else:
        hidden = net.op("Flatten", net.op("Relu", net.conv(net.input, 3, neurons, out="pre")), axis=1)
    width = neurons if layout == "dense" else neurons * 20
    model = net.build(net.dense(hidden, width, 2, out="logits"))
    shape = (40, 3) if layout == "dense" else (40, 3, 4, 5)
    x = np.random.default_rng(neurons).standard_normal(shape).astype(np.float32)
    integer, got = outputs(model, x)
    floating, want = outputs(model, x, integer_packing=False)
    assert any(node.op_type == "MatMulInteger" for node in integer.model.graph.node)
    assert not any(node.op_type == "MatMulInteger" for node in floating.model.graph.node)
    for a, b in zip(integer.layers, floating.layers, strict=True):
        np.testing.assert_array_equal(keys_of(got, a), keys_of(want, b))


def test_models_before_opset_10_pack_in_float() -> None:
    """MatMulInteger came in opset 10; an opset-8 model keeps the float packing, and matches."""
    net = Net(("batch", 4), opset=8, seed=28)
    model = net.build(net.dense(net.op("Relu", net.dense(net.input, 4, 30, out="pre")), 30, 3, out="logits"))
    fast = assert_like_oracle(model, np.random.default_rng(29).standard_normal((50, 4)).astype(np.float32))
    assert not any(node.op_type == "MatMulInteger" for node in fast.model.graph.node)


# --- The whole audit ---------------------------------------------------------------------------


def lenet16() -> onnx.ModelProto:
    """A LeNet-5 (16, 32, 64) with Elu, fixed random weights: its first layer's φ goes through
    linearity, the others keep the ReduceSum."""
    net = Net(("N", 1, 28, 28), opset=17, seed=30)

    def block(x: str, c_in: int, c_out: int, out: str) -> str:
        conv = net.conv(x, c_in, c_out, kernel=5, same=False, scale=0.3 / c_in, out=out)
        return net.op("MaxPool", net.op("Elu", conv), kernel_shape=[2, 2], strides=[2, 2])

    flat = net.op("Flatten", block(block(net.input, 1, 16, "c1"), 16, 32, "c2"), axis=1)
    hidden = net.op("Elu", net.dense(flat, 512, 64, weight=net.random(512, 64) * 0.05, out="d3"))
    return net.build(net.dense(hidden, 64, 10, weight=net.random(64, 10) * 0.2, out="logits"))


def test_audit_counts_are_identical_and_cna_within_1e_6_of_the_oracle() -> None:
    """The fast graph and the straightforward one give the same report, CNA up to 1e-6."""
    x, y = load_arrays("mnist", "train", limit=3000)
    model = lenet16()
    fast = prepare(model, device="cpu")
    assert through_linearity(fast.exposed, "c1") and not through_linearity(fast.exposed, "c2")
    exposed = expose(model, fast.structure, fast=False)
    oracle = dataclasses.replace(fast, exposed=exposed, runner=Session(exposed.model, fast.structure.input, "cpu"))
    config = AuditConfig(device="cpu", batch_size=256)
    reports = [audit(p, [("train", Batch(x, y))], config).splits["train"] for p in (fast, oracle)]
    mine, theirs = reports
    assert [dataclasses.astuple(layer) for layer in mine.layers] == [
        dataclasses.astuple(layer) for layer in theirs.layers
    ]
    assert mine.accuracy == theirs.accuracy
    assert mine.cna is not None and abs(mine.cna - theirs.cna) <= 1e-6


# --- α -------------------------------------------------------------------------------------------


def entropy_by_definition(counts: np.ndarray, per_row: int) -> float:
    """−Σ p log2 p over the non-empty bins, added one bin after another in bin order."""
    present = counts[counts > 0] / per_row
    total = 0.0
    for term in present * np.log2(present):
        total += term
    return 0.0 - total


def test_alpha_equals_its_definition_bit_for_bit() -> None:
    """The count-table α equals a per-row histogram summed bin by bin, for uint8 and float data."""
    rng = np.random.default_rng(31)
    images = rng.integers(0, 256, (300, 784), dtype=np.uint8)
    images[::3] = images[::3] // 64 * 64  # few distinct values
    images[1] = 0
    want = [entropy_by_definition(np.bincount(row, minlength=256), 784) for row in images]
    np.testing.assert_array_equal(metrics.input_entropy_uint8(images), want)
    values = rng.random((200, 50))
    values[::4] = np.round(values[::4], 1)
    bins = np.minimum((values * 1000).astype(np.intp), 999)
    want = [entropy_by_definition(np.bincount(row, minlength=1000), 50) for row in bins]
    np.testing.assert_array_equal(metrics.input_entropy(values), want)


def test_squeezenet_audits_with_the_fast_graph(shared_models: Path) -> None:
    """A real fp16 model prepares and audits with the fast graph."""
    loaded = load_model(shared_models / "squeezenet1.0_fp16_opset7.onnx")
    images = np.random.default_rng(32).integers(0, 256, (2, 3, 224, 224), dtype=np.uint8)
    report = audit(loaded, [("test", Batch(images))], AuditConfig(device="cpu"))
    assert [layer.states_total for layer in report.splits["test"].layers][:1] == [2 * 12321]
