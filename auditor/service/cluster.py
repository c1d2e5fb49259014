"""The server's Ray cluster (``auditor serve --ray ADDRESS``): joined for the server's life, audits run on it.

The server stays the one front door (auth, queue, jobs, progress, the report store); what moves
is where an accepted audit runs. ``RayAudits.audit`` cuts each split of a dataset the server
holds into shards exactly as ``auditor audit --ray`` does (``auditor.engine.shard.audit_sharded``);
``RayAudits.audit_stream`` gathers the batches a client streams into chunks, each a shard task
as soon as it is full (``auditor.engine.shard.audit_streamed``). Either way the model's bytes reach the
workers once, through Ray's object store; the shards' samples add up into the call's or job's
progress; the server's stop flag (a cancelled call or job, a stopping server) cancels the tasks;
a worker that dies has its task retried twice by Ray, and past that the audit fails with one
line and stores nothing. The report equals a local audit's.

``ray`` is imported only through ``auditor.raycluster``. ``resources`` answers what the cluster
offers, or raises when it cannot be reached; ``offer`` asks the same from the event loop with a
time limit, and the server's health check and ServerMetadata follow it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

from auditor.config import AuditConfig
from auditor.datasets.batches import Batch
from auditor.datasets.splits import open_splits
from auditor.engine.modelfile import load_model
from auditor.engine.shard import CHUNK_BYTES, RayExecutor, audit_sharded, audit_streamed
from auditor.errors import AuditError, first_line
from auditor.raycluster import connected
from auditor.records import DatasetRef, DataSpec
from auditor.report import Report

Progress = Callable[[str, int], None]


@dataclass(frozen=True)
class Offer:
    """What the cluster offers in all: CPUs and GPUs (Ray's cluster resources)."""

    cpus: float
    gpus: float


class RayAudits:
    """Audits on the Ray cluster at ``address`` (``local`` starts a private instance with the server).

    ``shards`` per split, or None for one per CPU the cluster offers when the audit starts.
    ``data_dir`` is where workers read named datasets (passed on as ``AUDITOR_DATA_DIR``).
    """

    def __init__(
        self, address: str, shards: int | None = None, data_dir: Path | None = None, chunk_bytes: int = CHUNK_BYTES
    ) -> None:
        self.address = address
        self.shards = shards
        self.data_dir = data_dir
        self.chunk_bytes = chunk_bytes
        self._stack = ExitStack()
        self._ray: ModuleType | None = None
        self._probe: asyncio.Future[Offer | None] | None = None

    def join(self) -> None:
        """Join the cluster (a one-line ``AuditError`` when it cannot be reached)."""
        env = {"AUDITOR_DATA_DIR": str(self.data_dir.resolve())} if self.data_dir is not None else None
        self._ray = self._stack.enter_context(connected(self.address, env))

    def leave(self) -> None:
        """Leave the cluster (a private instance stops with it)."""
        self._ray = None
        self._stack.close()

    def resources(self) -> Offer:
        """What the cluster offers now; ``AuditError`` when it cannot be reached."""
        ray = self._joined()
        try:
            total = ray.cluster_resources()
        except Exception as exc:  # Ray raises its own kinds (RaySystemError, ConnectionError, …)
            raise AuditError(f"the Ray cluster cannot be reached: {first_line(exc)}") from None
        if not total.get("CPU"):
            raise AuditError("the Ray cluster offers no CPUs: no node is alive")
        return Offer(cpus=float(total.get("CPU", 0.0)), gpus=float(total.get("GPU", 0.0)))

    async def offer(self, timeout: float) -> Offer | None:
        """What the cluster offers, or None when it cannot be reached or has not answered within
        ``timeout`` seconds. Asked on a daemon thread, one question at a time (a new caller waits for
        the open one), so a cluster that hangs neither piles up threads nor keeps the process from
        exiting. Call it from one event loop."""
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe.done():
            self._probe = probe = loop.create_future()
            threading.Thread(target=self._ask, args=(loop, probe), name="auditor-cluster-probe", daemon=True).start()
        try:
            return await asyncio.wait_for(asyncio.shield(self._probe), timeout)
        except TimeoutError:
            return None

    def _ask(self, loop: asyncio.AbstractEventLoop, probe: asyncio.Future[Offer | None]) -> None:
        try:
            answer: Offer | None = self.resources()
        except AuditError:
            answer = None
        with suppress(RuntimeError):  # the loop has closed meanwhile: nobody is waiting
            loop.call_soon_threadsafe(lambda: probe.done() or probe.set_result(answer))

    def audit(
        self,
        model: Path,
        dataset: DatasetRef,
        config: AuditConfig,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Report:
        """Audit the model file ``model`` on the server's ``dataset`` as sharded Ray tasks; the report
        a local audit gives. ``cancelled()`` turning true cancels the tasks (``CancelledError``)."""
        ray = self._joined()
        offer = self.resources()  # an unreachable cluster fails the audit here, in one line
        shards = self.shards or max(1, int(offer.cpus))
        loaded = load_model(model)
        data = DataSpec(source=dataset.name, split=dataset.split, limit=dataset.limit)
        datasets = open_splits(dataset.name, dataset.split, limit=dataset.limit, data_dir=self.data_dir)
        executor = RayExecutor(ray, cancelled)
        return audit_sharded(loaded, datasets, data, config, executor, shards=shards, progress=progress)

    def audit_stream(
        self,
        model: Path,
        batches: Iterable[tuple[str, Batch]],
        config: AuditConfig,
        progress: Progress | None = None,
        cancelled: Callable[[], bool] | None = None,
    ) -> Report:
        """Audit the model file ``model`` on streamed ``batches``, chunk by chunk as Ray tasks (at most
        one per CPU the cluster offers unfinished at once); the report a local audit gives."""
        ray = self._joined()
        cpus = max(1, int(self.resources().cpus))
        executor = RayExecutor(ray, cancelled)
        return audit_streamed(
            load_model(model), batches, config, executor,
            partitions=self.shards or cpus, in_flight=cpus, chunk_bytes=self.chunk_bytes, progress=progress,
        )  # fmt: skip

    def _joined(self) -> ModuleType:
        if self._ray is None:
            raise AuditError("the server has not joined its Ray cluster")
        return self._ray
