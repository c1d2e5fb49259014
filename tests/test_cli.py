"""The ``auditor`` command: exit codes 0/1/2, what goes to stdout and stderr, JSON and JUnit files.

Most runs call ``auditor.cli.main`` in-process (it returns the exit code); a few run
``python -m auditor.cli`` as a real subprocess where the process boundary itself matters.
Everything runs on the real MNIST files and real onnxruntime sessions.
"""

from __future__ import annotations

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from refusals import cli_refused

from auditor.cli import main
from auditor.prepare import describe_model
from auditor.run import cuda_usable

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "lenet300_11_4.onnx"
SCHEMA_KEYS = ["schema", "model", "providers", "splits", "cna_margin", "config", "warnings"]
SPLIT_KEYS = {"samples", "accuracy", "layers", "network_efficiency", "aiq", "beta", "cna"}
PROGRESS_MARKS = ("\r", "█", "it/s", "sample/s", "%|")


@pytest.fixture(scope="module")
def model() -> Path:
    """The small trained example model in the checkout (input ``input``, Gemm layers 300 and 11)."""
    return EXAMPLE


@pytest.fixture(scope="module")
def both_report(model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The JSON report of ``auditor audit MODEL --data mnist --split both --limit 300``."""
    out = tmp_path_factory.mktemp("report") / "out.json"
    assert main(["audit", str(model), "--data", "mnist", "--split", "both", "--limit", "300", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def cli(*args: str, stderr: int | None = subprocess.PIPE, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python -m auditor.cli ARGS`` as a real subprocess (stdout and stderr piped, so not TTYs)."""
    return subprocess.run(
        [sys.executable, "-m", "auditor.cli", *args],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        timeout=timeout,
        env=dict(os.environ),
    )


# --- auditor layers ---------------------------------------------------------------------------


def test_layers_table(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", str(model), "--json"]) == 0
    layers = json.loads(capsys.readouterr().out)["layers"]
    assert main(["layers", str(model)]) == 0
    out = capsys.readouterr().out.splitlines()
    columns = list(layers[0])
    assert out[0].split() == ["#", *columns]
    assert columns == ["name", "op", "activation", "role", "neurons", "positions", "block_output"]
    rows = [line.split() for line in out[1:]]
    assert rows == [
        [str(i), *("-" if layer[key] is None else str(layer[key]) for key in columns)]
        for i, layer in enumerate(layers, 1)
    ]
    assert [r[4] for r in rows] == ["hidden", "hidden", "output"]


def test_layers_json(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["layers", str(model), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["input"] == "input"
    assert [layer["role"] for layer in data["layers"]] == ["hidden", "hidden", "output"]
    assert all(layer["op"] == "Gemm" and layer["positions"] == 1 for layer in data["layers"])
    assert data["layers"][-1]["neurons"] == 10 and data["layers"][-1]["activation"] is None


def test_layers_json_is_what_describe_model_finds_for_every_shared_model(
    shared_models: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``auditor layers`` and the service's DescribeModel answer from one rule: the same layers,
    with the same sizes, for every real model."""
    paths = sorted(shared_models.glob("*.onnx"))
    assert len(paths) >= 5
    for path in paths:
        assert main(["layers", str(path), "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        info = describe_model(path)
        assert data["input"] == info.input_name
        assert len(data["layers"]) == len(info.layers), path.name
        for row, layer in zip(data["layers"], info.layers, strict=True):
            assert {"name", "op", "activation", "role", "neurons", "positions"} <= set(row)
            assert row == {key: getattr(layer, key) for key in row}, path.name


# --- auditor audit ----------------------------------------------------------------------------


def test_audit_writes_json_and_prints_the_table(model: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out.json"
    code = main(["audit", str(model), "--data", "mnist", "--split", "both", "--limit", "300", "--json", str(out)])
    assert code == 0
    stdout = capsys.readouterr().out
    assert "train: 300 samples" in stdout and "test: 300 samples" in stdout
    assert "aIQ (beta=2, 0-1 scale)" in stdout and "CNA-Margin" in stdout
    data = json.loads(out.read_text())
    assert [key for key in data if key in SCHEMA_KEYS] == SCHEMA_KEYS  # later keys are optional additions
    assert data["schema"] == "auditor.report/v1"
    assert data["model"]["name"] == model.name
    assert data["providers"][-1] == "CPUExecutionProvider"
    assert set(data["splits"]) == {"train", "test"}
    for split in data["splits"].values():
        assert set(split) >= SPLIT_KEYS
        assert split["samples"] == 300
        assert len(split["layers"]) == 2  # the output layer is left out of efficiency by default
        assert 0 <= split["accuracy"] <= 1
    assert data["cna_margin"]["cna_margin_max"] == data["cna_margin"]["margin_max"] * data["cna_margin"]["area"]
    assert data["config"]["beta"] == 2.0 and data["config"]["include_output_layer"] is False


def test_audit_options_reach_the_config(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.json"
    args = [
        "audit",
        str(model),
        "--data",
        "mnist",
        "--limit",
        "60",
        "--json",
        str(out),
        "--beta",
        "0.5",
        "--include-output-layer",
        "--cna-exclude-output-layer",
        "--aggregate",
        "mean",
        "--batch-size",
        "7",
        "--target-efficiency",
        "0.5",
        "--margin-fraction",
        "0.2",
        "--device",
        "cpu",
    ]
    assert main(args) == 0
    data = json.loads(out.read_text())
    config = data["config"]
    assert (config["beta"], config["aggregate"], config["batch_size"]) == (0.5, "mean", 7)
    assert (config["include_output_layer"], config["cna_include_output_layer"]) == (True, False)
    assert (config["target_efficiency"], config["margin_fraction"], config["device"]) == (0.5, 0.2, "cpu")
    (split,) = data["splits"].values()
    assert len(split["layers"]) == 3 and split["beta"] == 0.5
    assert list(data["splits"]) == ["test"]  # the default split
    assert data["providers"] == ["CPUExecutionProvider"]


def test_audit_json_to_stdout_prints_only_json(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(model), "--data", "mnist", "--limit", "50", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # the whole of stdout is the one JSON document
    assert data["schema"] == "auditor.report/v1"
    assert data["splits"]["test"]["samples"] == 50
    assert err == ""


# --- auditor gate -----------------------------------------------------------------------------


def _gate(model: Path, *thresholds: str) -> list[str]:
    return ["gate", str(model), "--data", "mnist", "--split", "both", "--limit", "300", *thresholds]


def test_gate_passes(model: Path, both_report: dict, capsys: pytest.CaptureFixture[str]) -> None:
    test = both_report["splits"]["test"]
    code = main(
        _gate(
            model,
            "--min-aiq",
            f"{test['aiq'] - 0.01}",
            "--min-accuracy",
            f"{test['accuracy'] - 0.01}",
            "--min-efficiency",
            "0",
            "--max-cna-margin",
            f"{both_report['cna_margin']['cna_margin_max'] + 0.01}",
        )
    )
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gate passed: 4/4 thresholds met" in out
    assert "FAIL" not in out


def test_gate_fails_and_names_the_metric(model: Path, both_report: dict, capsys) -> None:
    aiq = both_report["splits"]["test"]["aiq"]
    assert aiq < 0.99
    assert main(_gate(model, "--min-aiq", "0.99")) == 1
    out = capsys.readouterr().out
    assert f"FAIL aiq on test: {aiq:.4f} (needs >= 0.99)" in out
    assert "gate FAILED: 0/1 thresholds met" in out


def test_gate_on_the_train_split(model: Path, both_report: dict, capsys) -> None:
    accuracy = both_report["splits"]["train"]["accuracy"]
    assert main(_gate(model, "--gate-split", "train", "--min-accuracy", "1.01")) == 1
    assert f"FAIL accuracy on train: {accuracy:.4f} (needs >= 1.01)" in capsys.readouterr().out


def test_gate_junit(model: Path, both_report: dict, tmp_path: Path, capsys) -> None:
    junit = tmp_path / "gate.xml"
    accuracy = both_report["splits"]["test"]["accuracy"]
    code = main(
        _gate(
            model,
            "--min-aiq",
            "0.99",
            "--min-accuracy",
            f"{accuracy - 0.05}",
            "--max-cna-margin",
            "1000",
            "--junit",
            str(junit),
        )
    )
    assert code == 1
    capsys.readouterr()
    root = ET.parse(junit).getroot()
    assert root.tag == "testsuites"
    assert (root.get("tests"), root.get("failures")) == ("3", "1")
    (suite,) = root.findall("testsuite")
    assert (suite.get("tests"), suite.get("failures")) == ("3", "1")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "aiq >= 0.99",
        f"accuracy >= {accuracy - 0.05:g}",
        "cna_margin_max <= 1000",
    ]
    failed = [c for c in cases if c.find("failure") is not None]
    assert [c.get("name") for c in failed] == ["aiq >= 0.99"]
    assert "FAIL aiq on test" in failed[0].find("failure").get("message")
    assert "test: 300 samples" in suite.find("system-out").text


def test_gate_json_to_stdout_moves_the_verdict_to_stderr(model: Path, capsys) -> None:
    assert main(["gate", str(model), "--data", "mnist", "--limit", "50", "--min-aiq", "0.99", "--json", "-"]) == 1
    out, err = capsys.readouterr()
    assert json.loads(out)["schema"] == "auditor.report/v1"
    assert "FAIL aiq on test" in err and "gate FAILED" in err


def test_gate_without_thresholds(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["gate", str(model), "--data", "mnist", "--limit", "50"])
    cli_refused(capsys, code, "at least one threshold")


def test_gate_on_a_split_not_audited(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["gate", str(model), "--data", "mnist", "--limit", "50", "--min-aiq", "0.1", "--gate-split", "train"])
    cli_refused(capsys, code, "'train'", "--gate-split")


# --- Bad input: exit 2, one line on stderr ----------------------------------------------------


def test_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["audit", str(tmp_path / "nope.onnx"), "--data", "mnist", "--limit", "10"])
    cli_refused(capsys, code, "not found", "nope.onnx")
    cli_refused(capsys, main(["layers", str(tmp_path / "nope.onnx")]), "not found")


def test_random_bytes_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(5).integers(0, 256, 2048, dtype=np.uint8).tobytes())
    cli_refused(capsys, main(["audit", str(path), "--data", "mnist", "--limit", "10"]), "noise.onnx")
    cli_refused(capsys, main(["layers", str(path)]), "noise.onnx")


def test_unknown_dataset(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cli_refused(capsys, main(["audit", str(model), "--data", "imagenet-22k"]), "unknown dataset", "imagenet-22k")


@pytest.mark.parametrize(
    ("option", "fragment"),
    [
        (["--limit", "0"], "--limit"),
        (["--limit", "-3"], "--limit"),
        (["--beta", "-1"], "beta"),
        (["--beta", "0"], "beta"),
        (["--batch-size", "0"], "batch size"),
        (["--std", "0"], "std"),
        (["--margin-fraction", "0"], "margin fraction"),
        (["--alpha-range", "1", "0"], "alpha range"),
        (["--beta", "inf"], "beta must be a finite number"),
        (["--mean", "nan"], "mean must be a finite number"),
        (["--std", "inf"], "std"),
        (["--scale", "nan"], "scale"),
        (["--alpha-range", "0", "inf"], "alpha range"),
    ],
)
def test_bad_option_values(model: Path, capsys, option: list[str], fragment: str) -> None:
    cli_refused(capsys, main(["audit", str(model), "--data", "mnist", *option]), fragment)


def test_wrong_shape_data(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "wide.npz"
    np.savez(data, x=np.zeros((6, 5), np.float32), y=np.arange(6) % 10)
    cli_refused(capsys, main(["audit", str(model), "--data", str(data)]), "expects 1×28×28")


def test_labels_out_of_range_in_a_file(model: Path, tmp_path: Path, capsys) -> None:
    data = tmp_path / "bad_labels.npz"
    np.savez(data, x=np.zeros((6, 28, 28), np.uint8), y=np.array([0, 1, 2, 10, 4, 5]))
    cli_refused(capsys, main(["audit", str(model), "--data", str(data)]), "10 classes")


def test_preprocessing_that_turns_data_into_inf_is_refused(model: Path, capsys) -> None:
    code = main(["audit", str(model), "--data", "mnist", "--limit", "10", "--std", "1e-45"])
    cli_refused(capsys, code, "--std 1e-45", "inf/NaN")


def test_cuda_on_a_machine_without_it_is_refused(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    if cuda_usable():
        pytest.skip("onnxruntime runs on CUDA here; tests/test_run.py checks that it does")
    code = main(["audit", str(model), "--data", "mnist", "--limit", "10", "--device", "cuda"])
    cli_refused(capsys, code, "CUDA was requested", "--device auto")


def test_npz_data_audits(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = tmp_path / "two.npz"
    rng = np.random.default_rng(2)
    np.savez(
        data,
        x_train=rng.integers(0, 256, (30, 28, 28), dtype=np.uint8),
        y_train=rng.integers(0, 10, 30),
        x_test=rng.integers(0, 256, (26, 28, 28), dtype=np.uint8),
        y_test=rng.integers(0, 10, 26),
    )
    assert main(["audit", str(model), "--data", str(data), "--split", "both", "--json", "-"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["splits"]["train"]["samples"], report["splits"]["test"]["samples"]) == (30, 26)
    assert report["cna_margin"] is not None


def test_unwritable_output_files(model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "no" / "such" / "folder"
    code = main(["audit", str(model), "--data", "mnist", "--limit", "20", "--json", str(missing / "out.json")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "out.json" in err and "Traceback" not in err
    code = main(
        ["gate", str(model), "--data", "mnist", "--limit", "20", "--min-aiq", "0", "--junit", str(missing / "gate.xml")]
    )
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "gate.xml" in err


def test_reports_needs_a_server(capsys: pytest.CaptureFixture[str]) -> None:
    cli_refused(capsys, main(["reports"]), "--server")


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["frobnicate"],
        ["audit"],
        ["audit", "m.onnx"],
        ["audit", "m.onnx", "--data", "mnist", "--limit", "ten"],
        ["audit", "m.onnx", "--data", "mnist", "--split", "validation"],
        ["gate", "m.onnx", "--data", "mnist", "--min-aiq", "high"],
        ["serve", "--audit-memory", "1K"],
        ["serve", "--audit-memory", "lots"],
    ],
)
def test_usage_errors_exit_2(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as caught:
        main(argv)
    assert caught.value.code == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err  # one line, not argparse's usage block
    assert err.startswith("auditor") and ": error: " in err and err.rstrip().endswith("(see --help)")


# --- Real subprocesses ------------------------------------------------------------------------


def test_subprocess_audit_has_no_progress_bar_without_a_tty(model: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.json"
    run = cli("audit", str(model), "--data", "mnist", "--split", "both", "--limit", "300", "--json", str(out))
    assert run.returncode == 0, run.stderr
    assert run.stderr == ""
    assert not any(mark in run.stderr for mark in PROGRESS_MARKS)
    assert "test: 300 samples" in run.stdout
    assert json.loads(out.read_text())["schema"] == "auditor.report/v1"


def _run_with_terminal_stderr(*args: str) -> tuple[subprocess.CompletedProcess, str]:
    """Run the CLI with stderr on a pseudo-terminal of 24×100 (tqdm draws nothing 0 columns wide)."""
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))
    chunks: list[bytes] = []

    def drain() -> None:
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO once the child has exited and the terminal is closed
                return
            if not chunk:
                return
            chunks.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        run = cli(*args, stderr=follower)
    finally:
        os.close(follower)
        reader.join(timeout=10)
        os.close(leader)
    return run, b"".join(chunks).decode(errors="replace")


def test_subprocess_progress_bar_only_on_a_terminal(model: Path) -> None:
    args = ("audit", str(model), "--data", "mnist", "--limit", "300", "--batch-size", "100")
    run, err = _run_with_terminal_stderr(*args)
    assert run.returncode == 0, err
    assert "%|" in err and "300/300" in err
    assert "%|" not in run.stdout and "\r" not in run.stdout and "test: 300 samples" in run.stdout
    run, err = _run_with_terminal_stderr(*args, "--no-progress")
    assert run.returncode == 0, err
    assert not any(mark in err for mark in PROGRESS_MARKS if mark != "\r"), err


def test_subprocess_exit_codes(model: Path, tmp_path: Path) -> None:
    missing = cli("audit", str(tmp_path / "nope.onnx"), "--data", "mnist")
    assert missing.returncode == 2
    assert missing.stdout == ""
    assert missing.stderr.count("\n") == 1 and "not found" in missing.stderr
    assert "Traceback" not in missing.stderr

    usage = cli("audit", str(model))
    assert usage.returncode == 2 and usage.stderr.count("\n") == 1 and "--data" in usage.stderr

    failed = cli("gate", str(model), "--data", "mnist", "--limit", "100", "--min-aiq", "0.99")
    assert failed.returncode == 1, failed.stderr
    assert "FAIL aiq on test" in failed.stdout


def test_subprocess_refusal_of_overflowing_preprocessing_is_the_only_line_on_stderr(model: Path) -> None:
    """numpy's overflow warnings must not reach stderr ahead of the one-line refusal."""
    overflow = cli("audit", str(model), "--data", "mnist", "--limit", "10", "--std", "1e-45")
    assert overflow.returncode == 2 and overflow.stdout == ""
    assert overflow.stderr.startswith("auditor: error: ") and overflow.stderr.count("\n") == 1, overflow.stderr


def test_a_reader_that_stops_early_is_not_an_error() -> None:
    """``auditor … | head -1``: stdout closed before the table is written ends quietly, exit 0."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "auditor.cli", "layers", str(EXAMPLE)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()  # the reader is gone before anything is written
    assert proc.wait(timeout=120) == 0
    assert proc.stderr.read() == ""


# --- What each subcommand imports ---------------------------------------------------------------

HEAVY = ("grpc", "auditor._proto", "auditor.client", "auditor.server", "onnxruntime", "matplotlib")
_IMPORTED = """
import sys
from auditor.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
heavy = {heavy!r}
print("LOADED:", *sorted(m for m in heavy if m in sys.modules))
"""


@pytest.mark.parametrize(
    ("args", "allowed"),
    [
        (["--help"], ()),
        (["audit", "--help"], ()),
        (["serve", "--help"], ()),
        (["layers", str(EXAMPLE)], ()),
        (["compare", "REPORT", "REPORT"], ()),
        (["render", "REPORT", "--html", "PAGE"], ("matplotlib",)),
        (["audit", str(EXAMPLE), "--data", "mnist", "--limit", "10", "--json", "REPORT2"], ("onnxruntime",)),
    ],
)
def test_each_subcommand_imports_only_what_it_runs(
    args: list[str], allowed: tuple[str, ...], both_report: dict, tmp_path: Path
) -> None:
    """--help, layers, compare and render never load onnxruntime or the gRPC stubs; only drawing
    the page loads matplotlib (docs/performance.md, "The whole command")."""
    report = tmp_path / "report.json"
    report.write_text(json.dumps(both_report))
    names = {"REPORT": str(report), "PAGE": str(tmp_path / "page.html"), "REPORT2": str(tmp_path / "r2.json")}
    argv = [names.get(arg, arg) for arg in args]
    code = _IMPORTED.format(heavy=HEAVY)
    done = subprocess.run(
        [sys.executable, "-c", code, *argv], cwd=REPO, capture_output=True, text=True, timeout=120, check=True
    )
    loaded = done.stdout.strip().splitlines()[-1].split()
    assert loaded[0] == "LOADED:" and sorted(loaded[1:]) == sorted(allowed), done.stdout
