"""The gRPC service: ``auditor.v1.Auditor`` plus standard health and reflection.

The servicer methods are short; the work is in ``auditor.audit`` (the same pipeline the CLI
runs, so the numbers are the same), ``auditor.persist`` (reports and models on disk) and
``auditor.wire`` (messages). One decorator turns ``AuditError`` kinds into status codes, hides
every other exception behind INTERNAL, and logs one line per call.
"""

from __future__ import annotations

import argparse
import functools
import hmac
import inspect
import logging
import queue
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from auditor import wire
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.audit import audit
from auditor.config import DEVICES, AuditConfig
from auditor.data import KNOWN_DATASETS, Batch, Dataset, open_splits
from auditor.errors import GRPC_STATUS, AuditError, CancelledError, DataError, LimitError, UnauthenticatedError, require
from auditor.persist import ModelStore, ReportStore
from auditor.prepare import Prepared, prepare
from auditor.report import Report

log = logging.getLogger("auditor.server")

SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Auditor"].full_name
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MB = 2**20
_MESSAGE_HEADROOM = 64 * 1024  # framing and labels on top of a batch's samples
_SPARE_WORKERS = 8  # threads for uploads, lookups and health checks while audits run
_PREPARED_CACHE = 4  # onnxruntime sessions kept warm


@dataclass(frozen=True)
class ServeOptions:
    """Every setting of the server; ``auditor serve`` flags map one to one onto these fields.

    ``data_dir`` is where named datasets (mnist, fashion-mnist) are read or downloaded to
    (default: ``$AUDITOR_DATA_DIR``, then the user cache).
    ``device`` is used for audits whose settings leave the device at "auto".
    """

    host: str = "127.0.0.1"
    port: int = 50051
    store: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "onnx-auditor")
    data_dir: Path | None = None
    max_concurrent: int = 2
    max_model_mb: int = 1024
    max_batch_mb: int = 64
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    grace: float = 10.0
    device: str = "auto"

    def __post_init__(self) -> None:
        require(
            [
                (self.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {self.max_concurrent}"),
                (self.max_model_mb >= 1, f"--max-model-mb must be >= 1, got {self.max_model_mb}"),
                (self.max_batch_mb >= 1, f"--max-batch-mb must be >= 1, got {self.max_batch_mb}"),
                (self.grace >= 0, f"--grace must be >= 0 seconds, got {self.grace}"),
                ((self.tls_cert is None) == (self.tls_key is None), "give --tls-cert and --tls-key together"),
                (self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}"),
            ]
        )


# ---- the servicer ----------------------------------------------------------------------------


class _Call:
    """What one call's log line reports, filled in as the call learns it."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model = "-"
        self.samples: dict[str, int] = {}

    @contextmanager
    def serving(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Map errors to status codes (no traceback ever reaches the client) and log the call."""
        started, outcome = time.monotonic(), "OK"
        try:
            yield
        except AuditError as exc:
            code = grpc.StatusCode[GRPC_STATUS[exc.kind]]
            outcome = code.name
            context.abort(code, exc.message)
        except GeneratorExit:  # the client went away while the server was streaming to it
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome = "INTERNAL"
            log.exception("%s failed unexpectedly", self.method)
            context.abort(grpc.StatusCode.INTERNAL, "internal error in the auditor server; see its log")
        finally:
            log.info(
                "%s model=%s samples=%d duration=%.3fs outcome=%s",
                self.method,
                self.model if re.fullmatch(r"[0-9a-f]{64}|-", self.model) else "(not a sha256)",
                sum(self.samples.values()),
                time.monotonic() - started,
                outcome,
            )


def _handled(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give a servicer method a ``_Call`` and serve it through ``_Call.serving`` (streaming or not)."""
    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def streaming(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            call = _Call(method.__name__)
            with call.serving(context):
                yield from method(self, request, context, call)

        return streaming

    @functools.wraps(method)
    def unary(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        call = _Call(method.__name__)
        with call.serving(context):
            return method(self, request, context, call)

    return unary


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    """``auditor.v1.Auditor`` over a model store, a report store and a few warm sessions."""

    def __init__(self, options: ServeOptions) -> None:
        self._options = options
        self._models = ModelStore(options.store / "models", options.max_model_mb * MB)
        self._reports = ReportStore(options.store / "reports.sqlite3")
        self._prepared = _PreparedCache(_PREPARED_CACHE)
        self._slots = threading.BoundedSemaphore(options.max_concurrent)

    @_handled
    def HasModel(self, request: pb.HasModelRequest, context: grpc.ServicerContext, call: _Call) -> pb.HasModelResponse:
        call.model = request.sha256
        return pb.HasModelResponse(present=self._models.has(request.sha256))

    @_handled
    def UploadModel(
        self, request_iterator: Iterator[pb.UploadModelRequest], context: grpc.ServicerContext, call: _Call
    ) -> pb.UploadModelResponse:
        chunks = ((chunk.file, chunk.content) for chunk in _requests(request_iterator))
        sha256, created = self._models.put(chunks, self._vet)
        call.model = sha256
        return pb.UploadModelResponse(sha256=sha256, created=created)

    @_handled
    def DescribeModel(
        self, request: pb.DescribeModelRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.DescribeModelResponse:
        call.model = request.sha256
        return wire.model_info_to_proto(self._prepare(request.sha256, AuditConfig()).model_info)

    @_handled
    def Audit(
        self, request_iterator: Iterator[pb.AuditRequest], context: grpc.ServicerContext, call: _Call
    ) -> Iterator[pb.AuditResponse]:
        requests = _requests(request_iterator)
        start = _audit_start(next(requests, None))
        call.model = start.model_sha256
        config = wire.settings_to_config(start.settings)
        self._models.path(start.model_sha256)  # NOT_FOUND before anything else
        if start.HasField("dataset"):
            batches = _dataset_batches(start.dataset, config, self._options.data_dir)
        else:
            batches = _client_batches(requests)
        with self._slot():
            prepared = self._prepare(start.model_sha256, config)
            for event in _run_audit(prepared, batches, config, lambda: not context.is_active()):
                if isinstance(event, Report):
                    stored = self._reports.add(start.model_sha256, _named(event, start.model_name))
                    yield pb.AuditResponse(report=wire.report_to_proto(stored))
                else:
                    split, done = event
                    call.samples[split] = done
                    yield pb.AuditResponse(progress=pb.AuditProgress(split=split, samples_done=done))

    @_handled
    def GetReport(self, request: pb.GetReportRequest, context: grpc.ServicerContext, call: _Call) -> pb.Report:
        stored = self._reports.get(request.id)
        call.model = stored.model_sha256
        return wire.report_to_proto(stored)

    @_handled
    def ListReports(
        self, request: pb.ListReportsRequest, context: grpc.ServicerContext, call: _Call
    ) -> pb.ListReportsResponse:
        call.model = request.model_sha256 or call.model
        page, token = self._reports.page(request.model_sha256, request.page_size, request.page_token)
        return pb.ListReportsResponse(reports=[wire.summary_to_proto(s) for s in page], next_page_token=token)

    def _vet(self, model_path: Path, sha256: str) -> None:
        """Refuse an upload the audit could not use; keep its session warm for the audit to come."""
        key = self._cache_key(sha256, AuditConfig())
        self._prepared.put(key, prepare(model_path, device=key[1], states_at=key[2]))

    def _prepare(self, sha256: str, config: AuditConfig) -> Prepared:
        path = self._models.path(sha256)
        key = self._cache_key(sha256, config)
        return self._prepared.get(key, lambda: prepare(path, device=key[1], states_at=key[2]))

    def _cache_key(self, sha256: str, config: AuditConfig) -> tuple[str, str, str]:
        """What a prepared session depends on; "auto" means the server's own ``--device``."""
        device = self._options.device if config.device == "auto" else config.device
        return sha256, device, config.states_at

    @contextmanager
    def _slot(self) -> Iterator[None]:
        """One of ``max_concurrent`` audit slots, or RESOURCE_EXHAUSTED at once (never a queue)."""
        if not self._slots.acquire(blocking=False):
            raise LimitError(
                f"the server is already running {self._options.max_concurrent} audits, its limit "
                "(serve --max-concurrent); retry later"
            )
        try:
            yield
        finally:
            self._slots.release()


class _PreparedCache:
    """The few most recently used prepared models, keyed by (sha256, device, aggregate)."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[tuple[str, str, str], Prepared] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str, str], make: Callable[[], Prepared]) -> Prepared:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
        prepared = make()  # outside the lock: other models need not wait for this one
        self.put(key, prepared)
        return prepared

    def put(self, key: tuple[str, str, str], prepared: Prepared) -> None:
        with self._lock:
            self._items[key] = prepared
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


def _requests(request_iterator: Iterator[Any]) -> Iterator[Any]:
    """The client's messages; a client that cancels or times out mid-stream ends in CancelledError."""
    try:
        yield from request_iterator
    except grpc.RpcError:
        raise CancelledError("the client cancelled the call or its deadline passed") from None


def _audit_start(request: pb.AuditRequest | None) -> pb.AuditStart:
    if request is None or not request.HasField("start"):
        raise AuditError("an Audit call must begin with an AuditStart message (model and settings)")
    return request.start


def _dataset_batches(dataset: pb.DatasetRef, config: AuditConfig, data_dir: Path | None) -> list[Dataset]:
    """Batches of a dataset the server holds; only known names, never a path on the server."""
    if dataset.name not in KNOWN_DATASETS:
        raise DataError(
            f"the server resolves only the datasets {', '.join(KNOWN_DATASETS)}, not {dataset.name!r}; "
            "send other data as batches"
        )
    limit = dataset.limit if dataset.HasField("limit") else None
    return open_splits(dataset.name, dataset.split, limit=limit, data_dir=data_dir)


def _client_batches(requests: Iterator[pb.AuditRequest]) -> Iterator[tuple[str, Batch]]:
    for request in requests:
        if not request.HasField("batch"):
            raise AuditError("after AuditStart, an Audit call sends only SampleBatch messages")
        yield wire.batch_from_proto(request.batch)


def _named(report: Report, model_name: str) -> Report:
    """The report under the name the client gave its model (the store names every file model.onnx)."""
    return replace(report, model=replace(report.model, name=model_name)) if model_name else report


def _run_audit(
    prepared: Prepared,
    batches: list[Dataset] | Iterator[tuple[str, Batch]],
    config: AuditConfig,
    cancelled: Callable[[], bool],
) -> Iterator[tuple[str, int] | Report]:
    """``audit`` in a worker thread: its progress events as they happen, then its report.

    The thread lets progress reach the client while the audit runs. Leaving early (an error,
    or the client going away) stops the audit and waits for it, so no work outlives the call.
    """
    events: queue.Queue[tuple[str, int] | Report | BaseException] = queue.Queue()
    stop = threading.Event()

    def work() -> None:
        try:
            events.put(
                audit(
                    prepared,
                    batches,
                    config,
                    progress=lambda split, done: events.put((split, done)),
                    cancelled=lambda: stop.is_set() or cancelled(),
                )
            )
        except BaseException as exc:
            events.put(exc)

    worker = threading.Thread(target=work, name="auditor-audit", daemon=True)
    worker.start()
    try:
        while True:
            event = events.get()
            if isinstance(event, BaseException):
                raise event
            yield event
            if isinstance(event, Report):
                return
    finally:
        stop.set()
        worker.join()


# ---- assembling and running the server --------------------------------------------------------


# A handler of each kind, by (request streaming, response streaming).
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _BearerToken(grpc.ServerInterceptor):
    """Serve a call only with metadata ``authorization: Bearer <token>``; health and reflection stay open."""

    def __init__(self, token: str, open_services: tuple[str, ...]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open = tuple(f"/{name}/" for name in open_services)

    def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], grpc.RpcMethodHandler | None],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler | None:
        handler = continuation(details)
        if handler is None or details.method.startswith(self._open) or self._authorized(details):
            return handler
        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(functools.partial(_refuse, details.method))

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected)


def _refuse(method: str, request: Any, context: grpc.ServicerContext) -> None:
    with _Call(method.rsplit("/", 1)[-1]).serving(context):
        raise UnauthenticatedError(
            "this server needs a bearer token: send metadata 'authorization: Bearer <token>' (--token-file)"
        )


def read_token(path: Path) -> str:
    """The bearer token in a token file (surrounding whitespace dropped); server and client share it."""
    try:
        token = path.read_text().strip()
    except OSError as exc:
        raise AuditError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise AuditError(f"the token file {path} is empty; put the bearer token in it")
    return token


def _configure_health(server: grpc.Server) -> health.HealthServicer:
    servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    for service in ("", SERVICE_NAME):
        servicer.set(service, health_pb2.HealthCheckResponse.SERVING)
    return servicer


def _configure_reflection(server: grpc.Server) -> None:
    reflection.enable_server_reflection((SERVICE_NAME, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), server)


def _bind(server: grpc.Server, options: ServeOptions) -> int:
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"{host}:{options.port}"
    try:
        if options.tls_cert is None or options.tls_key is None:
            return server.add_insecure_port(address)
        pair = (options.tls_key.read_bytes(), options.tls_cert.read_bytes())
        return server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    except (OSError, RuntimeError) as exc:
        raise AuditError(f"cannot listen on {address}: {exc}") from None


def _assemble(options: ServeOptions) -> tuple[grpc.Server, int, health.HealthServicer]:
    """The server, bound but not started, with its port and health servicer."""
    open_services = (HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
    interceptors = [_BearerToken(read_token(options.token_file), open_services)] if options.token_file else []
    limit = options.max_batch_mb * MB + _MESSAGE_HEADROOM
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=options.max_concurrent + _SPARE_WORKERS),
        interceptors=interceptors,
        options=[
            ("grpc.max_receive_message_length", limit),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
        ],
    )
    auditor_pb2_grpc.add_AuditorServicer_to_server(AuditorServicer(options), server)
    health_servicer = _configure_health(server)
    _configure_reflection(server)
    return server, _bind(server, options), health_servicer


def build_server(options: ServeOptions) -> tuple[grpc.Server, int]:
    """A ready-to-start server and the port it bound (port 0 picks a free one, as tests do)."""
    server, port, _ = _assemble(options)
    return server, port


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``auditor serve`` flags, one per ``ServeOptions`` field."""
    d = ServeOptions()
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default: {d.host}; 0.0.0.0 = all)")
    parser.add_argument("--port", type=int, default=d.port, help=f"default: {d.port}; 0 picks a free port")
    parser.add_argument("--store", type=Path, default=d.store, help=f"reports and models folder (default: {d.store})")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="named datasets' folder (default: $AUDITOR_DATA_DIR)"
    )
    parser.add_argument("--max-concurrent", type=int, default=d.max_concurrent, help="audits at once; more are refused")
    parser.add_argument("--max-model-mb", type=int, default=d.max_model_mb, help="largest upload, data files included")
    parser.add_argument("--max-batch-mb", type=int, default=d.max_batch_mb, help="largest message a client may send")
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; serve TLS (needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send")
    parser.add_argument("--grace", type=float, default=d.grace, help="seconds in-flight audits get on SIGTERM")
    parser.add_argument("--device", choices=DEVICES, default=d.device, help="device for audits that leave it to auto")


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM or SIGINT, then shut down gracefully; exit code 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
    server, port, health_servicer = _assemble(options)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    server.start()
    log.info(
        "serving %s on %s:%d (store %s, tls %s)",
        SERVICE_NAME,
        options.host,
        port,
        options.store,
        "on" if options.tls_cert else "off",
    )
    stop.wait()
    log.info("shutting down: in-flight audits get %g s to finish", options.grace)
    health_servicer.enter_graceful_shutdown()
    server.stop(options.grace).wait()
    log.info("stopped")
    return 0
