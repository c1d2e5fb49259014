"""auditor.reporting.compare and ``auditor compare``: two real reports side by side, with deltas.

The reports come from real audits on real MNIST: the bundled LeNet-300-100 and LeNet-5, and two
small hand-built MLPs that share layer names but not widths, so that matching by name, added
layers and changed widths are all exercised. Expected deltas are worked out from the reports'
own JSON, never from the comparison code.
"""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
from models import mlp
from refusals import cli_refused

from auditor.cli import main
from auditor.report import Report
from auditor.reporting.compare import compare, render_comparison, setting_differences

REPO = Path(__file__).resolve().parents[1]
LENET300 = REPO / "examples" / "lenet300_11_4.onnx"
LENET5 = REPO / "examples" / "lenet5_3_9_4.onnx"
HEADLINE = ("samples", "accuracy", "network_efficiency", "aiq", "cna")
MARGIN = ("area", "margin_max", "cna_margin_max", "margin_p5", "cna_margin_p5")


def audited(model: Path, out: Path, *args: str) -> Path:
    """``auditor audit MODEL --data mnist ARGS --json OUT``; returns OUT."""
    argv = ["audit", str(model), "--data", "mnist", "--device", "cpu", *args, "--json", str(out)]
    assert main(argv) == 0
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("compare")


@pytest.fixture(scope="module")
def lenet300(folder: Path) -> Path:
    return audited(LENET300, folder / "lenet300.json", "--split", "both", "--limit", "300")


@pytest.fixture(scope="module")
def lenet5(folder: Path) -> Path:
    return audited(LENET5, folder / "lenet5.json", "--split", "both", "--limit", "300")


@pytest.fixture(scope="module")
def mlps(folder: Path) -> tuple[Path, Path]:
    """Reports of 784→16→8→10 and 784→12→8→6→10: ``pre1`` narrower, ``pre2`` the same, ``pre3`` new."""
    paths = []
    for widths in ([784, 16, 8, 10], [784, 12, 8, 6, 10]):
        model = folder / f"mlp_{'_'.join(map(str, widths))}.onnx"
        onnx.save(mlp(widths), model)
        paths.append(audited(model, model.with_suffix(".json"), "--split", "test", "--limit", "200"))
    return paths[0], paths[1]


def load(path: Path) -> dict:
    return json.loads(path.read_text())


def test_every_headline_metric_with_its_delta(lenet300: Path, lenet5: Path) -> None:
    base, new = load(lenet300), load(lenet5)
    comparison = compare(Report.from_dict(base), Report.from_dict(new))
    got = {(m.metric, m.split): (m.base, m.new, m.delta) for m in comparison.metrics}
    for split in ("train", "test"):
        for metric in HEADLINE:
            b, n = base["splits"][split][metric], new["splits"][split][metric]
            assert got[(metric, split)] == (b, n, n - b)
    for metric in MARGIN:
        b, n = base["cna_margin"][metric], new["cna_margin"][metric]
        assert got[(metric, "train+test")] == (b, n, n - b)
    assert len(got) == 2 * len(HEADLINE) + len(MARGIN)
    assert comparison.warnings == []  # same data, same settings


def test_model_changes_of_two_different_networks(lenet300: Path, lenet5: Path) -> None:
    base, new = load(lenet300), load(lenet5)
    changes = compare(Report.from_dict(base), Report.from_dict(new)).model
    assert not changes.same_file
    assert (changes.base_sha256, changes.new_sha256) == (base["model"]["sha256"], new["model"]["sha256"])
    base_names = [layer["name"] for layer in base["model"]["layers"]]
    new_names = [layer["name"] for layer in new["model"]["layers"]]
    assert changes.added == [name for name in new_names if name not in base_names]
    assert changes.removed == [name for name in base_names if name not in new_names]
    assert changes.added and changes.removed


def test_layers_match_by_name_and_widths_are_reported(mlps: tuple[Path, Path]) -> None:
    base, new = (load(path) for path in mlps)
    comparison = compare(Report.from_dict(base), Report.from_dict(new))
    assert comparison.model.added == ["pre3"]
    assert comparison.model.removed == []
    assert comparison.model.widths == [("pre1", 16, 12)]
    old = {layer["name"]: layer for layer in base["splits"]["test"]["layers"]}
    matched = {(layer.name, layer.split): layer for layer in comparison.layers}
    assert sorted(matched) == [("pre1", "test"), ("pre2", "test")]  # pre3 is new: nothing to match
    for layer in new["splits"]["test"]["layers"]:
        if layer["name"] in old:
            delta = matched[(layer["name"], "test")]
            assert delta.efficiency.delta == layer["efficiency"] - old[layer["name"]]["efficiency"]
            assert delta.entropy_bits.delta == layer["entropy_bits"] - old[layer["name"]]["entropy_bits"]
    text = render_comparison(comparison)
    assert "layers added: pre3" in text and "width of pre1: 16 -> 12" in text


def test_a_report_against_itself_changes_nothing(lenet300: Path) -> None:
    report = Report.from_dict(load(lenet300))
    comparison = compare(report, report)
    assert comparison.model.same_file and not comparison.model.added and not comparison.model.widths
    assert all(m.delta == 0 for m in comparison.metrics)
    assert all(layer.efficiency.delta == 0 == layer.entropy_bits.delta for layer in comparison.layers)


def test_different_splits_and_data_are_compared_with_a_warning(lenet300: Path, folder: Path) -> None:
    other = audited(LENET300, folder / "test_only.json", "--limit", "250")
    comparison = compare(Report.from_dict(load(lenet300)), Report.from_dict(load(other)))
    assert comparison.warnings == [
        "the train split is only in the base report; its figures are not compared",
        "the test split has 300 samples in the base report and 250 in the new one: different data, so the "
        "figures also differ for that reason",
    ]
    assert {m.split for m in comparison.metrics} == {"test", "train+test"}
    margin = {m.metric: m for m in comparison.metrics if m.split == "train+test"}
    assert margin["area"].new is None and margin["area"].delta is None


def test_settings_that_change_the_numbers_are_named() -> None:
    base = {"beta": 2.0, "batch_size": 256, "device": "auto", "alpha_range": [0.0, 1.0]}
    assert setting_differences(base, {**base, "batch_size": 7, "device": "cpu"}) == []
    assert setting_differences(base, {**base, "alpha_range": (0.0, 1.0)}) == []
    assert setting_differences(base, {**base, "beta": 1.0}) == [("beta", 2.0, 1.0)]
    # A setting missing from an older report takes its default.
    assert setting_differences(base, {**base, "states_at": "pre-activation"}) == []
    assert setting_differences(base, {**base, "states_at": "block-output"}) == [
        ("states_at", "pre-activation", "block-output")
    ]


def test_different_settings_are_a_warning(lenet300: Path, folder: Path) -> None:
    other = audited(LENET300, folder / "beta1.json", "--split", "both", "--limit", "300", "--beta", "1")
    comparison = compare(Report.from_dict(load(lenet300)), Report.from_dict(load(other)))
    assert comparison.warnings == ["the reports were audited with different settings: beta 2 (base) vs 1 (new)"]


# --- auditor compare -----------------------------------------------------------------------------


def test_cli_prints_side_by_side(lenet300: Path, lenet5: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compare", str(lenet300), str(lenet5)]) == 0
    out = capsys.readouterr().out
    base, new = load(lenet300), load(lenet5)
    header = next(line for line in out.splitlines() if line.startswith("metric"))
    assert header.split() == ["metric", "split", "base", "new", "delta"]
    aiq = next(line.split() for line in out.splitlines() if line.startswith("aiq") and " test " in line)
    b, n = base["splits"]["test"]["aiq"], new["splits"]["test"]["aiq"]
    assert aiq == ["aiq", "test", f"{b:.4f}", f"{n:.4f}", f"{n - b:+.4f}"]
    assert f"new   lenet5_3_9_4.onnx  (sha256 {new['model']['sha256'][:12]}…, a different file)" in out
    assert "layers removed: " in out


def test_cli_json_is_the_comparison_as_data(lenet300: Path, mlps: tuple[Path, Path], capsys) -> None:
    assert main(["compare", str(mlps[0]), str(mlps[1]), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert list(data) == ["schema", "model", "metrics", "layers", "warnings"]
    assert data["schema"] == "auditor.comparison/v1"
    assert data["model"]["widths"] == [{"layer": "pre1", "base": 16, "new": 12}]
    assert data["model"]["layers_added"] == ["pre3"]
    assert {(m["metric"], m["split"]) for m in data["metrics"]} == {(metric, "test") for metric in HEADLINE}
    assert [(layer["name"], sorted(layer)) for layer in data["layers"]] == [
        (name, ["efficiency", "entropy_bits", "name", "split"]) for name in ("pre1", "pre2")
    ]


def test_cli_refuses_what_is_not_a_report(lenet300: Path, tmp_path: Path, capsys) -> None:
    junk = tmp_path / "junk.json"
    junk.write_text('{"schema": "something/else"}')
    cli_refused(capsys, main(["compare", str(lenet300), str(junk)]), "new report", "junk.json", "'something/else'")
    cli_refused(capsys, main(["compare", str(tmp_path / "gone.json"), str(lenet300)]), "base report", "does not exist")
    cli_refused(capsys, main(["compare", "-", "-"]), "only one of the two reports can come from stdin")
