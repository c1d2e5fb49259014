"""The types of numeric command-line flags: each value range-checked while argparse parses it.

A flag's check belongs in its argparse ``type``: a bad value is then argparse's own one-line
usage error with exit code 2 (``auditor.usage.Parser``), before anything starts. A check made
later, or a type that raises anything but ``ArgumentTypeError``/``ValueError``, has ended in a
traceback (exit 1, the gate-failed code), an ``OverflowError`` deep in gRPC, or a port taken
modulo 65536. Every numeric flag of every command takes one of the types made here.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import re
from collections.abc import Callable

from auditor.errors import AuditError
from auditor.usage import parse_size

PORT_MAX = 65535
MAX_SAMPLES = 2**62  # --limit: more samples than any data set has, and within the wire's int64
_INTEGER = re.compile(r"\s*[+-]?\d{1,30}\s*")


def integer(low: int, high: int) -> Callable[[str], int]:
    """An integer in ``low..high`` (both included); anything else is refused naming the range."""

    def parse(text: str) -> int:
        if not (text.isascii() and _INTEGER.fullmatch(text)):
            raise argparse.ArgumentTypeError(f"must be a whole number in {low}..{high}, got {text!r}")
        value = int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be in {low}..{high}, got {value}")
        return value

    parse.__name__ = "integer"
    return parse


def port(text: str) -> int:
    """A TCP port: 0 (pick a free one) to 65535."""
    return integer(0, PORT_MAX)(text)


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def server_address(text: str) -> str:
    """``HOST:PORT`` of a server: a host name, an IPv4 address or a ``[v6]`` address, and a port in
    1..65535. gRPC takes anything and fails later, in lines of its own resolver's errors that
    repeat the text typed, escape sequences included; a typo is a usage error here instead."""
    shown = repr(text[:80] + ("…" if len(text) > 80 else ""))
    want = f"must be HOST:PORT (a host name, an IPv4 address or [IPv6], and a port in 1..{PORT_MAX}), got {shown}"
    host, colon, port_text = text.rpartition(":")
    if not (colon and port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
        raise argparse.ArgumentTypeError(want)
    if not 1 <= int(port_text) <= PORT_MAX:
        raise argparse.ArgumentTypeError(want)
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise argparse.ArgumentTypeError(want) from None
        return text
    labels = host.split(".")
    if not (host.isascii() and len(host) <= 253 and all(_HOST_LABEL.fullmatch(label) for label in labels)):
        raise argparse.ArgumentTypeError(want)
    return text


def number(
    low: float = -math.inf, high: float = math.inf, *, above: bool = False, below: bool = False
) -> Callable[[str], float]:
    """A finite float within ``low``..``high``; ``above``/``below`` make that end open (``> low``)."""
    opening, closing = ("(" if above else "["), (")" if below else "]")
    bounds = f"{opening}{low:g}, {high:g}{closing}"

    def parse(text: str) -> float:
        try:
            if not text.isascii():  # float() also reads other scripts' digits: ١e٣ is 1000
                raise ValueError(text)
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if value < low or value > high or (above and value == low) or (below and value == high):
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {value:g}")
        return value

    parse.__name__ = "number"
    return parse


def size(text: str) -> int:
    """A memory size such as ``512M`` or ``4G`` (``auditor.engine.count.parse_size``: 64M to 1P)."""
    try:
        return parse_size(text)
    except AuditError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
