"""Joining a Ray cluster: the one start-up rule that sharded audits and the trainer's grids share.

``ray`` is imported only here and only when asked for (the ``ray`` extra). ``connected`` joins
the cluster at an address, or starts a private instance for ``local``, passes on the
environment variables the workers need to find data, keeps Ray's own log lines off the
terminal, and shuts down on leaving only what it started.
"""

from __future__ import annotations

import importlib
import logging
import os
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from types import ModuleType

from auditor.errors import AuditError, first_line

ADDRESS_FORMS = "local (a private instance), auto, host:6379 or ray://host:10001"
FORWARDED_ENV = ("AUDITOR_DATA_DIR",)  # what a worker needs to read the same named datasets


def ray_module() -> ModuleType:
    """The ``ray`` package, or a one-line refusal naming the extra that installs it."""
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise AuditError("--ray needs Ray: pip install 'onnx-auditor[ray]'") from None


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
    env = {**{key: os.environ[key] for key in FORWARDED_ENV if key in os.environ}, **(env or {})}
    try:
        with warnings.catch_warnings():
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
