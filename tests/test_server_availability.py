"""A shared server under many clients, quiet ones and hostile ones: it queues, never starves, and retries work.

Every server here is real, on 127.0.0.1; every client is a real gRPC channel. No test asserts
how long anything takes, only what happens and in which order.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from servers import MNIST8, Served, code, eventually, gated, serving, silent, zeros_batch

from auditor import AuditConfig, audit, prepare
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.datasets.splits import open_splits
from auditor.errors import LimitError
from auditor.records import DataSpec
from auditor.service.client import check_health, list_reports, remote_audit
from auditor.service.options import Connection
from auditor.service.transport import RETRY_LATER


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    yield from serving(tmp_path)


@pytest.fixture(scope="module")
def model(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """mnist-8 under the name the remote reports give it."""
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes((shared_models / MNIST8).read_bytes())
    return path


CONFIG = AuditConfig(batch_size=32)


@pytest.fixture(scope="module")
def expected(model: Path) -> dict:
    """The local report every remote audit of the first 64 MNIST test images must equal."""
    return audit(prepare(model), open_splits("mnist", "test", limit=64), CONFIG).to_dict()


def _audit(served: Served, model: Path, timeout: float = 120, **callbacks: Callable[[int], None]) -> dict:
    conn = Connection(served.conn.target, timeout=timeout)
    return remote_audit(conn, model, DataSpec("mnist", "test", 64), CONFIG, **callbacks).to_dict()


def _holding(served: Served, model: Path, count: int, gate: threading.Event) -> list[Iterator[pb.AuditResponse]]:
    """``count`` audits that start, take a slot each, and wait for ``gate`` before finishing."""
    start = pb.AuditStart(model_sha256=served.upload(model))
    calls = [served.stub.Audit(gated(start, gate)) for _ in range(count)]
    for call in calls:
        assert next(call).HasField("progress")
    return calls


# ---- the queue ------------------------------------------------------------------------------


@pytest.mark.slow
def test_eight_concurrent_audits_against_a_default_server_all_finish_and_the_queue_says_where_they_wait(
    serve, model: Path, expected: dict
) -> None:
    served = serve()  # the defaults: 2 audits at once, 64 queued
    assert (served.options.max_concurrent, served.options.max_queued) == (2, 64)
    gate = threading.Event()
    holders = _holding(served, model, 2, gate)  # both slots taken until the gate opens
    positions: dict[int, list[int]] = {i: [] for i in range(8)}
    results: dict[int, dict] = {}

    def run(i: int) -> None:
        results[i] = _audit(served, model, queued=positions[i].append)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    eventually(lambda: all(positions.values()), what="every audit hearing its queue position")
    assert sorted(p[0] for p in positions.values()) == list(range(8))  # first come, first served
    gate.set()
    for thread in threads:
        thread.join(timeout=120)
    for call in holders:
        assert list(call)[-1].report.summary.splits["test"].samples == 320
    assert list(results.values()) == [expected] * 8
    assert all(p == sorted(p, reverse=True) for p in positions.values())  # places only ever move up


def test_a_full_queue_is_resource_exhausted_marked_retryable_and_the_client_waits_it_out(
    serve, model: Path, expected: dict
) -> None:
    served = serve(max_concurrent=1, max_queued=1)
    gate = threading.Event()
    [holder] = _holding(served, model, 1, gate)
    start = pb.AuditStart(model_sha256=served.upload(model))
    waiting = served.stub.Audit(gated(start, gate))
    assert next(waiting).progress.queue_position == 0
    with pytest.raises(grpc.RpcError) as caught:  # this raw channel has no retry policy
        list(served.stub.Audit(iter([pb.AuditRequest(start=start), pb.AuditRequest(batch=zeros_batch())])))
    assert code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "--max-queued" in caught.value.details()
    assert RETRY_LATER[0] in [tuple(m) for m in caught.value.trailing_metadata()]
    # The CLI's client retries a full queue with backoff until its --timeout: it gets in once the gate opens.
    result: list[dict] = []
    retried = threading.Thread(target=lambda: result.append(_audit(served, model)))
    retried.start()
    time.sleep(1)  # let it be refused a few times first
    gate.set()
    retried.join(timeout=150)
    assert list(holder)[-1].HasField("report") and list(waiting)[-1].HasField("report")
    assert result == [expected]


def test_with_no_queue_a_busy_server_refuses_at_once(serve, model: Path) -> None:
    served = serve(max_concurrent=1, max_queued=0)
    gate = threading.Event()
    [holder] = _holding(served, model, 1, gate)
    with pytest.raises(LimitError, match=r"running 1 audits and 0 more are queued"):
        remote_audit(Connection(served.conn.target, timeout=1), model, DataSpec("mnist", "test", 8), AuditConfig())
    gate.set()
    assert list(holder)[-1].HasField("report")


def test_the_client_retries_until_the_server_comes_up(serve) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    rows: list[list] = []
    client = threading.Thread(target=lambda: rows.append(list_reports(Connection(f"127.0.0.1:{port}", timeout=60))))
    client.start()
    time.sleep(1)  # the client finds nobody there, and keeps trying
    serve(port=port)
    client.join(timeout=90)
    assert rows == [[]]


# ---- quiet and hostile clients ----------------------------------------------------------------


def test_quiet_clients_cannot_lock_out_others(serve, model: Path, expected: dict) -> None:
    served = serve(max_concurrent=1, idle_timeout=1)
    start = pb.AuditStart(model_sha256=served.upload(model))
    release = threading.Event()

    def quiet_after_one_batch() -> Iterator[pb.AuditRequest]:
        yield pb.AuditRequest(start=start)
        yield pb.AuditRequest(batch=zeros_batch())
        release.wait(timeout=120)

    after_start = served.stub.Audit(silent(start, release))  # never takes a slot: it never sends a batch
    holding = served.stub.Audit(quiet_after_one_batch())  # takes the one slot, then goes quiet
    upload = served.stub.UploadModel.future(silent(None, release))  # an upload that never sends a byte
    try:
        assert _audit(served, model) == expected
        for call in (after_start, holding):
            with pytest.raises(grpc.RpcError) as caught:
                list(call)
            assert code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "sent nothing for 1 s (serve --idle-timeout)" in caught.value.details()
        with pytest.raises(grpc.RpcError) as caught:
            upload.result(timeout=60)
        assert code(caught) == grpc.StatusCode.RESOURCE_EXHAUSTED and "--idle-timeout" in caught.value.details()
    finally:
        release.set()


def test_health_and_the_cheap_calls_answer_while_20_idle_streams_are_open(serve, model: Path, expected: dict) -> None:
    served = serve()  # default idle timeout: the streams stay open for the whole test
    sha = served.upload(model)
    start = pb.AuditStart(model_sha256=sha)
    release = threading.Event()
    idle = [served.stub.UploadModel.future(silent(None, release)) for _ in range(10)]
    idle += [served.stub.Audit(silent(start, release)) for _ in range(10)]
    try:
        eventually(lambda: served.stub.HasModel(pb.HasModelRequest(sha256=sha), timeout=5).present)
        for _ in range(3):
            assert check_health(Connection(served.conn.target, timeout=5))
            assert served.stub.HasModel(pb.HasModelRequest(sha256=sha), timeout=5).present
            assert served.stub.DescribeModel(pb.DescribeModelRequest(sha256=sha), timeout=5).layers
            assert served.stub.ListReports(pb.ListReportsRequest(), timeout=5) is not None
            assert served.stub.ListJobs(pb.ListJobsRequest(), timeout=5) is not None
            assert served.stub.ServerMetadata(pb.ServerMetadataRequest(), timeout=5).name == "onnx-auditor"
        with pytest.raises(grpc.RpcError) as caught:
            served.stub.GetReport(pb.GetReportRequest(id="0" * 32), timeout=5)
        assert code(caught) == grpc.StatusCode.NOT_FOUND
        assert _audit(served, model) == expected  # and audits still run: quiet streams never took a slot
    finally:
        release.set()
        for call in idle:
            call.cancel()
