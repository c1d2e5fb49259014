"""auditor.engine.weights: the report's data-free norm baselines, pinned on hand-built models.

Each model's weights are chosen so that every norm is worked out by hand: a diagonal matrix's
spectral norm is its largest entry, a one-row matrix's is its length, and the path norm of a
two-layer chain is √(Σ_k (Σ_i W1[k,i]²)·W2[k]²) summed over the output.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import onnx
import pytest
from models import Net, dense_model, lenet_model, mnist_layers, qdq_mlp, save
from onnx import numpy_helper

from auditor import AuditConfig, Report, audit
from auditor.datasets.splits import open_splits
from auditor.engine.find import find_layers
from auditor.engine.weights import EXACT_SPECTRAL_ELEMENTS, spectral_norm, weight_norms
from auditor.report import ReportError
from auditor.reporting.page import render_page

# x (2) → Gemm W1 → Relu → Gemm W2 → logits (1); weights given as (in, out).
W1 = np.array([[3.0, 0.0], [0.0, 4.0]])  # as a matrix diag(3, 4): ‖·‖_F = 5, ‖·‖₂ = 4
W2 = np.array([[1.0], [2.0]])  # as a matrix [1, 2]: ‖·‖_F = ‖·‖₂ = √5


def norms_of(model):
    return weight_norms(model, find_layers(model))


def test_dense_chain_norms_products_and_path_norm() -> None:
    model = dense_model([(W1, np.zeros(2)), (W2, np.zeros(1))])
    found = norms_of(model)
    assert [n.layer for n in found.layers] == ["h1", "logits"] == found.covers
    assert [n.matrix for n in found.layers] == [[2, 2], [1, 2]]
    assert [n.shape for n in found.layers] == [[2, 2], [2, 1]]
    assert found.layers[0].frobenius == pytest.approx(5) and found.layers[0].spectral == pytest.approx(4)
    assert found.layers[1].frobenius == pytest.approx(math.sqrt(5))
    assert found.layers[1].spectral == pytest.approx(math.sqrt(5))
    assert found.frobenius_product == pytest.approx(5 * math.sqrt(5))
    assert found.spectral_product == pytest.approx(4 * math.sqrt(5))
    # paths x1→h1→out: 3²·1², x2→h2→out: 4²·2²; no path crosses the zero weights
    assert found.path_norm == pytest.approx(math.sqrt(9 + 64))
    assert found.without_weights == [] and found.path_norm_note is None


def test_gemm_transb_and_alpha_and_matmul_are_read_as_outputs_by_inputs() -> None:
    net = Net(("N", 3), opset=17)
    stored = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -2.0]], np.float32)  # (out 2, in 3) with transB
    h1 = net.op("Gemm", net.input, net.const(stored), out="h1", transB=1, alpha=3.0)
    h2 = net.op("MatMul", net.op("Relu", h1), net.const(np.array([[0.0], [5.0]], np.float32)), out="logits")
    found = norms_of(net.build(h2))
    first, second = found.layers
    assert (first.op, first.matrix, second.op, second.matrix) == ("Gemm", [2, 3], "MatMul", [1, 2])
    assert first.frobenius == pytest.approx(3 * math.sqrt(5)) and first.spectral == pytest.approx(6)
    assert second.frobenius == pytest.approx(5) and second.spectral == pytest.approx(5)
    # the only path with nonzero weight: x3 → h1[1] (3·−2) → logits (5)
    assert found.path_norm == pytest.approx(6 * 5)


def test_conv_kernels_are_read_as_banks_and_the_path_norm_is_declined() -> None:
    model = lenet_model()
    found = norms_of(model)
    stored = {i.name: i for i in model.graph.initializer}
    assert [n.op for n in found.layers] == ["Conv", "Conv", "Gemm", "Gemm"]
    assert [n.matrix for n in found.layers] == [[4, 25], [8, 100], [16, 128], [10, 16]]
    for norms in found.layers:
        weight = numpy_helper.to_array(stored[norms.weight]).astype(np.float64)
        matrix = weight.reshape(norms.matrix[0], -1) if norms.op == "Conv" else weight.T  # Gemm stores (in, out)
        assert norms.frobenius == pytest.approx(np.sqrt((weight**2).sum()))
        assert norms.spectral == pytest.approx(np.linalg.norm(matrix, 2))
    assert found.frobenius_product == pytest.approx(math.prod(n.frobenius for n in found.layers))
    assert found.path_norm is None and "dense layers" in found.path_norm_note


def test_qdq_weights_behind_dequantize_are_named_as_missing() -> None:
    model = qdq_mlp(np.array([[1, 0], [0, 2]]), np.array([[3.0], [4.0]]))
    found = norms_of(model)
    assert [m.layer for m in found.without_weights] == ["h1"]
    assert "DequantizeLinear" in found.without_weights[0].reason
    assert found.covers == ["logits"] and found.layers[0].frobenius == pytest.approx(5)
    assert found.frobenius_product == pytest.approx(5) and found.spectral_product == pytest.approx(5)
    assert found.path_norm is None and "no weights" in found.path_norm_note


def test_a_weight_in_a_constant_node_is_read() -> None:
    net = Net(("N", 2), opset=17)

    weight = net.op("Constant", out="w", value=numpy_helper.from_array(np.array([[0.0, 2.0]], np.float32).T, "w"))
    h1 = net.op("Gemm", net.input, weight, out="h1")
    logits = net.dense(net.op("Relu", h1), 1, 1, weight=[[-3.0]], bias=False, out="logits")
    found = norms_of(net.build(logits))
    assert [n.weight for n in found.layers] == ["w", found.layers[1].weight]
    assert found.path_norm == pytest.approx(6) and found.spectral_product == pytest.approx(6)


def test_power_iteration_agrees_with_the_singular_values() -> None:
    rng = np.random.default_rng(0)
    left, _ = np.linalg.qr(rng.standard_normal((300, 40)))
    right, _ = np.linalg.qr(rng.standard_normal((40, 40)))
    matrix = left @ np.diag(np.linspace(3, 0.1, 40)) @ right.T  # singular values 3, 2.93, …, 0.1
    tall = np.repeat(matrix, EXACT_SPECTRAL_ELEMENTS // matrix.size + 1, axis=0)  # σ_max × √copies
    expected = 3 * math.sqrt(tall.shape[0] // 300)
    assert spectral_norm(tall) == pytest.approx(expected, rel=1e-4)
    assert spectral_norm(tall.astype(np.float32)) == pytest.approx(expected, rel=1e-4)


def test_an_audit_reports_weights_in_json_and_html(tmp_path) -> None:
    path = save(dense_model([(W1, np.zeros(2)), (W2, np.zeros(1))]), tmp_path / "tiny.onnx")
    data = {"x": np.array([[1.0, 2.0], [0.5, -1.0], [2.0, 0.0]], np.float32)}  # no labels: one output
    np.savez(tmp_path / "tiny.npz", **data)
    report = audit(str(path), open_splits(str(tmp_path / "tiny.npz"), "test"), AuditConfig(device="cpu"))
    assert report.weights is not None and report.weights.path_norm == pytest.approx(math.sqrt(73))
    text = report.to_json()
    assert Report.load(text) == report
    assert list(json.loads(text))[-1] == "weights"
    page = render_page(report)
    assert "<h2>Weights</h2>" in page and "8.5440" in page  # √73
    old = json.loads(text)
    del old["weights"]
    old_report = Report.load(json.dumps(old))
    assert old_report.weights is None
    assert "no <code>weights</code> section" in render_page(old_report)
    old["weights"] = {"layers": [1, None], "without_weights": "x", "covers": None}  # malformed: refused on reading
    with pytest.raises(ReportError):
        Report.load(json.dumps(old), strict=False)
    refused = json.loads(text)
    refused["weights"]["path_norm"] = "big"
    with pytest.raises(ReportError, match=r"path_norm is .big., not float"):
        Report.load(json.dumps(refused))


def test_real_audit_of_an_mnist_mlp_has_weights() -> None:
    model = dense_model(mnist_layers())
    found = norms_of(model)
    matrices = [np.asarray(w, np.float64).T for w, _ in mnist_layers()]
    flow = np.ones(784)
    for matrix in matrices:
        flow = matrix**2 @ flow
    assert found.path_norm == pytest.approx(math.sqrt(flow.sum()))
    assert found.spectral_product == pytest.approx(math.prod(np.linalg.norm(m, 2) for m in matrices), rel=1e-6)
    assert replace(found, layers=[]).covers == ["h1", "h2", "logits"]


def test_a_real_qdq_export_names_every_layer_as_without_stored_weights(shared_models) -> None:
    model = onnx.load(shared_models / "qdq_int8_pytorch21_opset17.onnx")
    found = norms_of(model)
    assert found.layers == [] and found.covers == [] and found.frobenius_product is None
    assert len(found.without_weights) == len(find_layers(model))
    assert all("DequantizeLinear" in missing.reason for missing in found.without_weights)


def test_real_third_party_models_get_a_norm_per_layer(shared_models) -> None:
    model = onnx.load(shared_models / "cnn_pytorch25_opset17.onnx")
    found = norms_of(model)
    assert found.covers == [layer.name for layer in find_layers(model)] and found.without_weights == []
    assert all(n.frobenius >= n.spectral > 0 for n in found.layers)  # ‖W‖₂ ≤ ‖W‖_F always
