"""auditor.service.client and auditor.service.transport: what the client shares with the server, and what it does alone.

The client is tested end to end against real servers in the test_server*.py files; here are
the parts that need no server: the status mapping both ways, the retry marks, the token and
certificate files, the model files a client uploads, and what the health probe imports.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import onnx
import pytest
from models import mlp
from refusals import cli_refused, refused, usage_refused

from auditor.cli import main as cli
from auditor.engine.modelfile import load_model
from auditor.errors import AuditError, CancelledError, LimitError, ModelError, NotFoundError, UnauthenticatedError
from auditor.service import client
from auditor.service.client import list_reports, model_address, model_files
from auditor.service.jobs import QueueFullError
from auditor.service.options import Connection
from auditor.service.persist import ModelStore
from auditor.service.transport import NO_RETRY, RETRY_LATER, STATUS, error_from_status, read_token, retryable, status_of

# ---- status codes both ways -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "back"),
    [
        ("invalid", AuditError),
        ("invalid_model", AuditError),
        ("invalid_data", AuditError),
        ("not_found", NotFoundError),
        ("limit", LimitError),
        ("cancelled", CancelledError),
        ("unauthenticated", UnauthenticatedError),
    ],
)
def test_every_error_kind_has_a_status_code_and_comes_back_as_its_family(kind: str, back: type) -> None:
    code = STATUS[kind]
    assert code not in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.OK)
    error = error_from_status("host:1", code, "why", None)
    assert type(error) is back and str(error) == "auditor server at host:1: why"


def test_only_a_full_queue_and_an_unreachable_server_are_worth_retrying() -> None:
    code, trailing = status_of(QueueFullError("full"))
    assert (code, trailing) == (grpc.StatusCode.RESOURCE_EXHAUSTED, RETRY_LATER)
    assert retryable(code, trailing)
    code, trailing = status_of(LimitError("too big"))
    assert (code, trailing) == (grpc.StatusCode.RESOURCE_EXHAUSTED, NO_RETRY)
    assert not retryable(code, trailing)
    assert not retryable(grpc.StatusCode.RESOURCE_EXHAUSTED, ())  # gRPC's own message-size refusal
    assert retryable(grpc.StatusCode.UNAVAILABLE, ())
    for kind in ("invalid", "not_found", "cancelled", "unauthenticated"):
        assert not retryable(STATUS[kind], NO_RETRY)


def test_unreachable_and_timed_out_calls_read_as_such() -> None:
    assert str(error_from_status("h:1", grpc.StatusCode.UNAVAILABLE, "refused", 3)).startswith(
        "cannot reach auditor server at h:1: refused"
    )
    late = error_from_status("h:1", grpc.StatusCode.DEADLINE_EXCEEDED, "", 3)
    assert isinstance(late, CancelledError) and "did not answer within 3 s (--timeout)" in str(late)


# ---- the files a client reads ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("content", "fragment"), [(None, "cannot read the token file"), ("", "is empty"), ("two words", "one word")]
)
def test_token_files_are_read_or_refused_in_one_line(tmp_path: Path, content: str | None, fragment: str) -> None:
    path = tmp_path / "token"
    if content is not None:
        path.write_text(content + "\n")
    refused(AuditError, lambda: read_token(path), fragment, str(path))


def test_a_token_file_holds_one_word_with_surrounding_whitespace_dropped(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("  s3cret\n\n")
    assert read_token(tmp_path / "token") == "s3cret"


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read"), (b"not a certificate", "not a PEM")])
def test_a_bad_tls_root_certificate_is_named_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: bytes | None, fragment: str
) -> None:
    ca = tmp_path / "ca.pem"
    if content is not None:
        ca.write_bytes(content)
    refused(AuditError, lambda: list_reports(Connection("127.0.0.1:9", tls_ca=ca, timeout=1)), fragment, str(ca))
    code = cli(["reports", "--server", "127.0.0.1:9", "--tls-ca", str(ca), "--timeout", "1"])
    cli_refused(capsys, code, fragment, str(ca))


def _with_data(folder: Path, location: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if "/" in location:
        (folder / location).parent.mkdir(parents=True, exist_ok=True)
    path = folder / "net.onnx"
    onnx.save_model(mlp([4, 3, 2]), path, save_as_external_data=True, location=location, size_threshold=0)
    return path


@pytest.mark.parametrize("location", ["w.bin", "weights/w.bin", "a/b/w.bin"])
def test_the_client_uploads_exactly_the_files_a_local_audit_loads(tmp_path: Path, location: str) -> None:
    path = _with_data(tmp_path / "m", location)
    files = model_files(path)
    assert files == {"": path, location: tmp_path / "m" / location}
    load_model(path)  # the same model loads locally
    store = ModelStore(tmp_path / "store" / "models", max_bytes=10**6)
    chunks = [(name, file.read_bytes()) for name, file in files.items()]
    assert store.put(chunks, lambda *_: None)[0] == model_address(files)  # filed where the client looks


def test_a_data_file_behind_a_symlink_is_refused_by_the_client_as_locally(tmp_path: Path) -> None:
    path = _with_data(tmp_path / "m", "weights/w.bin")
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "m" / "weights").rename(tmp_path / "elsewhere" / "weights")
    os.symlink(tmp_path / "elsewhere" / "weights", tmp_path / "m" / "weights")
    refused(ModelError, lambda: model_files(path), "symbolic link")
    refused(ModelError, lambda: load_model(path), "symbolic link")


def test_a_missing_model_file_is_refused(tmp_path: Path) -> None:
    refused(ModelError, lambda: model_files(tmp_path / "nope.onnx"), "model file not found")


# ---- what the client imports ------------------------------------------------------------------


# What a client never needs: the model libraries, the engine, and the server's queue and store.
HEAVY = (
    "onnx",
    "onnxruntime",
    "ml_dtypes",
    "sqlite3",
    "auditor.engine",
    "auditor.service.server",
    "auditor.service.jobs",
    "auditor.service.persist",
)


def test_the_client_and_its_health_probe_load_no_engine_onnx_or_store() -> None:
    probe = (
        "import json, sys\n"
        "from auditor.service import client, wire\n"
        "code = client.main(['health', '--server', '127.0.0.1:9', '--timeout', '1'])\n"
        f"heavy = sorted(m for m in sys.modules for h in {HEAVY!r} if m == h or m.startswith(h + '.'))\n"
        "print(json.dumps([code, heavy]))\n"
    )
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == [1, []]


@pytest.mark.parametrize("server", ["host:x", "\x1b[31mhost:1", "[::1", "host:99999", "unix:/nope", "a" * 5000 + ":1"])
def test_the_health_probe_refuses_a_bad_server_address_as_usage_not_as_unhealthy(
    capsys: pytest.CaptureFixture[str], server: str
) -> None:
    """Exit 1 means "unhealthy" to a container runtime; a mistyped --server is bad input (2)."""
    line = usage_refused(capsys, lambda: client.main(["health", "--server", server, "--timeout", "1"]), "HOST:PORT")
    assert "\x1b" not in line and len(line) < 400


def test_the_health_probe_refuses_an_unreadable_token_file_as_usage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    probe = ["health", "--server", "127.0.0.1:9", "--token-file", str(tmp_path / "none")]
    usage_refused(capsys, lambda: client.main(probe), "cannot read the token file")


@pytest.mark.parametrize(("content", "fragment"), [(None, "cannot read"), (b"not a certificate", "not a PEM")])
def test_the_health_probe_refuses_a_bad_tls_root_certificate_as_usage(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, content: bytes | None, fragment: str
) -> None:
    pem = tmp_path / "ca.pem"
    if content is not None:
        pem.write_bytes(content)
    probe = ["health", "--server", "127.0.0.1:9", "--timeout", "1", "--tls-ca", str(pem)]
    usage_refused(capsys, lambda: client.main(probe), fragment)
