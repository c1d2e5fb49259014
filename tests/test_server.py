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
from refusals import refused
from servers import MNIST8, REPO, Served, code, eventually, save_mlp, serving

from auditor import AuditConfig, audit, prepare
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.datasets.batches import Batch
from auditor.datasets.splits import load_arrays, open_splits
from auditor.engine.prepare import describe_model
from auditor.errors import AuditError, NotFoundError
from auditor.records import DataSpec
from auditor.service import wire
from auditor.service.client import check_health, get_report, list_reports, main, remote_audit, server_metadata
from auditor.service.options import Connection, ServeOptions
from auditor.service.persist import ReportStore
from auditor.service.server import build_server


@pytest.fixture(scope="module")
def mnist8(shared_models: Path) -> Path:
    return shared_models / MNIST8


@pytest.fixture(scope="module")
def big_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 784-1500-10 MLP: 4.7 MB of weights, over gRPC's default 4 MB message size."""
    return save_mlp(tmp_path_factory.mktemp("big") / "big.onnx", hidden=1500)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    yield from serving(tmp_path)


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    """One server for the tests that do not care about its settings."""
    served = Served(ServeOptions(host="127.0.0.1", port=0, store=tmp_path_factory.mktemp("store"), max_concurrent=4))
    yield served
    served.stop()


def _local(model: Path, data: str, split: str, limit: int | None, config: AuditConfig):
    return audit(prepare(model, device=config.device), open_splits(data, split, limit=limit), config)


# ---- health, reflection, models, metadata -----------------------------------------------------


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


def test_server_metadata_names_the_server_its_limits_and_features(serve) -> None:
    served = serve(max_concurrent=3, max_queued=5, idle_timeout=7.5, max_model_mb=2, max_batch_mb=1)
    meta = server_metadata(served.conn)
    assert (meta.name, meta.version) == ("onnx-auditor", "0.1.0")
    assert {"audit-stream", "jobs", "server-datasets", "health", "reflection"} <= set(meta.extensions)
    assert "metrics" not in meta.extensions and "bearer-token" not in meta.extensions
    limits = meta.limits
    assert (limits.max_concurrent, limits.max_queued, limits.idle_timeout_seconds) == (3, 5, 7.5)
    assert (limits.max_model_bytes, limits.audit_memory_bytes, limits.page_size) == (2 * 2**20, 2**30, 100)
    assert list(meta.datasets) == ["mnist", "fashion-mnist"]


def test_upload_is_content_addressed_and_describe_gives_what_describe_model_gives(shared: Served, mnist8: Path) -> None:
    sha = shared.upload(mnist8)
    assert shared.stub.HasModel(pb.HasModelRequest(sha256=sha)).present
    again = shared.stub.UploadModel(iter([pb.UploadModelRequest(content=mnist8.read_bytes())]))
    assert (again.sha256, again.created) == (sha, False)
    described = shared.stub.DescribeModel(pb.DescribeModelRequest(sha256=sha))
    info = describe_model(mnist8)
    assert (described.sha256, described.input_name) == (info.sha256, info.input_name)
    assert [(layer.name, layer.op, layer.role, layer.neurons, layer.positions) for layer in described.layers] == [
        (layer.name, layer.op, layer.role, layer.neurons, layer.positions) for layer in info.layers
    ]


def test_unknown_models_and_reports_are_not_found(shared: Served) -> None:
    assert not shared.stub.HasModel(pb.HasModelRequest(sha256="0" * 64)).present
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.DescribeModel(pb.DescribeModelRequest(sha256="0" * 64))
    assert code(caught) == grpc.StatusCode.NOT_FOUND and "upload it first" in caught.value.details()
    start = pb.AuditStart(model_sha256="0" * 64, dataset=pb.DatasetRef(name="mnist", split="test", limit=8))
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter([pb.AuditRequest(start=start)])))
    assert code(caught) == grpc.StatusCode.NOT_FOUND
    with pytest.raises(NotFoundError, match=f"no report with id {'0' * 32!r}"):
        get_report(shared.conn, "0" * 32)


@pytest.mark.parametrize(
    ("content", "message"),
    [(b"this is not an onnx model", "not a readable ONNX model"), (None, "onnxruntime cannot load")],
)
def test_a_bad_model_is_invalid_argument_and_the_server_keeps_serving(
    shared: Served, tmp_path: Path, content: bytes | None, message: str
) -> None:
    if content is None:
        model = onnx.load_model(save_mlp(tmp_path / "ir14.onnx", hidden=4))
        model.ir_version = 14  # onnxruntime 1.31 reads IR <= 13 (FIELD-NOTES)
        content = model.SerializeToString()
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.UploadModel(iter([pb.UploadModelRequest(content=content)]))
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT
    assert message in caught.value.details() and "Traceback" not in caught.value.details()
    assert check_health(shared.conn)
    assert list_reports(shared.conn, "0" * 64) == []


def test_upload_file_names_outside_the_model_folder_are_refused(shared: Served, mnist8: Path) -> None:
    chunks = [pb.UploadModelRequest(content=mnist8.read_bytes()), pb.UploadModelRequest(file="../x", content=b"1")]
    with pytest.raises(grpc.RpcError) as caught:
        shared.stub.UploadModel(iter(chunks))
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "not allowed" in caught.value.details()
    assert not (shared.options.store / "x").exists()


# ---- audits ---------------------------------------------------------------------------------


def test_remote_audit_of_a_named_dataset_equals_the_local_audit(shared: Served, mnist8: Path) -> None:
    config = AuditConfig()
    seen: list[tuple[str, int]] = []
    data = DataSpec("mnist", "both", 300)
    remote = remote_audit(shared.conn, mnist8, data, config, progress=lambda *e: seen.append(e))
    assert remote.to_dict() == _local(mnist8, "mnist", "both", 300, config).to_dict()
    assert seen[-1] == ("test", 300) and ("train", 300) in seen


def test_remote_audit_of_streamed_npz_data_equals_the_local_audit(shared: Served, mnist8: Path, tmp_path: Path) -> None:
    arrays = {}
    for split in ("train", "test"):
        x, arrays[f"y_{split}"] = load_arrays("mnist", split, limit=200)
        arrays[f"x_{split}"] = x.astype(np.float32) / 255  # float32 reaches onnxruntime without a copy
    np.savez(tmp_path / "digits.npz", **arrays)
    config = AuditConfig(beta=3.0, batch_size=48, aggregate="mean", margin_fraction=0.5, mean=0.1307, std=0.3081)
    remote = remote_audit(shared.conn, mnist8, DataSpec(str(tmp_path / "digits.npz"), "both", None), config)
    assert remote.to_dict() == _local(mnist8, str(tmp_path / "digits.npz"), "both", None, config).to_dict()
    [row, *_] = list_reports(shared.conn, remote.model.sha256)
    assert get_report(shared.conn, row["id"]).to_dict() == remote.to_dict()
    assert row["summary"]["test"]["aiq"] == remote.splits["test"].aiq


def test_a_model_over_4_mb_uploads_and_audits(shared: Served, big_model: Path) -> None:
    assert big_model.stat().st_size > 4 * 2**20
    config = AuditConfig(batch_size=128)
    remote = remote_audit(shared.conn, big_model, DataSpec("mnist", "test", 128), config)
    assert remote.to_dict() == _local(big_model, "mnist", "test", 128, config).to_dict()


@pytest.mark.parametrize("location", ["ext.weights", "weights/w.bin", "a/b/c.bin"])
def test_a_model_with_external_data_audits_the_same_locally_and_remotely(
    shared: Served, tmp_path: Path, location: str
) -> None:
    """One rule for data file names on both ends: a subfolder audits locally and through the store."""
    model = save_mlp(tmp_path / "ext.onnx", hidden=32, external_data=location)
    config = AuditConfig(batch_size=64)
    remote = remote_audit(shared.conn, model, DataSpec("mnist", "test", 64), config)
    assert remote.to_dict() == _local(model, "mnist", "test", 64, config).to_dict()
    [row] = list_reports(shared.conn, None)[:1]
    assert row["model_sha256"] != remote.model.sha256  # the content address covers the weights file too
    assert (shared.options.store / "models" / row["model_sha256"] / location).is_file()
    assert shared.stub.HasModel(pb.HasModelRequest(sha256=row["model_sha256"])).present


def _endless(start: pb.AuditStart, stop: threading.Event) -> Iterator[pb.AuditRequest]:
    yield pb.AuditRequest(start=start)
    batch = wire.batch_to_proto("test", Batch(np.zeros((8, 28, 28), np.uint8)))
    while not stop.is_set():
        yield pb.AuditRequest(batch=batch)
        time.sleep(0.01)


def _audit_log(caplog: pytest.LogCaptureFixture, outcome: str) -> bool:
    """Whether the server logged an Audit call ending in ``outcome``."""
    return any(re.match(rf"Audit model=\S+ .* outcome={outcome}$", r.getMessage()) for r in caplog.records)


@pytest.mark.parametrize("how", ["cancel", "deadline"])
def test_cancelling_mid_stream_stops_the_server_side_audit(
    serve, mnist8: Path, caplog: pytest.LogCaptureFixture, how: str
) -> None:
    caplog.set_level(logging.INFO, logger="auditor.service.server")
    served = serve(max_concurrent=1, max_queued=0)
    start = pb.AuditStart(model_sha256=served.upload(mnist8))
    stop = threading.Event()
    call = served.stub.Audit(_endless(start, stop), timeout=1.5 if how == "deadline" else None)
    with pytest.raises(grpc.RpcError) as caught:
        for seen, _ in enumerate(call, 1):
            if seen == 3 and how == "cancel":
                call.cancel()
    stop.set()
    expected = grpc.StatusCode.CANCELLED if how == "cancel" else grpc.StatusCode.DEADLINE_EXCEEDED
    assert code(caught) == expected
    eventually(lambda: _audit_log(caplog, "CANCELLED"), what="the Audit log line")  # once its thread has ended
    # The one slot is free again (and the queue holds none): the next audit runs at once.
    assert remote_audit(served.conn, mnist8, DataSpec("mnist", "test", 16), AuditConfig()).splits["test"].samples == 16


def test_the_client_maps_a_deadline_to_a_one_line_error_naming_the_timeout(shared: Served, mnist8: Path) -> None:
    conn = Connection(shared.conn.target, timeout=0.001)
    # Whether the channel even connected in 1 ms decides which: "cannot reach" or "did not answer".
    data = DataSpec("mnist", "test", 1000)
    refused(AuditError, lambda: remote_audit(conn, mnist8, data, AuditConfig()), "0.001 s (--timeout)")


def test_bad_data_is_invalid_argument_with_the_engines_message(shared: Served, mnist8: Path) -> None:
    sha = shared.upload(mnist8)
    wrong = Batch(np.zeros((4, 5), np.float32))
    requests = [
        pb.AuditRequest(start=pb.AuditStart(model_sha256=sha)),
        pb.AuditRequest(batch=wire.batch_to_proto("test", wrong)),
    ]
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter(requests)))
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "expects 1×28×28" in caught.value.details()
    dataset = pb.DatasetRef(name="/etc/passwd.npy", split="test")
    with pytest.raises(grpc.RpcError) as caught:
        list(shared.stub.Audit(iter([pb.AuditRequest(start=pb.AuditStart(model_sha256=sha, dataset=dataset))])))
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "resolves only" in caught.value.details()


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
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT and message in caught.value.details()


# ---- reports, restarts, errors ----------------------------------------------------------------


def test_reports_survive_a_restart_on_the_same_store(serve, mnist8: Path, tmp_path: Path) -> None:
    first = serve(store=tmp_path / "kept")
    report = remote_audit(first.conn, mnist8, DataSpec("mnist", "test", 32), AuditConfig())
    [row] = list_reports(first.conn)
    first.stop()
    second = serve(store=tmp_path / "kept")
    assert list_reports(second.conn) == [row]
    assert get_report(second.conn, row["id"]).to_dict() == report.to_dict()
    assert second.stub.HasModel(pb.HasModelRequest(sha256=row["model_sha256"])).present


def test_list_reports_walks_every_page(serve, mnist8: Path) -> None:
    served = serve()
    report = remote_audit(served.conn, mnist8, DataSpec("mnist", "test", 16), AuditConfig())
    store = ReportStore(served.options.store / "reports.sqlite3")
    ids = [store.add("c" * 64, report).id for _ in range(101)]
    rows = list_reports(served.conn, "c" * 64)
    assert [row["id"] for row in rows] == ids[::-1]
    assert len(list_reports(served.conn)) == 102


def test_an_unreachable_server_is_a_one_line_audit_error_and_fails_the_health_probe(
    capsys: pytest.CaptureFixture,
) -> None:
    with pytest.raises(AuditError, match=r"^cannot reach auditor server at 127\.0\.0\.1:9: "):
        list_reports(Connection("127.0.0.1:9", timeout=2))
    assert main(["health", "--server", "127.0.0.1:9", "--timeout", "5"]) == 1
    assert capsys.readouterr().err.startswith("unhealthy: cannot reach auditor server at 127.0.0.1:9")


def test_an_unexpected_failure_is_internal_with_a_generic_message_and_logged(
    serve, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="auditor.service.server")
    served = serve()
    database = served.options.store / "reports.sqlite3"
    for path in served.options.store.glob("reports.sqlite3*"):
        path.unlink()
    database.mkdir()  # the disk under the store went bad: sqlite cannot open its file
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.ListReports(pb.ListReportsRequest())
    assert code(caught) == grpc.StatusCode.INTERNAL
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
    with pytest.raises(AuditError, match=rf"^cannot listen on 127\.0\.0\.1:{shared.port}: "):
        build_server(ServeOptions(host="127.0.0.1", port=shared.port, store=tmp_path))


def test_each_audit_gets_at_most_the_servers_memory_budget(serve, mnist8: Path) -> None:
    served = serve(audit_memory=256 << 20)
    assert server_metadata(served.conn).limits.audit_memory_bytes == 256 << 20
    for asked, given in [(AuditConfig(), 256 << 20), (AuditConfig(memory_budget=128 << 20), 128 << 20)]:
        report = remote_audit(served.conn, mnist8, DataSpec("mnist", "test", 16), asked)
        assert report.config["memory_budget"] == given


def test_serve_flags_map_onto_the_options() -> None:
    from auditor.cli import build_parser

    args = build_parser().parse_args(
        ["serve", "--max-queued", "3", "--idle-timeout", "2.5", "--audit-memory", "512M", "--metrics-port", "0"]
    )
    options = ServeOptions(**{f: getattr(args, f) for f in ServeOptions.__dataclass_fields__})
    assert (options.max_queued, options.idle_timeout, options.audit_memory, options.metrics_port) == (
        3,
        2.5,
        512 << 20,
        0,
    )


@pytest.mark.parametrize(
    ("setting", "fragment"),
    [
        ({"port": 65536}, "--port must be in 0..65535"),
        ({"port": -1}, "--port must be in 0..65535"),
        ({"max_batch_mb": 100_000}, "--max-batch-mb must be in 1..2047"),
        ({"max_batch_mb": 0}, "--max-batch-mb must be in 1..2047"),
        ({"metrics_port": 65536}, "--metrics-port must be in 0..65535"),
        ({"audit_memory": 1024}, "--audit-memory must be between 64M and 1P"),
    ],
)
def test_server_options_out_of_range_are_refused_before_anything_binds(
    tmp_path: Path, setting: dict, fragment: str
) -> None:
    refused(AuditError, lambda: ServeOptions(store=tmp_path, **setting), fragment)
    assert not list(tmp_path.iterdir())  # nothing was claimed or written
