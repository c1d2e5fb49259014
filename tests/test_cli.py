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
import signal
import struct
import subprocess
import sys
import termios
import threading
import unicodedata
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import HOSTILE_NAMES, input_of_type, mlp, save, wide_conv_model, with_names
from refusals import cli_refused, usage_refused
from servers import eventually, with_default_signals

from auditor.cli import main
from auditor.engine.prepare import describe_model
from auditor.engine.run import cuda_usable

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
        "--gpu-math",
        "tf32",
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
    assert config["gpu_math"] == "tf32"
    assert "provider_options" not in data and not any("approximate" in w for w in data["warnings"])  # CPU ran


def test_an_unknown_gpu_math_is_a_usage_error(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["audit", str(model), "--data", "mnist", "--gpu-math", "fp16"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "--gpu-math" in err and len(err.splitlines()) == 1


def test_audit_json_to_stdout_prints_only_json(model: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["audit", str(model), "--data", "mnist", "--limit", "50", "--json", "-"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)  # the whole of stdout is the one JSON document
    assert data["schema"] == "auditor.report/v1"
    assert data["splits"]["test"]["samples"] == 50
    assert err == ""


@pytest.mark.parametrize("command", ["audit", "gate"])
def test_html_to_stdout_prints_only_the_page_and_one_stdout_is_all(
    model: Path, capsys: pytest.CaptureFixture[str], command: str
) -> None:
    thresholds = ["--min-accuracy", "0"] if command == "gate" else []
    assert main([command, str(model), "--data", "mnist", "--limit", "50", "--html", "-", *thresholds]) == 0
    out = capsys.readouterr().out
    assert out.startswith("<!doctype html>") and out.rstrip().endswith("</html>")  # no table mixed in
    code = main([command, str(model), "--data", "mnist", "--limit", "50", "--json", "-", "--html", "-", *thresholds])
    cli_refused(capsys, code, "--json and --html both name '-' (stdout)")


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
    assert accuracy < 1
    assert main(_gate(model, "--gate-split", "train", "--min-accuracy", "1")) == 1
    assert f"FAIL accuracy on train: {accuracy:.4f} (needs >= 1)" in capsys.readouterr().out


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
        (["--limit", "0"], "argument --limit: must be in 1.."),
        (["--limit", "-3"], "argument --limit"),
        (["--beta", "-1"], "argument --beta: must be in (0, inf]"),
        (["--beta", "0"], "argument --beta"),
        (["--batch-size", "0"], "argument --batch-size"),
        (["--margin-fraction", "0"], "argument --margin-fraction"),
        (["--beta", "inf"], "argument --beta: must be a finite number"),
        (["--mean", "nan"], "argument --mean: must be a finite number"),
        (["--std", "inf"], "argument --std"),
        (["--scale", "nan"], "argument --scale"),
        (["--alpha-range", "0", "inf"], "argument --alpha-range"),
    ],
)
def test_bad_option_values_are_usage_errors(model: Path, capsys, option: list[str], fragment: str) -> None:
    usage_refused(capsys, lambda: main(["audit", str(model), "--data", "mnist", *option]), fragment)


@pytest.mark.parametrize(
    ("option", "fragment"),
    [(["--std", "0"], "std must not be 0"), (["--alpha-range", "1", "0"], "alpha range must be increasing")],
)
def test_option_values_that_only_fail_together_or_at_one_point_are_refused(
    model: Path, capsys, option: list[str], fragment: str
) -> None:
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


@pytest.mark.parametrize(
    "argv",
    [
        ["audit", "{model}", "--data", "mnist", "--json", "{model}"],
        ["audit", "{link}", "--data", "mnist", "--html", "{model}"],
        ["audit", "{model}", "--data", "{data}", "--json", "{data}"],
        ["audit", "{model}", "--data", "mnist", "--json", "{tmp}/r.json", "--html", "{tmp}/r.json"],
        ["gate", "{model}", "--data", "mnist", "--min-aiq", "0", "--junit", "{model}"],
        ["gate", "{model}", "--data", "mnist", "--min-aiq", "0", "--summary", "{link}"],
        ["gate", "{model}", "--data", "mnist", "--baseline", "{report}", "--max-aiq-drop", "1", "--json", "{report}"],
        ["gate", "{model}", "--data", "mnist", "--min-aiq", "0", "--junit", "{tmp}"],
        ["render", "{report}", "--html", "{report}"],
        ["render", "{report}", "--html", "{tmp}"],
        ["compare", "{report}", "{report}", "--json", "{report}"],
    ],
    ids=lambda argv: " ".join(argv),
)
def test_no_output_file_overwrites_an_input_or_another_output(
    model: Path, both_report: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str]
) -> None:
    """A --json, --html, --junit or --summary that names the model (however linked), the data, the
    report read, another output or a folder is refused before the audit, and nothing is written."""
    own = save(onnx.load(model), tmp_path / "m.onnx")
    (tmp_path / "link.onnx").symlink_to(own)
    data = tmp_path / "d.npz"
    np.savez(data, x_test=np.zeros((4, 784), np.float32), y_test=np.zeros(4, np.int64))
    report = tmp_path / "base.json"
    report.write_text(json.dumps(both_report))
    names = {"model": own, "link": tmp_path / "link.onnx", "data": data, "report": report, "tmp": tmp_path}
    before = {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()}
    line = cli_refused(capsys, main([item.format(**names) for item in argv]))
    assert " too; write it to another file" in line or " is a folder; name a file" in line, line
    assert {path: path.read_bytes() for path in tmp_path.iterdir() if path.is_file()} == before


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


@pytest.mark.parametrize(
    "setting", [["--std", "1e-45"], ["--std", "1e-300"], ["--scale", "1e300"], ["--mean", "1e300"]]
)
def test_subprocess_refusal_of_overflowing_preprocessing_is_the_only_line_on_stderr(
    model: Path, setting: list[str]
) -> None:
    """numpy's overflow and divide warnings must not reach stderr ahead of the one-line refusal."""
    overflow = cli("audit", str(model), "--data", "mnist", "--limit", "10", *setting)
    assert overflow.returncode == 2 and overflow.stdout == ""
    assert overflow.stderr.startswith("auditor: error: ") and overflow.stderr.count("\n") == 1, overflow.stderr


@pytest.mark.parametrize(
    ("elem_type", "name"), [(onnx.TensorProto.STRING, "string"), (onnx.TensorProto.BFLOAT16, "bfloat16")]
)
@pytest.mark.parametrize("command", ["layers", "audit"])
def test_a_model_whose_input_cannot_be_fed_is_refused_in_one_line_naming_input_and_type(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], elem_type: int, name: str, command: str
) -> None:
    model = save(input_of_type(mlp([784, 16, 10]), elem_type), tmp_path / "typed.onnx")
    argv = [command, str(model)] + (["--data", "mnist", "--limit", "10"] if command == "audit" else [])
    cli_refused(capsys, main(argv), f"model input 'x' takes {name} tensors, which the auditor cannot feed")


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


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT], ids=lambda s: s.name)
def test_a_signal_mid_spill_leaves_nothing_in_the_spill_root_and_exits_128_plus_its_number(
    tmp_path: Path, sig: signal.Signals
) -> None:
    model = save(wide_conv_model(), tmp_path / "wide.onnx")
    noise = tmp_path / "noise.npy"
    np.save(noise, np.random.default_rng(0).integers(0, 256, (40_000, 28, 28), dtype=np.uint8))
    root = tmp_path / "spill"
    root.mkdir()
    argv = [sys.executable, "-m", "auditor.cli", "audit", str(model), "--data", str(noise)]
    argv += ["--memory-budget", "64M", "--spill-dir", str(root), "--no-progress"]
    child = subprocess.Popen(with_default_signals(argv), cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        eventually(lambda: list(root.rglob("*.run")), timeout=120, what="the audit spilling")
        child.send_signal(sig)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 128 + sig
    assert out == b""
    assert err.decode().splitlines() == [
        "auditor: interrupted" if sig == signal.SIGINT else f"auditor: stopped by {sig.name}"
    ]
    assert not list(root.iterdir())


def _hostile_model(tmp_path: Path, name: str) -> Path:
    """A 784-16-10 MLP whose tensors, nodes, graph, doc strings and file are all named after ``name``."""
    file_name = name.replace("/", "_").replace("\x00", "_").encode("utf-8", "surrogatepass")[:200]
    return save(with_names(mlp([784, 16, 10]), name), tmp_path / (file_name.decode("utf-8", "ignore") + ".onnx"))


def _no_terminal_control(text: str) -> None:
    """Our own line breaks only: no ESC, no other control, format or separator character."""
    assert [c for c in text if c != "\n" and unicodedata.category(c) in ("Cc", "Cf", "Cs", "Zl", "Zp")] == []


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_names_from_the_model_are_escaped_in_layers_and_audit_and_valid_xml_in_junit(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _hostile_model(tmp_path, name)
    assert main(["layers", str(model)]) == 0
    out, err = capsys.readouterr()
    _no_terminal_control(out + err)
    assert len(out.splitlines()) == 3  # header and two layers: no name broke a line
    assert main(["layers", str(model), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["layers"][0]["name"] == f"{name}/pre1"  # JSON keeps the name exactly
    junit = tmp_path / "gate.xml"
    argv = ["gate", str(model), "--data", "mnist", "--limit", "40", "--min-aiq", "0.99", "--junit", str(junit)]
    assert main(argv) == 1
    out, err = capsys.readouterr()
    _no_terminal_control(out + err)
    suite = ET.parse(junit).getroot().find("testsuite")  # expat refuses any character XML forbids
    assert suite is not None and "test: 40 samples" in suite.find("system-out").text
    _no_terminal_control(suite.get("name") + suite.find("system-out").text)


@pytest.mark.parametrize("name", ["bad\x1b[2J\x1b]0;x\x07name", "a\u202eb\nc"])
def test_a_refusal_that_quotes_a_name_is_still_one_escaped_line(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    model = _hostile_model(tmp_path, name)
    data = tmp_path / "wrong.npy"
    np.save(data, np.zeros((4, 10), np.float32))  # does not fit the model's 784-wide input
    line = cli_refused(capsys, main(["audit", str(model), "--data", str(data)]))
    _no_terminal_control(line)


# --- What each subcommand imports ---------------------------------------------------------------

HEAVY = ("grpc", "auditor._proto", "auditor.service.client", "auditor.service.server", "onnxruntime", "matplotlib")
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
