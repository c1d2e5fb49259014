"""``auditor serve --ray local``: audits of server-held datasets run sharded on a real local Ray instance.

One server (and so one Ray instance, 2 CPUs) serves the whole module; its last test shuts Ray
down under it. A killed worker is a real SIGKILL to the Ray worker process running a shard.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import AUDITOR, REPO, Process, Served, Servers, eventually

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Dataset
from auditor.datasets.splits import open_splits
from auditor.errors import AuditError
from auditor.records import CANCELLED, DONE, FAILED, DatasetRef, DataSpec
from auditor.service.client import (
    Connection,
    cancel_job,
    check_health,
    get_job,
    list_reports,
    remote_audit,
    server_metadata,
    submit_job,
    watch_job,
)
from auditor.service.server import ServeOptions

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

MODEL = REPO / "examples" / "lenet300_11_4.onnx"
SMALL = DatasetRef("mnist", "both", 600)
WHOLE = DatasetRef("mnist", "train")
SLOW = AuditConfig(batch_size=4)  # small batches keep a shard running long enough to be caught at it
SHARD_TASK = b"ray::_audit_shard_task"  # the process title of a Ray worker running a shard


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    servers = Servers(tmp_path_factory.mktemp("ray-server"))
    yield servers.start(ray="local", shards=2)
    servers.stop_all()


def _local(ref: DatasetRef, config: AuditConfig | None = None) -> dict:
    return audit(prepare(MODEL), open_splits(ref.name, ref.split, limit=ref.limit), config).to_dict()


def _measured(report: dict) -> dict:
    """A report less how it ran: shards, and spilled bytes (which shards do not add up: None)."""
    return {key: value for key, value in report.items() if key not in ("sharding", "spilled_bytes")}


def _shard_workers() -> list[int]:
    """The pids of Ray workers running a shard task now."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if (entry / "cmdline").read_bytes().startswith(SHARD_TASK):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def test_metadata_names_the_cluster_and_what_it_offers(served: Served) -> None:
    meta = server_metadata(served.conn)
    assert "ray-cluster" in meta.extensions and meta.HasField("cluster")
    assert meta.cluster.reachable and meta.cluster.cpus >= 1 and meta.cluster.gpus == 0


def test_a_remote_audit_through_serve_ray_equals_a_local_one_with_progress(served: Served) -> None:
    seen: dict[str, int] = {}
    data = DataSpec(SMALL.name, SMALL.split, SMALL.limit)
    report = remote_audit(served.conn, MODEL, data, AuditConfig(), progress=lambda s, n: seen.__setitem__(s, n))
    assert _measured(report.to_dict()) == _measured(_local(SMALL))
    assert seen == {"train": 600, "test": 600}


def test_a_streamed_audit_through_serve_ray_equals_a_local_one(served: Served, tmp_path: Path) -> None:
    train, test = open_splits("mnist", "both", limit=700)
    path = tmp_path / "streamed.npz"
    arrays = {f"{key}_{d.split}": np.concatenate(parts) for d in (train, test) for key, parts in _columns(d).items()}
    np.savez(path, **arrays)
    seen: dict[str, int] = {}
    data = DataSpec(str(path), "both")
    report = remote_audit(served.conn, MODEL, data, AuditConfig(), progress=seen.__setitem__)
    local = audit(prepare(MODEL), open_splits(str(path), "both")).to_dict()
    assert _measured(report.to_dict()) == _measured(local)
    assert seen == {"train": 700, "test": 700}


def _columns(dataset: Dataset) -> dict[str, list[np.ndarray]]:
    batches = list(dataset.batches(256))
    return {"x": [b.x for b in batches], "y": [b.y for b in batches]}


def test_a_job_through_serve_ray_equals_a_local_audit(served: Served) -> None:
    job = submit_job(served.conn, MODEL, SMALL, AuditConfig())
    ended, report = watch_job(served.conn, job.id)
    assert ended.state == DONE and ended.samples == {"train": 600, "test": 600}
    assert report is not None and _measured(report.to_dict()) == _measured(_local(SMALL))


def test_cancelling_a_job_cancels_its_ray_tasks(served: Served) -> None:
    job = submit_job(served.conn, MODEL, WHOLE, SLOW)
    eventually(lambda: get_job(served.conn, job.id).samples.get("train"), 120, "the first shard's progress")
    ended = cancel_job(served.conn, job.id)
    assert ended.state == CANCELLED and "cancelled" in ended.error and ended.report_id == ""
    eventually(lambda: not _shard_workers(), 60, "the shard tasks' end")


def test_a_killed_worker_is_retried_and_the_report_still_equals_a_local_audit(served: Served) -> None:
    ref = DatasetRef("mnist", "train", 12000)
    job = submit_job(served.conn, MODEL, ref, SLOW)
    victim = eventually(_shard_workers, 120, "a Ray worker running a shard")[0]
    os.kill(victim, signal.SIGKILL)
    ended, report = watch_job(served.conn, job.id)
    assert ended.state == DONE, ended.error
    assert ended.samples == {"train": 12000}  # the retried shard's samples count once
    assert report is not None and _measured(report.to_dict()) == _measured(_local(ref, SLOW))


def test_a_shard_whose_workers_keep_dying_fails_the_job_in_one_line_and_stores_nothing(served: Served) -> None:
    before = len(list_reports(served.conn))
    job = submit_job(served.conn, MODEL, DatasetRef("mnist", "train", 12000), SLOW)
    kills = 0
    while not get_job(served.conn, job.id).ended:  # every attempt of every shard dies: Ray's two retries run out
        for pid in _shard_workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
                kills += 1
        time.sleep(0.05)
    ended = get_job(served.conn, job.id)
    assert ended.state == FAILED and kills >= 3, (ended.state, kills)
    assert ended.error.startswith("the Ray cluster lost part of the audit") and "\n" not in ended.error
    assert ended.report_id == "" and len(list_reports(served.conn)) == before


def test_a_job_a_restart_interrupts_runs_again_on_the_cluster(served: Served, tmp_path: Path) -> None:
    """Stopped with no grace mid-audit, the server cancels the job's tasks and keeps it; the next
    server on the same store runs it again from the start (both share the module's Ray instance)."""
    servers = Servers(tmp_path)
    ref = DatasetRef("mnist", "train", 12000)
    first = servers.start(ray="local", shards=2)
    job = submit_job(first.conn, MODEL, ref, SLOW)
    eventually(lambda: get_job(first.conn, job.id).samples.get("train"), 120, "the first shard's progress")
    first.stop(grace=0)
    try:
        second = servers.start(ray="local", shards=2)
        ended, report = watch_job(second.conn, job.id)
        assert (ended.state, ended.restarts, ended.samples) == (DONE, 1, {"train": 12000})
        assert report is not None and _measured(report.to_dict()) == _measured(_local(ref, SLOW))
    finally:
        servers.stop_all()


def test_health_is_not_serving_while_the_cluster_is_gone(served: Served) -> None:
    import ray

    stub = health_pb2_grpc.HealthStub(served.channel)
    status = health_pb2.HealthCheckResponse

    def health() -> int:
        return stub.Check(health_pb2.HealthCheckRequest(service="")).status

    assert health() == status.SERVING
    ray.shutdown()  # the server's Ray connection is gone under it
    eventually(lambda: health() == status.NOT_SERVING, 30, "NOT_SERVING")
    meta = server_metadata(served.conn)
    assert not meta.cluster.reachable and meta.cluster.cpus == 0
    job = submit_job(served.conn, MODEL, SMALL, AuditConfig())
    ended, report = watch_job(served.conn, job.id)
    assert (ended.state, report) == (FAILED, None)
    assert ended.error.startswith("the Ray cluster cannot be reached") and "\n" not in ended.error


def test_serve_joins_a_cluster_by_address_and_is_not_serving_once_it_is_gone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``ray start --head`` in a folder of its own, then ``auditor serve --ray 127.0.0.1:PORT`` as a
    process: a job equals a local audit; once the head stops, health turns NOT_SERVING and SIGTERM
    still stops the server. Ray >= 2.59 wants the same token on both sides (RAY_AUTH_MODE=token)."""
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(16))
    port, folder = _free_port(), tempfile.mkdtemp(prefix="ray-", dir="/tmp")  # short: Ray's socket paths
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", "--port", str(port),
         "--num-cpus", "1", "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", folder],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    server = None
    try:
        server = Process([*AUDITOR, "serve", "--port", "0", "--store", str(tmp_path), "--ray", f"127.0.0.1:{port}"])
        conn = Connection(server.target)
        assert server_metadata(conn).cluster.cpus == 1
        ended, report = watch_job(conn, submit_job(conn, MODEL, SMALL, AuditConfig()).id)
        assert ended.state == DONE and report is not None
        assert _measured(report.to_dict()) == _measured(_local(SMALL))
        assert check_health(conn)
        _stop(head)
        eventually(lambda: not check_health(conn), 60, "NOT_SERVING")
        assert server.terminate() == 0
    finally:
        if server is not None and server.popen.poll() is None:
            server.kill()
        _stop(head)
        for pid in _processes_under(folder):  # what the head started, should any outlive it
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(folder, ignore_errors=True)


def _stop(head: subprocess.Popen) -> None:
    """Stop ``ray start --block`` the way it expects: SIGTERM, and it stops what it started."""
    if head.poll() is None:
        head.terminate()
        head.wait(timeout=60)


def _processes_under(folder: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if folder.encode() in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_serve_ray_refuses_bad_flags_in_one_line(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="--shards needs --ray"):
        ServeOptions(store=tmp_path, shards=2)
    with pytest.raises(AuditError, match="--shards must be between 1 and"):
        ServeOptions(store=tmp_path, ray="local", shards=0)
