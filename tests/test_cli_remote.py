"""The CLI against a real server: ``audit``, ``gate`` and ``reports`` with ``--server``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from auditor.cli import main
from auditor.server import ServeOptions, build_server

REPO = Path(__file__).resolve().parents[1]
MODEL = REPO / "examples" / "lenet300_11_4.onnx"


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server, port = build_server(ServeOptions(host="127.0.0.1", port=0, store=tmp_path_factory.mktemp("store")))
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(None)


def _json_of(capsys: pytest.CaptureFixture, code: int) -> dict:
    assert code == 0
    return json.loads(capsys.readouterr().out)


def test_remote_audit_prints_the_same_report_as_a_local_one(target: str, capsys: pytest.CaptureFixture) -> None:
    args = ["audit", str(MODEL), "--data", "mnist", "--split", "both", "--limit", "200", "--json", "-"]
    local = _json_of(capsys, main(args))
    remote = _json_of(capsys, main([*args, "--server", target]))
    assert remote["splits"] == local["splits"]
    assert remote["cna_margin"] == local["cna_margin"]
    assert remote["model"] == local["model"]


def test_remote_gate_fails_with_exit_1_and_names_the_metric(target: str, capsys: pytest.CaptureFixture) -> None:
    code = main(["gate", str(MODEL), "--data", "mnist", "--limit", "100", "--min-aiq", "0.99", "--server", target])
    assert code == 1
    assert "FAIL aiq on test" in capsys.readouterr().out


def test_reports_lists_and_fetches_what_the_server_stored(target: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["audit", str(MODEL), "--data", "mnist", "--limit", "50", "--server", target]) == 0
    capsys.readouterr()
    assert main(["reports", "--server", target]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert rows and all(len(row["id"]) == 32 for row in rows)
    fetched = _json_of(capsys, main(["reports", rows[0]["id"], "--server", target, "--json", "-"]))
    assert fetched["schema"] == "auditor.report/v1"
    assert fetched["splits"]["test"]["samples"] == 50


def test_an_unreachable_server_is_a_one_line_exit_2(capsys: pytest.CaptureFixture) -> None:
    code = main(["audit", str(MODEL), "--data", "mnist", "--limit", "10", "--server", "127.0.0.1:9", "--timeout", "3"])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("auditor: error:") and err.count("\n") == 1 and "Traceback" not in err


def test_an_unknown_report_id_is_a_one_line_exit_2(target: str, capsys: pytest.CaptureFixture) -> None:
    assert main(["reports", "0" * 32, "--server", target]) == 2
    assert capsys.readouterr().err.count("\n") == 1
