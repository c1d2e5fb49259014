"""The settings of the service and of every command that talks to it, importable without gRPC.

``auditor --help`` and every subcommand's parser are built from these, so building the parser
imports neither grpc nor the generated stubs nor the engine: the server (``auditor.service.server``) and
the client (``auditor.service.client``) are imported only by the subcommand that runs them.
``ServeOptions`` is every setting of ``auditor serve``, one flag per field; a ``Connection`` is
where a server is and how to reach it (``--server`` and its companions).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path

from auditor.config import DEFAULT_MEMORY_BUDGET, DEVICES, MAX_MEMORY_BUDGET, MIN_MEMORY_BUDGET
from auditor.errors import AuditError, require
from auditor.flags import PORT_MAX, integer, number, port, server_address, size
from auditor.raycluster import ADDRESS_FORMS, MAX_SHARDS
from auditor.usage import format_size

MAX_CONCURRENT = 1024


MAX_QUEUED = 1_000_000


MAX_MODEL_MB = 1 << 20  # 1 TiB


MAX_BATCH_MB = (2**31 - 1 - 64 * 1024) // (1 << 20)  # 2047: a message limit gRPC can hold, headroom included


MAX_SECONDS = 7 * 24 * 3600.0  # --idle-timeout and --grace: a week


@dataclass(frozen=True)
class ServeOptions:
    """Every setting of the server; ``auditor serve`` flags map one to one onto these fields.

    ``data_dir`` is where named datasets (mnist, fashion-mnist) are read or downloaded to
    (default: ``$AUDITOR_DATA_DIR``, then the user cache). ``device`` is used for audits whose
    settings leave the device at "auto". ``metrics_port`` None serves no metrics; 0 picks a port.
    ``ray`` runs every audit sharded on that Ray cluster (``auditor.service.cluster``), in ``shards`` shards
    per split (None: one per CPU the cluster offers).
    """

    host: str = "127.0.0.1"
    port: int = 50051
    store: Path = field(default_factory=lambda: Path.home() / ".local" / "share" / "onnx-auditor")
    data_dir: Path | None = None
    max_concurrent: int = 2
    max_queued: int = 64
    idle_timeout: float = 60.0
    max_model_mb: int = 1024
    max_batch_mb: int = 64
    audit_memory: int = DEFAULT_MEMORY_BUDGET
    tls_cert: Path | None = None
    tls_key: Path | None = None
    token_file: Path | None = None
    grace: float = 10.0
    device: str = "auto"
    metrics_port: int | None = None
    ray: str | None = None
    shards: int | None = None

    def __post_init__(self) -> None:
        require(
            [
                (self.max_concurrent >= 1, f"--max-concurrent must be >= 1, got {self.max_concurrent}"),
                (self.max_queued >= 0, f"--max-queued must be >= 0, got {self.max_queued}"),
                (self.idle_timeout > 0, f"--idle-timeout must be > 0 seconds, got {self.idle_timeout}"),
                (self.max_model_mb >= 1, f"--max-model-mb must be >= 1, got {self.max_model_mb}"),
                (
                    1 <= self.max_batch_mb <= MAX_BATCH_MB,
                    f"--max-batch-mb must be in 1..{MAX_BATCH_MB}, got {self.max_batch_mb}",
                ),
                (0 <= self.port <= PORT_MAX, f"--port must be in 0..{PORT_MAX}, got {self.port}"),
                (
                    MIN_MEMORY_BUDGET <= self.audit_memory <= MAX_MEMORY_BUDGET,
                    f"--audit-memory must be between 64M and 1P, got {self.audit_memory} bytes",
                ),
                (self.grace >= 0, f"--grace must be >= 0 seconds, got {self.grace}"),
                ((self.tls_cert is None) == (self.tls_key is None), "give --tls-cert and --tls-key together"),
                (self.device in DEVICES, f"--device must be one of {DEVICES}, got {self.device!r}"),
                (
                    self.metrics_port is None or 0 <= self.metrics_port <= 65535,
                    f"--metrics-port must be in 0..65535, got {self.metrics_port}",
                ),
                (self.shards is None or self.ray is not None, f"--shards needs --ray ADDRESS ({ADDRESS_FORMS})"),
                (
                    self.shards is None or 1 <= self.shards <= MAX_SHARDS,
                    f"--shards must be between 1 and {MAX_SHARDS}, got {self.shards}",
                ),
            ]
        )


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``auditor serve`` flags, one per ``ServeOptions`` field."""
    d = ServeOptions()
    parser.add_argument("--host", default=d.host, help=f"address to listen on (default: {d.host}; 0.0.0.0 = all)")
    parser.add_argument("--port", type=port, default=d.port, help=f"default: {d.port}; 0 picks a free port")
    parser.add_argument("--store", type=Path, default=d.store, help=f"reports and models folder (default: {d.store})")
    parser.add_argument(
        "--data-dir", type=Path, default=None, help="named datasets' folder (default: $AUDITOR_DATA_DIR)"
    )
    parser.add_argument(
        "--max-concurrent", type=integer(1, MAX_CONCURRENT), default=d.max_concurrent, help="audits running at once"
    )
    parser.add_argument(
        "--max-queued",
        type=integer(0, MAX_QUEUED),
        default=d.max_queued,
        help=f"audits waiting for a slot (default: {d.max_queued})",
    )
    parser.add_argument(
        "--idle-timeout",
        type=number(0, MAX_SECONDS, above=True),
        default=d.idle_timeout,
        metavar="SECONDS",
        help=f"close a stream that sends nothing this long (default: {d.idle_timeout:g})",
    )
    parser.add_argument(
        "--max-model-mb",
        type=integer(1, MAX_MODEL_MB),
        default=d.max_model_mb,
        help="largest upload, data files included",
    )
    parser.add_argument(
        "--max-batch-mb",
        type=integer(1, MAX_BATCH_MB),
        default=d.max_batch_mb,
        help="largest message a client may send",
    )
    parser.add_argument(
        "--audit-memory",
        type=size,
        default=d.audit_memory,
        metavar="SIZE",
        help=f"memory budget of each audit, e.g. 512M or 4G (default: {format_size(d.audit_memory)}); "
        "see docs/service.md",
    )
    parser.add_argument("--tls-cert", type=Path, help="PEM certificate chain; serve TLS (needs --tls-key)")
    parser.add_argument("--tls-key", type=Path, help="PEM private key of --tls-cert")
    parser.add_argument("--token-file", type=Path, help="file holding the bearer token clients must send")
    parser.add_argument(
        "--grace", type=number(0, MAX_SECONDS), default=d.grace, help="seconds in-flight audits get on SIGTERM"
    )
    parser.add_argument("--device", choices=DEVICES, default=d.device, help="device for audits that leave it to auto")
    parser.add_argument(
        "--metrics-port", type=port, metavar="PORT", help="serve Prometheus metrics on this port (0 picks one)"
    )
    parser.add_argument(
        "--ray",
        metavar="ADDRESS",
        help=f"run audits sharded on a Ray cluster: {ADDRESS_FORMS}; needs the ray extra",
    )
    parser.add_argument(
        "--shards",
        type=integer(1, MAX_SHARDS),
        metavar="N",
        help="with --ray: shards per split (default: one per CPU of the cluster)",
    )


# --- Reaching a server -----------------------------------------------------------------------


MAX_TIMEOUT = 30 * 24 * 3600.0  # --timeout: a month; gRPC deadlines overflow far beyond


@dataclass(frozen=True)
class Connection:
    """Where the server is and how to talk to it."""

    target: str  # "host:port"
    token: str | None = None
    tls_ca: Path | None = None  # PEM root certificate; None = plaintext
    timeout: float | None = None  # seconds a whole command may take, retries included


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server`` and its companions; without ``--server`` the command runs locally."""
    group = parser.add_argument_group("server (without --server, everything runs locally)")
    group.add_argument("--server", type=server_address, metavar="HOST:PORT", help="audit on this auditor server")
    group.add_argument("--token-file", type=Path, metavar="PATH", help="file holding the server's bearer token")
    group.add_argument("--tls-ca", type=Path, metavar="PEM", help="root certificate: talk TLS to the server")
    group.add_argument(
        "--timeout",
        type=number(0, MAX_TIMEOUT, above=True),
        metavar="SECONDS",
        help="give up after this long, retries included (default: wait; retry failures for 60 s)",
    )


def connection_from_args(args: argparse.Namespace) -> Connection | None:
    """The connection the arguments name, or None when ``--server`` is absent."""
    if not args.server:
        return None
    if args.timeout is not None and not args.timeout > 0:
        raise AuditError(f"--timeout must be a positive number of seconds, got {args.timeout}")
    from auditor.service.transport import read_token  # grpc comes in only for a command that talks to a server

    token = read_token(args.token_file) if args.token_file is not None else None
    return Connection(args.server, token, args.tls_ca, args.timeout)
