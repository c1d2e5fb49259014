"""The server's Prometheus metrics, with the official ``prometheus_client``, on ``--metrics-port``.

Each server has its own registry, so several servers in one process (as in the tests) never
share or clash. Names follow Prometheus conventions: ``_total`` for counters, base units
(seconds, bytes).
"""

from __future__ import annotations

from pathlib import Path
from wsgiref.simple_server import WSGIServer

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

# Audits of MNIST-sized data take seconds; audits of real data sets tens of minutes.
DURATION_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 3 * 3600)


class ServiceMetrics:
    """Every metric the server reports; the methods are safe to call from any thread."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.audits = Counter(
            "auditor_audits",
            "Audits ended, streamed and detached, by outcome (the gRPC status code, lower case)",
            ["outcome"],
            registry=self.registry,
        )
        self.queued = Gauge("auditor_queue_depth", "Audits waiting for a slot", registry=self.registry)
        self.running = Gauge("auditor_audits_running", "Audits holding a slot", registry=self.registry)
        self.samples = Counter("auditor_samples", "Samples audited", registry=self.registry)
        self.duration = Histogram(
            "auditor_audit_duration_seconds",
            "Time an audit held its slot, by the end of it",
            buckets=DURATION_BUCKETS,
            registry=self.registry,
        )
        self.upload_bytes = Counter("auditor_upload_bytes", "Bytes of models received", registry=self.registry)
        self.spilled_bytes = Counter(
            "auditor_spilled_bytes", "Bytes of state counts audits wrote to spill files", registry=self.registry
        )

    def queue_changed(self, waiting: int, running: int) -> None:
        self.queued.set(waiting)
        self.running.set(running)

    def audit_ran(self, seconds: float, spilled_bytes: int | None) -> None:
        """An audit gave up its slot after ``seconds``, having spilled ``spilled_bytes`` (None: unknown)."""
        self.duration.observe(seconds)
        self.spilled_bytes.inc(spilled_bytes or 0)

    def serve(self, host: str, port: int, tls: tuple[Path, Path] | None = None) -> WSGIServer:
        """Serve ``/metrics`` over HTTP (HTTPS with ``tls`` = (cert, key)) in a daemon thread."""
        cert, key = (str(tls[0]), str(tls[1])) if tls else (None, None)
        server, _ = start_http_server(port, addr=host, registry=self.registry, certfile=cert, keyfile=key)
        return server
