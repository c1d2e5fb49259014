"""The gRPC service end to end: a real server on 127.0.0.1, real channels, real models and data."""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import numpy as np
import onnx
import pytest
from google.protobuf import descriptor_pb2
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from onnx import TensorProto, helper, numpy_helper

from auditor import audit, prepare, wire
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.client import Connection, check_health, get_report, list_reports, main, remote_audit
from auditor.config import AuditConfig
from auditor.data import Batch, load_arrays, open_splits, tagged
from auditor.errors import AuditError, CancelledError, LimitError, NotFoundError
from auditor.persist import ReportStore
from auditor.server import ServeOptions, build_server

REPO = Path(__file__).resolve().parents[1]
MNIST8 = "mnist-8_cntk_opset8.onnx"


@pytest.fixture(scope="module")
def mnist8(shared_models: Path) -> Path:
    return shared_models / MNIST8


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 784-1500-10 MLP: 4.7 MB of weights, over gRPC's default 4 MB message size."""
    return _save_mlp(tmp_path_factory.mktemp("big") / "big.onnx", hidden=1500)


def _save_mlp(path: Path, hidden: int, external_data: str | None = None, ir_version: int = 10) -> Path:
    rng = np.random.default_rng(0)
    weights = {
        "w1": rng.normal(0, 0.05, (784, hidden)).astype(np.float32),
        "b1": rng.normal(0, 0.05, hidden).astype(np.float32),
        "w2": rng.normal(0, 0.05, (hidden, 10)).astype(np.float32),
        "b2": np.zeros(10, np.float32),
    }
    graph = helper.make_graph(
        [
            helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
            helper.make_node("Relu", ["h"], ["a"]),
            helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"]),
        ],
        "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 784])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 10])],
        [numpy_helper.from_array(value, name) for name, value in weights.items()],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=ir_version)
    onnx.save_model(
        model, path, save_as_external_data=external_data is not None, location=external_data, size_threshold=0
    )
    return path


class Served:
    """A started server with its options, a connection to it, and a stub."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.server, port = build_server(options)
        self.server.start()
        self.conn = Connection(f"127.0.0.1:{port}")
        self.channel = grpc.insecure_channel(self.conn.target)
        self.stub = auditor_pb2_grpc.AuditorStub(self.channel)

    def stop(self) -> None:
        self.channel.close()
        self.server.stop(None).wait()

    def upload(self, model: Path) -> str:
        return self.stub.UploadModel(iter([pb.UploadModelRequest(content=model.read_bytes())])).sha256


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    """Start servers on 127.0.0.1:0 (store under tmp_path unless given); all stopped afterwards."""
    started: list[Served] = []

    def start(**settings: object) -> Served:
        settings.setdefault("store", tmp_path / "store")
        started.append(Served(ServeOptions(host="127.0.0.1", port=0, **settings)))
        return started[-1]

    yield start
    for served in started:
        served.stop()


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the tests that do not care about its settings."""
    served = Served(ServeOptions(host="127.0.0.1", port=0, store=tmp_path_factory.mktemp("store"), max_concurrent=4))
    yield served
    served.stop()


def _local(model: Path, data: str, split: str, limit: int | None, config: AuditConfig):
    return audit(model, open_splits(data, split, limit=limit), config)


def _code(caught: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return caught.value.code()


# ---- health, reflection, models -------------------------------------------------------------


def test_health_serves_the_server_and_the_auditor_service(shared: Served) -> None:
    assert check_health(shared.conn)
    assert check_health(shared.conn, "auditor.v1.Auditor")


def test_reflection_lists_and_describes_the_auditor_service(shared: Served) -> None:
    stub = reflection_pb2_grpc.ServerReflectionStub(shared.channel)
    requests = [
        reflection_pb2.ServerReflectionRequest(list_services=""),
        reflection_pb2.ServerReflectionRequest(file_containing_symbol="auditor.v1.Auditor"),
    ]
    listed, described = list(stub.ServerReflectionInfo(iter(requests)))
    names = {s.name for s in listed.list_services_response.service}
    assert {"auditor.v1.Auditor", "grpc.health.v1.Health"} <= names
    files = [
        descriptor_pb2.FileDescriptorProto.FromString(b)
        for b in described.file_descriptor_response.file_descriptor_proto
    ]
    assert any(f.package == "auditor.v1" and f.service[0].name == "Auditor" for f in files)


def test_upload_is_content_addressed_and_describe_shows_the_layers(shared: Served, mnist8: Path) -> None:
    sha = shared.upload(mnist8)
    assert shared.stub.HasModel(pb.HasModelRequest(sha256=sha)).present
    again = shared.stub.UploadModel(iter([pb.UploadModelRequest(content=mnist8.read_bytes())]))
    assert (again.sha256, again.created) == (sha, False)
    described = shared.stub.DescribeModel(pb.DescribeModelRequest(sha256=sha))
    info = prepare(mnist8).model_info
    assert (described.sha256, described.input_name) == (info.sha256, info.input_name)
    assert [(layer.name, layer.op, layer.role) for layer in described.layers] == [
        (layer.name, layer.op, layer.role) for layer in info.layers
    ]


def test_unknown_models_and_reports_are_not_found(shared: Served) -> None:
    assert not shared.stub.HasModel(pb.HasModelRequest(sha256="0" * 64)).present
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.DescribeModel(pb.DescribeModelRequest(sha256="0" * 64))
    assert _code(caught) == grpc.StatusCode.NOT_FOUND and "upload it first" in caught.value.details()
    start = pb.AuditStart(model_sha256="0" * 64, dataset=pb.DatasetRef(name="mnist", split="test", limit=8))
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter([pb.AuditRequest(start=start)])))
    assert _code(caught) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError, match="no report with id 'nope'"):
        get_report(shared.conn, "nope")


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not an onnx model", "not a readable ONNX model"), (None, "onnxruntime cannot load")],
)
def test_a_bad_model_is_invalid_argument_and_the_server_keeps_serving(
    shared: Served, tmp_path: Path, content: bytes | None, message: str
) -> None:
    content = content or _save_mlp(tmp_path / "ir14.onnx", hidden=4, ir_version=14).read_bytes()
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.UploadModel(iter([pb.UploadModelRequest(content=content)]))
    assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details() and "Traceback" not in caught.value.details()
    assert check_health(shared.conn)
    assert list_reports(shared.conn, "0" * 64) == []


def test_upload_file_names_outside_the_model_folder_are_refused(shared: Served, mnist8: Path) -> None:
    chunks = [pb.UploadModelRequest(content=mnist8.read_bytes()), pb.UploadModelRequest(file="../x", content=b"1")]
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.UploadModel(iter(chunks))
    assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "not allowed" in caught.value.details()
    assert not (shared.options.store / "x").exists()


def test_size_limits_are_resource_exhausted(serve, mnist8: Path) -> None:
    served = serve(max_model_mb=1, max_batch_mb=1)
    chunks = [pb.UploadModelRequest(content=bytes(600_000)) for _ in range(2)]
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.UploadModel(iter(chunks))
    assert _code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED and "--max-model-mb" in caught.value.details()
    sha = served.upload(mnist8)
    big = Batch(np.zeros((2000, 28, 28), np.uint8))  # 1.5 MiB in one message
    requests = [
        pb.AuditRequest(start=pb.AuditStart(model_sha256=sha)),
        pb.AuditRequest(batch=wire.batch_to_proto("test", big)),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        list(served.stub.Audit(iter(requests)))
    assert _code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED


# ---- audits ---------------------------------------------------------------------------------


def test_remote_audit_of_a_named_dataset_equals_the_local_audit(shared: Served, mnist8: Path) -> None:
    config = AuditConfig()
    seen: list[tuple[str, int]] = []
    remote = remote_audit(shared.conn, mnist8, "mnist", "both", 300, config, progress=lambda *e: seen.append(e))
    assert remote.to_dict() == _local(mnist8, "mnist", "both", 300, config).to_dict()
    assert seen[-1] == ("test", 300) and ("train", 300) in seen


def test_remote_audit_of_streamed_npz_data_equals_the_local_audit(shared: Served, mnist8: Path, tmp_path: Path) -> None:
    arrays = {}
    for split in ("train", "test"):
        x, arrays[f"y_{split}"] = load_arrays("mnist", split, limit=200)
        arrays[f"x_{split}"] = x.astype(np.float32) / 255  # float32 reaches onnxruntime without a copy
    np.savez(tmp_path / "digits.npz", **arrays)
    config = AuditConfig(beta=3.0, batch_size=48, aggregate="mean", margin_fraction=0.5, mean=0.1307, std=0.3081)
    remote = remote_audit(shared.conn, mnist8, str(tmp_path / "digits.npz"), "both", None, config)
    assert remote.to_dict() == _local(mnist8, str(tmp_path / "digits.npz"), "both", None, config).to_dict()
    [row, *_] = list_reports(shared.conn, remote.model.sha256)
    assert get_report(shared.conn, row["id"]).to_dict() == remote.to_dict()
    assert row["summary"]["test"]["aiq"] == remote.splits["test"].aiq


def test_a_model_over_4_mb_uploads_and_audits(shared: Served, big_model: Path) -> None:
    assert big_model.stat().st_size > 4 * 2**20
    config = AuditConfig(batch_size=128)
    remote = remote_audit(shared.conn, big_model, "mnist", "test", 128, config)
    assert remote.to_dict() == _local(big_model, "mnist", "test", 128, config).to_dict()


def test_a_model_with_external_data_uploads_with_its_data_file(shared: Served, tmp_path: Path) -> None:
    model = _save_mlp(tmp_path / "ext.onnx", hidden=32, external_data="ext.weights")
    config = AuditConfig(batch_size=64)
    remote = remote_audit(shared.conn, model, "mnist", "test", 64, config)
    assert remote.to_dict() == _local(model, "mnist", "test", 64, config).to_dict()
    [row] = list_reports(shared.conn, None)[:1]
    assert row["model_sha256"] != remote.model.sha256  # the address covers the weights file too
    assert shared.stub.HasModel(pb.HasModelRequest(sha256=row["model_sha256"])).present


READ_AHEAD = 20  # batches: more than the engine reads ahead of its first result (two per worker, at most 8)


def _gated(start: pb.AuditStart, batches: list[tuple[str, Batch]], gate: threading.Barrier):
    """Start and READ_AHEAD batches, then the rest once ``gate`` opens: an audit that holds its slot."""
    yield pb.AuditRequest(start=start)
    for i, (split, batch) in enumerate(batches):
        if i == READ_AHEAD:
            gate.wait(timeout=30)
        yield pb.AuditRequest(batch=wire.batch_to_proto(split, batch))


def test_four_concurrent_audits_match_and_a_fifth_is_refused(shared: Served, mnist8: Path) -> None:
    sha = shared.upload(mnist8)
    batches = list(tagged(open_splits("mnist", "test", limit=2 * READ_AHEAD * 16), 16))
    expected = audit(prepare(mnist8), batches).to_dict()
    gate = threading.Barrier(5)
    running = threading.Semaphore(0)
    results: list[dict] = []

    def run() -> None:
        start = pb.AuditStart(model_sha256=sha, model_name=MNIST8)
        responses = shared.stub.Audit(_gated(start, batches, gate))
        assert next(responses).HasField("progress")
        running.release()
        results.append(wire.report_from_proto(list(responses)[-1].report).to_dict())

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for _ in threads:
        assert running.acquire(timeout=30)
    with pytest.raises(LimitError, match="already running 4 audits"):
        remote_audit(shared.conn, mnist8, "mnist", "test", 8, AuditConfig())
    gate.wait(timeout=30)
    for thread in threads:
        thread.join(timeout=60)
    assert results == [expected] * 4


def _endless(start: pb.AuditStart, stop: threading.Event) -> Iterator[pb.AuditRequest]:
    yield pb.AuditRequest(start=start)
    batch = wire.batch_to_proto("test", Batch(np.zeros((8, 28, 28), np.uint8)))
    while not stop.is_set():
        yield pb.AuditRequest(batch=batch)
        time.sleep(0.01)


def _audit_log(caplog: pytest.LogCaptureFixture, outcome: str, timeout: float = 10) -> int:
    """Wait for the server's log line of an Audit call ending in ``outcome``; its sample count."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            found = re.match(rf"Audit model=\S+ samples=(\d+) .* outcome={outcome}$", record.getMessage())
            if found:
                return int(found.group(1))
        time.sleep(0.05)
    pytest.fail(f"no Audit log line with outcome={outcome}")


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelling_mid_stream_stops_the_server_side_audit(
    serve, mnist8: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="auditor.server")
    served = serve(max_concurrent=1)
    start = pb.AuditStart(model_sha256=served.upload(mnist8))
    stop = threading.Event()
    call = served.stub.Audit(_endless(start, stop), timeout=1.5 if how == "deadline" else None)
    with pytest.raises(grpc.RpcError) as caught:
        for seen, _ in enumerate(call, 1):
            if seen == 3 and how == "cancel":
                call.cancel()
    stop.set()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert _code(caught) == expected
    samples = _audit_log(caplog, "CANCELLED")  # logged once the audit thread has ended
    assert samples >= 24
    # The one slot is free again: the next audit runs instead of RESOURCE_EXHAUSTED.
    assert remote_audit(served.conn, mnist8, "mnist", "test", 16, AuditConfig()).splits["test"].samples == 16


def test_the_client_maps_a_deadline_to_a_one_line_cancelled_error(shared: Served, mnist8: Path) -> None:
    conn = Connection(shared.conn.target, timeout=0.001)
    with pytest.raises(CancelledError, match=r"did not answer within 0.001 s \(--timeout\)"):
        remote_audit(conn, mnist8, "mnist", "test", 1000, AuditConfig())


def test_bad_data_is_invalid_argument_with_the_engines_message(shared: Served, mnist8: Path) -> None:
    sha = shared.upload(mnist8)
    wrong = Batch(np.zeros((4, 5), np.float32))
    requests = [
        pb.AuditRequest(start=pb.AuditStart(model_sha256=sha)),
        pb.AuditRequest(batch=wire.batch_to_proto("test", wrong)),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter(requests)))
    assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "expects 1×28×28" in caught.value.details()
    dataset = pb.DatasetRef(name="/etc/passwd.npy", split="test")
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter([pb.AuditRequest(start=pb.AuditStart(model_sha256=sha, dataset=dataset))])))
    assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "resolves only" in caught.value.details()


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([], "must begin with an AuditStart"),
        (["batch"], "must begin with an AuditStart"),
        (["start", "start"], "only SampleBatch messages"),
        (["start"], "the dataset is empty"),
    ],
)
def test_audit_calls_out_of_protocol_are_invalid_argument(
    shared: Served, mnist8: Path, messages: list[str], message: str
) -> None:
    kinds = {
        "start": pb.AuditRequest(start=pb.AuditStart(model_sha256=shared.upload(mnist8))),
        "batch": pb.AuditRequest(batch=wire.batch_to_proto("test", Batch(np.zeros((1, 28, 28), np.uint8)))),
    }
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter([kinds[m] for m in messages])))
    assert _code(caught) == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


# ---- reports, restarts, errors ----------------------------------------------------------------


def test_reports_survive_a_restart_on_the_same_store(serve, mnist8: Path, tmp_path: Path) -> None:
    first = serve(store=tmp_path / "kept")
    report = remote_audit(first.conn, mnist8, "mnist", "test", 32, AuditConfig())
    [row] = list_reports(first.conn)
    first.stop()
    second = serve(store=tmp_path / "kept")
    assert list_reports(second.conn) == [row]
    assert get_report(second.conn, row["id"]).to_dict() == report.to_dict()
    assert second.stub.HasModel(pb.HasModelRequest(sha256=row["model_sha256"])).present


def test_list_reports_walks_every_page(serve, tmp_path: Path, mnist8: Path) -> None:
    served = serve()
    report = remote_audit(served.conn, mnist8, "mnist", "test", 16, AuditConfig())
    store = ReportStore(served.options.store / "reports.sqlite3")
    ids = [store.add("c" * 64, report).id for _ in range(101)]
    rows = list_reports(served.conn, "c" * 64)
    assert [row["id"] for row in rows] == ids[::-1]
    assert len(list_reports(served.conn)) == 102


def test_an_unreachable_server_is_a_one_line_audit_error_and_fails_the_health_probe(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(AuditError, match=r"^cannot reach auditor server at 127\.0\.0\.1:9: "):
        list_reports(Connection("127.0.0.1:9", timeout=5))
    assert main(["health", "--server", "127.0.0.1:9", "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: cannot reach auditor server at 127.0.0.1:9")


def test_an_unexpected_failure_is_internal_with_a_generic_message_and_logged(
    serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="auditor.server")
    served = serve()
    database = served.options.store / "reports.sqlite3"
    for path in served.options.store.glob("reports.sqlite3*"):
        path.unlink()
    database.mkdir()  # the disk under the store went bad: sqlite cannot open its file
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.ListReports(pb.ListReportsRequest())
    assert _code(caught) == grpc.StatusCode.INTERNAL
    assert caught.value.details() == "internal error in the auditor server; see its log"
    assert any("ListReports failed unexpectedly" in r.getMessage() and r.exc_info for r in caplog.records)
    assert check_health(served.conn)


def test_the_python_client_example_in_the_readme_runs(
    shared: Served, mnist8: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    text = (REPO / "README.md").read_text().split("## Run the service", 1)[1]
    example = text.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "model.onnx").write_bytes(mnist8.read_bytes())
    x, y = load_arrays("mnist", "test", limit=300)
    np.savez(tmp_path / "digits.npz", x_test=x, y_test=y)
    monkeypatch.chdir(tmp_path)
    exec(compile(example.replace("localhost:50051", shared.conn.target), "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "samples done: 300" in out
    assert re.search(r"^report [0-9a-f]{32} aIQ 0\.\d+$", out, re.MULTILINE)


def test_a_taken_port_is_a_one_line_error(shared: Served, tmp_path: Path) -> None:
    port = int(shared.conn.target.rsplit(":", 1)[1])
    with pytest.raises(AuditError, match=rf"^cannot listen on 127\.0\.0\.1:{port}: "):
        build_server(ServeOptions(host="127.0.0.1", port=port, store=tmp_path))
