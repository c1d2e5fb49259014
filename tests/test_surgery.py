"""surgery: where a layer can be cut, and cuts whose outputs are worked out by hand.

Each graph is built with ``tests.models.Net`` and run in onnxruntime; a cut of neurons that
send nothing on (dead ReLUs), or a constant that the cut folds into the consumer's bias, must
leave every output as it was (max abs difference ≤ 1e-5).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from auditor.pruning.surgery import Cut, affine_rows, cut, find_sites
from tests.models import Net, conv_flatten_net

TOLERANCE = 1e-5


def outputs(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def checked(model: onnx.ModelProto) -> onnx.ModelProto:
    onnx.checker.check_model(model, full_check=True)
    return model


def weight_of(model: onnx.ModelProto, node_output: str, slot: int = 1) -> np.ndarray:
    node = next(n for n in model.graph.node if node_output in n.output)
    init = next(i for i in model.graph.initializer if i.name == node.input[slot])
    return numpy_helper.to_array(init)


def test_dead_channels_leave_their_block_of_flattened_features() -> None:
    model = conv_flatten_net(dead=(1, 3))
    sites = {site.name: site for site in find_sites(model)}
    conv = sites["c1"]
    assert conv.cuttable and [(c.kind, c.block) for c in conv.consumers] == [("gemm", 9)]
    x = np.random.default_rng(0).standard_normal((16, 1, 8, 8)).astype(np.float32)
    shrunk = checked(cut(model, list(sites.values()), [Cut("c1", frozenset({1, 3}))]))
    assert weight_of(shrunk, "c1").shape == (2, 1, 3, 3)
    dense = weight_of(shrunk, "f1")
    assert dense.shape == (18, 5)
    original = weight_of(model, "f1")
    assert np.array_equal(dense, np.concatenate([original[0:9], original[18:27]]))  # channels 0 and 2, 9 each
    assert np.max(np.abs(outputs(shrunk, x) - outputs(model, x))) <= TOLERANCE


def test_a_constant_channel_is_folded_into_the_dense_bias_feature_by_feature() -> None:
    net = Net(("N", 1, 6, 6), opset=17, seed=4)
    w, b = net.random(3, 1, 3, 3), np.array([0.2, 0.7, 0.1], np.float32)
    w[1] = 0  # channel 1 is the constant relu(0.7) = 0.7 everywhere
    conv = net.op("Conv", net.input, net.const(w), net.const(b), out="c1")
    flat = net.op("Flatten", net.op("Relu", conv), axis=1)
    model = net.build(net.dense(flat, 48, 4, out="logits"), name="const")
    sites = find_sites(model)
    fill = np.zeros((3, 16), np.float32)
    fill[1] = 0.7
    shrunk = checked(cut(model, sites, [Cut("c1", frozenset({1}), fill={sites[0].consumers[0].tensor: fill})]))
    x = np.random.default_rng(1).standard_normal((8, 1, 6, 6)).astype(np.float32)
    assert np.max(np.abs(outputs(shrunk, x) - outputs(model, x))) <= TOLERANCE


def test_batchnorm_parameters_are_cut_with_their_channel() -> None:
    """Conv → BN → Relu → Conv (valid): channel 2's BN shift makes it constant 0.5 after the Relu,
    channel 0's makes it dead; both go, the BN keeps two channels, the fill goes into the bias."""
    net = Net(("N", 2, 7, 7), opset=17, seed=5)
    w = net.random(4, 2, 3, 3)
    w[0] = w[2] = 0
    conv = net.op("Conv", net.input, net.const(w), out="conv")
    scale, shift = np.array([1.0, 0.5, 2.0, 1.5], np.float32), np.array([-1.0, 0.1, 0.5, 0.2], np.float32)
    mean, var = np.zeros(4, np.float32), np.ones(4, np.float32)
    bn = net.op(
        "BatchNormalization", conv, net.const(scale), net.const(shift), net.const(mean), net.const(var), out="bn"
    )
    second = net.op("Conv", net.op("Relu", bn), net.const(net.random(3, 4, 3, 3) * 0.1), net.const(net.random(3)))
    model = net.build(second, name="bn")
    site = find_sites(model)[0]
    assert site.name == "bn" and site.cuttable
    rows, bias = affine_rows(model, site)
    assert not rows[0].any() and np.allclose(bias, shift / np.sqrt(1 + 1e-5))
    fill = np.zeros((4, 1), np.float32)
    fill[2] = shift[2] / np.sqrt(1 + 1e-5)
    shrunk = checked(cut(model, [site], [Cut("bn", frozenset({0, 2}), fill={site.consumers[0].tensor: fill})]))
    node = next(n for n in shrunk.graph.node if n.op_type == "BatchNormalization")
    inits = {i.name: numpy_helper.to_array(i) for i in shrunk.graph.initializer}
    assert np.array_equal(inits[node.input[1]], scale[[1, 3]]) and np.array_equal(inits[node.input[2]], shift[[1, 3]])
    x = np.random.default_rng(2).standard_normal((4, 2, 7, 7)).astype(np.float32)
    assert np.max(np.abs(outputs(shrunk, x) - outputs(model, x))) <= TOLERANCE


def test_reshape_targets_are_resized_like_a_flatten() -> None:
    """The CNTK mnist-8 pattern: Relu → Reshape to (batch, C·P) with a constant shape → MatMul + Add."""
    net = Net(("N", 1, 5, 5), opset=13, seed=6)
    w = net.random(3, 1, 3, 3)
    w[0], bias = 0, np.array([-1.0, 0.3, 0.2], np.float32)
    conv = net.op("Conv", net.input, net.const(w), net.const(bias), out="c1")
    flat = net.op("Reshape", net.op("Relu", conv), net.const(np.array([-1, 27]), dtype=np.int64))
    product = net.op("MatMul", flat, net.const(net.random(27, 4)))
    model = net.build(net.op("Add", product, net.const(net.random(4))), name="reshape")
    site = find_sites(model)[0]
    assert site.cuttable and site.reshapes and site.consumers[0].kind == "matmul"
    shrunk = checked(cut(model, [site], [Cut("c1", frozenset({0}))]))
    reshape = next(n for n in shrunk.graph.node if n.op_type == "Reshape")
    target = next(i for i in shrunk.graph.initializer if i.name == reshape.input[1])
    assert numpy_helper.to_array(target).tolist() == [-1, 18]
    x = np.random.default_rng(3).standard_normal((5, 1, 5, 5)).astype(np.float32)
    assert np.max(np.abs(outputs(shrunk, x) - outputs(model, x))) <= TOLERANCE


def test_duplicate_neurons_merge_into_the_one_they_multiply() -> None:
    """Neuron 4 is 2.5 × neuron 1 (weights and bias): through ReLU its output is 2.5 × neuron 1's,
    so neuron 1's outgoing weights take 2.5 × neuron 4's and nothing changes."""
    net = Net(("N", 4), opset=17, seed=7)
    w, b = net.random(4, 6), net.random(6)
    w[:, 4], b[4] = 2.5 * w[:, 1], 2.5 * b[1]
    hidden = net.dense(net.input, 4, 6, weight=w, bias=b, out="h1")
    model = net.build(net.dense(net.op("Relu", hidden), 6, 3, out="logits"), name="dup")
    site = find_sites(model)[0]
    shrunk = checked(cut(model, [site], [Cut("h1", merged={4: (1, 2.5)})]))
    out = weight_of(shrunk, "logits")
    original = weight_of(model, "logits")
    assert out.shape == (5, 3)
    assert np.allclose(out[1], original[1] + 2.5 * original[4])
    x = np.random.default_rng(4).standard_normal((32, 4)).astype(np.float32)
    assert np.max(np.abs(outputs(shrunk, x) - outputs(model, x))) <= TOLERANCE


def residual_net() -> onnx.ModelProto:
    """h1 = Gemm(x) → a1 = Relu; h2 = Gemm(a1) + a1 (a residual Add) → Relu → Gemm ``logits``."""
    net = Net(("N", 4), opset=17, seed=8)
    a1 = net.op("Relu", net.dense(net.input, 4, 4, out="h1"))
    h2 = net.op("Add", net.dense(a1, 4, 4), a1, out="h2")
    return net.build(net.dense(net.op("Relu", h2), 4, 2, out="logits"), name="residual")


def concat_net() -> onnx.ModelProto:
    """Two branches Gemm → Relu concatenated, then a Gemm."""
    net = Net(("N", 4), opset=17, seed=9)
    a = net.op("Relu", net.dense(net.input, 4, 3, out="ha"))
    b = net.op("Relu", net.dense(net.input, 4, 2, out="hb"))
    joined = net.op("Concat", a, b, axis=1)
    return net.build(net.dense(net.op("Relu", net.dense(joined, 5, 3, out="hc")), 3, 2, out="logits"), name="concat")


def test_layers_in_a_residual_block_are_left_whole_with_the_reason() -> None:
    sites = {site.name: site for site in find_sites(residual_net())}
    assert "residual Add" in sites["h1"].refusal
    assert "residual block" in sites["h2"].refusal


def test_layers_feeding_a_concat_are_left_whole_and_the_layer_after_it_can_be_cut() -> None:
    sites = {site.name: site for site in find_sites(concat_net())}
    assert "Concat" in sites["ha"].refusal and "Concat" in sites["hb"].refusal
    assert sites["hc"].cuttable


def test_a_layer_that_reaches_the_model_output_is_left_whole() -> None:
    net = Net(("N", 4), opset=17, seed=10)
    model = net.build(net.op("Relu", net.dense(net.dense(net.op("Relu", net.dense(net.input, 4, 3)), 3, 3), 3, 3)))
    refusals = [site.refusal for site in find_sites(model)]
    assert refusals[0] is None and "model's output" in refusals[-1]


def test_inputs_outputs_and_opset_are_kept_and_ir3_lists_new_initializers() -> None:
    net = Net(("N", 4), opset=8, seed=11)
    hidden = net.op("Relu", net.dense(net.input, 4, 5, out="h1"))
    model = net.build(net.dense(hidden, 5, 2, out="logits"), ir_version=3, inits_as_inputs=True)
    shrunk = checked(cut(model, find_sites(model), [Cut("h1", frozenset({0, 3}))]))
    assert [i.name for i in shrunk.graph.output] == [i.name for i in model.graph.output]
    assert shrunk.graph.input[0] == model.graph.input[0] and shrunk.opset_import == model.opset_import
    inits = {i.name for i in shrunk.graph.initializer}
    assert inits <= {i.name for i in shrunk.graph.input}
