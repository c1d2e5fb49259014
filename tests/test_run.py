"""auditor.engine.run: onnxruntime at the edge, outputs by name, fixed batches in chunks, work side by side.

Real sessions on hand-built models; every output is compared with a plain onnxruntime run of the
same model (``models.run``). On a machine with CUDA the device tests check that CUDA runs; on
one without, that asking for it is a one-line refusal.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import Net, mlp, run
from onnx import helper
from refusals import refused

from auditor.engine.expose import with_outputs
from auditor.engine.find import ModelInput, describe
from auditor.engine.run import (
    CUDA,
    GPU_PROVIDERS,
    Session,
    create_session,
    cuda_driver_loads,
    cuda_probe,
    cuda_provider_options,
    cuda_usable,
    gpu_math_warnings,
    ordered_map,
    probe_shapes,
    with_provider_options,
    workers_for,
)
from auditor.errors import AuditError, DataError, ModelError

REPO = Path(__file__).resolve().parents[1]
X = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)


def runner(model: onnx.ModelProto, device: str = "cpu") -> Session:
    return Session(model, describe(model).input, device)


# --- Outputs by name ------------------------------------------------------------------------------


def test_run_returns_the_outputs_asked_for_by_name() -> None:
    model = mlp([4, 5, 3], head="Softmax")
    session = runner(with_outputs(model, ["pre1"]))
    outputs = session.run(X, ["probs", "pre1"])
    assert list(outputs) == ["probs", "pre1"]
    for name, expected in zip(["probs", "pre1"], run(model, X, ["probs", "pre1"]), strict=True):
        np.testing.assert_array_equal(outputs[name], expected)
    assert list(session.run(X, ["pre1"])) == ["pre1"]


@pytest.mark.parametrize("samples", [1, 3, 4, 8, 10])
def test_a_fixed_batch_model_runs_in_chunks_and_the_padding_is_cut_off(samples: int) -> None:
    """Batch size 4: 10 samples run as 4 + 4 + 2 zero-padded to 4; the answer matches a dynamic model."""
    fixed, dynamic = mlp([4, 5, 3], batch=4), mlp([4, 5, 3])
    assert describe(fixed).input.shape == (4, 4)
    names = ["logits", "pre1"]
    got = runner(with_outputs(fixed, ["pre1"])).run(X[:samples], names)
    for name, expected in zip(names, run(dynamic, X[:samples], names), strict=True):
        assert got[name].shape[0] == samples
        np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("call_rows", [1, 3, 4, 10, 11])
def test_a_batch_runs_in_calls_of_call_rows_with_the_same_answer(call_rows: int) -> None:
    """10 samples in calls of at most ``call_rows``: outputs equal one call's, in order."""
    model = with_outputs(mlp([4, 5, 3]), ["pre1"])
    whole = runner(model).run(X, ["logits", "pre1"])
    split = Session(model, describe(model).input, "cpu", call_rows=call_rows)
    assert split.call_rows == call_rows
    got = split.run(X, ["logits", "pre1"])
    for name in ("logits", "pre1"):
        np.testing.assert_array_equal(got[name], whole[name])


def test_outputs_without_the_batch_first_are_refused_when_a_batch_is_split() -> None:
    """A batch-independent output (here the input's shape) cannot be put together from calls."""
    model = mlp([4, 5, 3])
    model.graph.node.append(helper.make_node("Shape", ["x"], ["shape"]))
    model.graph.output.append(helper.make_tensor_value_info("shape", onnx.TensorProto.INT64, [2]))
    split = Session(model, describe(model).input, "cpu", call_rows=3)
    refused(ModelError, lambda: split.run(X, ["logits", "shape"]), "'shape' has shape (2,) for 3 samples")
    with pytest.raises(ValueError, match="call_rows"):
        Session(model, describe(model).input, "cpu", call_rows=0)


def test_a_fixed_batch_size_wins_over_call_rows() -> None:
    """A model of batch size 4 is always called with 4 samples, whatever ``call_rows`` says."""
    fixed = mlp([4, 5, 3], batch=4)
    got = Session(fixed, describe(fixed).input, "cpu", call_rows=3).run(X, ["logits"])
    np.testing.assert_allclose(got["logits"], run(mlp([4, 5, 3]), X, ["logits"])[0], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("x", "fragment"),
    [(np.zeros((3, 5), np.float32), "shape (3, 5)"), (np.zeros((3, 4), np.float64), "shape (3, 4)")],
    ids=["shape", "dtype"],
)
def test_a_batch_onnxruntime_rejects_is_a_one_line_refusal(x: np.ndarray, fragment: str) -> None:
    message = refused(DataError, lambda: runner(mlp([4, 5, 3])).run(x, ["logits"]), "onnxruntime rejected", fragment)
    assert message.endswith("check the data shape and --batch-size")


def test_a_model_onnxruntime_cannot_load_is_a_one_line_refusal() -> None:
    """An op from a domain onnxruntime does not know: the checker cannot tell, the session can."""
    node = helper.make_node("Frobnicate", ["x"], ["y"], domain="com.example")
    graph = helper.make_graph(
        [node],
        "custom",
        [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    model = helper.make_model(graph, opset_imports=opsets, ir_version=8)
    refused(ModelError, lambda: create_session(model, "cpu"), "onnxruntime cannot load the model", "re-export")


# --- Shapes shape inference cannot give -----------------------------------------------------------


def reshaped_conv() -> tuple[onnx.ModelProto, str]:
    """A conv whose weights come through a computed Reshape, so inference cannot type its output."""
    net = Net(("batch", 2, 5, 5))
    flat = net.const(net.random(3 * 2 * 3 * 3).ravel())
    shape = net.op("Identity", net.const([3, 2, 3, 3], dtype=np.int64))
    conv = net.op("Conv", net.input, net.op("Reshape", flat, shape), pads=[1, 1, 1, 1])
    return net.build(net.dense(net.op("Flatten", net.op("Relu", conv)), 75, 2)), conv


def test_probe_shapes_measures_tensors_on_one_zero_sample() -> None:
    model, conv = reshaped_conv()
    model_input = describe(model).input
    assert probe_shapes(model, model_input, [conv]) == {conv: (1, 3, 5, 5)}
    fixed = ModelInput(model_input.name, model_input.dtype, (2, 2, 5, 5))  # a fixed batch is probed whole
    assert probe_shapes(model, fixed, [conv]) == {conv: (2, 3, 5, 5)}


def test_probe_shapes_answers_nothing_it_cannot_measure() -> None:
    model, conv = reshaped_conv()
    model_input = describe(model).input
    assert probe_shapes(model, model_input, []) == {}
    unknown = ModelInput(model_input.name, model_input.dtype, ("batch", 2, "height", 5))
    assert probe_shapes(model, unknown, [conv]) == {}


# --- Devices --------------------------------------------------------------------------------------


def test_device_auto_runs_on_cuda_when_it_can_and_on_the_cpu_otherwise() -> None:
    session = runner(mlp([4, 5, 3]), "auto")
    assert session.providers[-1] == "CPUExecutionProvider"
    if cuda_usable():
        assert session.providers[0] == "CUDAExecutionProvider" and session.workers == 1
    else:
        assert session.providers == ["CPUExecutionProvider"]
    np.testing.assert_allclose(session.run(X, ["logits"])["logits"], run(mlp([4, 5, 3]), X, ["logits"])[0], rtol=1e-5)


def test_the_driver_shortcut_never_changes_whether_cuda_is_usable() -> None:
    """Skipping the probe where the CUDA driver does not load gives the probe's own answer."""
    assert cuda_usable() == cuda_probe()
    if not cuda_driver_loads():
        assert not cuda_probe()


def test_device_cpu_never_uses_cuda() -> None:
    session = runner(mlp([4, 5, 3]), "cpu")
    assert session.providers == ["CPUExecutionProvider"]
    assert session.workers == workers_for(session.session) == max(1, min(os.cpu_count() or 1, 8))


def test_device_cuda_runs_on_cuda_or_is_refused_in_one_line() -> None:
    model = mlp([4, 5, 3])
    if cuda_usable():
        assert runner(model, "cuda").providers[0] == "CUDAExecutionProvider"
    else:
        refused(AuditError, lambda: runner(model, "cuda"), "CUDA was requested", "--device auto or --device cpu")


def test_cuda_sessions_are_asked_for_fp32_math_and_a_fixed_convolution_algorithm() -> None:
    """TF32 off unless asked for; cuDNN's algorithm fixed rather than timed (docs/counting.md)."""
    exact, tf32 = with_provider_options(GPU_PROVIDERS, "exact"), with_provider_options(GPU_PROVIDERS, "tf32")
    assert exact == [(CUDA, {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT"}), "CPUExecutionProvider"]
    assert tf32[0] == (CUDA, {"use_tf32": "1", "cudnn_conv_algo_search": "DEFAULT"})
    assert cuda_provider_options("exact")["use_tf32"] == "0"
    assert with_provider_options(["CPUExecutionProvider"], "tf32") == ["CPUExecutionProvider"]


def test_the_provider_options_that_ran_are_known_only_when_cuda_ran() -> None:
    for gpu_math in ("exact", "tf32"):
        cpu = Session(mlp([4, 5, 3]), describe(mlp([4, 5, 3])).input, "cpu", gpu_math=gpu_math)
        assert cpu.provider_options is None
        assert gpu_math_warnings(cpu.provider_options, gpu_math) == []  # the CPU's counts are exact anyway
    if cuda_usable():
        session = Session(mlp([4, 5, 3]), describe(mlp([4, 5, 3])).input, "cuda")
        assert session.provider_options[CUDA]["use_tf32"] == "0"
        assert session.provider_options[CUDA]["cudnn_conv_algo_search"] == "DEFAULT"


def test_tf32_on_cuda_makes_the_report_call_its_counts_approximate() -> None:
    ran = {CUDA: cuda_provider_options("tf32")}
    (warning,) = gpu_math_warnings(ran, "tf32")
    assert "approximate" in warning and "gpu_math exact" in warning and "\n" not in warning
    assert gpu_math_warnings({CUDA: cuda_provider_options("exact")}, "exact") == []


def test_import_auditor_does_not_load_onnxruntime() -> None:
    """The health probe and the trainer's CLI import auditor; only a session needs onnxruntime."""
    code = (
        "import sys, auditor\n"
        "assert 'onnxruntime' not in sys.modules, 'import auditor loaded onnxruntime'\n"
        "auditor.find_layers  # the graph side works without it too\n"
        "from auditor.engine.run import create_session\n"
        "assert 'onnxruntime' not in sys.modules, 'importing auditor.engine.run loaded onnxruntime'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr


# --- Work side by side ----------------------------------------------------------------------------


def test_ordered_map_keeps_input_order_when_later_items_finish_first() -> None:
    first_may_finish = threading.Event()

    def work(i: int) -> int:
        if i == 0:
            assert first_may_finish.wait(timeout=30)
        if i == 1:
            first_may_finish.set()
        return i * i

    assert list(ordered_map(work, range(12), workers=3)) == [i * i for i in range(12)]


def test_ordered_map_runs_a_bounded_number_ahead_and_stops_when_closed() -> None:
    started: list[int] = []
    lock = threading.Lock()

    def work(i: int) -> int:
        with lock:
            started.append(i)
        return i

    results = ordered_map(work, range(1000), workers=2)
    assert next(results) == 0
    assert len(started) <= 2 * 2 + 1  # what was in flight when the first result was taken
    results.close()
    assert len(started) <= 2 * 2 + 1


def test_ordered_map_passes_an_exception_to_the_caller() -> None:
    def work(i: int) -> int:
        if i == 5:
            raise DataError("batch 5 is bad")
        return i

    seen: list[int] = []
    with pytest.raises(DataError, match="batch 5 is bad"):
        seen.extend(ordered_map(work, range(20), workers=2))
    assert seen == [0, 1, 2, 3, 4]  # every result before the failure, in order, then the error
