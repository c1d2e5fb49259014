"""The gRPC service: ``auditor.v1.Auditor`` plus standard health and reflection.

The server runs on grpc's asyncio server. A call that waits (an idle upload, an audit queued
for a slot, a client that has gone quiet) then costs one coroutine, not a thread, so no number
of open streams can starve the others: health checks and the cheap calls are answered on the
event loop, or by a small pool of their own, however many streams are open. A thread-pool
server would tie one worker thread to every open stream, which is exactly how ten idle uploads
used to lock out health checks. Blocking work runs in three pools, each sized for its job:

- ``audits``: exactly ``--max-concurrent`` threads, fed in order by the one ``AuditQueue``
  (``auditor.service.jobs``) that streamed audits and detached jobs share;
- ``models``: checking uploads and describing models (onnxruntime sessions: seconds);
- ``lookups``: SQLite and upload writes (milliseconds).

The servicer methods are short; the work is in ``auditor.engine.audit`` (the same pipeline as the
CLI, so the numbers are the same), ``auditor.service.persist`` and ``auditor.service.jobs`` (what is kept, the
queue), ``auditor.service.streams`` (one call's streams, with the idle timeout) and ``auditor.service.wire``
(messages, checked as they arrive). One wrapper turns ``AuditError`` kinds into
status codes (``auditor.service.transport``), hides every other exception behind INTERNAL, strips server
paths from messages, and logs one line per call.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import hmac
import logging
import re
import signal
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import Any, Generic, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

import auditor
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.config import SessionSettings
from auditor.datasets.batches import Batch, Dataset
from auditor.datasets.splits import open_splits
from auditor.engine.audit import audit
from auditor.engine.prepare import Prepared, describe_model, prepare
from auditor.errors import AuditError, CancelledError, DataError, LimitError, UnauthenticatedError
from auditor.exits import TERMINATING
from auditor.records import DONE, KNOWN_DATASETS, AuditSpec, Job, StoredReport, check_content_address, check_id
from auditor.report import ModelInfo, Report
from auditor.service import wire
from auditor.service.cluster import RayAudits
from auditor.service.jobs import AuditQueue, Jobs, JobStore, Progress, QueueFullError
from auditor.service.monitoring import ServiceMetrics
from auditor.service.options import ServeOptions
from auditor.service.persist import MAX_FILES, PAGE_SIZE, ModelStore, ReportStore, claim_store
from auditor.service.streams import Messages, ProgressStream, client_batches, expect_no_batches
from auditor.service.transport import NO_RETRY, SERVICE, read_token, status_of
from auditor.sinks import for_terminal

log = logging.getLogger("auditor.service.server")

T = TypeVar("T")
K = TypeVar("K")
V = TypeVar("V")
HEALTH_SERVICE_NAME = health_pb2.DESCRIPTOR.services_by_name["Health"].full_name
MB = 2**20
_MESSAGE_HEADROOM = 64 * 1024  # framing and labels on top of a batch's samples
_PREPARED_CACHE = 4  # onnxruntime sessions kept warm
_DESCRIBED_CACHE = 64  # model descriptions kept (models never change under their address)
# The largest value each numeric flag takes: beyond these a setting is a typo or an attack, and
# some would overflow (gRPC takes a message limit as a signed 32-bit count of bytes).
_MODEL_WORKERS = 2
_LOOKUP_WORKERS = 4
_CLUSTER_PROBE_S = 5.0  # a Ray cluster that has not answered in this long counts as unreachable
_CLUSTER_WATCH_S = 2.0  # how often health asks the cluster
# An absolute path of two parts or more; a refusal never shows one (the server's folders are its own).
_SERVER_PATH = re.compile(r"(?<![\w.:/~-])/[^\s'\"/]+/[^\s'\"]*")


# ---- one call: status codes and its log line ----------------------------------------------------


class _Call:
    """What one call's log line reports, filled in as the call learns it."""

    def __init__(self, method: str) -> None:
        self.method = method
        self.model = "-"
        self.samples: dict[str, int] = {}

    @asynccontextmanager
    async def serving(self, context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
        """Map errors to status codes (no traceback, no server path ever reaches the client) and log the call."""
        started, outcome = time.monotonic(), "OK"
        try:
            yield
        except AuditError as exc:
            code, trailing = status_of(exc)
            outcome = code.name
            await context.abort(code, _without_paths(exc.message), trailing)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            outcome = "CANCELLED"
            raise
        except Exception:
            outcome = "INTERNAL"
            log.exception("%s failed unexpectedly", self.method)
            await context.abort(grpc.StatusCode.INTERNAL, "internal error in the auditor server; see its log", NO_RETRY)
        finally:
            log.info(
                "%s model=%s samples=%d duration=%.3fs outcome=%s",
                self.method,
                self.model if re.fullmatch(r"[0-9a-f]{64}|-", self.model) else "(not a content address)",
                sum(self.samples.values()),
                time.monotonic() - started,
                outcome,
            )


def _without_paths(message: str) -> str:
    return _SERVER_PATH.sub("<path>", message)


def _handled(method: Callable[..., Any]) -> Callable[..., Any]:
    """Give a servicer method a ``_Call`` and serve it through ``_Call.serving``."""

    @functools.wraps(method)
    async def handler(self: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        call = _Call(method.__name__)
        async with call.serving(context):
            return await method(self, request, context, call)

    return handler


# ---- the servicer ----------------------------------------------------------------------------


class AuditorServicer(auditor_pb2_grpc.AuditorServicer):
    """``auditor.v1.Auditor`` over a model store, a report store, the job table and a few warm sessions.

    Build it on the event loop that serves it (``async_init`` recovers the jobs of a stopped server).
    """

    def __init__(self, options: ServeOptions, metrics: ServiceMetrics) -> None:
        self._options = options
        self._metrics = metrics
        self._device = options.device
        self._models = ModelStore(options.store / "models", options.max_model_mb * MB)
        self._reports = ReportStore(options.store / "reports.sqlite3")
        self._prepared: _Cache[tuple[str, SessionSettings], Prepared] = _Cache(_PREPARED_CACHE)
        self._described: _Cache[str, ModelInfo] = _Cache(_DESCRIBED_CACHE)
        self._audit_pool = ThreadPoolExecutor(options.max_concurrent, thread_name_prefix="auditor-audit")
        self._model_pool = ThreadPoolExecutor(_MODEL_WORKERS, thread_name_prefix="auditor-model")
        self._lookup_pool = ThreadPoolExecutor(_LOOKUP_WORKERS, thread_name_prefix="auditor-lookup")
        self._queue = AuditQueue(options.max_concurrent, options.max_queued, metrics.queue_changed)
        job_store = JobStore(options.store / "reports.sqlite3")
        self._jobs = Jobs(job_store, self._queue, self._run_job, self._lookup_pool, self._job_ended)
        self.cluster = RayAudits(options.ray, options.shards, options.data_dir) if options.ray else None

    async def async_init(self) -> int:
        """Queue again the jobs a stopped server left; how many there were."""
        return await self._jobs.start()

    async def stop(self, grace: float | None) -> None:
        """Give running jobs ``grace`` seconds, interrupt them (they run again at the next start), release the pools."""
        await self._jobs.stop(grace or 0.0)
        for pool in (self._audit_pool, self._model_pool, self._lookup_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        if self.cluster is not None:
            self.cluster.leave()

    # ---- models

    @_handled
    async def HasModel(self, request: pb.HasModelRequest, context: Any, call: _Call) -> pb.HasModelResponse:
        call.model = check_content_address(request.sha256)
        return pb.HasModelResponse(present=self._models.has(request.sha256))

    @_handled
    async def UploadModel(self, requests: Any, context: Any, call: _Call) -> pb.UploadModelResponse:
        messages = Messages(context, self._options.idle_timeout)
        with self._models.receive() as upload:
            while (message := await messages.next()) is not None:
                self._metrics.upload_bytes.inc(len(message.content))
                await self._on(self._lookup_pool, upload.write, message.file, message.content)
            address, created = await self._on(self._model_pool, self._models.keep, upload, self._vet)
        call.model = address
        return pb.UploadModelResponse(sha256=address, created=created)

    @_handled
    async def DescribeModel(
        self, request: pb.DescribeModelRequest, context: Any, call: _Call
    ) -> pb.DescribeModelResponse:
        call.model = check_content_address(request.sha256)
        path = self._models.path(request.sha256)
        info = self._described.get(request.sha256)
        if info is None:
            info = await self._on(self._model_pool, describe_model, path)
            self._described.put(request.sha256, info)
        return wire.model_info_to_proto(info)

    def _vet(self, model_path: Path, address: str) -> None:
        """Refuse an upload the audit could not use; keep its session warm for the audit to come."""
        prepared = prepare(model_path, device=self._device)
        self._prepared.put((address, prepared.settings), prepared)

    def _prepare(self, spec: AuditSpec) -> Prepared:
        """A warm session for the spec's model and session settings ("auto" = the server's ``--device``)."""
        session = spec.config.session
        settings = replace(session, device=self._device if session.device == "auto" else session.device)
        path = self._models.path(spec.content_address)
        key = (spec.content_address, settings)
        prepared = self._prepared.get(key)
        if prepared is None:
            prepared = prepare(path, device=settings.device, states_at=settings.states_at, gpu_math=settings.gpu_math)
            self._prepared.put(key, prepared)
        return prepared

    # ---- streamed audits

    @_handled
    async def Audit(self, requests: Any, context: Any, call: _Call) -> None:
        async with self._counted():
            messages = Messages(context, self._options.idle_timeout)
            spec = self._spec(_audit_start(await messages.next()))
            call.model = spec.content_address
            self._models.path(spec.content_address)  # NOT_FOUND before anything else
            stop = threading.Event()
            loop = asyncio.get_running_loop()
            if spec.dataset is None:
                first = await messages.next()  # a client that never sends a batch never takes a slot
                if first is None:
                    raise DataError("the dataset is empty: no samples reached the audit; send SampleBatch messages")
                data = functools.partial(client_batches, first, messages, loop, stop)
            else:
                await expect_no_batches(messages)
                data = None
            progress = ProgressStream(context, self._options.idle_timeout, call.samples)
            work = asyncio.create_task(self._queued(spec, data, progress, stop))
            try:
                stored = await _unless_fails(work, progress.writer)
                await progress.finish()
            finally:
                for task in (work, progress.writer):
                    task.cancel()
                await asyncio.wait([work, progress.writer])
            await context.write(pb.AuditResponse(report=wire.report_to_proto(stored)))

    async def _queued(
        self, spec: AuditSpec, data: Callable[[], Iterator[tuple[str, Batch]]] | None, progress: ProgressStream,
        stop: threading.Event,
    ) -> StoredReport:  # fmt: skip
        async with self._queue.slot(progress.queued):
            return await self._compute(functools.partial(self._audit_work, spec, data), progress.running, stop)

    @asynccontextmanager
    async def _counted(self) -> AsyncIterator[None]:
        """Count a streamed audit by how it ended: done, failed, cancelled, or rejected (by a limit of the
        server: a full queue, the idle timeout, a size limit)."""
        outcome = "failed"
        try:
            yield
            outcome = "done"
        except LimitError:
            outcome = "rejected"
            raise
        except (asyncio.CancelledError, CancelledError):
            outcome = "cancelled"
            raise
        finally:
            self._metrics.audits.labels(outcome).inc()

    async def _compute(
        self, work: Callable[[Progress, Callable[[], bool]], StoredReport], on_progress: Progress, stop: threading.Event
    ) -> StoredReport:
        """Run ``work`` in an audit thread (the caller holds a slot); ``stop`` or cancelling this ends it early.

        It returns only once the thread has finished, so no audit outlives its slot.
        """
        loop = asyncio.get_running_loop()
        seen: dict[str, int] = {}

        def progress(split: str, done: int) -> None:
            self._metrics.samples.inc(done - seen.get(split, 0))
            seen[split] = done
            on_progress(split, done)

        started = time.monotonic()
        future = loop.run_in_executor(self._audit_pool, work, progress, stop.is_set)
        try:
            return await asyncio.shield(future)
        finally:
            if not future.done():
                stop.set()
                await asyncio.wait([future])
            ok = not future.cancelled() and future.exception() is None
            self._metrics.audit_ran(time.monotonic() - started, future.result().report.spilled_bytes if ok else None)

    def _audit_work(
        self,
        spec: AuditSpec,
        data: Callable[[], Iterator[tuple[str, Batch]]] | None,
        progress: Progress,
        cancelled: Callable[[], bool],
    ) -> StoredReport:
        """One audit, in an audit thread: the model's session, the data, the report, stored. With
        ``--ray`` it runs on the cluster instead."""
        if self.cluster is not None:
            path = self._models.path(spec.content_address)
            if data is not None:
                report = self.cluster.audit_stream(path, data(), spec.config, progress, cancelled)
            else:
                ref = spec.dataset or _no_dataset()
                report = self.cluster.audit(path, ref, spec.config, progress, cancelled)
            return self._reports.add(spec.content_address, _named(report, spec.model_name))
        prepared = self._prepare(spec)
        batches: list[Dataset] | Iterator[tuple[str, Batch]]
        if data is not None:
            batches = data()
        else:
            ref = spec.dataset or _no_dataset()
            batches = open_splits(ref.name, ref.split, limit=ref.limit, data_dir=self._options.data_dir)
        report = audit(prepared, batches, spec.config, progress=progress, cancelled=cancelled)
        return self._reports.add(spec.content_address, _named(report, spec.model_name))

    def _spec(self, start: pb.AuditStart) -> AuditSpec:
        """The audit an AuditStart asks for, within the server's per-audit memory budget."""
        spec = wire.start_from_proto(start)
        budget = min(spec.config.memory_budget, self._options.audit_memory)
        return replace(spec, config=replace(spec.config, memory_budget=budget))

    # ---- reports

    @_handled
    async def GetReport(self, request: pb.GetReportRequest, context: Any, call: _Call) -> pb.Report:
        stored = await self._on(self._lookup_pool, self._reports.get, check_id(request.id, "report"))
        call.model = stored.content_address
        return wire.report_to_proto(stored)

    @_handled
    async def ListReports(self, request: pb.ListReportsRequest, context: Any, call: _Call) -> pb.ListReportsResponse:
        call.model = request.model_sha256 or call.model
        page, token = await self._on(
            self._lookup_pool, self._reports.page, request.model_sha256, request.page_size, request.page_token
        )
        return pb.ListReportsResponse(reports=[wire.summary_to_proto(s) for s in page], next_page_token=token)

    # ---- jobs

    @_handled
    async def SubmitJob(self, request: pb.SubmitJobRequest, context: Any, call: _Call) -> pb.Job:
        spec = self._spec(request.audit)
        call.model = spec.content_address
        self._models.path(spec.content_address)
        try:
            job = await self._jobs.submit(spec)
        except QueueFullError:
            self._metrics.audits.labels("rejected").inc()
            raise
        log.info("job %s queued: model=%s dataset=%s", job.id, spec.content_address, spec.dataset)
        return wire.job_to_proto(job)

    @_handled
    async def GetJob(self, request: pb.GetJobRequest, context: Any, call: _Call) -> pb.Job:
        return wire.job_to_proto(await self._jobs.get(request.id))

    @_handled
    async def ListJobs(self, request: pb.ListJobsRequest, context: Any, call: _Call) -> pb.ListJobsResponse:
        jobs, token = await self._jobs.page(request.page_size, request.page_token)
        return pb.ListJobsResponse(jobs=[wire.job_to_proto(job) for job in jobs], next_page_token=token)

    @_handled
    async def CancelJob(self, request: pb.CancelJobRequest, context: Any, call: _Call) -> pb.Job:
        return wire.job_to_proto(await self._jobs.cancel(request.id))

    @_handled
    async def WatchJob(self, request: pb.WatchJobRequest, context: Any, call: _Call) -> None:
        last = None
        async for job in self._jobs.watch(request.id):
            await context.write(pb.JobEvent(job=wire.job_to_proto(job)))
            last = job
        if last is not None and last.state == DONE:
            stored = await self._on(self._lookup_pool, self._reports.get, last.report_id)
            await context.write(pb.JobEvent(report=wire.report_to_proto(stored)))

    async def _run_job(self, job: Job, progress: Progress, stop: threading.Event) -> str:
        try:
            stored = await self._compute(functools.partial(self._audit_work, job.spec, None), progress, stop)
        except AuditError as exc:  # the job's error is shown to clients: no server paths in it either
            raise type(exc)(_without_paths(exc.message)) from None
        log.info("job %s done: report %s", job.id, stored.id)
        return stored.id

    def _job_ended(self, job: Job) -> None:
        self._metrics.audits.labels(job.state).inc()
        if job.error:
            log.info("job %s %s: %s", job.id, job.state, for_terminal(job.error))  # it may quote the model's names

    # ---- the server

    @_handled
    async def ServerMetadata(
        self, request: pb.ServerMetadataRequest, context: Any, call: _Call
    ) -> pb.ServerMetadataResponse:
        options = self._options
        extensions = ["audit-stream", "jobs", "server-datasets", "health", "reflection"]
        extensions += ["metrics"] if options.metrics_port is not None else []
        extensions += ["tls"] if options.tls_cert else []
        extensions += ["bearer-token"] if options.token_file else []
        extensions += ["ray-cluster"] if self.cluster is not None else []
        limits = pb.ServerLimits(
            max_concurrent=options.max_concurrent,
            max_queued=options.max_queued,
            max_model_bytes=options.max_model_mb * MB,
            max_message_bytes=_message_limit(options),
            max_data_files=MAX_FILES,
            idle_timeout_seconds=options.idle_timeout,
            audit_memory_bytes=options.audit_memory,
            page_size=PAGE_SIZE,
        )
        return pb.ServerMetadataResponse(
            name="onnx-auditor",
            version=auditor.__version__,
            extensions=extensions,
            limits=limits,
            datasets=KNOWN_DATASETS,
            device=options.device,
            cluster=await self._cluster_offer() if self.cluster is not None else None,
        )

    async def _cluster_offer(self) -> pb.RayCluster:
        offer = await self.cluster.offer(_CLUSTER_PROBE_S)  # type: ignore[union-attr]
        if offer is None:
            return pb.RayCluster(reachable=False)
        return pb.RayCluster(cpus=offer.cpus, gpus=offer.gpus, reachable=True)

    async def _on(self, pool: Executor, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(pool, fn, *args)


class _Cache(Generic[K, V]):
    """The few most recently used values; used from the event loop and the worker threads."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._items: OrderedDict[K, V] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self._size:
                self._items.popitem(last=False)


async def _unless_fails(work: asyncio.Task[T], watcher: asyncio.Task[Any]) -> T:
    """``work``'s result, unless ``watcher`` fails first: then the watcher's error."""
    await asyncio.wait([work, watcher], return_when=asyncio.FIRST_COMPLETED)
    if not work.done() and not watcher.cancelled() and watcher.exception() is not None:
        raise watcher.exception()  # type: ignore[misc]
    return await work


def _audit_start(request: pb.AuditRequest | None) -> pb.AuditStart:
    if request is None or not request.HasField("start"):
        raise AuditError("an Audit call must begin with an AuditStart message (model and settings)")
    return request.start


def _no_dataset() -> Any:
    raise DataError("the audit names no dataset and streams no batches; send one or the other")


def _named(report: Report, model_name: str) -> Report:
    """The report under the name the client gave its model (the store names every file model.onnx)."""
    return replace(report, model=replace(report.model, name=model_name)) if model_name else report


# ---- assembling and running the server --------------------------------------------------------

# A handler of each kind, by (request streaming, response streaming).
_HANDLER_FACTORIES = {
    (False, False): grpc.unary_unary_rpc_method_handler,
    (False, True): grpc.unary_stream_rpc_method_handler,
    (True, False): grpc.stream_unary_rpc_method_handler,
    (True, True): grpc.stream_stream_rpc_method_handler,
}


class _BearerToken(grpc.aio.ServerInterceptor):
    """Serve a call only with metadata ``authorization: Bearer <token>``; health and reflection stay open."""

    def __init__(self, token: str, open_services: tuple[str, ...]) -> None:
        self._expected = f"Bearer {token}".encode()
        self._open = tuple(f"/{name}/" for name in open_services)

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Any], details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(details)
        if handler is None or details.method.startswith(self._open) or self._authorized(details):
            return handler
        factory = _HANDLER_FACTORIES[(handler.request_streaming, handler.response_streaming)]
        return factory(functools.partial(_refuse, details.method))

    def _authorized(self, details: grpc.HandlerCallDetails) -> bool:
        sent = dict(details.invocation_metadata or ()).get("authorization", "")
        return hmac.compare_digest(sent.encode() if isinstance(sent, str) else sent, self._expected)


async def _refuse(method: str, request: Any, context: grpc.aio.ServicerContext) -> None:
    async with _Call(method.rsplit("/", 1)[-1]).serving(context):
        raise UnauthenticatedError(
            "this server needs a bearer token: send metadata 'authorization: Bearer <token>' (--token-file)"
        )


def _message_limit(options: ServeOptions) -> int:
    return options.max_batch_mb * MB + _MESSAGE_HEADROOM


class _Service:
    """The whole server on one event loop: gRPC (auditor, health, reflection) and the metrics endpoint."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.metrics = ServiceMetrics()
        self.metrics_port: int | None = None
        self._metrics_http: Any = None
        self._watcher: asyncio.Task[None] | None = None
        self._ownership: Any = None

    async def bind(self) -> int:
        """Claim the store, build the server and bind its port (0 picks a free one); nothing is served yet.

        The store is claimed first: staging cleanup (``ModelStore``) and job recovery touch it only
        under its lock, so a second server on a store in use is refused before it changes anything.
        """
        self._ownership = claim_store(self.options.store)
        try:
            return self._build()
        except BaseException:
            self._ownership.release()
            raise

    def _build(self) -> int:
        options = self.options
        open_services = (HEALTH_SERVICE_NAME, reflection.SERVICE_NAME)
        interceptors = [_BearerToken(read_token(options.token_file), open_services)] if options.token_file else []
        self.server = grpc.aio.server(
            interceptors=interceptors,
            options=[
                ("grpc.max_receive_message_length", _message_limit(options)),
                ("grpc.max_send_message_length", -1),
                ("grpc.so_reuseport", 0),  # a second server on a taken port fails instead of sharing it
            ],
        )
        self.servicer = AuditorServicer(options, self.metrics)
        auditor_pb2_grpc.add_AuditorServicer_to_server(self.servicer, self.server)
        self.health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection((SERVICE, HEALTH_SERVICE_NAME, reflection.SERVICE_NAME), self.server)
        self.port = _bind(self.server, options)
        return self.port

    async def start(self) -> None:
        """Serve ``/metrics`` when asked to, queue the jobs a stopped server left, then serve gRPC."""
        if self.options.metrics_port is not None:
            tls = (self.options.tls_cert, self.options.tls_key) if self.options.tls_cert else None
            try:
                self._metrics_http = self.metrics.serve(self.options.host, self.options.metrics_port, tls)  # type: ignore[arg-type]
            except OSError as exc:
                raise AuditError(f"cannot serve metrics on port {self.options.metrics_port}: {exc.strerror}") from None
            self.metrics_port = self._metrics_http.server_port
        cluster = self.servicer.cluster
        if cluster is not None:
            cluster.join()  # before any job runs; a cluster that cannot be reached stops the start in one line
        recovered = await self.servicer.async_init()
        if recovered:
            log.info("queued again %d job(s) a stopped server left queued or running", recovered)
        await self.server.start()
        await self._set_health(True)
        if cluster is not None:
            self._watcher = asyncio.create_task(self._watch(cluster), name="auditor-cluster-health")

    async def _set_health(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for service in ("", SERVICE):
            await self.health.set(service, status)

    async def _watch(self, cluster: RayAudits) -> None:
        """Health follows the cluster: NOT_SERVING while it cannot be reached, SERVING once it answers again."""
        reachable = True
        while True:
            await asyncio.sleep(_CLUSTER_WATCH_S)
            now = await cluster.offer(_CLUSTER_PROBE_S) is not None
            if now != reachable:
                reachable = now
                log.warning(
                    "Ray cluster %s", "reachable again" if now else f"unreachable (no answer in {_CLUSTER_PROBE_S:g} s)"
                )
                await self._set_health(now)

    async def stop(self, grace: float | None) -> None:
        """Health turns NOT_SERVING, new calls are refused, in-flight audits and jobs get ``grace`` seconds."""
        if self._watcher is not None:
            self._watcher.cancel()
        await self.health.enter_graceful_shutdown()
        await asyncio.gather(self.server.stop(grace), self.servicer.stop(grace))
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()
        self._ownership.release()


def _bind(server: grpc.aio.Server, options: ServeOptions) -> int:
    host = f"[{options.host}]" if ":" in options.host else options.host
    address = f"{host}:{options.port}"
    try:
        if options.tls_cert is None or options.tls_key is None:
            return server.add_insecure_port(address)
        pair = (options.tls_key.read_bytes(), options.tls_cert.read_bytes())
        return server.add_secure_port(address, grpc.ssl_server_credentials([pair]))
    except (OSError, RuntimeError) as exc:  # gRPC's own text ends in advice about GRPC_VERBOSITY: keep the fact
        reason = str(exc).split(";")[0].strip() or type(exc).__name__
        raise AuditError(
            f"cannot listen on {address}: {reason} (is the port taken, or the host not an address of this machine?)"
        ) from None


class Server:
    """A server on an event loop thread of its own: the synchronous face that tests and embedders use.

    ``start()`` serves; ``stop(grace)`` returns an event that is set once the server has stopped.
    """

    def __init__(self, options: ServeOptions) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="auditor-server", daemon=True)
        self._thread.start()
        self._service = _Service(options)
        self._stopped: threading.Event | None = None
        try:
            self.port = self._run(self._service.bind())
        except BaseException:
            self._close()
            raise

    @property
    def metrics_port(self) -> int | None:
        return self._service.metrics_port

    def start(self) -> None:
        self._run(self._service.start())

    def stop(self, grace: float | None) -> threading.Event:
        if self._stopped is None:
            self._stopped = threading.Event()
            future = asyncio.run_coroutine_threadsafe(self._service.stop(grace), self._loop)
            future.add_done_callback(lambda _: (self._close(), self._stopped.set()))  # type: ignore[union-attr]
        return self._stopped

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    def _close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)


def build_server(options: ServeOptions) -> tuple[Server, int]:
    """A ready-to-start server and the port it bound (port 0 picks a free one, as tests do)."""
    server = Server(options)
    return server, server.port


def run_serve(args: argparse.Namespace) -> int:
    """Serve until SIGTERM, SIGINT, SIGHUP or another terminating signal, then shut down gracefully; exit code 0."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    options = ServeOptions(**{f.name: getattr(args, f.name) for f in fields(ServeOptions)})
    return asyncio.run(_serve(options))


async def _serve(options: ServeOptions) -> int:
    service = _Service(options)
    port = await service.bind()
    await service.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, *TERMINATING):  # each one that is not ignored ends the server gracefully
        if signal.getsignal(sig) is not signal.SIG_IGN:
            loop.add_signal_handler(sig, stop.set)
    log.info(
        "serving %s on %s:%d (store %s, tls %s)",
        SERVICE,
        options.host,
        port,
        options.store,
        "on" if options.tls_cert else "off",
    )
    if service.metrics_port is not None:
        log.info("metrics on http://%s:%d/metrics", options.host, service.metrics_port)
    await stop.wait()
    log.info("shutting down: in-flight audits get %g s to finish", options.grace)
    await service.stop(options.grace)
    log.info("stopped")
    return 0
