"""Audits as jobs: the one bounded queue every audit waits in, and detached jobs that outlive restarts.

``AuditQueue`` hands out ``--max-concurrent`` slots in arrival order to ``--max-queued`` waiting
audits at most; past that it refuses with ``QueueFullError``, the one RESOURCE_EXHAUSTED worth
retrying. Streamed audits (the Audit call) and detached jobs wait in the same queue.

A detached job is an audit of a dataset the server holds. ``JobStore`` keeps each job as a row
in the store's SQLite file; ``Jobs`` runs them. A job that was queued or running when the server
stopped, even by ``kill -9``, is queued again at the next start and begins from the beginning:
counts are exact, so the re-run gives the same report. A job ends done (with a report id), failed
or cancelled (each with a one-line reason); none is ever dropped silently.

The queue and ``Jobs`` live on the server's event loop and are used from it only; the audits
themselves run in worker threads (``auditor.service.server``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from contextlib import asynccontextmanager, closing
from dataclasses import asdict, replace
from datetime import datetime
from pathlib import Path
from typing import Any

from auditor.config import AuditConfig
from auditor.errors import AuditError, CancelledError, LimitError, NotFoundError
from auditor.records import CANCELLED, DONE, FAILED, QUEUED, RUNNING, AuditSpec, DatasetRef, Job, check_id, utc_now
from auditor.service.persist import connect, create_tables, page_bounds

log = logging.getLogger("auditor.service.jobs")

_WATCH_INTERVAL_S = 0.2  # progress reaches watchers at most this often; state changes at once

Progress = Callable[[str, int], None]


class QueueFullError(LimitError):
    """Every slot is busy and the queue is full: the one refusal that retrying later can fix."""

    retryable = True


# ---- the queue ------------------------------------------------------------------------------


class Ticket:
    """One audit's place: waiting (``position`` ahead of it), then running once ``granted`` is set."""

    def __init__(self, on_position: Callable[[int], None] | None) -> None:
        self.on_position = on_position
        self.position: int | None = None
        self.running = False
        self.granted = asyncio.Event()


class AuditQueue:
    """``slots`` audits run at once; up to ``max_queued`` more wait, first come first served."""

    def __init__(self, slots: int, max_queued: int, on_change: Callable[[int, int], None] | None = None) -> None:
        self.slots = slots
        self.max_queued = max_queued
        self._on_change = on_change
        self._waiting: list[Ticket] = []
        self._running = 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return self._running

    def full(self) -> bool:
        """Whether a new audit would be refused: no free slot for it and no room in the queue."""
        starts_now = not self._waiting and self._running < self.slots
        return not starts_now and len(self._waiting) >= self.max_queued

    def join(self, on_position: Callable[[int], None] | None = None, *, force: bool = False) -> Ticket:
        """Take a place at the back (``force``: even past ``max_queued``, for jobs a restart brings back).

        ``on_position(n)`` is called whenever the audits ahead of it change, and not at all if
        it starts at once.
        """
        if self.full() and not force:
            raise QueueFullError(
                f"the server is running {self._running} audits and {len(self._waiting)} more are queued, its "
                "limits (serve --max-concurrent, --max-queued); retry later"
            )
        ticket = Ticket(on_position)
        self._waiting.append(ticket)
        self._advance()
        return ticket

    async def turn(self, ticket: Ticket) -> None:
        """Wait until the ticket holds a slot."""
        await ticket.granted.wait()

    def leave(self, ticket: Ticket) -> None:
        """Give up a place in the queue, or the slot the ticket holds."""
        if ticket in self._waiting:
            self._waiting.remove(ticket)
        elif ticket.running:
            ticket.running = False
            self._running -= 1
        self._advance()

    @asynccontextmanager
    async def slot(self, on_position: Callable[[int], None] | None = None) -> AsyncIterator[None]:
        """Hold a slot for the block, after waiting for it (``QueueFullError`` when the queue is full)."""
        ticket = self.join(on_position)
        try:
            await self.turn(ticket)
            yield
        finally:
            self.leave(ticket)

    def _advance(self) -> None:
        while self._waiting and self._running < self.slots:
            ticket = self._waiting.pop(0)
            ticket.running, ticket.position = True, None
            self._running += 1
            ticket.granted.set()
        for position, ticket in enumerate(self._waiting):
            if ticket.position != position:
                ticket.position = position
                if ticket.on_position is not None:
                    ticket.on_position(position)
        if self._on_change is not None:
            self._on_change(len(self._waiting), self._running)


# ---- what a job is ------------------------------------------------------------------------------


def new_job(spec: AuditSpec) -> Job:
    if spec.dataset is None:
        raise AuditError("a job audits a dataset the server holds: give a DatasetRef (mnist or fashion-mnist)")
    return Job(uuid.uuid4().hex, spec)


# ---- the job table ------------------------------------------------------------------------------

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    content_address TEXT NOT NULL,
    model_name TEXT NOT NULL,
    dataset_json TEXT NOT NULL,
    config_json TEXT NOT NULL,
    state TEXT NOT NULL,
    samples_json TEXT NOT NULL,
    error TEXT NOT NULL,
    report_id TEXT NOT NULL,
    created TEXT NOT NULL,
    started TEXT,
    finished TEXT,
    restarts INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_by_state ON jobs (state, seq);
"""
_COLUMNS = (
    "id, content_address, model_name, dataset_json, config_json, state, samples_json, error, report_id, "
    "created, started, finished, restarts"
)


class JobStore:
    """Jobs as rows of the store's SQLite file (beside the reports); a connection per call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_tables(path, _SCHEMA)

    def add(self, job: Job) -> None:
        with closing(connect(self.path)) as db, db:
            db.execute(f"INSERT INTO jobs ({_COLUMNS}) VALUES ({', '.join('?' * 13)})", _row(job))

    def save(self, job: Job) -> None:
        """Write a job's state, progress and outcome (its spec never changes)."""
        row = _row(job)
        with closing(connect(self.path)) as db, db:
            db.execute(
                "UPDATE jobs SET state = ?, samples_json = ?, error = ?, report_id = ?, started = ?, finished = ?, "
                "restarts = ? WHERE id = ?",
                (*row[5:9], *row[10:13], job.id),
            )

    def get(self, job_id: str) -> Job:
        check_id(job_id, "job")
        with closing(connect(self.path)) as db:
            row = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise NotFoundError(f"no job with id {job_id}; list the jobs to see their ids")
        return _job(row)

    def page(self, page_size: int = 0, page_token: str = "") -> tuple[list[Job], str]:
        """One page of jobs, newest first, and the token of the next page ("" on the last)."""
        size, before = page_bounds(page_size, page_token)
        where, params = ("WHERE seq < ?", [before]) if before is not None else ("", [])
        with closing(connect(self.path)) as db:
            rows = db.execute(
                f"SELECT seq, {_COLUMNS} FROM jobs {where} ORDER BY seq DESC LIMIT ?", [*params, size + 1]
            ).fetchall()
        page = rows[:size]
        return [_job(row[1:]) for row in page], str(page[-1][0]) if len(rows) > size else ""

    def recover(self) -> list[Job]:
        """The jobs a stopped server left queued or running, all queued again, oldest first.

        A running job counts one more restart and starts from no samples. A job whose stored
        settings this version cannot read fails, saying so.
        """
        with closing(connect(self.path)) as db, db:
            db.execute("UPDATE jobs SET restarts = restarts + 1 WHERE state = ?", (RUNNING,))
            db.execute(
                "UPDATE jobs SET state = ?, samples_json = '{}', started = NULL WHERE state IN (?, ?)",
                (QUEUED, QUEUED, RUNNING),
            )
            rows = db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY seq", (QUEUED,)).fetchall()
        jobs = []
        for row in rows:
            try:
                jobs.append(_job(row))
            except (AuditError, ValueError, KeyError, TypeError) as exc:
                reason = exc.message if isinstance(exc, AuditError) else type(exc).__name__
                with closing(connect(self.path)) as db, db:
                    db.execute(
                        "UPDATE jobs SET state = ?, error = ?, finished = ? WHERE id = ?",
                        (FAILED, f"this server version cannot read the job's settings ({reason})",
                         utc_now().isoformat(), row[0]),
                    )  # fmt: skip
        return jobs


def _row(job: Job) -> tuple[Any, ...]:
    spec = job.spec
    return (
        job.id,
        spec.content_address,
        spec.model_name,
        json.dumps(asdict(spec.dataset) if spec.dataset else None),
        json.dumps(spec.config.to_dict()),
        job.state,
        json.dumps(dict(job.samples)),
        job.error,
        job.report_id,
        job.created.isoformat(),
        job.started.isoformat() if job.started else None,
        job.finished.isoformat() if job.finished else None,
        job.restarts,
    )


def _job(row: tuple[Any, ...]) -> Job:
    (job_id, address, model_name, dataset, config, state, samples, error, report_id, created, started, finished,
     restarts) = row  # fmt: skip
    ref = json.loads(dataset)
    spec = AuditSpec(address, model_name, AuditConfig.from_dict(json.loads(config)), ref and DatasetRef(**ref))
    return Job(
        id=job_id,
        spec=spec,
        state=state,
        samples=json.loads(samples),
        error=error,
        report_id=report_id,
        created=datetime.fromisoformat(created),
        started=datetime.fromisoformat(started) if started else None,
        finished=datetime.fromisoformat(finished) if finished else None,
        restarts=restarts,
    )


# ---- running jobs -------------------------------------------------------------------------------

# ``work(job, progress, stop) -> report id``: runs the audit (in a worker thread) until ``stop`` is set.
Work = Callable[[Job, Progress, threading.Event], Awaitable[str]]


class Jobs:
    """Detached jobs: each waits in the ``AuditQueue``, then ``work`` runs it; every change is saved.

    Live jobs (queued or running) are held in memory, with their progress and queue position;
    the store has every job's state, and its outcome once it ends.
    """

    def __init__(
        self, store: JobStore, queue: AuditQueue, work: Work, io: Executor, on_end: Callable[[Job], None] | None = None
    ) -> None:
        self._store = store
        self._queue = queue
        self._work = work
        self._io = io
        self._on_end = on_end
        self._live: dict[str, Job] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stops: dict[str, threading.Event] = {}
        self._cancelled: set[str] = set()
        self._stopping = False
        self._signal = asyncio.Event()
        self._touched: dict[str, float] = {}

    async def start(self) -> int:
        """Queue again every job a stopped server left queued or running; how many there were."""
        jobs = await self._call(self._store.recover)
        for job in jobs:
            self._launch(job, self._queue.join(self._positioner(job.id), force=True))
        return len(jobs)

    async def submit(self, spec: AuditSpec) -> Job:
        """Store a new job and queue it (``QueueFullError`` when the queue is full)."""
        job = new_job(spec)
        ticket = self._queue.join(self._positioner(job.id))
        self._live[job.id] = replace(job, queue_position=ticket.position)
        try:
            await self._call(self._store.add, job)
        except BaseException:
            self._queue.leave(ticket)
            del self._live[job.id]
            raise
        self._launch(job, ticket)
        return self._live[job.id]

    async def get(self, job_id: str) -> Job:
        check_id(job_id, "job")
        return self._live.get(job_id) or await self._call(self._store.get, job_id)

    async def page(self, page_size: int, page_token: str) -> tuple[list[Job], str]:
        jobs, token = await self._call(self._store.page, page_size, page_token)
        return [self._live.get(job.id, job) for job in jobs], token

    async def cancel(self, job_id: str) -> Job:
        """Stop a queued or running job and return it once it has ended; an ended job as it is."""
        job = await self.get(job_id)
        task = self._tasks.get(job_id)
        if job.ended or task is None:
            return job
        self._cancelled.add(job_id)
        if job_id in self._stops:
            self._stops[job_id].set()
        else:
            task.cancel()
        await asyncio.wait([task])
        return await self.get(job_id)

    async def watch(self, job_id: str) -> AsyncIterator[Job]:
        """The job now, then each time it changes, until it has ended."""
        last = await self.get(job_id)
        yield last
        while not last.ended:
            signal = self._signal
            current = self._live.get(job_id) or await self._call(self._store.get, job_id)
            if current != last:
                last = current
                yield current
            else:
                await signal.wait()

    async def stop(self, grace: float) -> None:
        """Let running jobs finish within ``grace`` seconds, then interrupt them; their rows stay
        queued or running, so the next start runs them again."""
        self._stopping = True
        for job_id, task in self._tasks.items():
            if job_id not in self._stops:
                task.cancel()
        running = list(self._tasks.values())
        if running:
            await asyncio.wait(running, timeout=grace)
        for stop in self._stops.values():
            stop.set()
        if self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    # ---- one job's life

    def _launch(self, job: Job, ticket: Any) -> None:
        self._live[job.id] = replace(self._live.get(job.id, job), queue_position=ticket.position)
        self._tasks[job.id] = asyncio.create_task(self._run(job, ticket), name=f"auditor-job-{job.id}")

    async def _run(self, job: Job, ticket: Any) -> None:
        ended: Job | None = None
        try:
            await self._queue.turn(ticket)
            if self._stopping:
                return
            job = replace(job, state=RUNNING, started=utc_now(), samples={}, queue_position=None)
            self._stops[job.id] = stop = threading.Event()
            self._set(job)
            await self._call(self._store.save, job)
            report_id = await self._work(job, self._progress_of(job.id), stop)
            ended = replace(self._live[job.id], state=DONE, report_id=report_id)
        except asyncio.CancelledError:
            if self._stopping:
                return
            ended = replace(self._live[job.id], state=CANCELLED, error="cancelled while queued (CancelJob)")
        except AuditError as exc:
            by_client = job.id in self._cancelled
            if isinstance(exc, CancelledError) and self._stopping and not by_client:
                return  # the server is stopping: the job runs again at the next start
            samples = sum(self._live[job.id].samples.values())
            state, error = (
                (CANCELLED, f"cancelled after {samples} samples (CancelJob)") if by_client else (FAILED, exc.message)
            )
            ended = replace(self._live[job.id], state=state, error=error)
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job.id)
            ended = replace(
                self._live[job.id], state=FAILED, error=f"internal error ({type(exc).__name__}); see the server log"
            )
        finally:
            self._queue.leave(ticket)
            if ended is not None:
                await self._end(replace(ended, finished=utc_now(), queue_position=None))
            self._forget(job.id)

    async def _end(self, job: Job) -> None:
        self._set(job)
        if self._on_end is not None:
            self._on_end(job)
        try:
            await asyncio.shield(self._call(self._store.save, job))
        except Exception:
            log.exception("could not save the outcome of job %s", job.id)

    def _forget(self, job_id: str) -> None:
        for table in (self._live, self._tasks, self._stops, self._touched):
            table.pop(job_id, None)
        self._cancelled.discard(job_id)
        self._touch()

    def _positioner(self, job_id: str) -> Callable[[int], None]:
        def moved(position: int) -> None:
            if job_id in self._live:
                self._set(replace(self._live[job_id], queue_position=position))

        return moved

    def _progress_of(self, job_id: str) -> Progress:
        """A progress callback for the worker thread that updates the live job on the event loop."""
        loop = asyncio.get_running_loop()

        def moved(split: str, done: int) -> None:
            job = self._live.get(job_id)
            if job is None:
                return
            self._live[job_id] = replace(job, samples={**job.samples, split: done})
            now = time.monotonic()
            if now - self._touched.get(job_id, 0.0) >= _WATCH_INTERVAL_S:
                self._touched[job_id] = now
                self._touch()

        return lambda split, done: loop.call_soon_threadsafe(moved, split, done)

    def _set(self, job: Job) -> None:
        self._live[job.id] = job
        self._touch()

    def _touch(self) -> None:
        """Wake every watcher (they compare the job they last sent with the one now)."""
        self._signal.set()
        self._signal = asyncio.Event()

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        return await asyncio.get_running_loop().run_in_executor(self._io, fn, *args)
