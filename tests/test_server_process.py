"""``auditor serve`` as a process: the container's exact entrypoint and health check, and SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import AUDITOR, REPO, Process, gated, processes

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor._proto.auditor.v1 import auditor_pb2_grpc
from auditor.service.persist import claim_store


def _dockerfile_command(instruction: str) -> list[str]:
    """The exec-form (JSON) arguments of a Dockerfile instruction, e.g. ENTRYPOINT or HEALTHCHECK's CMD."""
    text = (REPO / "Dockerfile").read_text().replace("\\\n", " ")
    line = next(line for line in text.splitlines() if line.startswith(instruction))
    return json.loads(line[line.index("[") :])


@pytest.fixture(name="processes")
def processes_fixture() -> Iterator[list[Process]]:
    yield from processes()


def test_the_container_entrypoint_serves_passes_its_healthcheck_and_stops_on_sigterm(
    processes: list[Process], tmp_path: Path
) -> None:
    entrypoint = _dockerfile_command("ENTRYPOINT")
    assert entrypoint[:2] == ["auditor", "serve"]
    # `docker run IMAGE --port 0 --store ...`: flags after the image name come last and win.
    processes.append(Process([*AUDITOR, *entrypoint[1:], "--port", "0", "--store", str(tmp_path / "store")]))
    process = processes[0]
    probe = _dockerfile_command("HEALTHCHECK")
    assert probe[:3] == ["python", "-m", "auditor.service.client"]
    probe = [sys.executable, *probe[1:]]
    probe[probe.index("--server") + 1] = process.target
    result = subprocess.run(probe, capture_output=True, text=True, timeout=30, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, "SERVING")
    assert process.terminate() == 0
    assert (tmp_path / "store" / "reports.sqlite3").is_file()


def _upload(channel: grpc.Channel, shared_models: Path) -> str:
    content = (shared_models / "mnist-8_cntk_opset8.onnx").read_bytes()
    return auditor_pb2_grpc.AuditorStub(channel).UploadModel(iter([pb.UploadModelRequest(content=content)])).sha256


def test_sigterm_turns_health_to_not_serving_and_lets_an_inflight_audit_finish(
    processes: list[Process], tmp_path: Path, shared_models: Path
) -> None:
    processes.append(Process([*AUDITOR, "serve", "--port", "0", "--store", str(tmp_path), "--grace", "30"]))
    process = processes[0]
    with grpc.insecure_channel(process.target) as channel:
        start = pb.AuditStart(model_sha256=_upload(channel, shared_models))
        watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""))
        assert next(watch).status == health_pb2.HealthCheckResponse.SERVING
        gate = threading.Event()
        responses = auditor_pb2_grpc.AuditorStub(channel).Audit(gated(start, gate))
        assert next(responses).HasField("progress")  # the audit is in flight
        process.popen.send_signal(signal.SIGTERM)
        assert next(watch).status == health_pb2.HealthCheckResponse.NOT_SERVING
        watch.cancel()  # a health watch would otherwise hold the server for the whole grace period
        gate.set()
        last = list(responses)[-1]
        assert last.report.summary.splits["test"].samples == 320
    assert process.popen.wait(timeout=30) == 0
    process.wait_for(r"Audit model=\S+ samples=320 .* outcome=OK")


def test_an_audit_still_running_when_the_grace_period_ends_is_cancelled(
    processes: list[Process], tmp_path: Path, shared_models: Path
) -> None:
    processes.append(Process([*AUDITOR, "serve", "--port", "0", "--store", str(tmp_path), "--grace", "0.5"]))
    process = processes[0]
    gate = threading.Event()  # never set: the client stalls
    with grpc.insecure_channel(process.target) as channel:
        start = pb.AuditStart(model_sha256=_upload(channel, shared_models))
        responses = auditor_pb2_grpc.AuditorStub(channel).Audit(gated(start, gate))
        assert next(responses).HasField("progress")
        assert process.terminate() == 0
        with pytest.raises(grpc.RpcError):
            list(responses)
        gate.set()
    process.wait_for(r"Audit model=\S+ samples=\d+ .* outcome=CANCELLED")


@pytest.mark.parametrize("where", ["taken port", "bad host", "unresolvable host"])
def test_a_server_that_cannot_listen_says_so_in_exactly_one_line(tmp_path: Path, where: str) -> None:
    """No gRPC core log line (``E… add_port.cc … Failed to add port``) before ours, no store path."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = {
            "taken port": ("127.0.0.1", taken.getsockname()[1]),
            "bad host": ("999.1.1.1", 0),
            "unresolvable host": ("nonexistent.invalid", 0),
        }[where]
        env = {key: value for key, value in os.environ.items() if key != "GRPC_VERBOSITY"}
        run = subprocess.run(
            [*AUDITOR, "serve", "--host", host, "--port", str(port), "--store", str(tmp_path / "store")],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
    assert (run.returncode, run.stdout) == (2, "")
    [line] = run.stderr.splitlines()
    assert line.startswith(f"auditor: error: cannot listen on {host}:{port}: ")
    assert "GRPC_VERBOSITY" not in line and str(tmp_path) not in line
    # the store was claimed and released: a server can use it now
    claim_store(tmp_path / "store").release()
