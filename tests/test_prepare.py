"""auditor.engine.prepare: a model made ready once, and the one rule for describing a model.

``prepare`` loads, finds layers, exposes them and starts a session; ``describe_model`` says what
the auditor finds without starting one. Real onnxruntime sessions, real third-party models.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from models import Net, lenet_model, mlp, reference_counts, run, save
from refusals import refused

from auditor import AuditConfig, Prepared, audit, find_layers, prepare
from auditor.config import SessionSettings
from auditor.datasets.batches import Batch
from auditor.engine.find import describe
from auditor.engine.modelfile import load_model
from auditor.engine.prepare import MIN_CALL_ROWS, call_rows, describe_model, rows_per_batch, structure_of
from auditor.errors import ModelError


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_prepare_finds_exposes_and_starts_a_session_once() -> None:
    model = mlp([4, 5, 3], head="Softmax")
    prepared = prepare(model, device="cpu")
    assert isinstance(prepared, Prepared)
    assert prepared.settings == SessionSettings("cpu", "pre-activation")
    assert prepared.providers == ["CPUExecutionProvider"]
    assert prepared.structure.layers == find_layers(model)
    assert [out.layer for out in prepared.exposed.layers] == prepared.structure.layers
    assert prepared.exposed.prediction == "probs" and prepared.exposed.logits == "logits"
    # the runner answers every output the audit reads, by name
    x = np.random.default_rng(0).standard_normal((5, 4)).astype(np.float32)
    outputs = prepared.runner.run(x, prepared.exposed.output_names)
    assert set(outputs) == set(prepared.exposed.output_names)
    np.testing.assert_allclose(outputs["probs"], run(model, x, ["probs"])[0], rtol=1e-6)


def test_cpu_calls_hold_about_a_mebibyte_of_the_widest_layer() -> None:
    """LeNet's widest layer is c1, 4 × 576 units: 1 MiB of float32 is 113 samples a call; a
    model whose widest layer is huge still gets ``MIN_CALL_ROWS``; batches stay uncapped."""
    prepared = prepare(lenet_model(), device="cpu")
    assert call_rows(prepared.structure) == prepared.runner.call_rows == (1 << 20) // (4 * 576 * 4)
    assert rows_per_batch(prepared.structure) == prepared.max_rows > 256
    net = Net(("batch", 3, 64, 64))
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", net.conv(net.input, 3, 512))), axis=1)
    wide = describe(net.build(net.dense(pooled, 512, 2)))
    assert wide.layers[0].neurons * wide.layers[0].positions * 4 * MIN_CALL_ROWS > 1 << 20
    assert call_rows(wide) == MIN_CALL_ROWS


def test_prepare_reads_states_where_it_is_asked() -> None:
    model = mlp([4, 5, 3])
    prepared = prepare(model, device="cpu", states_at="block-output")
    assert prepared.settings == SessionSettings("cpu", "block-output")
    assert prepared.exposed.states_at == "block-output"
    refused(ModelError, lambda: prepare(model, device="cpu", states_at="post-activation"), "states_at must be one of")


def test_model_info_describes_the_model_and_every_layer() -> None:
    prepared = prepare(lenet_model(), device="cpu")
    info = prepared.model_info
    assert (info.name, info.opset, info.input_name, info.input_dtype) == ("lenet", 17, "x", "float32")
    assert info.input_shape == ["N", 1, 28, 28]
    assert [(lay.name, lay.op, lay.activation, lay.role, lay.neurons, lay.positions) for lay in info.layers] == [
        ("c1", "Conv", "Relu", "hidden", 4, 576),
        ("c2", "Conv", "Relu", "hidden", 8, 64),
        ("f1", "Gemm", "Relu", "hidden", 16, 1),
        ("logits", "Gemm", None, "output", 10, 1),
    ]


def test_describe_model_gives_what_prepare_gives(shared_models: Path) -> None:
    """``auditor layers``, DescribeModel and the report's model block all come from one rule."""
    paths = sorted(shared_models.glob("*.onnx"))
    assert len(paths) >= 5, f"the shared models are missing from {shared_models}"
    for path in paths:
        assert describe_model(path) == prepare(path, device="cpu").model_info, path.name
        assert describe_model(load_model(path)) == describe_model(path), path.name


def test_describe_model_agrees_for_a_path_and_its_bytes(tmp_path: Path) -> None:
    """The same bytes give the same hash and layers; only the name comes from the path."""
    path = save(mlp([4, 6, 3]), tmp_path / "m.onnx")
    by_path, by_bytes = describe_model(path), describe_model(path.read_bytes())
    assert by_path.sha256 == by_bytes.sha256 == sha256(path)
    assert by_path.layers == by_bytes.layers
    assert [(lay.neurons, lay.positions) for lay in by_path.layers] == [(6, 1), (3, 1)]


def test_prepare_does_not_touch_the_file(tmp_path: Path, shared_models: Path) -> None:
    path = tmp_path / "mnist.onnx"
    path.write_bytes((shared_models / "mnist-8_cntk_opset8.onnx").read_bytes())
    digest, mtime = sha256(path), path.stat().st_mtime_ns
    prepared = prepare(path)
    assert prepared.model.sha256 == digest
    assert sha256(path) == digest and path.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mnist.onnx"]


def test_shapes_shape_inference_cannot_see_are_measured_on_one_sample() -> None:
    """A conv whose weights come through a computed Reshape: its width is unknown until it runs."""
    net = Net(shape=("batch", 2, 5, 5))
    flat = net.const(net.random(3 * 2 * 3 * 3).ravel())
    shape = net.op("Identity", net.const([3, 2, 3, 3], dtype=np.int64))  # not an initializer any more
    conv = net.op("Conv", net.input, net.op("Reshape", flat, shape), pads=[1, 1, 1, 1])
    logits = net.dense(net.op("Flatten", net.op("Relu", conv)), 75, 2)
    model = net.build(logits)
    (hidden,) = [layer for layer in find_layers(model) if layer.role == "hidden"]
    assert hidden.neurons is None  # shape inference gave up on the Reshape
    assert structure_of(load_model(model)).layers[0].neurons == 3
    prepared = prepare(model)
    layer = prepared.structure.layers[0]
    assert (layer.neurons, layer.positions, layer.rank) == (3, 25, 4)
    assert describe_model(model).layers[0].neurons == 3
    x = net.random(6, 2, 5, 5)
    report = audit(prepared, [("test", Batch(x))], AuditConfig(device="cpu"))
    (pre,) = run(model, x, [conv])
    assert report.splits["test"].layers[0].states_distinct == len(reference_counts(pre, 1))


@pytest.mark.parametrize("device", ["cpu", "auto"])
def test_a_prepared_model_is_shared_by_audits_it_serves(device: str) -> None:
    """An audit with device "auto" runs on whatever the model was prepared for: no second session."""
    prepared = prepare(mlp([4, 5, 3]), device=device)
    x = np.random.default_rng(1).standard_normal((8, 4)).astype(np.float32)
    report = audit(prepared, [("test", Batch(x))], AuditConfig())
    assert report.providers == prepared.providers
