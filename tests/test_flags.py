"""auditor.flags: every numeric flag of every command refuses a bad value while argparse parses
it, in one line with exit code 2, before anything starts (no model read, no port bound)."""

from __future__ import annotations

import argparse
import math

import pytest
from refusals import usage_refused

from auditor.cli import build_parser
from auditor.flags import MAX_SAMPLES, integer, number, port, server_address, size
from auditor.service.options import MAX_BATCH_MB

# What an attacker types where a number belongs.
NOT_NUMBERS = ["", " ", "abc", "1,5", "0x10", "1e", "½", "١e٣", "1 2", "nan(1)", "\x1b[2J"]
NOT_FINITE = ["nan", "NaN", "inf", "-inf", "Infinity", "1e309", "-1e309"]
NOT_WHOLE = ["1.5", "1e3", "1.0", "9" * 40, "0b1", "+-1"]

AUDIT = ["audit", "m.onnx", "--data", "mnist"]
GATE = ["gate", "m.onnx", "--data", "mnist", "--min-aiq", "0.5"]
SHRINK = ["shrink", "m.onnx", "--data", "mnist", "--out", "o.onnx"]

# (command line before the flag, flag, values it refuses). Every numeric flag of every command.
FLAGS = [
    *[
        (command, flag, values)
        for command in (AUDIT, GATE)
        for flag, values in [
            ("--limit", ["0", "-1", str(MAX_SAMPLES + 1), *NOT_WHOLE]),
            ("--resize", ["0", "-3", "100000", *NOT_WHOLE]),
            ("--crop", ["0", "65536", *NOT_WHOLE]),
            ("--batch-size", ["0", "-1", str(2**31), *NOT_WHOLE]),
            ("--scale", NOT_FINITE),
            ("--mean", NOT_FINITE),
            ("--std", NOT_FINITE),
            ("--beta", ["0", "-1", "-0.0", *NOT_FINITE]),
            ("--margin-fraction", ["0", "1.0001", "-0.1", *NOT_FINITE]),
            ("--margin-seed", ["-1", str(2**63), *NOT_WHOLE]),
            ("--target-efficiency", ["0", "1.5", *NOT_FINITE]),
            ("--memory-budget", ["0", "1K", "63M", "2P", "abc", "-1G", "1e9"]),
            ("--shards", ["0", "-2", "4097", *NOT_WHOLE]),
            ("--timeout", ["0", "-5", "1e12", *NOT_FINITE]),
        ]
    ],
    (SHRINK, "--limit", ["0", "-5", str(MAX_SAMPLES + 1), *NOT_WHOLE]),
    (SHRINK, "--max-accuracy-drop", ["-1", "-0.001", "100.5", "1e9", *NOT_FINITE]),
    (SHRINK, "--align", ["0", "-1", "1025", *NOT_WHOLE]),
    (SHRINK, "--batch-size", ["0", "-1", str(2**31), *NOT_WHOLE]),
    (SHRINK, "--scale", NOT_FINITE),
    (SHRINK, "--mean", NOT_FINITE),
    (SHRINK, "--std", NOT_FINITE),
    (SHRINK, "--beta", ["0", "-2", *NOT_FINITE]),
    (["serve"], "--port", ["-1", "65536", "131073", "99999999999", *NOT_WHOLE]),
    (["serve"], "--metrics-port", ["-1", "65536", *NOT_WHOLE]),
    (["serve"], "--max-concurrent", ["0", "-1", "1025", *NOT_WHOLE]),
    (["serve"], "--max-queued", ["-1", "1000001", *NOT_WHOLE]),
    (["serve"], "--idle-timeout", ["0", "-1", "1e9", *NOT_FINITE]),
    (["serve"], "--max-model-mb", ["0", "-1", str((1 << 20) + 1), *NOT_WHOLE]),
    (["serve"], "--max-batch-mb", ["0", "-1", str(MAX_BATCH_MB + 1), "100000", *NOT_WHOLE]),
    (["serve"], "--audit-memory", ["0", "1K", "abc", "-1", "", "2P", "1e9"]),
    (["serve"], "--grace", ["-1", "1e9", *NOT_FINITE]),
    (["jobs"], "--timeout", ["0", "-1", *NOT_FINITE]),
    (["reports"], "--timeout", ["0", "-1", *NOT_FINITE]),
]
CASES = [
    pytest.param(prefix, flag, value, id=f"{prefix[0]} {flag} {value!r}")
    for prefix, flag, values in FLAGS
    for value in dict.fromkeys([*values, *NOT_NUMBERS])
]


@pytest.mark.parametrize(("prefix", "flag", "value"), CASES)
def test_every_numeric_flag_refuses_a_bad_value_in_one_line_with_exit_2(
    capsys: pytest.CaptureFixture[str], prefix: list[str], flag: str, value: str
) -> None:
    line = usage_refused(capsys, lambda: build_parser().parse_args([*prefix, f"{flag}={value}"]), f"argument {flag}")
    assert "\x1b" not in line and len(line) < 400


@pytest.mark.parametrize(
    ("argv", "attribute", "expected"),
    [
        (["serve", "--port", "0"], "port", 0),
        (["serve", "--port", "65535"], "port", 65535),
        (["serve", "--max-batch-mb", str(MAX_BATCH_MB)], "max_batch_mb", MAX_BATCH_MB),
        (["serve", "--audit-memory", "64M"], "audit_memory", 64 << 20),
        (["serve", "--grace", "0"], "grace", 0.0),
        ([*AUDIT, "--memory-budget", "1.5G"], "memory_budget", 3 << 29),
        ([*AUDIT], "memory_budget", 1 << 30),  # the default goes through the same type
        ([*AUDIT, "--margin-fraction", "1"], "margin_fraction", 1.0),
        ([*AUDIT, "--mean=-0.5"], "mean", -0.5),
        ([*AUDIT, "--limit", " 7 "], "limit", 7),
    ],
)
def test_values_at_the_edges_of_each_range_are_taken(argv: list[str], attribute: str, expected: object) -> None:
    assert getattr(build_parser().parse_args(argv), attribute) == expected


def test_the_types_say_what_they_want() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be in 1\.\.3, got 4$"):
        integer(1, 3)("4")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be in \(0, 1\], got 0$"):
        number(0, 1, above=True)("0")
    with pytest.raises(argparse.ArgumentTypeError, match=r"^must be in \[0, 1\), got 1$"):
        number(0, 1, below=True)("1")
    with pytest.raises(argparse.ArgumentTypeError, match="must be a finite number"):
        number()("nan")
    with pytest.raises(argparse.ArgumentTypeError, match="memory budget must be at least 64M"):
        size("1K")
    assert port("8080") == 8080 and number()("-1e300") == -1e300 and math.isclose(number()("1e-300"), 1e-300)


# Where a server's HOST:PORT belongs: what gRPC would take and fail on later, in its resolver's words.
NOT_SERVERS = [
    "",
    "nohost",
    "host:",
    "host:0",
    "host:65536",
    "host:-1",
    "host:x",
    "host: 1",
    ":1",
    "[::1",
    "[::1]",
    "[zz]:1",
    "\x1b[31mhost:1",
    "a" * 300 + ":1",
    "a" * 64 + ".b:1",
    "h..x:1",
    "-h:1",
    "é:1",
    "unix:/tmp/s",
    "http://h:1",
    "h:1\n",
    "h/../x:1",
]


@pytest.mark.parametrize("prefix", [AUDIT, GATE, ["reports"], ["jobs"]], ids=lambda prefix: prefix[0])
@pytest.mark.parametrize("value", NOT_SERVERS, ids=repr)
def test_a_server_address_that_is_not_host_port_is_a_usage_error(
    capsys: pytest.CaptureFixture[str], prefix: list[str], value: str
) -> None:
    line = usage_refused(capsys, lambda: build_parser().parse_args([*prefix, f"--server={value}"]), "HOST:PORT")
    assert "\x1b" not in line and len(line) < 400


@pytest.mark.parametrize("value", ["localhost:50051", "127.0.0.1:1", "[::1]:65535", "auditor.internal:50051", "a_b:9"])
def test_server_addresses_of_every_form_are_taken(value: str) -> None:
    assert server_address(value) == value
