"""Ending on a signal the way Ctrl-C ends: unwinding, so that every ``with`` block cleans up.

By default SIGTERM, SIGHUP, SIGQUIT and the other terminating signals kill Python on the spot:
no ``finally`` runs, and an audit that was spilling leaves its spill folder behind (tens of
MiB per audit). Within ``ending_on_signals()`` each of them raises ``Terminated`` in the main
thread instead, as SIGINT raises ``KeyboardInterrupt``; the command line then exits with the
conventional ``128 + signal number``.

A signal that is ignored when the block starts stays ignored: ``nohup`` ignores SIGHUP, and a
shell starts background jobs with SIGINT ignored, on purpose. SIGINT itself is left to Python,
which raises ``KeyboardInterrupt`` for it. SIGKILL cannot be caught; the next audit removes
what a killed one left (``auditor.locks``).
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType

# Signals whose default action ends the process and that a program may catch. The faults
# (SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGABRT) are not here: after one, nothing is safe to run.
TERMINATING: tuple[signal.Signals, ...] = tuple(
    getattr(signal, name)
    for name in (
        "SIGHUP",
        "SIGQUIT",
        "SIGTERM",
        "SIGUSR1",
        "SIGUSR2",
        "SIGALRM",
        "SIGVTALRM",
        "SIGPROF",
        "SIGXCPU",
        "SIGIO",
        "SIGPWR",
    )
    if hasattr(signal, name)
)


class Terminated(BaseException):
    """The process was asked to end by ``signum``; a ``BaseException``, like ``KeyboardInterrupt``,
    so that ``except Exception`` blocks let it through."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """What shells report for a process a signal ended: 128 + the signal's number."""
        return 128 + self.signum


def _raise(signum: int, frame: FrameType | None) -> None:
    for sig in TERMINATING:  # the cleanup that follows is not to be cut short by a second signal
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


@contextmanager
def ending_on_signals() -> Iterator[None]:
    """Turn every terminating signal not ignored now into ``Terminated`` for the block (main thread only)."""
    before = {sig: signal.getsignal(sig) for sig in TERMINATING}
    for sig, handler in before.items():
        if handler is not signal.SIG_IGN:
            signal.signal(sig, _raise)
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
