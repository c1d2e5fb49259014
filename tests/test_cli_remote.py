"""The CLI against a real server: ``audit``, ``gate``, ``reports`` and ``jobs`` with ``--server``."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from models import mlp, save
from refusals import cli_refused

from auditor.cli import main
from auditor.service.options import ServeOptions
from auditor.service.server import build_server

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


def _detach(capsys: pytest.CaptureFixture, target: str, *extra: str, model: Path = MODEL) -> str:
    code = main(["audit", str(model), "--data", "mnist", "--split", "both", "--server", target, "--detach", *extra])
    out, err = capsys.readouterr()
    assert (code, err) == (0, "")
    [job_id] = out.splitlines()
    assert len(job_id) == 32
    return job_id


def test_a_detached_audit_prints_its_job_id_and_jobs_waits_for_its_report(
    target: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    job_id = _detach(capsys, target, "--limit", "150")
    args = ["jobs", job_id, "--server", target, "--wait", "--json", str(tmp_path / "r.json")]
    assert main([*args, "--html", str(tmp_path / "r.html")]) == 0
    assert "aIQ" in capsys.readouterr().out
    remote = json.loads((tmp_path / "r.json").read_text())
    assert (remote["splits"]["train"]["samples"], remote["splits"]["test"]["samples"]) == (150, 150)
    assert (tmp_path / "r.html").read_text().lstrip().lower().startswith("<!doctype html")
    local = _json_of(
        capsys, main(["audit", str(MODEL), "--data", "mnist", "--split", "both", "--limit", "150", "--json", "-"])
    )
    assert remote["splits"] == local["splits"]
    assert main(["jobs", "--server", target]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:6] == ["id", "model", "dataset", "state", "samples", "queue"]
    row = next(line for line in listing if line.startswith(job_id)).split()
    assert row[1:4] == ["lenet300_11_4.onnx", "mnist/both[:150]", "done"]


def test_a_failed_job_exits_2_with_its_reason_in_one_line(
    target: str, capsys: pytest.CaptureFixture, tmp_path: Path
) -> None:
    wrong = save(mlp([10, 4, 3]), tmp_path / "ten_inputs.onnx")
    job_id = _detach(capsys, target, "--limit", "20", model=wrong)
    cli_refused(capsys, main(["jobs", job_id, "--server", target, "--wait"]), f"job {job_id} failed: ", "expects")
    cli_refused(capsys, main(["jobs", job_id, "--server", target]), "failed")


def test_a_cancelled_job_exits_2(target: str, capsys: pytest.CaptureFixture) -> None:
    job_id = _detach(capsys, target)
    cli_refused(capsys, main(["jobs", job_id, "--server", target, "--cancel"]), f"job {job_id} cancelled")


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["audit", str(MODEL), "--data", "mnist", "--detach"], "give --server"),
        (["audit", str(MODEL), "--data", "x.npz", "--detach", "--server", "127.0.0.1:9"], "dataset the server holds"),
        (["audit", str(MODEL), "--data", "mnist", "--detach", "--server", "127.0.0.1:9", "--json", "-"], "job id"),
        (["jobs"], "give --server"),
        (["jobs", "--server", "127.0.0.1:9", "--wait"], "give its id"),
    ],
)
def test_detach_and_jobs_misuse_is_a_one_line_exit_2(
    capsys: pytest.CaptureFixture, args: list[str], fragment: str
) -> None:
    cli_refused(capsys, main(args), fragment)


def test_an_unknown_job_is_a_one_line_exit_2(target: str, capsys: pytest.CaptureFixture) -> None:
    cli_refused(capsys, main(["jobs", "0" * 32, "--server", target]), "no job with id")
    cli_refused(capsys, main(["jobs", "not-an-id", "--server", target]), "32 lowercase hex digits")


def test_remote_audit_of_an_image_folder_equals_a_local_one(
    target: str, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from PIL import Image

    from auditor.datasets.splits import load_arrays

    x, _ = load_arrays("mnist", "test", limit=60)
    for i, image in enumerate(x):
        Image.fromarray(image).save(tmp_path / f"{i:03d}.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    args = ["audit", str(MODEL), "--data", str(tmp_path), "--skip-bad", "--json", "-"]
    local = _json_of(capsys, main(args))
    remote = _json_of(capsys, main([*args, "--server", target]))
    assert remote["splits"] == local["splits"] and local["splits"]["test"]["samples"] == 60
    assert remote["warnings"] == local["warnings"] and "skipped 1 bad image" in local["warnings"][0]
