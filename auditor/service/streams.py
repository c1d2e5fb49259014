"""The streams of one gRPC call, for the asyncio server: what a client sends, what it is sent.

- ``Messages`` reads the client's messages one at a time; a client silent for the idle timeout
  loses its call (``LimitError``), which frees whatever it held.
- ``ProgressStream`` writes progress events from one writer task, coalesced, so that a slow
  reader never holds up an audit.
- ``client_batches`` hands the client's batches to an audit running in a worker thread, each
  read on the event loop only when the audit asks for it (gRPC flow control does the rest).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import grpc

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.datasets.batches import Batch
from auditor.errors import AuditError, CancelledError, LimitError
from auditor.service import wire


class Messages:
    """The client's messages, one at a time; a client silent for ``idle_timeout`` loses its call."""

    def __init__(self, context: grpc.aio.ServicerContext, idle_timeout: float) -> None:
        self._context = context
        self._idle_timeout = idle_timeout

    async def next(self, *, idle_timeout: bool = True) -> Any:
        """The next message, or None once the client has closed its side."""
        try:
            async with asyncio.timeout(self._idle_timeout if idle_timeout else None):
                message = await self._context.read()
        except TimeoutError:
            raise LimitError(
                f"the client sent nothing for {self._idle_timeout:g} s (serve --idle-timeout); the call was "
                "closed to free its place"
            ) from None
        return None if message is grpc.aio.EOF else message


class ProgressStream:
    """Progress events to the client from one writer task: queue positions, then samples per split.

    Events are coalesced (the newest per split, in order of first appearance), so a client that
    reads slowly never holds up the audit; one that reads nothing for ``idle_timeout`` is dropped.
    """

    def __init__(self, context: grpc.aio.ServicerContext, idle_timeout: float, samples: dict[str, int]) -> None:
        self._context = context
        self._idle_timeout = idle_timeout
        self._samples = samples  # samples done per split, for the call's log line
        self._loop = asyncio.get_running_loop()
        self._pending: dict[str, pb.AuditProgress] = {}
        self._wake = asyncio.Event()
        self._closing = False
        self.writer = asyncio.create_task(self._write())  # ends early only by failing

    def queued(self, position: int) -> None:
        """On the event loop: the audit waits, ``position`` audits ahead of it."""
        self._put("", pb.AuditProgress(queue_position=position))

    def running(self, split: str, done: int) -> None:
        """From any thread: ``done`` samples of ``split`` audited."""
        self._samples[split] = done
        self._loop.call_soon_threadsafe(self._put, split, pb.AuditProgress(split=split, samples_done=done))

    async def finish(self) -> None:
        """Send what is pending, then stop."""
        self._closing = True
        self._wake.set()
        await self.writer

    def cancel(self) -> None:
        self.writer.cancel()

    def _put(self, key: str, event: pb.AuditProgress) -> None:
        self._pending[key] = event
        self._wake.set()

    async def _write(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                event = self._pending.pop(next(iter(self._pending)))
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for can swallow a cancel that
                    # arrives as the write completes, and this task would then wait for ever
                    async with asyncio.timeout(self._idle_timeout):
                        await self._context.write(pb.AuditResponse(progress=event))
                except TimeoutError:
                    raise LimitError(
                        f"the client read nothing for {self._idle_timeout:g} s (serve --idle-timeout); the call "
                        "was closed"
                    ) from None
            if self._closing:
                return


async def expect_no_batches(messages: Messages) -> None:
    """After an AuditStart that names a server-side dataset the client closes its side; a batch
    instead makes the request ambiguous. (Read here, before the audit, never alongside it: a read
    cut short would leave the call unable to finish.)"""
    if await messages.next() is not None:
        raise AuditError(
            "the AuditStart names a server-side dataset (DatasetRef) and the client sent batches too; send "
            "one or the other, and close the stream after the AuditStart"
        )


def client_batches(
    first: pb.AuditRequest, messages: Messages, loop: asyncio.AbstractEventLoop, stop: threading.Event
) -> Iterator[tuple[str, Batch]]:
    """In an audit thread: the client's batches, each read on the event loop when the audit wants it."""
    message = first
    while message is not None:
        if not message.HasField("batch"):
            raise AuditError("after AuditStart, an Audit call sends only SampleBatch messages")
        yield wire.batch_from_proto(message.batch)
        future = asyncio.run_coroutine_threadsafe(messages.next(), loop)
        while True:
            try:
                message = future.result(timeout=0.25)
                break
            except TimeoutError:
                if stop.is_set():
                    future.cancel()
                    raise CancelledError("the audit was stopped while waiting for the client's next batch") from None
