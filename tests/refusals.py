"""The one-line refusal every bad input gets, checked the same way in every test.

In the library a refusal is an ``AuditError`` of the right kind whose message is one line; on the
command line it is exit code 2 with that line on stderr, after ``auditor: error:``, nothing on
stdout and no traceback.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from auditor.errors import AuditError


def refused(kind: type[AuditError], call: Callable[[], object], *fragments: str) -> str:
    """Run ``call``; expect a one-line refusal of ``kind`` containing every fragment. Returns it."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert message and "\n" not in message and message.strip() == message, repr(message)
    for fragment in fragments:
        assert fragment in message, message
    return message


def cli_refused(capsys: pytest.CaptureFixture[str], code: int, *fragments: str) -> str:
    """The command just run exited 2 with one line on stderr holding every fragment. Returns it."""
    out, err = capsys.readouterr()
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("auditor: error: ")
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]


def usage_refused(capsys: pytest.CaptureFixture[str], call: Callable[[], object], *fragments: str) -> str:
    """``call`` (a parse of bad flags) exits 2 with one argparse line on stderr holding every
    fragment and pointing at --help; nothing on stdout. Returns the line."""
    with pytest.raises(SystemExit) as caught:
        call()
    assert caught.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert ": error: " in lines[0] and lines[0].endswith("(see --help)"), lines[0]
    for fragment in fragments:
        assert fragment in lines[0], lines[0]
    return lines[0]
