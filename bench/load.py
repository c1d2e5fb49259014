"""A bounded load check of the gRPC service: many clients, mixed work, quiet and cancelling ones.

    python bench/load.py                                   # 8 clients, 20 s, the default server
    python bench/load.py --clients 16 --duration 60 --max-concurrent 4

It starts ``auditor serve`` as a process on 127.0.0.1 (a free port, a temporary store) with the
given server flags, and for ``--duration`` seconds (at most 300) runs, all at once:
- ``--clients`` audit clients, each auditing again and again, in turn: mnist-8 and LeNet-300-100
  (11,4), 100 to 2,000 samples, half on the server's own MNIST and half streamed from a ``.npz``
  (the CLI's ``remote_audit``, with its retries and ``--timeout``);
- ``--idle`` quiet clients: each opens an Audit, sends its start, and says nothing more until the
  server's ``--idle-timeout`` closes the call; then it does it again;
- ``--cancelling`` clients that start an audit and cancel it at its first progress event;
- one health probe, twice a second.
No new audit starts after ``--duration`` or ``--max-audits``. At the end it prints throughput,
p50 and p99 latency of completed audits and of health checks, refusals by status code, errors,
and the server's own counts from its /metrics endpoint. Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import itertools
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
import numpy as np
from grpc_health.v1 import health_pb2, health_pb2_grpc

from auditor.config import AuditConfig
from auditor.datasets.splits import load_arrays
from auditor.errors import AuditError
from auditor.service.client import remote_audit
from auditor.service.options import Connection

REPO = Path(__file__).resolve().parents[1]
MODELS = [REPO.parent / "shared" / "models" / "mnist-8_cntk_opset8.onnx", REPO / "examples" / "lenet300_11_4.onnx"]
LIMITS = [100, 500, 2000]
MAX_DURATION_S = 300
CALL_TIMEOUT_S = 120


class Tally:
    """What the clients saw, shared between their threads."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.latencies: list[float] = []
        self.samples = 0
        self.queued = 0
        self.refusals: collections.Counter[str] = collections.Counter()
        self.errors: collections.Counter[str] = collections.Counter()
        self.cancelled = 0
        self.idle_closed = 0
        self.health: list[float] = []
        self.health_failures = 0

    def add(self, field: str, value: object = 1) -> None:
        with self.lock:
            current = getattr(self, field)
            if isinstance(current, list):
                current.append(value)
            else:
                setattr(self, field, current + value)


def start_server(flags: list[str], store: Path) -> tuple[subprocess.Popen[str], str, int]:
    """``auditor serve`` on 127.0.0.1: the process, its gRPC target and its metrics port."""
    args = [sys.executable, "-m", "auditor.cli", "serve", "--host", "127.0.0.1", "--port", "0", "--store", str(store)]
    process = subprocess.Popen([*args, "--metrics-port", "0", *flags], stderr=subprocess.PIPE, text=True)
    port = metrics = None
    assert process.stderr is not None
    for line in process.stderr:
        if found := re.search(r"metrics on http://\S+:(\d+)/metrics", line):
            metrics = int(found.group(1))
        if found := re.search(r"serving auditor\.v1\.Auditor on \S+:(\d+)", line):
            port = int(found.group(1))
        if port and metrics:
            break
    if not (port and metrics):
        raise SystemExit("the server did not start; run `auditor serve` by hand to see why")
    threading.Thread(target=lambda: collections.deque(process.stderr, maxlen=0), daemon=True).start()
    return process, f"127.0.0.1:{port}", metrics


def auditing(conn: Connection, npz: Path, work: itertools.count, args: argparse.Namespace, tally: Tally) -> None:
    end = time.monotonic() + args.duration
    while time.monotonic() < end and (n := next(work)) < args.max_audits:
        model, limit = MODELS[n % len(MODELS)], LIMITS[n % len(LIMITS)]
        data = "mnist" if n % 2 else str(npz)
        started, waited = time.monotonic(), []
        try:
            report = remote_audit(conn, model, data, "test", limit, AuditConfig(), queued=waited.append)
        except AuditError as exc:
            kind = "refusals" if exc.kind in ("limit", "invalid", "invalid_data", "invalid_model") else "errors"
            tally.add(kind, collections.Counter([f"{exc.kind}: {str(exc)[:70]}"]))
            continue
        tally.add("latencies", time.monotonic() - started)
        tally.add("samples", report.splits["test"].samples)
        tally.add("queued", 1 if waited else 0)


def quiet(target: str, stop: threading.Event, tally: Tally) -> None:
    """Open an Audit, send only its start, and wait for the server to close it; again until ``stop``."""
    from auditor._proto.auditor.v1 import auditor_pb2 as pb
    from auditor._proto.auditor.v1 import auditor_pb2_grpc

    with grpc.insecure_channel(target) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        sha = stub.UploadModel(iter([pb.UploadModelRequest(content=MODELS[0].read_bytes())])).sha256

        def requests():  # the start, then nothing until the test is over
            yield pb.AuditRequest(start=pb.AuditStart(model_sha256=sha))
            stop.wait()

        while not stop.is_set():
            call = stub.Audit(requests())
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "idle-timeout" in (exc.details() or ""):
                    tally.add("idle_closed")
            call.cancel()


def cancelling(target: str, end: float, tally: Tally) -> None:
    """Start a streamed audit and cancel it at its first progress event; again until ``end``."""
    from auditor._proto.auditor.v1 import auditor_pb2 as pb
    from auditor._proto.auditor.v1 import auditor_pb2_grpc
    from auditor.datasets.batches import Batch
    from auditor.service import wire

    batch = wire.batch_to_proto("test", Batch(np.zeros((64, 28, 28), np.uint8)))
    with grpc.insecure_channel(target) as channel:
        stub = auditor_pb2_grpc.AuditorStub(channel)
        sha = stub.UploadModel(iter([pb.UploadModelRequest(content=MODELS[0].read_bytes())])).sha256
        while time.monotonic() < end:
            requests = itertools.chain(
                [pb.AuditRequest(start=pb.AuditStart(model_sha256=sha))],
                itertools.repeat(pb.AuditRequest(batch=batch), 200),
            )
            call = stub.Audit(requests, timeout=CALL_TIMEOUT_S)
            try:
                for response in call:
                    if response.progress.samples_done:
                        call.cancel()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.CANCELLED:
                    tally.add("cancelled")


def probing(target: str, stop: threading.Event, tally: Tally) -> None:
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while not stop.wait(0.5):
            started = time.monotonic()
            try:
                stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
                tally.add("health", time.monotonic() - started)
            except grpc.RpcError:
                tally.add("health_failures")


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--idle", type=int, default=4)
    parser.add_argument("--cancelling", type=int, default=2)
    parser.add_argument("--duration", type=float, default=20.0, help=f"seconds (at most {MAX_DURATION_S})")
    parser.add_argument("--max-audits", type=int, default=200)
    parser.add_argument("--max-concurrent", type=int, default=2)
    parser.add_argument("--max-queued", type=int, default=64)
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    args = parser.parse_args()
    args.duration = min(args.duration, MAX_DURATION_S)
    os.environ.setdefault("AUDITOR_DATA_DIR", str(REPO.parent / "shared" / "data"))  # the server inherits it
    flags = ["--max-concurrent", str(args.max_concurrent), "--max-queued", str(args.max_queued)]
    flags += ["--idle-timeout", str(args.idle_timeout)]
    tally = Tally()
    with tempfile.TemporaryDirectory() as folder:
        x, y = load_arrays("mnist", "test", limit=max(LIMITS))
        npz = Path(folder) / "digits.npz"
        np.savez(npz, x_test=x, y_test=y)
        server, target, metrics_port = start_server(flags, Path(folder) / "store")
        try:
            conn = Connection(target, timeout=CALL_TIMEOUT_S)
            stop, work = threading.Event(), itertools.count()
            started = time.monotonic()
            end = started + args.duration
            threads = [
                threading.Thread(target=auditing, args=(conn, npz, work, args, tally)) for _ in range(args.clients)
            ]
            threads += [threading.Thread(target=cancelling, args=(target, end, tally)) for _ in range(args.cancelling)]
            background = [threading.Thread(target=quiet, args=(target, stop, tally)) for _ in range(args.idle)]
            background.append(threading.Thread(target=probing, args=(target, stop, tally)))
            for thread in [*threads, *background]:
                thread.start()
            for thread in threads:
                thread.join()
            elapsed = time.monotonic() - started
            stop.set()
            for thread in background:
                thread.join(timeout=CALL_TIMEOUT_S)
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
                served = [
                    line for line in response.read().decode().splitlines() if re.match(r"auditor_audits_total", line)
                ]
        finally:
            server.terminate()
            server.wait(timeout=60)
    report(args, tally, elapsed, served)
    return 0


def report(args: argparse.Namespace, tally: Tally, elapsed: float, served: list[str]) -> None:
    done = len(tally.latencies)
    print(f"clients {args.clients} (+{args.idle} quiet, {args.cancelling} cancelling), {elapsed:.1f} s, "
          f"server --max-concurrent {args.max_concurrent} --max-queued {args.max_queued}")  # fmt: skip
    print(f"audits completed    {done}  ({done / elapsed:.2f}/s, {tally.samples / elapsed:.0f} samples/s)")
    if done:
        print(f"latency p50 / p99   {percentile(tally.latencies, 50):.2f} s / {percentile(tally.latencies, 99):.2f} s")
    if tally.health:
        print(
            f"health p50 / p99    {percentile(tally.health, 50) * 1000:.1f} ms / "
            f"{percentile(tally.health, 99) * 1000:.1f} ms, {tally.health_failures} failed of "
            f"{len(tally.health) + tally.health_failures}"
        )
    print(f"waited in the queue {tally.queued} of {done}")
    print(f"cancelled           {tally.cancelled}")
    print(f"quiet calls closed  {tally.idle_closed} (by --idle-timeout {args.idle_timeout:g} s)")
    print(f"refusals            {sum(tally.refusals.values())} {dict(tally.refusals) or ''}")
    print(f"errors              {sum(tally.errors.values())} {dict(tally.errors) or ''}")
    print("server says         " + ", ".join(line.replace("auditor_audits_total", "") for line in served))


if __name__ == "__main__":
    sys.exit(main())
