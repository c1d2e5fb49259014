"""Bearer tokens and TLS on a real server: refused without credentials, health always open."""

from __future__ import annotations

import datetime
import ipaddress
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from auditor.config import AuditConfig
from auditor.errors import AuditError
from auditor.records import DataSpec
from auditor.service.client import check_health, list_reports, main, remote_audit
from auditor.service.options import Connection, ServeOptions
from auditor.service.server import build_server


def _start(options: ServeOptions) -> tuple[grpc.Server, int]:
    server, port = build_server(options)
    server.start()
    return server, port


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[str]:
    (tmp_path / "token").write_text("s3cret-token\n")
    server, port = _start(ServeOptions(port=0, store=tmp_path / "store", token_file=tmp_path / "token"))
    yield f"127.0.0.1:{port}"
    server.stop(None)


@pytest.mark.parametrize("token", [None, "wrong", "s3cret-token-and-more"])
def test_calls_without_the_right_token_are_unauthenticated(token_server: str, token: str | None) -> None:
    with pytest.raises(AuditError, match="needs a bearer token") as caught:
        list_reports(Connection(token_server, token=token))
    assert "UNAUTHENTICATED" not in str(caught.value) and "\n" not in str(caught.value)


def test_streaming_calls_are_refused_too(token_server: str, shared_models: Path) -> None:
    with pytest.raises(AuditError, match="needs a bearer token"):
        model = shared_models / "mnist-8_cntk_opset8.onnx"
        remote_audit(Connection(token_server), model, DataSpec("mnist", "test", 8), AuditConfig())


def test_the_right_token_is_served(token_server: str, shared_models: Path) -> None:
    conn = Connection(token_server, token="s3cret-token")
    report = remote_audit(conn, shared_models / "mnist-8_cntk_opset8.onnx", DataSpec("mnist", "test", 8), AuditConfig())
    assert [row["model_sha256"] for row in list_reports(conn)] == [report.model.sha256]


def test_health_and_reflection_stay_open_without_a_token(token_server: str) -> None:
    assert check_health(Connection(token_server))
    assert main(["health", "--server", token_server]) == 0
    with grpc.insecure_channel(token_server) as channel:
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        [reply] = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    assert "auditor.v1.Auditor" in {s.name for s in reply.list_services_response.service}


def test_an_empty_token_file_refuses_to_start(tmp_path: Path) -> None:
    (tmp_path / "token").write_text("\n")
    with pytest.raises(AuditError, match="is empty"):
        build_server(ServeOptions(port=0, store=tmp_path / "store", token_file=tmp_path / "token"))


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for localhost and 127.0.0.1: (cert.pem, key.pem)."""
    x509 = pytest.importorskip("cryptography.x509")
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    folder = tmp_path_factory.mktemp("tls")
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    (folder / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (folder / "key.pem").write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return folder / "cert.pem", folder / "key.pem"


def test_tls_serves_clients_that_trust_the_certificate_and_no_others(
    tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server, port = _start(ServeOptions(port=0, store=tmp_path / "store", tls_cert=cert, tls_key=key))
    try:
        for host in ("localhost", "127.0.0.1"):
            conn = Connection(f"{host}:{port}", tls_ca=cert)
            assert check_health(conn) and list_reports(conn) == []
        assert main(["health", "--server", f"localhost:{port}", "--tls-ca", str(cert)]) == 0
        with pytest.raises(AuditError, match="cannot reach auditor server"):
            list_reports(Connection(f"127.0.0.1:{port}", timeout=5))  # plaintext to a TLS port
    finally:
        server.stop(None)


def test_tls_needs_both_the_certificate_and_the_key(tmp_path: Path) -> None:
    with pytest.raises(AuditError, match="--tls-cert and --tls-key together"):
        ServeOptions(tls_cert=tmp_path / "cert.pem")
