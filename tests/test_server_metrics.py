"""The Prometheus endpoint of a real server, scraped over HTTP and parsed by prometheus_client itself."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families
from servers import MNIST8, Served, eventually, gated, serving, zeros_batch

from auditor import AuditConfig
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.records import DatasetRef, DataSpec
from auditor.service.client import remote_audit, server_metadata, submit_job, watch_job


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    yield from serving(tmp_path)


def scrape(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample on /metrics, by (name, labels)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{served.server.metrics_port}/metrics", timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_audits_samples_durations_uploads_and_the_queue_are_counted(serve, shared_models: Path) -> None:
    served = serve(max_concurrent=1, metrics_port=0)
    assert "metrics" in server_metadata(served.conn).extensions
    model = shared_models / MNIST8
    remote_audit(served.conn, model, DataSpec("mnist", "both", 100), AuditConfig())
    watch_job(served.conn, submit_job(served.conn, model, DatasetRef("mnist", "test", 50), AuditConfig()).id)
    with pytest.raises(grpc.RpcError):
        bad = pb.SampleBatch(split="test", samples=pb.Tensor(datatype="FP32", shape=[2, 5], raw_contents=bytes(40)))
        start = pb.AuditStart(model_sha256=served.upload(model))
        list(served.stub.Audit(iter([pb.AuditRequest(start=start), pb.AuditRequest(batch=bad)])))
    metrics = scrape(served)
    assert metrics[("auditor_audits_total", (("outcome", "done"),))] == 2
    assert metrics[("auditor_audits_total", (("outcome", "failed"),))] == 1
    assert metrics[("auditor_samples_total", ())] == 250
    assert metrics[("auditor_audit_duration_seconds_count", ())] == 3
    assert metrics[("auditor_upload_bytes_total", ())] == 2 * model.stat().st_size  # the CLI's upload and ours
    assert metrics[("auditor_spilled_bytes_total", ())] == 0
    assert metrics[("auditor_queue_depth", ())] == 0 and metrics[("auditor_audits_running", ())] == 0


def test_the_queue_depth_and_running_audits_are_live(serve, shared_models: Path) -> None:
    served = serve(max_concurrent=1, metrics_port=0)
    start = pb.AuditStart(model_sha256=served.upload(shared_models / MNIST8))
    gate = threading.Event()
    running = served.stub.Audit(gated(start, gate))
    assert next(running).HasField("progress")
    waiting = served.stub.Audit(gated(start, gate))
    assert next(waiting).progress.queue_position == 0
    metrics = scrape(served)
    assert (metrics[("auditor_audits_running", ())], metrics[("auditor_queue_depth", ())]) == (1, 1)
    gate.set()
    assert list(running)[-1].HasField("report") and list(waiting)[-1].HasField("report")
    eventually(lambda: scrape(served)[("auditor_audits_running", ())] == 0, what="the slots freed")
    third = served.stub.Audit(iter([pb.AuditRequest(start=start), pb.AuditRequest(batch=zeros_batch())]))
    assert list(third)[-1].HasField("report")
    assert scrape(served)[("auditor_audits_total", (("outcome", "done"),))] == 3


def test_without_metrics_port_nothing_listens(serve) -> None:
    served = serve()
    assert served.server.metrics_port is None
    assert "metrics" not in server_metadata(served.conn).extensions
