"""Detached jobs on a real server: submit, watch, list, cancel, fail with a reason, survive restarts."""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from models import mlp, save
from refusals import refused
from servers import AUDITOR, MNIST8, REPO, Process, Served, code, eventually, processes, serving

from auditor import AuditConfig, audit, prepare
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.datasets.splits import open_splits
from auditor.errors import AuditError, LimitError, NotFoundError
from auditor.records import CANCELLED, DONE, FAILED, QUEUED, RUNNING, DatasetRef
from auditor.service.client import (
    Connection,
    cancel_job,
    get_job,
    get_report,
    list_jobs,
    submit_job,
    watch_job,
)


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Callable[..., Served]]:
    yield from serving(tmp_path)


@pytest.fixture(name="processes")
def processes_fixture() -> Iterator[list[Process]]:
    yield from processes()


@pytest.fixture(scope="module")
def model(shared_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("model") / "model.onnx"
    path.write_bytes((shared_models / MNIST8).read_bytes())
    return path


def _local(model: Path, ref: DatasetRef, config: AuditConfig | None = None) -> dict:
    return audit(prepare(model), open_splits(ref.name, ref.split, limit=ref.limit), config).to_dict()


SMALL = DatasetRef("mnist", "both", 200)
WHOLE = DatasetRef("mnist", "train")  # 60,000 samples: long enough to be caught running


def test_a_job_runs_to_a_report_equal_to_a_local_audit_and_is_listed(serve, model: Path) -> None:
    served = serve()
    job = submit_job(served.conn, model, SMALL, AuditConfig(beta=3.0))
    assert len(job.id) == 32 and job.state in (QUEUED, RUNNING) and job.spec.dataset == SMALL
    states: list[str] = []
    ended, report = watch_job(served.conn, job.id, on_change=lambda j: states.append(j.state))
    assert ended.state == DONE and ended.error == "" and ended.samples == {"train": 200, "test": 200}
    assert states[-1] == DONE and RUNNING in states
    assert report is not None and report.to_dict() == _local(model, SMALL, AuditConfig(beta=3.0))
    assert get_report(served.conn, ended.report_id).to_dict() == report.to_dict()
    [listed] = list_jobs(served.conn)
    assert listed == ended == get_job(served.conn, job.id)
    assert listed.finished is not None and listed.started is not None and listed.restarts == 0


def test_a_job_that_fails_says_why_in_one_line_without_server_paths(serve, tmp_path: Path) -> None:
    served = serve()
    wrong = save(mlp([10, 4, 3]), tmp_path / "ten_inputs.onnx")  # MNIST images do not fit a 10-wide input
    job = submit_job(served.conn, wrong, SMALL, AuditConfig())
    ended, report = watch_job(served.conn, job.id)
    assert (ended.state, report) == (FAILED, None)
    assert "\n" not in ended.error and "expects" in ended.error
    assert str(served.options.store) not in ended.error


def test_queued_and_running_jobs_can_be_cancelled_and_an_ended_job_stays_as_it_is(serve, model: Path) -> None:
    served = serve(max_concurrent=1)
    running = submit_job(served.conn, model, WHOLE, AuditConfig())
    queued = submit_job(served.conn, model, SMALL, AuditConfig())
    assert queued.queue_position == 0
    eventually(lambda: sum(get_job(served.conn, running.id).samples.values()) > 0, what="the first job running")
    stopped = cancel_job(served.conn, queued.id)
    assert (stopped.state, stopped.error) == (CANCELLED, "cancelled while queued (CancelJob)")
    stopped = cancel_job(served.conn, running.id)
    assert stopped.state == CANCELLED and stopped.error.startswith("cancelled after ")
    assert cancel_job(served.conn, running.id) == stopped
    assert [job.state for job in list_jobs(served.conn)] == [CANCELLED, CANCELLED]


def test_bad_submissions_are_refused_cleanly(serve, model: Path) -> None:
    served = serve(max_concurrent=1, max_queued=0)
    start = pb.AuditStart(model_sha256=served.upload(model))
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.SubmitJob(pb.SubmitJobRequest(audit=start))
    assert code(caught) == grpc.StatusCode.INVALID_ARGUMENT and "DatasetRef" in caught.value.details()
    missing = pb.AuditStart(model_sha256="0" * 64, dataset=pb.DatasetRef(name="mnist"))
    with pytest.raises(grpc.RpcError) as caught:
        served.stub.SubmitJob(pb.SubmitJobRequest(audit=missing))
    assert code(caught) == grpc.StatusCode.NOT_FOUND
    refused(NotFoundError, lambda: get_job(served.conn, "0" * 32), "no job with id")
    refused(AuditError, lambda: get_job(served.conn, "x" * 33), "32 lowercase hex digits")
    submit_job(served.conn, model, WHOLE, AuditConfig())  # takes the only slot; no queue behind it
    full = Connection(served.conn.target, timeout=1)
    refused(LimitError, lambda: submit_job(full, model, SMALL, AuditConfig()), "--max-queued")


def test_a_job_interrupted_by_a_shutdown_runs_again_at_the_next_start(serve, model: Path, tmp_path: Path) -> None:
    first = serve(store=tmp_path / "kept", max_concurrent=1)
    running = submit_job(first.conn, model, WHOLE, AuditConfig())
    queued = submit_job(first.conn, model, SMALL, AuditConfig())
    eventually(lambda: sum(get_job(first.conn, running.id).samples.values()) > 0, what="the first job running")
    first.stop(grace=0)  # no time to finish: the running job is interrupted, not cancelled
    second = serve(store=tmp_path / "kept", max_concurrent=1)
    interrupted = get_job(second.conn, running.id)
    assert (interrupted.state in (QUEUED, RUNNING), interrupted.restarts) == (True, 1)
    assert get_job(second.conn, queued.id).state == QUEUED
    cancel_job(second.conn, running.id)  # (only to spare the test the whole run)
    again, report = watch_job(second.conn, queued.id)
    assert (again.state, again.restarts) == (DONE, 0)
    assert report is not None and report.to_dict() == _local(model, SMALL)


def test_a_second_server_on_a_store_in_use_is_refused_and_leaves_the_first_ones_work_alone(
    serve, model: Path, tmp_path: Path
) -> None:
    store = tmp_path / "shared-store"
    first = serve(store=store, max_concurrent=1)
    running = submit_job(first.conn, model, WHOLE, AuditConfig())
    eventually(lambda: sum(get_job(first.conn, running.id).samples.values()) > 0, what="the first job running")
    content, release = model.read_bytes(), threading.Event()

    def upload() -> Iterator[pb.UploadModelRequest]:  # an upload in flight: half sent, then waits
        yield pb.UploadModelRequest(content=content[: len(content) // 2])
        release.wait(timeout=60)
        yield pb.UploadModelRequest(content=content[len(content) // 2 :])

    uploaded: list[str] = []
    sender = threading.Thread(target=lambda: uploaded.append(first.stub.UploadModel(upload()).sha256))
    sender.start()
    eventually(lambda: any((store / "models" / ".staging").iterdir()), what="the upload staged")
    for same in (store, store / ".", tmp_path / "." / "shared-store"):  # however the path is spelled
        refused(AuditError, lambda same=same: serve(store=same), "is in use by another auditor server", "--store")
    release.set()
    sender.join(timeout=60)
    assert uploaded == [first.upload(model)]  # the upload was not cleaned away as a leftover
    job = get_job(first.conn, running.id)
    assert (job.state, job.restarts) == (RUNNING, 0)  # not queued again by the refused server
    cancel_job(first.conn, running.id)


@pytest.mark.slow
def test_a_detached_job_survives_kill_9_and_a_restart(processes: list[Process], model: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    serve = [*AUDITOR, "serve", "--port", "0", "--store", str(store), "--max-concurrent", "1"]
    processes.append(Process(serve))
    conn = Connection(processes[0].target, timeout=120)
    running = submit_job(conn, model, WHOLE, AuditConfig())
    queued = submit_job(conn, model, SMALL, AuditConfig())
    eventually(lambda: sum(get_job(conn, running.id).samples.values()) > 0, what="the first job running")
    second = subprocess.run(serve, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert (second.returncode, second.stdout) == (2, "")
    assert second.stderr.splitlines() == [
        f"auditor: error: the store {store} is in use by another auditor server (pid {processes[0].popen.pid}); "
        "stop that server or give another --store"
    ]
    assert get_job(conn, running.id).restarts == 0
    processes[0].kill()  # SIGKILL: no shutdown, no goodbye; the kernel drops the store's lock
    processes.append(Process(serve))
    conn = Connection(processes[1].target, timeout=300)
    assert any("queued again 2 job(s)" in line for line in processes[1].log)  # logged before "serving"
    again, report = watch_job(conn, queued.id)
    assert (again.state, again.restarts) == (DONE, 0)
    assert report is not None and report.to_dict() == _local(model, SMALL)
    whole, report = watch_job(conn, running.id)
    assert (whole.state, whole.restarts, whole.samples) == (DONE, 1, {"train": 60000})
    # counts are exact, so the run begun again from the start equals an audit that was never interrupted
    assert report is not None and report.to_dict() == _local(model, WHOLE)
