"""argparse for our command lines: a usage error is one line and exit code 2, like every refusal.

argparse prints the whole usage block before its error; a CI log then shows a dozen lines for
one mistyped flag. This parser keeps only the error and points at ``--help``. Subcommands
inherit it, since ``add_subparsers`` builds them with the parser's own class.
"""

from __future__ import annotations

import argparse
import re
from fractions import Fraction
from typing import NoReturn

from auditor.config import MAX_MEMORY_BUDGET, MIN_MEMORY_BUDGET
from auditor.errors import AuditError
from auditor.sinks import for_terminal

# The exit codes of both command lines (``auditor`` and ``auditor-train``), defined once.
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # only ``auditor gate``: a threshold was missed
EXIT_BAD_INPUT = 2  # every refusal, usage errors included
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it

_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


def parse_size(text: str) -> int:
    """Bytes from a memory size such as ``512M``, ``4G``, ``1.5G`` or ``1073741824``.

    Units are binary (K = 1024 bytes) and may end in ``B`` or ``iB``. Refuses, with one line,
    anything that is not a size or lies outside ``MIN_MEMORY_BUDGET``..``MAX_MEMORY_BUDGET``.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", str(text).upper())
    if match is None:
        raise AuditError(f"memory budget must be a size such as 512M or 4G, got {text!r}")
    size = int(Fraction(match[1]) * _UNITS[match[2]])
    if size < MIN_MEMORY_BUDGET:
        raise AuditError(f"memory budget must be at least 64M, got {text!r}")
    if size > MAX_MEMORY_BUDGET:
        raise AuditError(f"memory budget must be at most 1P, got {text!r}")
    return size


def format_size(size: int) -> str:
    """A size as ``parse_size`` reads it, in the largest binary unit that divides it (``1G``)."""
    for unit, scale in reversed(_UNITS.items()):
        if size % scale == 0:
            return f"{size // scale}{unit}"
    raise ValueError(f"not a size: {size}")


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        line = for_terminal(" ".join(message.split()))  # it quotes what was typed, escapes included
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {line} (see --help)\n")
