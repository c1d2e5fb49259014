"""Client functions for the auditor service: remote audits, stored reports, a health probe.

Each function takes a ``Connection`` and opens its own channel. Every failure, from an
unreachable server to a refused model, comes back as an ``AuditError`` with a one-line message,
so callers (the CLI) never see a gRPC exception. ``python -m auditor.client health`` is the
container's health probe.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import sys
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import onnx
from google.protobuf.message import DecodeError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from onnx import external_data_helper

from auditor import wire
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.config import AuditConfig
from auditor.data import KNOWN_DATASETS, open_splits, tagged
from auditor.errors import AuditError, CancelledError, LimitError, ModelError, NotFoundError
from auditor.modelfile import external_tensors
from auditor.persist import check_data_file_name, model_digest
from auditor.report import Report
from auditor.server import read_token

UPLOAD_CHUNK = 1 << 20  # well under gRPC's 4 MB default message size
_CHANNEL_OPTIONS = [("grpc.max_receive_message_length", -1), ("grpc.max_send_message_length", -1)]
_ERRORS: dict[grpc.StatusCode, type[AuditError]] = {
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: CancelledError,
}


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to talk to it."""

    target: str  # "host:port"
    token: str | None = None
    tls_ca: Path | None = None  # PEM root certificate; None = plaintext
    timeout: float | None = None  # seconds per call


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server`` and its companions; without ``--server`` the command runs locally."""
    group = parser.add_argument_group("server (without --server, everything runs locally)")
    group.add_argument("--server", metavar="HOST:PORT", help="audit on this auditor server")
    group.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the server's bearer token")
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help="root certificate: talk TLS to the server")
    group.add_argument(
        "--timeout", type=float, metavar="SECONDS", help="seconds each call may take (an audit is one call)"
    )


def connection_from_args(args: argparse.Namespace) -> Connection | None:
    """The connection the arguments name, or None when ``--server`` is absent."""
    if not args.server:
        return None
    token = read_token(args.token_file) if args.token_file is not None else None
    return Connection(args.server, token, args.tls_ca, args.timeout)


def remote_audit(
    conn: Connection,
    model_path: Path,
    data: str,
    split: str,
    limit: int | None,
    config: AuditConfig,
    *,
    progress: Callable[[str, int], None] | None = None,
) -> Report:
    """Audit on the server; the same report, number for number, as a local audit.

    The model (with its external data files) is uploaded only when the server lacks it. A known
    dataset name is sent as a name for the server to read; a ``.npz``/``.npy`` file is streamed
    in batches of ``config.batch_size`` and never held whole.
    """
    files = _model_files(model_path)
    sha256 = _digest(files)
    start = pb.AuditStart(model_sha256=sha256, settings=wire.config_to_settings(config), model_name=model_path.name)
    if data in KNOWN_DATASETS:
        start.dataset.CopyFrom(pb.DatasetRef(name=data, split=split, limit=limit))
        batches: Iterable[pb.AuditRequest] = ()
    else:
        datasets = open_splits(data, split, limit=limit)
        batches = (pb.AuditRequest(batch=wire.batch_to_proto(s, b)) for s, b in tagged(datasets, config.batch_size))
    failures: list[BaseException] = []
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        if not stub.HasModel(pb.HasModelRequest(sha256=sha256), **_call_options(conn)).present:
            start.model_sha256 = stub.UploadModel(_upload_chunks(files), **_call_options(conn)).sha256
        requests = _recording(itertools.chain([pb.AuditRequest(start=start)], batches), failures)
        try:
            return _await_report(stub.Audit(requests, **_call_options(conn)), progress)
        except grpc.RpcError:
            if failures:  # our own data failed while streaming: that is the story, not CANCELLED
                raise failures[0] from None
            raise


def list_reports(conn: Connection, model_sha256: str | None = None) -> list[dict[str, Any]]:
    """Every stored report's id, model_sha256, created time and per-split figures, newest first."""
    rows: list[dict[str, Any]] = []
    token = ""
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        while True:
            request = pb.ListReportsRequest(model_sha256=model_sha256 or "", page_token=token)
            page = stub.ListReports(request, **_call_options(conn))
            rows.extend(wire.summary_from_proto(summary) for summary in page.reports)
            token = page.next_page_token
            if not token:
                return rows


def get_report(conn: Connection, report_id: str) -> Report:
    with _channel(conn) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        return wire.report_from_proto(stub.GetReport(pb.GetReportRequest(id=report_id), **_call_options(conn)))


def check_health(conn: Connection, service: str = "") -> bool:
    """Whether the server reports SERVING for ``service`` ("" = the server as a whole)."""
    with _channel(conn) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=conn.timeout)
    return response.status == health_pb2.HealthCheckResponse.SERVING


@contextmanager
def _channel(conn: Connection) -> Iterator[grpc.Channel]:
    """A channel for the duration of the block; gRPC failures inside become one-line AuditErrors."""
    if conn.tls_ca is None:
        channel = grpc.insecure_channel(conn.target, _CHANNEL_OPTIONS)
    else:
        try:
            credentials = grpc.ssl_channel_credentials(root_certificates=conn.tls_ca.read_bytes())
        except OSError as exc:
            raise AuditError(f"cannot read the TLS root certificate {conn.tls_ca}: {exc.strerror}") from None
        channel = grpc.secure_channel(conn.target, credentials, _CHANNEL_OPTIONS)
    try:
        yield channel
    except grpc.RpcError as exc:
        raise _error(conn, exc) from None
    finally:
        channel.close()


def _call_options(conn: Connection) -> dict[str, Any]:
    metadata = (("authorization", f"Bearer {conn.token}"),) if conn.token else None
    return {"metadata": metadata, "timeout": conn.timeout}


def _error(conn: Connection, exc: grpc.RpcError) -> AuditError:
    """The AuditError kind and one-line message for a failed call."""
    code, details = exc.code(), exc.details()  # type: ignore[attr-defined]
    if code == grpc.StatusCode.UNAVAILABLE:
        return AuditError(f"cannot reach auditor server at {conn.target}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CancelledError(f"auditor server at {conn.target} did not answer within {conn.timeout} s (--timeout)")
    return _ERRORS.get(code, AuditError)(f"auditor server at {conn.target}: {details}")


def _model_files(model_path: Path) -> dict[str, Path]:
    """The model file (key "") and the external data files it names, each a plain file beside it."""
    if not model_path.is_file():
        raise ModelError(f"model file not found: {model_path}; check the path")
    try:
        proto = onnx.load_model(model_path, load_external_data=False)
    except (DecodeError, ValueError, RuntimeError):
        return {"": model_path}  # the server refuses it, with the same message a local audit gives
    files = {"": model_path}
    for tensor in external_tensors(proto):
        name = check_data_file_name(external_data_helper.ExternalDataInfo(tensor).location)
        path = model_path.parent / name
        if path.is_symlink() or not path.is_file():
            raise ModelError(
                f"external data file {name!r} of {model_path.name} must be a plain file beside the model "
                "(not missing, not a symlink)"
            )
        files[name] = path
    return files


def _digest(files: dict[str, Path]) -> str:
    """The content address the server files the model under (``persist.model_digest``)."""
    shas = {}
    for name, path in files.items():
        with path.open("rb") as stream:
            shas[name] = hashlib.file_digest(stream, "sha256").hexdigest()
    model_sha = shas.pop("")
    return model_digest(model_sha, shas)


def _upload_chunks(files: dict[str, Path]) -> Iterator[pb.UploadModelRequest]:
    for name, path in files.items():
        with path.open("rb") as stream:
            while content := stream.read(UPLOAD_CHUNK):
                yield pb.UploadModelRequest(file=name, content=content)


def _recording(requests: Iterable[pb.AuditRequest], failures: list[BaseException]) -> Iterator[pb.AuditRequest]:
    """The request stream; an exception while producing it is kept, since gRPC only cancels the call."""
    try:
        yield from requests
    except Exception as exc:
        failures.append(exc)
        raise


def _await_report(responses: Iterable[pb.AuditResponse], progress: Callable[[str, int], None] | None) -> Report:
    """The report, after reading the stream to its end so that the call finishes cleanly."""
    report = None
    for response in responses:
        if response.HasField("report"):
            report = wire.report_from_proto(response.report)
        elif progress is not None:
            progress(response.progress.split, response.progress.samples_done)
    if report is None:
        raise AuditError("the auditor server ended the audit without a report; see the server log")
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m auditor.client health --server HOST:PORT``: exit 0 when the server is SERVING."""
    parser = argparse.ArgumentParser(prog="python -m auditor.client", description="Probe an auditor server.")
    parser.add_argument("command", choices=["health"])
    add_connection_arguments(parser)
    args = parser.parse_args(argv)
    conn = connection_from_args(args)
    if conn is None:
        parser.error("health needs --server HOST:PORT")
    try:
        serving = check_health(conn)
    except AuditError as exc:
        print(f"unhealthy: {exc}", file=sys.stderr)
        return 1
    print("SERVING" if serving else "NOT_SERVING")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
