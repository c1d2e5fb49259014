"""Every bad request gets a clean refusal: the right status code and one line, never INTERNAL.

One test per class of bad request (issue 9 §4), each against a real server on 127.0.0.1. The
classes covered elsewhere: idle and quiet clients and a full queue (test_server_availability),
bad tokens and TLS (test_server_security), bad job submissions (test_server_jobs).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from models import mlp, save
from onnx import TensorProto, helper
from servers import MNIST8, Served, code, serving, zeros_batch

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.datasets.batches import Batch
from auditor.engine.modelfile import external_tensors
from auditor.service import wire
from auditor.service.transport import NO_RETRY


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    yield from serving(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    servers = serving(tmp_path_factory.mktemp("refusals"))
    yield next(servers)(max_model_mb=1, max_batch_mb=1)
    next(servers, None)


@pytest.fixture(scope="module")
def sha(shared: Served, shared_models: Path) -> str:
    return shared.upload(shared_models / MNIST8)


def _refusal(call: Callable[[], object], status: grpc.StatusCode, *fragments: str) -> str:
    """``call`` fails with ``status`` and a one-line message holding every fragment; the message."""
    with pytest.raises(grpc.RpcError) as caught:
        call()
    details = caught.value.details()
    assert code(caught) == status, details
    assert details and "\n" not in details and "Traceback" not in details
    for fragment in fragments:
        assert fragment in details, details
    return details


def _upload(served: Served, *chunks: tuple[str, bytes]) -> Callable[[], object]:
    return lambda: served.stub.UploadModel(iter([pb.UploadModelRequest(file=f, content=c) for f, c in chunks]))


def _audit(served: Served, *requests: pb.AuditRequest) -> Callable[[], object]:
    return lambda: list(served.stub.Audit(iter(requests)))


def _start(sha: str, **fields: object) -> pb.AuditRequest:
    return pb.AuditRequest(start=pb.AuditStart(model_sha256=sha, **fields))


# ---- models ---------------------------------------------------------------------------------


def _graph_model(outputs: bool = True, typed: bool = True) -> bytes:
    x = helper.make_tensor_value_info(
        "x", TensorProto.FLOAT if typed else TensorProto.UNDEFINED, ["n", 4] if typed else None
    )
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y] if outputs else [])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (_graph_model(outputs=False), "has no graph outputs"),
        (_graph_model(typed=False), "fails onnx.checker"),
        (b"", "held no model bytes"),
    ],
)
def test_a_model_graph_without_outputs_or_typed_inputs_is_refused(
    shared: Served, content: bytes, fragment: str
) -> None:
    _refusal(_upload(shared, ("", content)), grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_external_data_with_a_negative_offset_is_refused(shared: Served, tmp_path: Path) -> None:
    path = tmp_path / "neg.onnx"
    onnx.save_model(mlp([4, 3, 2]), path, save_as_external_data=True, location="w.bin", size_threshold=0)
    proto = onnx.load_model(path, load_external_data=False)
    for tensor in external_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "offset":
                entry.value = "-8"
        if not any(entry.key == "offset" for entry in tensor.external_data):
            tensor.external_data.add(key="offset", value="-8")
    chunks = [("", proto.SerializeToString()), ("w.bin", (tmp_path / "w.bin").read_bytes())]
    _refusal(_upload(shared, *chunks), grpc.StatusCode.INVALID_ARGUMENT, "offset must be non-negative")


@pytest.mark.parametrize("name", ["../w.bin", "/etc/passwd", "w\n.bin", "w\\x.bin", "a" * 2000, "model.onnx"])
def test_upload_file_names_are_checked_at_the_boundary(shared: Served, sha: str, name: str) -> None:
    message = _refusal(_upload(shared, ("", b"x"), (name, b"1")), grpc.StatusCode.INVALID_ARGUMENT, "not allowed")
    assert len(message) < 600


def test_size_limits_are_resource_exhausted_and_marked_not_worth_retrying(shared: Served, sha: str) -> None:
    with pytest.raises(grpc.RpcError) as caught:
        _upload(shared, *[("", bytes(600_000))] * 2)()
    assert code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-model-mb" in caught.value.details()
    assert NO_RETRY[0] in [tuple(m) for m in caught.value.trailing_metadata()]
    big = wire.batch_to_proto("test", Batch(np.zeros((2000, 28, 28), np.uint8)))  # 1.5 MiB in one message
    _refusal(_audit(shared, _start(sha), pb.AuditRequest(batch=big)), grpc.StatusCode.RESOURCE_EXHAUSTED)


# ---- ids, tokens, names ----------------------------------------------------------------------


@pytest.mark.parametrize("token", ["x", "1; DROP TABLE reports", "²", "-1", "9" * 19, "1" * 100_000])
def test_ill_formed_page_tokens_are_invalid_argument(shared: Served, token: str) -> None:
    for call in (
        lambda: shared.stub.ListReports(pb.ListReportsRequest(page_token=token)),
        lambda: shared.stub.ListJobs(pb.ListJobsRequest(page_token=token)),
    ):
        assert len(_refusal(call, grpc.StatusCode.INVALID_ARGUMENT, "page token")) < 200


@pytest.mark.parametrize("value", ["nope", "A" * 32, "0" * 31, "../" * 20, "z" * 100_000])
def test_ill_formed_ids_and_addresses_are_invalid_argument_and_never_echoed_whole(shared: Served, value: str) -> None:
    for call, fragment in [
        (lambda: shared.stub.GetReport(pb.GetReportRequest(id=value)), "report id"),
        (lambda: shared.stub.GetJob(pb.GetJobRequest(id=value)), "job id"),
        (lambda: shared.stub.CancelJob(pb.CancelJobRequest(id=value)), "job id"),
        (lambda: list(shared.stub.WatchJob(pb.WatchJobRequest(id=value))), "job id"),
        (lambda: shared.stub.HasModel(pb.HasModelRequest(sha256=value)), "content address"),
        (lambda: shared.stub.DescribeModel(pb.DescribeModelRequest(sha256=value)), "content address"),
        (lambda: shared.stub.ListReports(pb.ListReportsRequest(model_sha256=value)), "content address"),
    ]:
        assert len(_refusal(call, grpc.StatusCode.INVALID_ARGUMENT, fragment)) < 200


@pytest.mark.parametrize("name", ["a\nb", "tab\there", "m" * 300])
def test_a_model_name_with_control_characters_or_too_long_is_refused(shared: Served, sha: str, name: str) -> None:
    dataset = pb.DatasetRef(name="mnist", limit=8)
    _refusal(
        _audit(shared, _start(sha, model_name=name, dataset=dataset)), grpc.StatusCode.INVALID_ARGUMENT, "model_name"
    )


# ---- data ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "fragment"), [([1] * 65, "1 to 16 dims"), ([1] * 17, "1 to 16 dims"), ([], "1 to 16")]
)
def test_tensor_shapes_are_bounded_in_rank_and_size(shared: Served, sha: str, shape: list[int], fragment: str) -> None:
    batch = pb.SampleBatch(split="test", samples=pb.Tensor(datatype="UINT8", shape=shape, raw_contents=b"\0"))
    _refusal(_audit(shared, _start(sha), pb.AuditRequest(batch=batch)), grpc.StatusCode.INVALID_ARGUMENT, fragment)


def test_settings_that_turn_finite_data_into_inf_are_refused_naming_the_setting(shared: Served, sha: str) -> None:
    settings = pb.AuditSettings(std=1e-39)  # every nonzero pixel / 1e-39 overflows float32
    dataset = pb.DatasetRef(name="mnist", limit=8)
    _refusal(_audit(shared, _start(sha, settings=settings, dataset=dataset)), grpc.StatusCode.INVALID_ARGUMENT, "--std")


def test_a_dataset_ref_together_with_client_batches_is_refused(shared: Served, sha: str) -> None:
    dataset = pb.DatasetRef(name="mnist", limit=8)
    requests = [_start(sha, dataset=dataset), pb.AuditRequest(batch=zeros_batch())]
    _refusal(_audit(shared, *requests), grpc.StatusCode.INVALID_ARGUMENT, "DatasetRef", "one or the other")


@pytest.mark.parametrize(
    ("dataset", "fragment"),
    [
        (pb.DatasetRef(name="../../etc/passwd"), "resolves only"),
        (pb.DatasetRef(name="mnist", split="validation"), "split must be one of"),
        (pb.DatasetRef(name="mnist", limit=-5), "at least 1"),
    ],
)
def test_dataset_refs_name_only_what_the_server_holds(shared: Served, sha: str, dataset, fragment: str) -> None:
    _refusal(_audit(shared, _start(sha, dataset=dataset)), grpc.StatusCode.INVALID_ARGUMENT, fragment)


# ---- the server's own paths and leftovers -------------------------------------------------------


def test_messages_never_reveal_server_paths(
    serve, shared_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A server without the dataset, and no way to download it: the refusal names no folder of its own."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("AUDITOR_DATA_MIRROR", "http://127.0.0.1:9")  # refused at once, no network needed
    served = serve(data_dir=tmp_path / "no-data")
    sha = served.upload(shared_models / MNIST8)
    start = _start(sha, dataset=pb.DatasetRef(name="mnist", limit=8))
    message = _refusal(_audit(served, start), grpc.StatusCode.INVALID_ARGUMENT)
    assert str(tmp_path) not in message and "/no-data" not in message and "/cache" not in message
    assert "<path>" in message


def test_upload_leftovers_of_a_crash_are_removed_when_the_server_starts(serve, tmp_path: Path) -> None:
    leftover = tmp_path / "store" / "models" / ".staging" / "tmpcrash"
    leftover.mkdir(parents=True)
    (leftover / "model.onnx").write_bytes(b"half an upload")
    serve()
    assert list((tmp_path / "store" / "models" / ".staging").iterdir()) == []


def test_a_refused_request_leaves_the_server_serving(shared: Served, sha: str, tmp_path: Path) -> None:
    good = save(mlp([784, 8, 10]), tmp_path / "good.onnx")
    _refusal(_audit(shared, _start("0" * 64)), grpc.StatusCode.NOT_FOUND, "upload it first")
    assert shared.upload(good) and shared.stub.HasModel(pb.HasModelRequest(sha256=sha)).present
