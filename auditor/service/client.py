"""Client functions for the auditor service: remote audits, jobs, stored reports, a health probe.

Each function takes a ``Connection`` and opens its own channel. Every failure, from an
unreachable server to a refused model, comes back as an ``AuditError`` with a one-line message,
so callers (the CLI) never see a gRPC exception. Calls are retried on UNAVAILABLE and on a full
queue: first by gRPC's own retry policy (``auditor.service.transport.SERVICE_CONFIG``), then by
``_retrying`` with exponential backoff and full jitter until ``--timeout`` (or, without one, for
``RETRY_WINDOW_S`` after the first failure of a run of them). ``python -m auditor.service.client health``
is the container's health probe; it loads neither onnx nor onnxruntime.

The client shares ``auditor.service.transport`` with the server and imports no server code.
"""

from __future__ import annotations

import hashlib
import itertools
import random
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.config import AuditConfig
from auditor.datasets.batches import skipped_warnings, tagged
from auditor.datasets.splits import open_splits
from auditor.errors import AuditError, ModelError
from auditor.records import AuditSpec, DatasetRef, DataSpec, Job
from auditor.report import Report
from auditor.service import wire
from auditor.service.options import Connection, add_connection_arguments, connection_from_args
from auditor.service.transport import CHANNEL_OPTIONS, bearer_metadata, error_from_status, retryable
from auditor.sinks import for_terminal
from auditor.usage import Parser

T = TypeVar("T")
UPLOAD_CHUNK = 1 << 20  # well under gRPC's 4 MB default message size
RETRY_INITIAL_S = 0.5
RETRY_MAX_S = 15.0
RETRY_WINDOW_S = 60.0  # without --timeout: how long a run of failures is retried


# ---- audits ---------------------------------------------------------------------------------


def remote_audit(
    conn: Connection,
    model_path: Path,
    data: DataSpec,
    config: AuditConfig,
    *,
    progress: Callable[[str, int], None] | None = None,
    queued: Callable[[int], None] | None = None,
) -> Report:
    """Audit on the server; the same report, number for number, as a local audit.

    The model (with its external data files) is uploaded only when the server lacks it. A known
    dataset name is sent as a name for the server to read; a ``.npz``/``.npy`` file is streamed
    in batches of ``config.batch_size`` and never held whole. While the audit waits in the
    server's queue, ``queued(position)`` says how many audits are ahead of it. An image folder is
    decoded here as ``data.images`` says (sized to the model by ``runners.for_model``), and the
    files it skipped are added to the report's warnings.
    """
    files = model_files(model_path)
    dataset = DatasetRef(data.source, data.split, data.limit) if data.known else None
    datasets = (
        None if dataset is not None else open_splits(data.source, data.split, limit=data.limit, images=data.images)
    )  # opened before anything is uploaded, so that bad data fails early
    deadline = _deadline(conn)
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        address = _ensure_model(conn, stub, files, deadline)
        start = wire.start_to_proto(AuditSpec(address, model_path.name, config, dataset))

        def attempt(timeout: float | None) -> Report:
            batches: Iterable[pb.AuditRequest] = ()
            if datasets is not None:
                batches = (
                    pb.AuditRequest(batch=wire.batch_to_proto(s, b)) for s, b in tagged(datasets, config.batch_size)
                )
            failures: list[BaseException] = []
            requests = _recording(itertools.chain([pb.AuditRequest(start=start)], batches), failures)
            try:
                return _await_report(stub.Audit(requests, **_call(conn, timeout)), progress, queued)
            except grpc.RpcError:
                if failures:  # our own data failed while streaming: that is the story, not CANCELLED
                    raise failures[0] from None
                raise

        report = _retrying(deadline, attempt)
    skipped = skipped_warnings(datasets) if datasets is not None else []
    return replace(report, warnings=[*skipped, *report.warnings]) if skipped else report


def submit_job(conn: Connection, model_path: Path, dataset: DatasetRef, config: AuditConfig) -> Job:
    """Queue an audit of a dataset the server holds as a detached job; the job as queued."""
    files = model_files(model_path)
    deadline = _deadline(conn)
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        address = _ensure_model(conn, stub, files, deadline)
        request = pb.SubmitJobRequest(audit=wire.start_to_proto(AuditSpec(address, model_path.name, config, dataset)))
        return wire.job_from_proto(_retrying(deadline, lambda timeout: stub.SubmitJob(request, **_call(conn, timeout))))


def get_job(conn: Connection, job_id: str) -> Job:
    return wire.job_from_proto(_unary(conn, "GetJob", pb.GetJobRequest(id=job_id)))


def cancel_job(conn: Connection, job_id: str) -> Job:
    """Stop a queued or running job; the job once it has ended."""
    return wire.job_from_proto(_unary(conn, "CancelJob", pb.CancelJobRequest(id=job_id)))


def list_jobs(conn: Connection) -> list[Job]:
    """Every job the server keeps, newest first."""
    jobs: list[Job] = []
    token = ""
    while True:
        page = _unary(conn, "ListJobs", pb.ListJobsRequest(page_token=token))
        jobs.extend(wire.job_from_proto(job) for job in page.jobs)
        token = page.next_page_token
        if not token:
            return jobs


def watch_job(
    conn: Connection, job_id: str, on_change: Callable[[Job], None] | None = None
) -> tuple[Job, Report | None]:
    """Follow a job until it ends: the job as it ended, and its report when it is done.

    ``on_change(job)`` sees every state the server sends. A server restart in the meantime is
    ridden out: the watch starts again once the server is back (the job runs again there).
    """
    deadline = _deadline(conn)
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)

        def attempt(timeout: float | None) -> tuple[Job, Report | None]:
            job, report = None, None
            for event in stub.WatchJob(pb.WatchJobRequest(id=job_id), **_call(conn, timeout)):
                if event.HasField("report"):
                    report = wire.report_from_proto(event.report)
                else:
                    job = wire.job_from_proto(event.job)
                    if on_change is not None:
                        on_change(job)
            if job is None or not job.ended:
                raise AuditError(f"the server ended the watch of job {job_id} before the job ended; watch it again")
            return job, report

        return _retrying(deadline, attempt)


def server_metadata(conn: Connection) -> pb.ServerMetadataResponse:
    """The server's name, version, limits and features."""
    return _unary(conn, "ServerMetadata", pb.ServerMetadataRequest())


# ---- reports --------------------------------------------------------------------------------


def list_reports(conn: Connection, content_address: str | None = None) -> list[dict[str, Any]]:
    """Every stored report (of one model, by content address, when given): id, model_sha256 (the
    content address), created time and per-split figures, newest first."""
    rows: list[dict[str, Any]] = []
    token = ""
    while True:
        request = pb.ListReportsRequest(model_sha256=content_address or "", page_token=token)
        page = _unary(conn, "ListReports", request)
        rows.extend(wire.summary_from_proto(summary) for summary in page.reports)
        token = page.next_page_token
        if not token:
            return rows


def get_report(conn: Connection, report_id: str) -> Report:
    return wire.report_from_proto(_unary(conn, "GetReport", pb.GetReportRequest(id=report_id)))


def check_health(conn: Connection, service: str = "") -> bool:
    """Whether the server reports SERVING for ``service`` ("" = the server as a whole); never retried."""
    with _channel(conn) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=conn.timeout)
    return response.status == health_pb2.HealthCheckResponse.SERVING


# ---- models ---------------------------------------------------------------------------------


def model_files(model_path: Path) -> dict[str, Path]:
    """The model file (key "") and the external data files it names, by the rule a local audit holds.

    ``modelfile.external_data_files`` decides which files those are, so a model uploads exactly
    when it would audit locally, subfolders (``weights/w.bin``) included.
    """
    import onnx  # here, not at the top: the health probe needs no onnx
    from google.protobuf.message import DecodeError

    from auditor.engine.modelfile import external_data_files

    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}; check the path")
    try:
        proto = onnx.load_model(model_path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError):
        return {"": model_path}  # the server refuses it, with the same message a local audit gives
    return {"": model_path, **external_data_files(proto, model_path.parent, model_path.name)}


def model_address(files: dict[str, Path]) -> str:
    """The content address the server files the model under (``modelfile.content_address``)."""
    from auditor.engine.modelfile import content_address  # here, not at the top: the health probe needs no onnx

    shas = {}
    for name, path in files.items():
        with path.open("rb") as stream:
            shas[name] = hashlib.file_digest(stream, "sha256").hexdigest()
    file_sha256 = shas.pop("")
    return content_address(file_sha256, shas)


def _ensure_model(conn: Connection, stub: auditor_pb2_grpc.AuditorStub, files: dict[str, Path], deadline: Any) -> str:
    """Upload the model unless the server has it already; its content address."""
    address = model_address(files)
    present = _retrying(deadline, lambda t: stub.HasModel(pb.HasModelRequest(sha256=address), **_call(conn, t)))
    if present.present:
        return address
    return _retrying(deadline, lambda t: stub.UploadModel(_upload_chunks(files), **_call(conn, t))).sha256


def _upload_chunks(files: dict[str, Path]) -> Iterator[pb.UploadModelRequest]:
    for name, path in files.items():
        with path.open("rb") as stream:
            while content := stream.read(UPLOAD_CHUNK):
                yield pb.UploadModelRequest(file=name, content=content)


# ---- calls, channels, retries ----------------------------------------------------------------


def _deadline(conn: Connection) -> float | None:
    return None if conn.timeout is None else time.monotonic() + conn.timeout


def _call(conn: Connection, timeout: float | None) -> dict[str, Any]:
    return {"metadata": bearer_metadata(conn.token), "timeout": timeout}


def _unary(conn: Connection, method: str, request: Any) -> Any:
    deadline = _deadline(conn)
    with _channel(conn) as channel:
        call = getattr(auditor_pb2_grpc.AuditorStub(channel), method)
        return _retrying(deadline, lambda timeout: call(request, **_call(conn, timeout)))


def _retrying(deadline: float | None, attempt: Callable[[float | None], T]) -> T:
    """``attempt(timeout)`` again after each retryable failure, with exponential backoff and full jitter.

    It stops at the deadline; without one, once failures have gone on for ``RETRY_WINDOW_S``.
    ``timeout`` is the time left, for the call's own deadline.
    """
    backoff, failing_since, failure = RETRY_INITIAL_S, None, None
    while True:
        left = None if deadline is None else max(deadline - time.monotonic(), 0.001)
        try:
            return attempt(left)
        except grpc.RpcError as exc:
            if failure is not None and exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                raise failure from None  # time ran out while retrying: the failure retried is the story
            failure = exc
            now = time.monotonic()
            failing_since = failing_since or now
            give_up = deadline if deadline is not None else failing_since + RETRY_WINDOW_S
            pause = random.uniform(0, backoff)
            if not retryable(exc.code(), exc.trailing_metadata()) or now + pause >= give_up:  # type: ignore[attr-defined]
                raise
            time.sleep(pause)
            backoff = min(backoff * 2, RETRY_MAX_S)


@contextmanager
def _channel(conn: Connection) -> Iterator[grpc.Channel]:
    """A channel for the duration of the block; gRPC failures inside become one-line AuditErrors."""
    if conn.tls_ca is None:
        channel = grpc.insecure_channel(conn.target, CHANNEL_OPTIONS)
    else:
        channel = grpc.secure_channel(
            conn.target, grpc.ssl_channel_credentials(_root_certificate(conn.tls_ca)), CHANNEL_OPTIONS
        )
    try:
        yield channel
    except grpc.RpcError as exc:
        raise error_from_status(conn.target, exc.code(), exc.details() or "", conn.timeout) from None  # type: ignore[attr-defined]
    finally:
        channel.close()


def _root_certificate(path: Path) -> bytes:
    """The PEM root certificate in ``path``; anything else is refused here, naming the file."""
    try:
        pem = path.read_bytes()
    except OSError as exc:
        raise AuditError(f"cannot read the TLS root certificate {path}: {exc.strerror}") from None
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise AuditError(f"the TLS root certificate {path} is not a PEM certificate (no BEGIN CERTIFICATE line)")
    return pem


def _recording(requests: Iterable[pb.AuditRequest], failures: list[BaseException]) -> Iterator[pb.AuditRequest]:
    """The request stream; an exception while producing it is kept, since gRPC only cancels the call."""
    try:
        yield from requests
    except Exception as exc:
        failures.append(exc)
        raise


def _await_report(
    responses: Iterable[pb.AuditResponse],
    progress: Callable[[str, int], None] | None,
    queued: Callable[[int], None] | None,
) -> Report:
    """The report, after reading the stream to its end so that the call finishes cleanly."""
    report = None
    for response in responses:
        if response.HasField("report"):
            report = wire.report_from_proto(response.report)
        elif response.progress.HasField("queue_position"):
            if queued is not None:
                queued(response.progress.queue_position)
        elif progress is not None:
            progress(response.progress.split, response.progress.samples_done)
    if report is None:
        raise AuditError("the auditor server ended the audit without a report; see the server log")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m auditor.service.client health --server HOST:PORT``: exit 0 when the server is SERVING."""
    parser = Parser(prog="python -m auditor.service.client", description="Probe an auditor server.")
    parser.add_argument("command", choices=["health"])
    add_connection_arguments(parser)
    args = parser.parse_args(argv)
    try:
        conn = connection_from_args(args)
        if conn is not None and conn.tls_ca is not None:
            _root_certificate(conn.tls_ca)
    except AuditError as exc:  # bad input (a token or certificate file that cannot be read), not an unhealthy server
        parser.error(str(exc))
    if conn is None:
        parser.error("health needs --server HOST:PORT")
    try:
        serving = check_health(conn)
    except AuditError as exc:
        print(f"unhealthy: {for_terminal(str(exc))}", file=sys.stderr)
        return 1
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
