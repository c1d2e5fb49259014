"""Joining a Ray cluster: the one start-up rule that sharded audits and the trainer's grids share.

``ray`` is imported only here and only when asked for (the ``ray`` extra). ``connected`` joins
the cluster at an address, or starts a private instance for ``local``, passes on the
environment variables the workers need to find data, keeps Ray's own log lines off the
terminal (Ray's C++ core writes to file descriptor 2, which is silenced while Ray starts), and
shuts down on leaving only what it started. An address is first tried with a plain TCP connect
of at most ``REACH_TIMEOUT_S`` seconds, so an address where nothing listens is refused at once.
"""

from __future__ import annotations

import importlib
import logging
import os
import re
import socket
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from auditor.errors import AuditError, first_line

MAX_SHARDS = 4096  # shards per split of one sharded audit
ADDRESS_FORMS = "local (a private instance), auto, host:6379 or ray://host:10001"
FORWARDED_ENV = ("AUDITOR_DATA_DIR",)  # what a worker needs to read the same named datasets
REACH_TIMEOUT_S = 5.0  # an address must accept a TCP connection this fast before Ray is asked to join it


def ray_module() -> ModuleType:
    """The ``ray`` package, or a one-line refusal naming the extra that installs it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise AuditError("--ray needs Ray: pip install 'onnx-auditor[ray]'") from None


def check_reachable(address: str, timeout: float = REACH_TIMEOUT_S) -> None:
    """Refuse, in one line and within ``timeout`` seconds, an address where nothing listens.

    Given an unreachable ``host:port`` or ``ray://host:port``, ``ray.init`` retries for minutes
    and prints its own log lines; a plain TCP connect answers in a moment. ``local`` and ``auto``
    name no address to try (Ray finds ``auto``'s cluster itself, and says at once when there is none).
    """
    if address in ("local", "auto"):
        return
    host, port = _host_port(address)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            pass
    except (OSError, UnicodeError) as exc:  # UnicodeError: a name the resolver cannot encode
        reason = (
            "no answer" if isinstance(exc, TimeoutError) else (getattr(exc, "strerror", None) or type(exc).__name__)
        )
        raise AuditError(
            f"cannot reach the Ray cluster at {address!r}: nothing answers at {host}:{port} within {timeout:g} s "
            f"({reason}); start the cluster or check the address ({ADDRESS_FORMS})"
        ) from None


def _host_port(address: str) -> tuple[str, int]:
    """Host and port of ``host:port``, ``[v6]:port`` or ``ray://host:port``; a one-line refusal otherwise."""
    rest = address.removeprefix("ray://")
    default = 10001 if address.startswith("ray://") else 6379
    match = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\](?::(\d{1,5}))?|([A-Za-z0-9.-]+)(?::(\d{1,5}))?", rest)
    if match is None:
        raise AuditError(f"--ray {address[:80]!r} is not an address; use {ADDRESS_FORMS}")
    host = match[1] or match[3]
    if len(host) > 253 or any(not 0 < len(label) <= 63 for label in host.split(".") if not match[1]):
        raise AuditError(f"--ray {address[:80]!r} is not an address: a host name has labels of 1 to 63 characters")
    port = int(match[2] or match[4] or default)
    if not 0 < port <= 65535:
        raise AuditError(f"--ray {address!r} names port {port}; a port is in 1..65535")
    return host, port


@contextmanager
def connected(address: str, env: dict[str, str] | None = None) -> Iterator[ModuleType]:
    """Ray, joined to ``address`` for the block (``local`` starts a private instance).

    Joining when this process is already connected reuses that connection and leaves it open;
    otherwise the connection made here is shut down when the block ends, however it ends. An
    address Ray cannot reach is refused in one line. ``env`` adds environment variables for the
    workers to those passed on from this process (``FORWARDED_ENV``).
    """
    ray = ray_module()
    if ray.is_initialized():
        yield ray
        return
    check_reachable(address)
    env = {**{key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}, **(env or {})}
    try:
        with warnings.catch_warnings(), _stderr_silenced():
            warnings.simplefilter("ignore")  # Ray warns before it raises; the refusal says it in one line
            ray.init(
                address=address,  # "local" starts a new instance even where `ray start` left an address behind
                runtime_env={"env_vars": env} if env else None,
                log_to_driver=False,
                logging_level=logging.ERROR,
                include_dashboard=False,
            )
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, … depending on the address form
        raise AuditError(f"cannot reach the Ray cluster at {address!r}: {first_line(exc)}") from None
    try:
        yield ray
    finally:
        ray.shutdown()


@contextmanager
def _stderr_silenced() -> Iterator[None]:
    """File descriptor 2 on /dev/null for the block: Ray's C++ core writes its retries and warnings
    there directly (``gcs_client.cc: Failed to get cluster ID``), past Python's logging."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
