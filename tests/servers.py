"""Real auditor servers for the service tests: in this process on 127.0.0.1:0, or as a process.

``Servers`` starts in-process servers (each on its own event loop thread) and stops them all;
``Process`` runs ``auditor serve`` as the container does and reads its port from its log.
"""

from __future__ import annotations

import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import onnx
import pytest
from models import mlp

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.datasets.batches import Batch
from auditor.service import wire
from auditor.service.options import Connection, ServeOptions
from auditor.service.server import Server

REPO = Path(__file__).resolve().parents[1]
AUDITOR = [sys.executable, "-m", "auditor.cli"]  # what the `auditor` console script runs
MNIST8 = "mnist-8_cntk_opset8.onnx"


class Served:
    """A started server with its options, a connection to it, and a raw stub."""

    def __init__(self, options: ServeOptions) -> None:
        self.options = options
        self.server = Server(options)
        self.server.start()
        self.port = self.server.port
        self.conn = Connection(f"127.0.0.1:{self.port}")
        self.channel = grpc.insecure_channel(self.conn.target)
        self.stub = auditor_pb2_grpc.AuditorStub(self.channel)

    def stop(self, grace: float | None = None) -> None:
        self.channel.close()
        assert self.server.stop(grace).wait(timeout=60)

    def upload(self, model: Path) -> str:
        return self.stub.UploadModel(iter([pb.UploadModelRequest(content=model.read_bytes())])).sha256


class Servers:
    """Starts servers on 127.0.0.1:0, storing under ``folder`` unless told otherwise; stops them all."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.started: list[Served] = []

    def start(self, **settings: Any) -> Served:
        settings = {"host": "127.0.0.1", "port": 0, "store": self.folder / "store", **settings}
        self.started.append(Served(ServeOptions(**settings)))
        return self.started[-1]

    def stop_all(self) -> None:
        for served in self.started:
            served.stop()


def serving(folder: Path) -> Iterator[Callable[..., Served]]:
    """The body of a ``serve`` fixture: yields ``start(**settings)``, stops every server afterwards."""
    servers = Servers(folder)
    yield servers.start
    servers.stop_all()


def save_mlp(path: Path, hidden: int, external_data: str | None = None) -> Path:
    """A 784-hidden-10 ReLU MLP on MNIST-shaped input; ``external_data`` keeps its weights in that file."""
    model = mlp([784, hidden, 10], seed=3)
    if external_data is not None:
        (path.parent / external_data).parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(
        model, path, save_as_external_data=external_data is not None, location=external_data, size_threshold=0
    )
    return path


def code(caught: pytest.ExceptionInfo[grpc.RpcError]) -> grpc.StatusCode:
    return caught.value.code()


def eventually(check: Callable[[], Any], timeout: float = 30, what: str = "the condition") -> Any:
    """Poll ``check`` until it returns something truthy; fail the test after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.05)
    pytest.fail(f"{what} did not happen within {timeout} s")


def zeros_batch(n: int = 8) -> pb.SampleBatch:
    return wire.batch_to_proto("test", Batch(np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.int64)))


def gated(start: pb.AuditStart, gate: threading.Event, before: int = 20, after: int = 20) -> Iterator[pb.AuditRequest]:
    """Start, ``before`` batches of 8 (more than the engine reads ahead), then ``after`` more once ``gate`` is set."""
    batch = zeros_batch()
    yield pb.AuditRequest(start=start)
    for i in range(before + after):
        if i == before:
            gate.wait(timeout=60)
        yield pb.AuditRequest(batch=batch)


def silent(start: pb.AuditStart | None, release: threading.Event) -> Iterator[pb.AuditRequest]:
    """A client that sends ``start`` (or nothing) and then goes quiet until ``release`` is set."""
    if start is not None:
        yield pb.AuditRequest(start=start)
    release.wait(timeout=120)


# Runs argv[1:] with every catchable terminating signal at its default action. A process started
# in the background (a shell's `&`, nohup, some CI runners) inherits SIGINT or SIGHUP ignored, and
# an ignored signal stays ignored across exec, so a test that sends signals sets them itself.
_WITH_DEFAULT_SIGNALS = """
import os, signal, sys
for name in ("SIGHUP", "SIGINT", "SIGQUIT", "SIGTERM", "SIGUSR1", "SIGUSR2", "SIGALRM"):
    signal.signal(getattr(signal, name), signal.SIG_DFL)
os.execv(sys.argv[1], sys.argv[1:])
"""


def with_default_signals(argv: list[str]) -> list[str]:
    """``argv`` run with the terminating signals at their defaults, however the tests were started."""
    return [sys.executable, "-c", _WITH_DEFAULT_SIGNALS, *argv]


class Process:
    """A running ``auditor serve``: its port (read from its log) and its log lines."""

    def __init__(self, args: list[str]) -> None:
        self.popen = subprocess.Popen(with_default_signals(args), cwd=REPO, stderr=subprocess.PIPE, text=True)
        self.lines: queue.Queue[str] = queue.Queue()
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()
        self.port = int(self.wait_for(r"serving auditor\.v1\.Auditor on \S+:(\d+)").group(1))
        self.target = f"127.0.0.1:{self.port}"

    def _drain(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            self.lines.put(line)

    def wait_for(self, pattern: str, timeout: float = 60) -> re.Match[str]:
        while True:
            line = self.lines.get(timeout=timeout)
            self.log.append(line)
            if found := re.search(pattern, line):
                return found

    def terminate(self, timeout: float = 60) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return self.popen.wait(timeout=timeout)

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait(timeout=60)


def processes() -> Iterator[list[Process]]:
    """The body of a ``processes`` fixture: every process started is killed afterwards if still running."""
    started: list[Process] = []
    yield started
    for process in started:
        if process.popen.poll() is None:
            process.kill()
