"""auditor.reporting.gate and ``auditor gate --baseline``: relative thresholds, JUnit, the Markdown summary.

Baselines are real reports written by ``auditor audit`` on real MNIST: the bundled LeNet-5
(higher aIQ) as the model a candidate LeNet-300-100 replaces, and the candidate's own report.
Thresholds are set from the reports' JSON, just above or below the measured change.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from refusals import cli_refused, usage_refused

from auditor.cli import main
from auditor.reporting.gate import COMPARED_SETTINGS, Check, threshold_problem

REPO = Path(__file__).resolve().parents[1]
CANDIDATE = REPO / "examples" / "lenet300_11_4.onnx"
BASELINE = REPO / "examples" / "lenet5_3_9_4.onnx"
LIMIT = "300"


def audited(model: Path, out: Path, *args: str) -> Path:
    argv = ["audit", str(model), "--data", "mnist", "--limit", LIMIT, "--device", "cpu", *args, "--json", str(out)]
    assert main(argv) == 0
    return out


def gate(*args: str) -> list[str]:
    return ["gate", str(CANDIDATE), "--data", "mnist", "--split", "both", "--limit", LIMIT, "--device", "cpu", *args]


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gate")


@pytest.fixture(scope="module")
def baseline(folder: Path) -> Path:
    return audited(BASELINE, folder / "baseline.json", "--split", "both")


@pytest.fixture(scope="module")
def candidate(folder: Path) -> Path:
    return audited(CANDIDATE, folder / "candidate.json", "--split", "both")


def figures(path: Path) -> dict:
    report = json.loads(path.read_text())
    test = report["splits"]["test"]
    return {
        "aiq": test["aiq"],
        "accuracy": test["accuracy"],
        "network_efficiency": test["network_efficiency"],
        "cna_margin_max": report["cna_margin"]["cna_margin_max"],
    }


@pytest.fixture(autouse=True)
def no_step_summary(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests run under GitHub Actions too: only the test that sets it writes a step summary."""
    monkeypatch.delenv("GITHUB_STEP_SUMMARY", raising=False)


# --- Check ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("op", "base", "value", "threshold", "passed"),
    [
        ("drop", 0.80, 0.78, 0.02, True),  # dropped 0.02 (to float rounding), allowed 0.02
        ("drop", 0.80, 0.77, 0.02, False),
        ("drop", 0.80, 0.90, 0.0, True),  # a rise never fails a drop threshold
        ("rise", 0.05, 0.10, 0.05, True),
        ("rise", 0.05, 0.11, 0.05, False),
        ("rise", 0.05, 0.01, 0.0, True),
        ("drop", 0.80, None, 1.0, False),  # null now fails
    ],
)
def test_relative_check(op: str, base: float, value: float | None, threshold: float, passed: bool) -> None:
    check = Check("aiq", "test", value, threshold, op, base)
    assert check.passed is passed
    assert check.name == f"aiq {op} <= {threshold:g} vs baseline"
    line = check.describe()
    assert line.startswith("ok  " if passed else "FAIL")
    assert f"baseline {base:.4f}" in line and f"allowed {op} <= {threshold:g}" in line


# --- gate --baseline ------------------------------------------------------------------------------


def test_gate_fails_when_aiq_drops_more_than_allowed(baseline: Path, candidate: Path, capsys) -> None:
    base, new = figures(baseline), figures(candidate)
    drop = base["aiq"] - new["aiq"]
    assert drop > 0.02  # LeNet-5 (3,9,4) beats LeNet-300-100 (11,4) on aIQ
    allowed = f"{drop - 0.01:.6f}"
    assert main(gate("--baseline", str(baseline), "--max-aiq-drop", allowed)) == 1
    out = capsys.readouterr().out
    assert (
        f"FAIL aiq on test: baseline {base['aiq']:.4f}, now {new['aiq']:.4f} (drop {drop:.4f}; "
        f"allowed drop <= {float(allowed):g})" in out
    )
    assert "gate FAILED: 0/1 thresholds met" in out
    assert main(gate("--baseline", str(baseline), "--max-aiq-drop", f"{drop + 0.01:.6f}")) == 0
    assert "gate passed: 1/1 thresholds met" in capsys.readouterr().out


def test_gate_against_its_own_report_allows_no_change(candidate: Path, capsys) -> None:
    thresholds = ["--max-aiq-drop", "0", "--max-accuracy-drop", "0", "--max-efficiency-drop", "0"]
    assert main(gate("--baseline", str(candidate), *thresholds, "--max-cna-margin-rise", "0")) == 0
    assert "gate passed: 4/4 thresholds met" in capsys.readouterr().out


def test_each_threshold_is_a_junit_testcase(baseline: Path, candidate: Path, tmp_path: Path, capsys) -> None:
    base, new = figures(baseline), figures(candidate)
    junit = tmp_path / "gate.xml"
    allowed_rise = f"{abs(new['cna_margin_max'] - base['cna_margin_max']) + 0.01:.6f}"
    argv = gate(
        "--baseline",
        str(baseline),
        "--min-accuracy",
        "0.5",
        "--max-aiq-drop",
        "0.001",
        "--max-accuracy-drop",
        "1",
        "--max-efficiency-drop",
        "0.001",
        "--max-cna-margin-rise",
        allowed_rise,
        "--junit",
        str(junit),
    )
    assert main(argv) == 1
    capsys.readouterr()
    (suite,) = ET.parse(junit).getroot().findall("testsuite")
    cases = suite.findall("testcase")
    assert [c.get("name") for c in cases] == [
        "accuracy >= 0.5",
        "aiq drop <= 0.001 vs baseline",
        "accuracy drop <= 1 vs baseline",
        "network_efficiency drop <= 0.001 vs baseline",
        f"cna_margin_max rise <= {float(allowed_rise):g} vs baseline",
    ]
    failures = {c.get("name"): c.find("failure").get("message") for c in cases if c.find("failure") is not None}
    assert (suite.get("tests"), suite.get("failures")) == ("5", "2")
    message = failures["network_efficiency drop <= 0.001 vs baseline"]
    drop = base["network_efficiency"] - new["network_efficiency"]
    assert message == (
        f"FAIL network_efficiency on test: baseline {base['network_efficiency']:.4f}, now "
        f"{new['network_efficiency']:.4f} (drop {drop:.4f}; allowed drop <= 0.001)"
    )
    assert "aiq drop <= 0.001 vs baseline" in failures


def test_summary_file_and_github_step_summary(baseline: Path, candidate: Path, tmp_path: Path, monkeypatch) -> None:
    step = tmp_path / "step_summary.md"
    step.write_text("earlier step\n")
    monkeypatch.setenv("GITHUB_STEP_SUMMARY", str(step))
    summary = tmp_path / "summary.md"
    base, new = figures(baseline), figures(candidate)
    argv = gate("--baseline", str(baseline), "--max-aiq-drop", "0.001", "--min-aiq", "0", "--summary", str(summary))
    assert main(argv) == 1
    text = summary.read_text()
    assert step.read_text() == "earlier step\n" + text + "\n"  # appended, never overwritten
    lines = text.splitlines()
    assert lines[0] == "### auditor gate FAILED: 1/2 thresholds met"
    table = lines[lines.index("| metric | split | baseline | value | change | threshold | result |") :]
    assert table[1].startswith("|---")
    assert table[2] == f"| aiq | test | – | {new['aiq']:.4f} | – | >= 0 | ✅ pass |"
    drop = base["aiq"] - new["aiq"]
    assert (
        table[3] == f"| aiq | test | {base['aiq']:.4f} | {new['aiq']:.4f} | drop {drop:.4f} | drop ≤ 0.001 | ❌ FAIL |"
    )
    assert f"| aiq (test) | {new['aiq']:.4f} | {base['aiq']:.4f} | {new['aiq'] - base['aiq']:+.4f} |" in lines


def test_batch_size_may_differ_from_the_baseline(candidate: Path, capsys) -> None:
    # batching changes no state count, so aIQ is the baseline's to the last bit and a zero drop passes
    assert main(gate("--baseline", str(candidate), "--max-aiq-drop", "0", "--batch-size", "37")) == 0
    out = capsys.readouterr().out.splitlines()
    (check,) = [line for line in out if line.startswith("ok   aiq on test")]
    assert "(drop 0.0000; allowed drop <= 0)" in check
    assert out[-1] == "gate passed: 1/1 thresholds met"


# --- Bad input: exit 2, one line -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "fragments"),
    [
        (["--max-aiq-drop=-0.01"], ["argument --max-aiq-drop", "must be in [0, inf]", "-0.01"]),
        (["--max-cna-margin-rise=-1"], ["argument --max-cna-margin-rise", "must be in [0, inf]"]),
        (["--max-accuracy-drop", "nan"], ["argument --max-accuracy-drop: must be a finite number, got 'nan'"]),
        (["--max-efficiency-drop", "inf"], ["argument --max-efficiency-drop: must be a finite number, got 'inf'"]),
        (["--min-aiq", "nan"], ["argument --min-aiq: must be a finite number, got 'nan'"]),
        (["--min-aiq=-1"], ["argument --min-aiq: must be in [0, 1], got -1"]),
        (["--min-accuracy", "95"], ["argument --min-accuracy: must be in [0, 1], got 95"]),
        (["--min-efficiency", "١"], ["argument --min-efficiency: must be a number"]),
        (["--min-cna", "1e400"], ["argument --min-cna: must be a finite number"]),
    ],
)
def test_bad_thresholds(candidate: Path, capsys, args: list[str], fragments: list[str]) -> None:
    """A threshold that could never be met, or always is, is bad input (exit 2), never a failed gate (1)."""
    usage_refused(capsys, lambda: main(gate("--baseline", str(candidate), *args)), *fragments)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("max_aiq_drop", -0.01, "must be >= 0"),
        ("min_accuracy", 95.0, "a figure in [0, 1] (not a percentage), got 95"),
        ("min_cna", -3.0, None),
        ("min_aiq", math.nan, "must be a finite number"),
    ],
)
def test_threshold_problem_names_what_a_library_caller_got_wrong(key: str, value: float, fragment: str | None) -> None:
    problem = threshold_problem(key, value)
    assert problem == fragment if fragment is None else fragment in problem


def test_relative_threshold_needs_a_baseline(capsys: pytest.CaptureFixture[str]) -> None:
    cli_refused(capsys, main(gate("--max-aiq-drop", "0.1")), "--max-aiq-drop needs --baseline")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        (None, ["baseline", "does not exist"]),
        ("{not json", ["baseline", "is not an auditor.report/v1 report"]),
        ('{"schema": "auditor.report/v0"}', ["is not an auditor.report/v1 report", "'auditor.report/v0'"]),
        ('{"schema": "auditor.report/v1", "model": {}}', ["is not an auditor.report/v1 report"]),
    ],
)
def test_baseline_that_is_not_a_report(tmp_path: Path, capsys, content: str | None, fragments: list[str]) -> None:
    path = tmp_path / "base.json"
    if content is not None:
        path.write_text(content)
    cli_refused(capsys, main(gate("--baseline", str(path), "--max-aiq-drop", "0.1")), "base.json", *fragments)


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--beta", "1"], "beta 2 (baseline) vs 1 (this audit)"),
        (["--cna-exclude-output-layer"], "cna_include_output_layer true (baseline) vs false (this audit)"),
        (["--aggregate", "mean"], 'aggregate "sum" (baseline) vs "mean" (this audit)'),
        (["--states-at", "block-output"], 'states_at "pre-activation" (baseline) vs "block-output" (this audit)'),
        (["--margin-seed", "7"], "margin_seed 0 (baseline) vs 7 (this audit)"),
        (["--alpha-range", "0", "255"], "alpha_range 0 1 (baseline) vs 0 255 (this audit)"),
        (["--scale", "1"], "scale null (baseline) vs 1 (this audit)"),
        (["--mean", "0.1307", "--std", "0.3081"], "mean 0 (baseline) vs 0.1307 (this audit); std 1 (baseline)"),
    ],
)
def test_baseline_with_other_settings(candidate: Path, capsys, args: list[str], fragment: str) -> None:
    code = main(gate("--baseline", str(candidate), "--max-aiq-drop", "0.1", *args))
    cli_refused(capsys, code, "audited with settings that change the numbers", fragment)


def test_baseline_of_other_data(candidate: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code = main([*gate("--baseline", str(candidate), "--max-aiq-drop", "0.1"), "--limit", "200"])
    cli_refused(capsys, code, "the baseline's test split has 300 samples and this audit's 200")


def test_baseline_without_the_gated_split_or_figure(folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    train_only = audited(CANDIDATE, folder / "train_only.json", "--split", "train")
    capsys.readouterr()
    cli_refused(capsys, main(gate("--baseline", str(train_only), "--max-aiq-drop", "0.1")), "has no test split")
    code = main(gate("--baseline", str(train_only), "--gate-split", "train", "--max-cna-margin-rise", "0.1"))
    cli_refused(capsys, code, "has no CNA-Margin", "--max-cna-margin-rise cannot be checked")


def _edited(candidate: Path, folder: Path, edit) -> Path:
    """A copy of the candidate's report with its ``config`` block changed by ``edit(config)``."""
    report = json.loads(candidate.read_text())
    edit(report["config"])
    path = folder / "edited.json"
    path.write_text(json.dumps(report))
    return path


def _drop(*keys: str):
    def edit(config: dict) -> None:
        for key in keys or list(config):
            config.pop(key, None)

    return edit


def _only(*keys: str):
    return lambda config: [config.pop(key) for key in list(config) if key not in keys]


def _set(**values: object):
    return lambda config: config.update(values)


# Baselines whose recorded settings are missing, partial, or different in value or only in kind:
# each is refused before anything is audited, in one line naming what differs.
HOSTILE_CONFIGS = [
    (_drop(), ["does not record beta, include_output_layer", "and 8 more"]),
    (_drop("beta"), ["does not record beta, so it cannot show"]),
    (_only("beta"), ["does not record include_output_layer, cna_include_output_layer, aggregate"]),
    (_only("beta", "batch_size", "device", "memory_budget"), ["does not record include_output_layer"]),
    (_drop("states_at", "scale"), ["does not record scale, states_at"]),
    (_set(beta="2"), ['beta "2" (baseline) vs 2 (this audit)']),
    (_set(beta=2.0000000000000004), ["beta 2.0000000000000004 (baseline) vs 2 (this audit)"]),
    (_set(beta=True), ["beta true (baseline) vs 2 (this audit)"]),
    (_set(beta=[2.0]), ["beta 2 (baseline) vs 2 (this audit)"]),
    (_set(beta={"value": 2}), ['beta {"value": 2} (baseline) vs 2 (this audit)']),
    (_set(beta=None), ["beta null (baseline) vs 2 (this audit)"]),
    (_set(include_output_layer=0), ["include_output_layer 0 (baseline) vs false (this audit)"]),
    (_set(aggregate="SUM"), ['aggregate "SUM" (baseline)']),
    (_set(alpha_range=[0, 1, 2]), ["alpha_range 0 1 2 (baseline) vs 0 1 (this audit)"]),
    (_set(alpha_range=list(range(10_000))), ["alpha_range 0 1 2 3", "…"]),
    (_set(mean=1e-300), ["mean 1e-300 (baseline) vs 0 (this audit)"]),
    (_set(margin_fraction=0.1 + 1e-16), ["margin_fraction 0.1000000000000001 (baseline) vs 0.1 (this audit)"]),
    (_set(states_at="block-output\x1b[2J"), ['states_at "block-output\\u001b[2J" (baseline)']),
    (_set(**{"evil\x1b]0;x\x07": 1}), ["records settings this auditor does not know: evil\\x1b]0;x\\x07"]),
    (_set(**{f"k{i}": i for i in range(50)}), ["does not know: k0, k1, k2, k3, k4 and 45 more"]),
    (_set(**{"x" * 5000: 1}), ["does not know: " + "x" * 39 + "…"]),
]


@pytest.mark.parametrize(("edit", "fragments"), HOSTILE_CONFIGS)
def test_a_baseline_with_missing_partial_or_other_settings_is_refused_naming_them(
    candidate: Path, folder: Path, capsys, edit, fragments: list[str]
) -> None:
    edited = _edited(candidate, folder, edit)
    code = main(gate("--baseline", str(edited), "--max-aiq-drop", "0.1"))
    line = cli_refused(capsys, code, f"the baseline {edited}", *fragments)
    assert "--allow-difference SETTING" in line and len(line) < 1200


def test_named_differences_may_be_allowed_and_only_those(candidate: Path, folder: Path, capsys) -> None:
    edited = _edited(candidate, folder, _set(beta=1.0, margin_seed=3))
    code = main(gate("--baseline", str(edited), "--max-aiq-drop", "1", "--allow-difference", "beta"))
    cli_refused(capsys, code, "margin_seed 3 (baseline) vs 0 (this audit)")
    allow = ["--allow-difference", "beta", "--allow-difference", "margin_seed"]
    assert main(gate("--baseline", str(edited), "--max-accuracy-drop", "0", *allow)) == 0
    assert capsys.readouterr().out.splitlines()[-1] == "gate passed: 1/1 thresholds met"


def test_a_baseline_without_any_settings_passes_only_when_every_one_is_allowed(
    candidate: Path, folder: Path, capsys
) -> None:
    edited = _edited(candidate, folder, _drop())
    allow = [arg for key in COMPARED_SETTINGS for arg in ("--allow-difference", key)]
    assert main(gate("--baseline", str(edited), "--max-accuracy-drop", "0", *allow)) == 0
    capsys.readouterr()


@pytest.mark.parametrize("name", ["batch_size", "BETA", "", "beta\x1b[2J", "nonsense"])
def test_allow_difference_names_a_setting_that_changes_the_numbers(candidate: Path, capsys, name: str) -> None:
    argv = gate("--baseline", str(candidate), "--max-aiq-drop", "0.1", "--allow-difference", name)
    line = usage_refused(capsys, lambda: main(argv), "--allow-difference")
    assert "\x1b" not in line
