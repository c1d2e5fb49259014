"""The one error type the auditor raises, in a few kinds.

Every refusal is an ``AuditError`` whose message is a single line that says what is wrong and
what to do about it. The kind decides how the edges report it: the CLI exits with code 2, the
gRPC server maps it to a status code (``auditor.service.transport.STATUS``), and nothing ever shows a traceback.
"""

from __future__ import annotations


class AuditError(Exception):
    """A refusal with a one-line, actionable message."""

    kind = "invalid"

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))

    @property
    def message(self) -> str:
        return str(self)


class ModelError(AuditError):
    """The model file is missing, malformed, unsafe, or has nothing the auditor can use."""

    kind = "invalid_model"


class DataError(AuditError):
    """The data cannot be read, is empty, or does not fit the model."""

    kind = "invalid_data"


class NotFoundError(AuditError):
    """A named model, report or dataset does not exist."""

    kind = "not_found"


class LimitError(AuditError):
    """A configured size or concurrency limit was exceeded."""

    kind = "limit"


class CancelledError(AuditError):
    """The caller cancelled the audit, or its deadline passed, before it finished."""

    kind = "cancelled"


class UnauthenticatedError(AuditError):
    """A call to a server that wants a bearer token came without the right one."""

    kind = "unauthenticated"


def require(checks: list[tuple[bool, str]]) -> None:
    """Raise ``AuditError`` with the message of the first check that does not hold."""
    for ok, message in checks:
        if not ok:
            raise AuditError(message)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (or its type name), for one-line refusals."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
