"""argparse for our command lines: a usage error is one line and exit code 2, like every refusal.

argparse prints the whole usage block before its error; a CI log then shows a dozen lines for
one mistyped flag. This parser keeps only the error and points at ``--help``. Subcommands
inherit it, since ``add_subparsers`` builds them with the parser's own class.
"""

from __future__ import annotations

import argparse
from typing import NoReturn

from auditor.sinks import for_terminal

# The exit codes of both command lines (``auditor`` and ``auditor-train``), defined once.
EXIT_OK = 0
EXIT_GATE_FAILED = 1  # only ``auditor gate``: a threshold was missed
EXIT_BAD_INPUT = 2  # every refusal, usage errors included
EXIT_INTERRUPTED = 130  # Ctrl-C: 128 + SIGINT, as shells report it


class Parser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose usage errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        line = for_terminal(" ".join(message.split()))  # it quotes what was typed, escapes included
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {line} (see --help)\n")
