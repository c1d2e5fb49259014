"""auditor.service.jobs: the audit queue on a real event loop, and the job table in a real SQLite file."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from contextlib import closing
from dataclasses import replace
from pathlib import Path

import pytest
from refusals import refused

from auditor.config import AuditConfig
from auditor.errors import AuditError, DataError, NotFoundError
from auditor.records import CANCELLED, DONE, FAILED, QUEUED, RUNNING, AuditSpec, DatasetRef
from auditor.service.jobs import AuditQueue, JobStore, QueueFullError, new_job

SPEC = AuditSpec("a" * 64, "net.onnx", AuditConfig(beta=3.0), DatasetRef("mnist", "test", 50))


# ---- the queue ------------------------------------------------------------------------------


def test_slots_go_first_come_first_served_and_positions_only_move_up() -> None:
    async def scenario() -> tuple[list[str], dict[str, list[int]]]:
        queue = AuditQueue(slots=2, max_queued=3)
        order: list[str] = []
        positions: dict[str, list[int]] = {name: [] for name in "abcde"}
        release = asyncio.Event()

        async def audit(name: str) -> None:
            async with queue.slot(positions[name].append):
                order.append(name)
                await release.wait()

        tasks = []
        for name in "abcde":
            tasks.append(asyncio.create_task(audit(name)))
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        assert (queue.running, queue.waiting) == (2, 3)
        release.set()
        await asyncio.gather(*tasks)
        assert (queue.running, queue.waiting) == (0, 0)
        return order, positions

    order, positions = asyncio.run(scenario())
    assert order == list("abcde")
    assert positions == {"a": [], "b": [], "c": [0], "d": [1, 0], "e": [2, 1, 0]}


def test_past_the_slots_and_the_queue_a_new_audit_is_refused_as_retryable() -> None:
    async def scenario() -> None:
        queue = AuditQueue(slots=1, max_queued=1)
        first, second = queue.join(), queue.join()
        assert queue.full()
        refused(QueueFullError, queue.join, "running 1 audits and 1 more are queued", "--max-queued")
        assert QueueFullError.retryable
        queue.leave(second)
        assert not queue.full()
        queue.leave(first)
        forced = [queue.join(force=True) for _ in range(3)]  # jobs a restart brings back always get in
        assert (queue.running, queue.waiting) == (1, 2)
        for ticket in forced:
            queue.leave(ticket)

    asyncio.run(scenario())


def test_a_waiter_that_gives_up_leaves_its_place_and_a_slot_given_back_goes_to_the_next() -> None:
    async def scenario() -> None:
        changes: list[tuple[int, int]] = []
        queue = AuditQueue(slots=1, max_queued=5, on_change=lambda *change: changes.append(change))
        holder = queue.join()

        async def wait() -> None:
            async with queue.slot():
                pytest.fail("a cancelled waiter never gets a slot")

        waiter = asyncio.create_task(wait())
        await asyncio.sleep(0)
        assert (queue.running, queue.waiting) == (1, 1)
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        assert (queue.running, queue.waiting) == (1, 0)
        next_one = queue.join()
        queue.leave(holder)
        assert next_one.granted.is_set() and (queue.running, queue.waiting) == (1, 0)
        queue.leave(next_one)
        assert changes[-1] == (0, 0)

    asyncio.run(scenario())


# ---- what a job is ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ref", "message"),
    [
        (lambda: DatasetRef("/etc/passwd"), "resolves only the datasets"),
        (lambda: DatasetRef("mnist", "validation"), "split must be one of"),
        (lambda: DatasetRef("mnist", "test", 0), "limit must be at least 1"),
    ],
)
def test_a_dataset_ref_names_only_known_datasets_splits_and_limits(ref, message: str) -> None:
    refused(DataError, ref, message)


def test_a_job_needs_a_dataset_the_server_holds() -> None:
    refused(AuditError, lambda: new_job(AuditSpec("a" * 64, "", AuditConfig())), "DatasetRef")


# ---- the job table --------------------------------------------------------------------------------


def test_jobs_round_trip_and_page_newest_first(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store.sqlite3")
    jobs = [new_job(SPEC) for _ in range(5)]
    for job in jobs:
        store.add(job)
    assert store.get(jobs[0].id) == jobs[0]
    seen, token = [], ""
    while True:
        page, token = store.page(2, token)
        seen += [job.id for job in page]
        if not token:
            break
    assert seen == [job.id for job in reversed(jobs)]
    refused(NotFoundError, lambda: store.get("0" * 32), "no job with id")
    refused(AuditError, lambda: store.get("../x"), "32 lowercase hex digits")
    refused(AuditError, lambda: store.page(0, "x"), "page token")


def test_recovery_queues_again_what_was_queued_or_running_and_keeps_what_ended(tmp_path: Path) -> None:
    store = JobStore(tmp_path / "store.sqlite3")
    queued, running, done, failed, cancelled = (new_job(SPEC) for _ in range(5))
    for job, state in [(queued, QUEUED), (running, RUNNING), (done, DONE), (failed, FAILED), (cancelled, CANCELLED)]:
        store.add(job)
        store.save(replace(job, state=state, samples={"test": 7}))
    recovered = JobStore(tmp_path / "store.sqlite3").recover()  # as a restarted server opens it
    assert [job.id for job in recovered] == [queued.id, running.id]  # oldest first
    assert all(job.state == QUEUED and job.samples == {} for job in recovered)
    assert [job.restarts for job in recovered] == [0, 1]
    assert store.get(done.id).state == DONE and store.get(done.id).samples == {"test": 7}


def test_a_job_whose_settings_this_version_cannot_read_fails_saying_why(tmp_path: Path) -> None:
    path = tmp_path / "store.sqlite3"
    store = JobStore(path)
    job = new_job(SPEC)
    store.add(job)
    with closing(sqlite3.connect(path)) as db, db:
        db.execute("UPDATE jobs SET config_json = ? WHERE id = ?", (json.dumps({"shiny_new_setting": 1}), job.id))
    assert store.recover() == []
    with closing(sqlite3.connect(path)) as db:
        state, error = db.execute("SELECT state, error FROM jobs WHERE id = ?", (job.id,)).fetchone()
    assert state == FAILED and "cannot read the job's settings" in error and "\n" not in error
