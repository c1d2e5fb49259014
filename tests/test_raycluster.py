"""auditor.raycluster: an address where nothing listens is refused in one line, at once, before
Ray is asked to join it (which retries for minutes and prints its own lines). Real sockets on
127.0.0.1; no Ray instance is started here."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from refusals import refused

from auditor.errors import AuditError
from auditor.raycluster import REACH_TIMEOUT_S, check_reachable

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def closed_port() -> int:
    """A port on 127.0.0.1 that nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture
def listening() -> Iterator[int]:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        yield server.getsockname()[1]


def test_an_address_that_accepts_connections_passes(listening: int) -> None:
    for address in (f"127.0.0.1:{listening}", f"ray://127.0.0.1:{listening}", f"localhost:{listening}"):
        check_reachable(address)
    check_reachable("local")  # no address to try: Ray starts or finds these itself
    check_reachable("auto")


@pytest.mark.parametrize("form", ["{port}", "ray://{port}", "ray://[::1]:{port}"])
def test_an_address_where_nothing_listens_is_refused_in_one_line(closed_port: int, form: str) -> None:
    address = form.format(port=f"127.0.0.1:{closed_port}") if "::1" not in form else form.format(port=closed_port)
    refused(
        AuditError, lambda: check_reachable(address), "cannot reach the Ray cluster", f"within {REACH_TIMEOUT_S:g} s"
    )


@pytest.mark.parametrize(
    ("address", "fragment"),
    [
        ("bad address", "is not an address"),
        ("ray://", "is not an address"),
        ("host:99999", "names port 99999"),
        ("host:0", "names port 0"),
        ("host:port", "is not an address"),
        ("http://host:6379", "is not an address"),
        ("[::1", "is not an address"),
        ("a\x1b[2J:1", "is not an address"),
        ("h" * 300 + ":1", "is not an address"),
        ("a." + "b" * 64 + ".c:1", "labels of 1 to 63"),
        ("a..b:1", "labels of 1 to 63"),
        ("nonexistent.invalid:6379", "cannot reach the Ray cluster"),
    ],
)
def test_malformed_and_unresolvable_addresses_are_refused_in_one_line(address: str, fragment: str) -> None:
    refused(AuditError, lambda: check_reachable(address), fragment)


@pytest.mark.slow
def test_audit_on_an_unreachable_cluster_is_one_line_within_the_documented_time(closed_port: int) -> None:
    started = time.monotonic()
    run = subprocess.run(
        [
            *(sys.executable, "-m", "auditor.cli", "audit", str(REPO / "examples" / "lenet300_11_4.onnx")),
            *("--data", "mnist", "--limit", "10", "--ray", f"ray://127.0.0.1:{closed_port}", "--shards", "2"),
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO,
    )
    assert run.returncode == 2 and run.stdout == ""
    assert run.stderr.splitlines() == [
        f"auditor: error: cannot reach the Ray cluster at 'ray://127.0.0.1:{closed_port}': nothing answers at "
        f"127.0.0.1:{closed_port} within {REACH_TIMEOUT_S:g} s (Connection refused); start the cluster or check "
        "the address (local (a private instance), auto, host:6379 or ray://host:10001)"
    ]
    assert time.monotonic() - started < 60  # start-up included; Ray itself would retry for minutes
