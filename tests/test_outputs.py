"""auditor.outputs: every file a command will write is checked before it does any work."""

from __future__ import annotations

from pathlib import Path

import pytest
from refusals import refused

from auditor.errors import AuditError
from auditor.outputs import check_outputs


@pytest.mark.parametrize("name", ["m.onnx", "soft", "hard", "sub/../m.onnx"])
def test_an_output_may_not_name_an_input_however_linked(tmp_path: Path, name: str) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model")
    (tmp_path / "soft").symlink_to(model)
    (tmp_path / "hard").hardlink_to(model)
    (tmp_path / "sub").mkdir()
    refused(AuditError, lambda: check_outputs({"the model": model}, {"--out": tmp_path / name}), "is the model too")
    assert model.read_bytes() == b"model"


def test_two_outputs_may_not_name_one_file_or_both_stdout(tmp_path: Path) -> None:
    both = {"--json": str(tmp_path / "r.json"), "--html": tmp_path / "r.json"}
    refused(AuditError, lambda: check_outputs({}, both), "--html", "is --json too")
    check_outputs({"the report": "-"}, {"--json": "-", "--html": None, "--junit": None})
    check_outputs({}, {"--json": str(tmp_path / "r.json"), "--html": "-"})
    stdout_twice = {"--json": "-", "--html": "-"}
    refused(AuditError, lambda: check_outputs({}, stdout_twice), "--json and --html both name '-' (stdout)")
    refused(AuditError, lambda: check_outputs({}, {"--json": ""}), "--json '' names no file")


@pytest.mark.parametrize(
    ("name", "make_folders", "fragment"),
    [
        ("", False, "is a folder"),
        (".", True, "is a folder"),
        ("none/o.onnx", False, "its folder does not exist"),
        ("file.txt/o.onnx", True, "its folder does not exist"),
        ("file.txt/deeper/o.onnx", True, "its folder does not exist"),
    ],
)
def test_an_output_that_cannot_be_a_file_is_refused(
    tmp_path: Path, name: str, make_folders: bool, fragment: str
) -> None:
    (tmp_path / "file.txt").write_text("x")
    out = tmp_path / name if name else Path(name)
    refused(AuditError, lambda: check_outputs({}, {"--out": out}, make_folders=make_folders), "--out", fragment)


def test_a_command_that_makes_its_folders_may_name_one_not_there_yet(tmp_path: Path) -> None:
    check_outputs({}, {"--out": tmp_path / "a" / "b" / "o.onnx"}, make_folders=True)
    assert not (tmp_path / "a").exists()
