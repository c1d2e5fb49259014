"""``find``: SPEC §1 (which tensors are layers) on hand-built graphs, exported models and real models.

Every model is a real ONNX graph; where a test audits one, it runs in a real onnxruntime
session and the figures are checked against states counted from onnxruntime's own tensors.
Reading model files (external data included) is tested in ``test_modelfile``; sizes measured
when shape inference gives up, in ``test_prepare``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import (
    FLOAT,
    FLOAT16,
    SHARED_MODELS,
    Net,
    input_of_type,
    mlp,
    reference_counts,
    reference_entropy,
    run,
)
from onnx import helper, numpy_helper
from refusals import refused

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Batch
from auditor.engine.expose import expose
from auditor.engine.find import Layer, describe, find_layers
from auditor.engine.modelfile import load_model
from auditor.errors import ModelError


def summary(layers: list[Layer]) -> list[tuple[object, ...]]:
    """What SPEC §1 decides about each layer, in depth order."""
    return [(lay.name, lay.op, lay.activation, lay.role, lay.axis, lay.neurons, lay.positions) for lay in layers]


def audited(model: onnx.ModelProto | str | Path, x: np.ndarray, **config: object):
    """The report's layer figures for one split of data ``x``."""
    report = audit(model, [("test", Batch(x))], AuditConfig(**config))  # type: ignore[arg-type]
    return report.splits["test"].layers


def assert_states(stats, pre_activation: np.ndarray, axis: int) -> None:
    """The report's figures for one layer equal the states counted by np.unique."""
    counts = reference_counts(pre_activation, axis)
    assert stats.states_total == counts.sum()
    assert stats.states_distinct == len(counts)
    assert stats.entropy_bits == pytest.approx(reference_entropy(counts), rel=1e-12, abs=1e-12)


# --- Hidden layers and the output layer ------------------------------------------------------


@pytest.mark.parametrize(("head", "probability"), [(None, False), ("Softmax", True), ("LogSoftmax", False)])
def test_gemm_relu_gemm_has_one_hidden_layer_and_the_output_layer(head: str | None, probability: bool) -> None:
    """The last Gemm is the output layer, directly or behind (Log)Softmax; it is never hidden."""
    model = mlp([4, 5, 3], head=head)
    structure = describe(model)
    assert summary(structure.layers) == [
        ("pre1", "Gemm", "Relu", "hidden", 1, 5, 1),
        ("logits", "Gemm", None, "output", 1, 3, 1),
    ]
    assert structure.output == ("probs" if head else "logits")
    assert structure.output_layer is not None and structure.output_layer.name == "logits"
    assert structure.output_is_probability is probability
    assert structure.input.name == "x" and structure.input.dtype == np.float32
    assert [lay.depth for lay in structure.layers] == sorted(lay.depth for lay in structure.layers)


def test_output_layer_is_left_out_of_efficiency_unless_asked() -> None:
    model = mlp([4, 5, 6, 3])
    x = np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32)
    assert [s.name for s in audited(model, x)] == ["pre1", "pre2"]
    assert [s.name for s in audited(model, x, include_output_layer=True)] == ["pre1", "pre2", "logits"]


def test_depth_order_follows_the_node_list() -> None:
    model = mlp([3, 4, 5, 6, 7, 2])
    layers = find_layers(model)
    assert [lay.name for lay in layers] == ["pre1", "pre2", "pre3", "pre4", "logits"]
    assert [lay.neurons for lay in layers] == [4, 5, 6, 7, 2]
    depths = [lay.depth for lay in layers]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)


def test_matmul_add_relu_walks_through_the_bias_add() -> None:
    net = Net(("batch", 4))
    h = net.matmul(net.input, 4, 6, out="pre")
    logits = net.matmul(net.op("Relu", h), 6, 3, out="logits")
    assert summary(find_layers(net.build(logits))) == [
        ("pre", "MatMul", "Relu", "hidden", 1, 6, 1),
        ("logits", "MatMul", None, "output", 1, 3, 1),
    ]


# (op, opset, attributes); PRelu also gets a slope initializer.
ACTIVATION_CASES = [
    ("Relu", 13, {}),
    ("LeakyRelu", 13, {"alpha": 0.1}),
    ("PRelu", 13, {}),
    ("Elu", 13, {}),
    ("Selu", 13, {}),
    ("Celu", 13, {}),
    ("Sigmoid", 13, {}),
    ("Tanh", 13, {}),
    ("HardSigmoid", 13, {}),
    ("Softplus", 13, {}),
    ("Softsign", 13, {}),
    ("ThresholdedRelu", 13, {"alpha": 0.5}),
    ("Mish", 18, {}),
    ("Gelu", 20, {}),
    ("HardSwish", 14, {}),
]


@pytest.mark.parametrize(("activation", "opset", "attrs"), ACTIVATION_CASES, ids=[c[0] for c in ACTIVATION_CASES])
def test_every_listed_activation_marks_a_layer(activation: str, opset: int, attrs: dict) -> None:
    """Each SPEC activation makes its input a layer, and the exposed model runs and counts it."""
    net = Net(("batch", 4), opset=opset)
    h = net.dense(net.input, 4, 6, out="pre")
    slope = [net.const(np.full(6, 0.25, np.float32), "slope")] if activation == "PRelu" else []
    logits = net.dense(net.op(activation, h, *slope, **attrs), 6, 3, out="logits")
    model = net.build(logits)
    assert summary(find_layers(model)) == [
        ("pre", "Gemm", activation, "hidden", 1, 6, 1),
        ("logits", "Gemm", None, "output", 1, 3, 1),
    ]
    x = np.random.default_rng(2).standard_normal((40, 4)).astype(np.float32)
    (pre,) = run(model, x, ["pre"])
    (stats,) = audited(model, x)
    assert_states(stats, pre, 1)


def clip_model(low: float, *, opset: int = 13, as_constant_node: bool = False) -> onnx.ModelProto:
    """``Gemm → Relu → Gemm → Clip(low, 6) → Gemm``: the second Gemm is a layer only if low ≤ 0."""
    net = Net(("batch", 4), opset=opset)
    h1 = net.dense(net.input, 4, 5, out="pre1")
    h2 = net.dense(net.op("Relu", h1), 5, 5, out="pre2")
    if opset < 11:
        clipped = net.op("Clip", h2, min=low, max=6.0)
    elif as_constant_node:
        bounds = [net.op("Constant", value=numpy_helper.from_array(np.array(v, np.float32))) for v in (low, 6.0)]
        clipped = net.op("Clip", h2, *bounds)
    else:
        clipped = net.op("Clip", h2, net.const(np.float32(low)), net.const(np.float32(6.0)))
    return net.build(net.dense(clipped, 5, 3, out="logits"))


@pytest.mark.parametrize(
    ("opset", "as_constant_node"), [(13, False), (13, True), (6, False)], ids=["inputs", "constant-nodes", "attrs"]
)
def test_clip_counts_as_an_activation_only_when_its_minimum_is_at_most_zero(opset: int, as_constant_node: bool) -> None:
    relu6 = find_layers(clip_model(0.0, opset=opset, as_constant_node=as_constant_node))
    assert [(lay.name, lay.activation, lay.role) for lay in relu6] == [
        ("pre1", "Relu", "hidden"),
        ("pre2", "Clip", "hidden"),
        ("logits", None, "output"),
    ]
    shifted = find_layers(clip_model(1.0, opset=opset, as_constant_node=as_constant_node))
    assert [(lay.name, lay.role) for lay in shifted] == [("pre1", "hidden"), ("logits", "output")]


@pytest.mark.parametrize("sigmoid_first", [False, True])
def test_silu_is_one_layer(sigmoid_first: bool) -> None:
    """``Mul(x, Sigmoid(x))`` marks x once, whichever input order the Mul has."""
    net = Net(("batch", 4), opset=13)
    h = net.dense(net.input, 4, 6, out="pre")
    gate = net.op("Sigmoid", h)
    silu = net.op("Mul", gate, h) if sigmoid_first else net.op("Mul", h, gate)
    model = net.build(net.dense(silu, 6, 3, out="logits"))
    layers = find_layers(model)
    assert [(lay.name, lay.op, lay.role) for lay in layers] == [("pre", "Gemm", "hidden"), ("logits", "Gemm", "output")]
    x = np.random.default_rng(3).standard_normal((30, 4)).astype(np.float32)
    (pre,) = run(model, x, ["pre"])
    assert_states(audited(model, x)[0], pre, 1)


def erf_gelu(net: Net, x: str) -> str:
    """The erf-GELU that exporters write: ``0.5 · x · (1 + erf(x / √2))``."""
    scaled = net.op("Div", x, net.const(np.float32(math.sqrt(2))))
    plus_one = net.op("Add", net.op("Erf", scaled), net.const(np.float32(1)))
    return net.op("Mul", net.op("Mul", x, plus_one), net.const(np.float32(0.5)))


def test_erf_gelu_marks_its_input_as_a_gelu_layer() -> None:
    net = Net(("batch", 4), opset=13)
    h = net.dense(net.input, 4, 6, out="pre")
    model = net.build(net.dense(erf_gelu(net, h), 6, 3, out="logits"))
    assert summary(find_layers(model)) == [
        ("pre", "Gemm", "Gelu", "hidden", 1, 6, 1),
        ("logits", "Gemm", None, "output", 1, 3, 1),
    ]


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_pytorch_export_of_gelu_and_silu_is_found() -> None:
    """The TorchScript exporter's own decompositions of GELU (erf) and SiLU (Sigmoid·x)."""
    torch = pytest.importorskip("torch")
    import io

    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Linear(4, 6), torch.nn.GELU(), torch.nn.Linear(6, 5), torch.nn.SiLU(), torch.nn.Linear(5, 3)
    ).eval()
    buffer = io.BytesIO()
    torch.onnx.export(
        net,
        (torch.zeros(1, 4),),
        buffer,
        opset_version=13,
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "n"}, "y": {0: "n"}},
    )
    model = onnx.load_from_string(buffer.getvalue())
    layers = find_layers(model)
    assert [(lay.op, lay.role, lay.neurons) for lay in layers] == [
        ("Gemm", "hidden", 6),
        ("Gemm", "hidden", 5),
        ("Gemm", "output", 3),
    ]
    assert layers[0].activation == "Gelu"


# --- Residuals, normalisation, layouts -------------------------------------------------------


@pytest.mark.parametrize("merge", ["Add", "Sum"])
@pytest.mark.parametrize("skip_first", [False, True])
def test_residual_merge_feeding_relu_is_a_layer(merge: str, skip_first: bool) -> None:
    """``Conv → Relu → Conv → Add/Sum(·, skip) → Relu``: the merged tensor is the second layer."""
    net = Net(("batch", 3, 5, 5))
    r1 = net.op("Relu", net.conv(net.input, 3, 4, out="c1"))
    c2 = net.conv(r1, 4, 4, out="c2")
    merged = net.op(merge, *((r1, c2) if skip_first else (c2, r1)), out="res")
    model = net.build(net.op("Relu", merged))
    layers = find_layers(model)
    assert summary(layers) == [
        ("c1", "Conv", "Relu", "hidden", 1, 4, 25),
        ("res", "Conv", "Relu", "hidden", 1, 4, 25),
    ]
    x = np.random.default_rng(4).standard_normal((12, 3, 5, 5)).astype(np.float32)
    c1, res = run(model, x, ["c1", "res"])
    first, second = audited(model, x)
    assert_states(first, c1, 1)
    assert_states(second, res, 1)


def test_batch_normalization_between_conv_and_relu() -> None:
    net = Net(("batch", 2, 4, 4))
    conv = net.conv(net.input, 2, 5, out="conv")
    params = [
        net.const(v, s)
        for v, s in (
            (np.ones(5), "scale"),
            (np.full(5, 0.1), "shift"),
            (np.full(5, 0.2), "mean"),
            (np.full(5, 2.0), "var"),
        )
    ]
    bn = net.op("BatchNormalization", conv, *params, out="bn")
    model = net.build(net.op("Relu", bn))
    assert summary(find_layers(model)) == [("bn", "Conv", "Relu", "hidden", 1, 5, 16)]


def test_channels_last_conv_has_its_neurons_on_the_last_axis() -> None:
    """Keras-style NHWC export: Transpose → Conv → Transpose → Add(bias) → Relu (SPEC §1)."""
    net = Net(("batch", 5, 5, 3))
    nchw = net.op("Transpose", net.input, perm=[0, 3, 1, 2])
    conv = net.conv(nchw, 3, 6, bias=False)
    nhwc = net.op("Transpose", conv, perm=[0, 2, 3, 1])
    pre = net.op("Add", nhwc, net.const(net.random(6) * 0.5, "bias"), out="pre")
    model = net.build(net.op("Relu", pre))
    assert summary(find_layers(model)) == [("pre", "Conv", "Relu", "hidden", 3, 6, 25)]

    x = np.random.default_rng(5).standard_normal((40, 5, 5, 3)).astype(np.float32)
    (tensor,) = run(model, x, ["pre"])
    (stats,) = audited(model, x)
    assert (stats.neurons, stats.positions) == (6, 25)
    assert_states(stats, tensor, 3)
    # Counting along the wrong axis would give other numbers: the check above has teeth.
    assert len(reference_counts(tensor, 3)) != len(reference_counts(tensor, 1))


def other_linear(kind: str) -> tuple[onnx.ModelProto, tuple[int, ...]]:
    """One layer of another linear op or layout, and the shape of one sample."""
    if kind == "convtranspose":
        net = Net(("batch", 3, 4, 4))
        pre = net.op("ConvTranspose", net.input, net.const(net.random(3, 5, 3, 3)), out="pre")
        shape: tuple[int, ...] = (3, 4, 4)
    elif kind == "einsum":
        net = Net(("batch", 4), opset=13)
        pre = net.op("Einsum", net.input, net.const(net.random(4, 6)), out="pre", equation="bi,ij->bj")
        shape = (4,)
    elif kind == "tokens":
        net = Net(("batch", 7, 4))
        pre = net.matmul(net.input, 4, 6, out="pre")
        shape = (7, 4)
    else:  # conv1d
        net = Net(("batch", 3, 9))
        pre = net.op("Conv", net.input, net.const(net.random(5, 3, 3)), out="pre", pads=[1, 1])
        shape = (3, 9)
    return net.build(net.op("Relu", pre)), shape


@pytest.mark.parametrize(
    ("kind", "op", "axis", "neurons", "positions"),
    [
        ("convtranspose", "ConvTranspose", 1, 5, 36),
        ("einsum", "Einsum", 1, 6, 1),
        ("tokens", "MatMul", 2, 6, 7),
        ("conv1d", "Conv", 1, 5, 9),
    ],
)
def test_other_linear_ops_and_layouts(kind: str, op: str, axis: int, neurons: int, positions: int) -> None:
    """ConvTranspose and 1-D Conv count channels; Einsum and token MatMuls count the last axis."""
    model, shape = other_linear(kind)
    assert summary(find_layers(model)) == [("pre", op, "Relu", "hidden", axis, neurons, positions)]
    x = np.random.default_rng(16).standard_normal((25, *shape)).astype(np.float32)
    (pre,) = run(model, x, ["pre"])
    (stats,) = audited(model, x)
    assert (stats.neurons, stats.positions) == (neurons, positions)
    assert_states(stats, pre, axis)


# --- How weights and inputs are stored --------------------------------------------------------


def test_initializers_listed_as_inputs_in_old_ir() -> None:
    """IR 3 / opset 8 models list every initializer among the graph inputs; only x is data."""
    net = Net(("batch", 4), opset=8)
    logits = net.dense(net.op("Relu", net.dense(net.input, 4, 5, out="pre")), 5, 3, out="logits")
    model = net.build(logits, ir_version=3, inits_as_inputs=True)
    assert len(model.graph.input) == 5
    structure = describe(model)
    assert structure.input.name == "x" and structure.input.shape == ("batch", 4)
    assert summary(structure.layers) == [
        ("pre", "Gemm", "Relu", "hidden", 1, 5, 1),
        ("logits", "Gemm", None, "output", 1, 3, 1),
    ]
    x = np.random.default_rng(6).standard_normal((30, 4)).astype(np.float32)
    (pre,) = run(model, x, ["pre"])
    assert_states(audited(model, x)[0], pre, 1)


def test_weights_in_constant_nodes() -> None:
    net = Net(("batch", 4))

    def constant(array: np.ndarray) -> str:
        return net.op("Constant", value=numpy_helper.from_array(array.astype(np.float32)))

    product = net.op("MatMul", net.input, constant(net.random(4, 6)))
    pre = net.op("Add", product, constant(net.random(6)), out="pre")
    logits = net.op("MatMul", net.op("Relu", pre), constant(net.random(6, 3)), out="logits")
    model = net.build(logits)
    assert not model.graph.initializer
    structure = describe(model)
    assert structure.input.name == "x"
    assert summary(structure.layers) == [
        ("pre", "MatMul", "Relu", "hidden", 1, 6, 1),
        ("logits", "MatMul", None, "output", 1, 3, 1),
    ]
    x = np.random.default_rng(7).standard_normal((30, 4)).astype(np.float32)
    (tensor,) = run(model, x, ["pre"])
    assert_states(audited(model, x)[0], tensor, 1)


def test_real_qdq_model_layers_are_found_through_the_wrappers(shared_models: Path) -> None:
    path = shared_models / "qdq_int8_pytorch21_opset17.onnx"
    layers = find_layers(onnx.load(path))
    assert [(lay.op, lay.activation, lay.role, lay.neurons, lay.positions) for lay in layers] == [
        ("Conv", "Relu", "hidden", 1, 729),
        ("Gemm", "Relu", "hidden", 12, 1),
        ("Gemm", "Relu", "hidden", 5, 1),
        ("Gemm", None, "output", 10, 1),
    ]
    x = np.random.default_rng(8).random((6, 1, 28, 28)).astype(np.float32)
    stats = audited(path, x)
    assert [s.states_total for s in stats] == [6 * 729, 6, 6]


def test_own_static_quantization_in_qdq_format(tmp_path: Path) -> None:
    """A model quantized by onnxruntime's ``quantize_static`` (QDQ) keeps its layers."""
    quantization = pytest.importorskip("onnxruntime.quantization")
    net = Net(("batch", 3, 4, 4))
    r1 = net.op("Relu", net.conv(net.input, 3, 6))
    flat = net.op("Flatten", r1)
    r2 = net.op("Relu", net.op("MatMul", flat, net.const(net.random(96, 5))))
    logits = net.op("MatMul", r2, net.const(net.random(5, 3)), out="logits")
    net.build(logits)
    onnx.save(net.build(logits), tmp_path / "float.onnx")
    rng = np.random.default_rng(9)

    class Calibration(quantization.CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": rng.standard_normal((8, 3, 4, 4)).astype(np.float32)} for _ in range(3)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    quantization.quantize_static(
        tmp_path / "float.onnx",
        tmp_path / "qdq.onnx",
        Calibration(),
        quant_format=quantization.QuantFormat.QDQ,
        extra_options={"QDQKeepRemovableActivations": True},  # by default the quantizer drops each Relu
    )
    model = onnx.load(tmp_path / "qdq.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    layers = find_layers(model)
    assert [(lay.op, lay.activation, lay.role, lay.neurons, lay.positions) for lay in layers] == [
        ("Conv", "Relu", "hidden", 6, 16),
        ("MatMul", "Relu", "hidden", 5, 1),
        ("MatMul", None, "output", 3, 1),
    ]
    x = rng.standard_normal((20, 3, 4, 4)).astype(np.float32)
    tensors = run(model, x, [lay.name for lay in layers[:2]])
    stats = audited(tmp_path / "qdq.onnx", x)
    assert_states(stats[0], tensors[0], 1)
    assert_states(stats[1], tensors[1], 1)


def test_float16_model_audits_with_float32_data() -> None:
    """Data is cast to the input's float16; states match the fp16 model's own tensor."""
    net = Net(("batch", 4), dtype=FLOAT16)
    pre = net.dense(net.input, 4, 6, out="pre")
    model = net.build(net.dense(net.op("Relu", pre), 6, 3, out="logits"))
    structure = describe(model)
    assert structure.input.dtype == np.float16
    assert summary(structure.layers)[0] == ("pre", "Gemm", "Relu", "hidden", 1, 6, 1)
    x = np.random.default_rng(10).standard_normal((50, 4)).astype(np.float32)
    (tensor,) = run(model, x.astype(np.float16), ["pre"])
    assert tensor.dtype == np.float16
    assert_states(audited(model, x)[0], tensor, 1)


def test_real_float16_squeezenet_audits(shared_models: Path) -> None:
    path = shared_models / "squeezenet1.0_fp16_opset7.onnx"
    x = np.random.default_rng(11).random((1, 3, 224, 224)).astype(np.float32)
    stats = audited(path, x)
    assert len(stats) == 26
    assert stats[0].neurons == 64 and stats[0].states_total == 12321
    assert all(0.0 <= s.efficiency <= 1.0 for s in stats)


# --- Models the auditor cannot use -----------------------------------------------------------


def test_sklearn_logistic_regression_has_no_layers() -> None:
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(13)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    clf = LogisticRegression(max_iter=200).fit(x, rng.integers(0, 3, 60))
    model = skl2onnx.to_onnx(clf, x[:1], target_opset={"": 13, "ai.onnx.ml": 3})
    message = refused(ModelError, lambda: prepare(model))
    assert message.startswith("no layers the auditor can use")


def test_sklearn_mlp_hidden_layer_is_found() -> None:
    """A real exporter's MatMul → Add → Relu (skl2onnx MLPClassifier)."""
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(14)
    x = rng.standard_normal((60, 4)).astype(np.float32)
    with pytest.warns(ConvergenceWarning):
        clf = MLPClassifier((7,), max_iter=5, random_state=0).fit(x, rng.integers(0, 3, 60))
    model = skl2onnx.to_onnx(clf, x[:1], target_opset={"": 13, "ai.onnx.ml": 3}, options={"zipmap": False})
    hidden = [lay for lay in find_layers(model) if lay.role == "hidden"]
    assert [(lay.op, lay.activation, lay.neurons) for lay in hidden] == [("MatMul", "Relu", 7)]


def test_linear_only_network_has_no_layers() -> None:
    net = Net(("batch", 4))
    model = net.build(net.dense(net.dense(net.input, 4, 5), 5, 3))
    message = refused(ModelError, lambda: describe(model))
    assert message.startswith("no layers the auditor can use")


def test_activation_without_a_linear_op_is_no_layer() -> None:
    """A Relu straight on the input (nothing linear above it) is not a layer."""
    net = Net(("batch", 4))
    model = net.build(net.dense(net.op("Relu", net.input), 4, 3))
    assert refused(ModelError, lambda: describe(model)).startswith("no layers the auditor can use")


def test_two_data_inputs_are_refused() -> None:
    net = Net(("batch", 4))
    net.inputs.append(helper.make_tensor_value_info("z", FLOAT, ["batch", 4]))
    both = net.op("Add", net.input, "z")
    model = net.build(net.dense(net.op("Relu", net.dense(both, 4, 5)), 5, 3))
    refused(ModelError, lambda: describe(model), "2 data inputs", "'x'", "'z'")


# Element types a model may declare for its input that no numeric data can be fed as.
UNFEEDABLE = [
    (onnx.TensorProto.STRING, "string"),
    (onnx.TensorProto.BFLOAT16, "bfloat16"),
    (onnx.TensorProto.FLOAT8E4M3FN, "float8e4m3fn"),
    (onnx.TensorProto.FLOAT8E5M2, "float8e5m2"),
    (onnx.TensorProto.INT4, "int4"),
    (onnx.TensorProto.UINT4, "uint4"),
]


@pytest.mark.parametrize(("elem_type", "name"), UNFEEDABLE, ids=[name for _, name in UNFEEDABLE])
def test_an_input_the_auditor_cannot_feed_is_refused_naming_the_input_and_its_type(elem_type: int, name: str) -> None:
    model = input_of_type(mlp([4, 3, 2]), elem_type)
    onnx.checker.check_model(model, full_check=True)  # a valid model, only not one the auditor can feed
    refused(ModelError, lambda: describe(model), f"model input 'x' takes {name} tensors", "cannot feed", "float")


@pytest.mark.parametrize("elem_type", [onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128, 999, -1])
def test_inputs_of_complex_or_unknown_element_types_are_refused_too(elem_type: int) -> None:
    model = mlp([4, 3, 2])
    model.graph.input[0].type.tensor_type.elem_type = elem_type
    refused(ModelError, lambda: describe(model), "model input 'x' takes", "tensors, which the auditor cannot feed")


@pytest.mark.parametrize("kind", ["sequence", "map", "optional", "none"])
def test_an_input_that_is_not_a_tensor_is_refused_naming_what_it_is(kind: str) -> None:
    model = mlp([4, 3, 2])
    value = model.graph.input[0]
    if kind == "sequence":
        value.type.CopyFrom(helper.make_sequence_type_proto(helper.make_tensor_type_proto(FLOAT, ["batch", 4])))
    elif kind == "map":
        value.type.CopyFrom(
            helper.make_map_type_proto(onnx.TensorProto.INT64, helper.make_tensor_type_proto(FLOAT, []))
        )
    elif kind == "optional":
        value.type.CopyFrom(helper.make_optional_type_proto(helper.make_tensor_type_proto(FLOAT, ["batch", 4])))
    else:
        value.ClearField("type")
    shown = "no type" if kind == "none" else kind
    refused(ModelError, lambda: describe(model), f"model input 'x' is a {shown}, not a tensor")


# --- Real models from other tools ------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_real_models_have_hidden_layers(shared_models: Path, name: str) -> None:
    structure = describe(onnx.load(shared_models / f"{name}.onnx"))
    hidden = [lay for lay in structure.layers if lay.role == "hidden"]
    assert hidden
    assert all(lay.neurons and lay.positions for lay in hidden)
    depths = [lay.depth for lay in structure.layers]
    assert depths == sorted(depths) and len(set(depths)) == len(depths)
    assert len({lay.name for lay in structure.layers}) == len(structure.layers)
    assert [lay.role for lay in structure.layers].count("output") <= 1


def test_mnist8_layers(shared_models: Path) -> None:
    structure = describe(onnx.load(shared_models / "mnist-8_cntk_opset8.onnx"))
    assert [(lay.op, lay.role, lay.neurons, lay.positions) for lay in structure.layers] == [
        ("Conv", "hidden", 8, 784),
        ("Conv", "hidden", 16, 196),
        ("MatMul", "output", 10, 1),
    ]
    assert structure.output == "Plus214_Output_0" == structure.layers[-1].name
    assert structure.output_is_probability is False


def test_light_resnet50_layers(shared_models: Path) -> None:
    model = onnx.load(shared_models / "light_resnet50_opset9.onnx")
    structure = describe(model)
    hidden = [lay for lay in structure.layers if lay.role == "hidden"]
    assert len(hidden) == 49 and all(lay.op == "Conv" for lay in hidden)
    out = structure.output_layer
    assert out is not None and (out.op, out.neurons) == ("Gemm", 1000)
    assert structure.output_is_probability is True
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    assert sum(producers[lay.name] == "Sum" for lay in hidden) == 16  # every residual merge


def test_squeezenet_fp16_layers(shared_models: Path) -> None:
    structure = describe(onnx.load(shared_models / "squeezenet1.0_fp16_opset7.onnx"))
    hidden = [lay for lay in structure.layers if lay.role == "hidden"]
    assert len(hidden) == 26
    assert hidden[-1].neurons == 1000  # the final 1×1 Conv + Relu before global pooling
    assert structure.input.dtype == np.float16
    assert structure.output_layer is None  # Softmax follows global pooling, not a linear op
    assert structure.output_is_probability is True


def test_pytorch_cnn_layers(shared_models: Path) -> None:
    structure = describe(onnx.load(shared_models / "cnn_pytorch25_opset17.onnx"))
    assert [(lay.op, lay.role, lay.neurons, lay.positions) for lay in structure.layers] == [
        ("Conv", "hidden", 16, 784),
        ("Conv", "hidden", 32, 784),
        ("Conv", "hidden", 64, 196),
        ("Gemm", "hidden", 128, 1),
        ("Gemm", "output", 10, 1),
    ]


# --- expose ---------------------------------------------------------------------------------


def test_clip_bound_from_a_constant_node_with_a_scalar_attribute() -> None:
    """Constant(value_float=0) as Clip's min: a ReLU6-style layer, not a crash."""
    net = Net(opset=13)
    h = net.dense(net.input, 4, 3)
    net.nodes.append(helper.make_node("Constant", [], ["lo"], value_float=0.0))
    net.nodes.append(helper.make_node("Constant", [], ["hi"], value_float=6.0))
    clipped = net.op("Clip", h, "lo", "hi")
    layers = find_layers(net.build(net.dense(clipped, 3, 2)))
    assert [(layer.name, layer.activation) for layer in layers if layer.role == "hidden"] == [(h, "Clip")]


def test_a_transpose_without_perm_or_shapes_is_refused_in_one_line() -> None:
    """Unknown rank and no perm: the neuron axis cannot be traced, so the audit refuses cleanly."""
    net = Net()
    h = net.op("MatMul", net.input, net.const(net.random(4, 3)))
    out = net.dense(net.op("Relu", net.op("Transpose", h)), 3, 2)
    shapeless = [helper.make_tensor_value_info(net.input, FLOAT, None)]
    graph = helper.make_graph(net.nodes, "t", shapeless, [helper.make_tensor_value_info(out, FLOAT, None)], net.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    (layer,) = [layer for layer in find_layers(model) if layer.role == "hidden"]
    assert layer.axis is None and layer.rank is None
    with pytest.raises(ModelError, match="cannot be traced"):
        expose(model, describe(model))


@pytest.mark.slow
def test_a_pytorch_dynamo_export_audits(tmp_path: Path) -> None:
    """torch.onnx.export(dynamo=True): opset 20, native Gelu, SiLU decomposed into Sigmoid·Mul."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("onnxscript")
    nn = torch.nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.c2 = nn.Conv2d(1, 4, 5), nn.Conv2d(4, 8, 5)
            self.fc, self.out = nn.Linear(8 * 16, 16), nn.Linear(16, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.max_pool2d(nn.functional.gelu(self.c1(x)), 2)
            x = torch.max_pool2d(nn.functional.silu(self.c2(x)), 2)
            return self.out(nn.functional.elu(self.fc(x.flatten(1))))

    torch.manual_seed(0)
    net = Net().eval()
    path = tmp_path / "dynamo.onnx"
    batch = torch.export.Dim("batch")
    exported = torch.onnx.export(net, (torch.rand(2, 1, 28, 28),), dynamo=True, dynamic_shapes=({0: batch},))
    exported.save(str(path))
    layers = find_layers(load_model(path).proto)
    hidden = [(layer.op, layer.neurons, layer.positions) for layer in layers if layer.role == "hidden"]
    assert hidden == [("Conv", 4, 576), ("Conv", 8, 64), ("Gemm", 16, 1)]
    x = np.random.default_rng(0).random((8, 1, 28, 28), dtype=np.float32)
    with torch.no_grad():
        torch_says = net(torch.from_numpy(x)).argmax(1).numpy().astype(np.int64)
    report = audit(str(path), [("test", Batch(x, torch_says))], AuditConfig(device="cpu"))
    assert report.splits["test"].samples == 8
    assert report.splits["test"].accuracy == 1.0  # onnxruntime agrees with torch on every sample
