"""What the gRPC client and server share: status codes both ways, retries, the bearer token.

Like grpc's route_guide examples, client and server share only this small module, so the client
imports no server code. ``STATUS`` maps each ``AuditError`` kind to a status code for the
server; ``error_from_status`` maps a code back to the kind for the client. Only a full audit
queue is worth retrying: its refusal is marked ``RETRY_LATER``, the one RESOURCE_EXHAUSTED the
client's retry loop retries; every other goes out with ``grpc-retry-pushback-ms: -1``, which any
client whose gRPC retry policy names RESOURCE_EXHAUSTED reads as "do not retry".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc

from auditor.errors import AuditError, CancelledError, LimitError, NotFoundError, UnauthenticatedError

SERVICE = "auditor.v1.Auditor"
PUSHBACK_KEY = "grpc-retry-pushback-ms"
NO_RETRY = ((PUSHBACK_KEY, "-1"),)  # trailing metadata of a refusal that retrying cannot fix
RETRY_LATER = (("auditor-retry", "queue-full"),)  # ... and of the one that retrying later can

STATUS: dict[str, grpc.StatusCode] = {
    "invalid": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_model": grpc.StatusCode.INVALID_ARGUMENT,
    "invalid_data": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "limit": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
}
# The client's side of the same map: the error type each code comes back as.
_ERRORS: dict[grpc.StatusCode, type[AuditError]] = {
    grpc.StatusCode.INVALID_ARGUMENT: AuditError,
    grpc.StatusCode.NOT_FOUND: NotFoundError,
    grpc.StatusCode.RESOURCE_EXHAUSTED: LimitError,
    grpc.StatusCode.CANCELLED: CancelledError,
    grpc.StatusCode.DEADLINE_EXCEEDED: CancelledError,
    grpc.StatusCode.UNAUTHENTICATED: UnauthenticatedError,
}

# gRPC's standard retry policy (gRFC A6) for every Auditor call: up to 3 attempts with
# exponential backoff and full jitter on UNAVAILABLE, the transient failure it fits; its backoff
# is kept short so that a call still ends in UNAVAILABLE, not in its deadline, when nobody is
# there. The client's own loop (``client._retrying``) goes on from there until --timeout, and is
# what retries a full queue (RESOURCE_EXHAUSTED marked RETRY_LATER): it can tell that from a size
# limit, and says which one it was when the time runs out. gRPC retries a streaming call only
# while its first 256 KB are still buffered; the loop starts it again from the beginning.
RETRY_POLICY = {
    "maxAttempts": 3,
    "initialBackoff": "0.1s",
    "maxBackoff": "1s",
    "backoffMultiplier": 2,
    "retryableStatusCodes": ["UNAVAILABLE"],
}
SERVICE_CONFIG = json.dumps({"methodConfig": [{"name": [{"service": SERVICE}], "retryPolicy": RETRY_POLICY}]})
CHANNEL_OPTIONS: list[tuple[str, Any]] = [
    ("grpc.max_receive_message_length", -1),
    ("grpc.max_send_message_length", -1),
    ("grpc.enable_retries", 1),
    ("grpc.service_config", SERVICE_CONFIG),
]


def status_of(exc: AuditError) -> tuple[grpc.StatusCode, tuple[tuple[str, str], ...]]:
    """The status code a refusal goes out with, and its trailing metadata: RETRY_LATER for a full
    queue (an error whose class says ``retryable = True``), NO_RETRY for everything else."""
    return STATUS[exc.kind], RETRY_LATER if getattr(exc, "retryable", False) else NO_RETRY


def retryable(code: grpc.StatusCode, trailing: Any) -> bool:
    """Whether a failed call may succeed if made again: UNAVAILABLE, or the server's queue was full.

    A RESOURCE_EXHAUSTED without the server's RETRY_LATER mark (a size limit, or gRPC's own
    message-size check) fails the same way every time.
    """
    if code == grpc.StatusCode.UNAVAILABLE:
        return True
    return code == grpc.StatusCode.RESOURCE_EXHAUSTED and any(tuple(item) in RETRY_LATER for item in trailing or ())


def error_from_status(target: str, code: grpc.StatusCode, details: str, timeout: float | None) -> AuditError:
    """The ``AuditError`` (kind and one-line message) for a call that ended in ``code``."""
    if code == grpc.StatusCode.UNAVAILABLE:
        return AuditError(f"cannot reach auditor server at {target}: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return CancelledError(f"auditor server at {target} did not answer within {timeout} s (--timeout)")
    return _ERRORS.get(code, AuditError)(f"auditor server at {target}: {details}")


def bearer_metadata(token: str | None) -> tuple[tuple[str, str], ...] | None:
    """The call metadata that carries a bearer token (None without one)."""
    return (("authorization", f"Bearer {token}"),) if token else None


def read_token(path: Path) -> str:
    """The bearer token in a token file (surrounding whitespace dropped); server and client share it."""
    try:
        token = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise AuditError(f"cannot read the token file {path}: {getattr(exc, 'strerror', None) or 'not text'}") from None
    if not token:
        raise AuditError(f"the token file {path} is empty; put the bearer token in it")
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in token):
        raise AuditError(f"the token file {path} holds spaces or non-printable characters; a token is one word")
    return token
