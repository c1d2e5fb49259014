"""The gate: thresholds on a report, absolute or against a baseline report, as checks CI can read.

A ``Check`` is one threshold and the figures it compares. ``gate_checks`` makes the absolute
ones (``--min-aiq 0.8``), ``baseline_checks`` the relative ones (``--max-aiq-drop 0.02``
against a stored report of the model it replaces). Both render as JUnit XML (one testcase per
threshold, so CI systems show the gate natively) and as a Markdown summary for a pull request's
run page. A metric that is null in the audited report fails its check.
"""

from __future__ import annotations

import json
import math
import xml.etree.ElementTree as ET
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from auditor.config import AuditConfig
from auditor.report import Report, render_table
from auditor.reporting.compare import SETTINGS_WITHOUT_EFFECT
from auditor.sinks import for_terminal, for_xml

# Absolute thresholds: option key -> (metric, comparison).
GATE_METRICS = {
    "min_aiq": ("aiq", ">="),
    "min_efficiency": ("network_efficiency", ">="),
    "min_accuracy": ("accuracy", ">="),
    "min_cna": ("cna", ">="),
    "max_cna_margin": ("cna_margin_max", "<="),
}

# Thresholds against a baseline: option key -> (metric, the direction of change that is bounded).
BASELINE_METRICS = {
    "max_aiq_drop": ("aiq", "drop"),
    "max_accuracy_drop": ("accuracy", "drop"),
    "max_efficiency_drop": ("network_efficiency", "drop"),
    "max_cna_margin_rise": ("cna_margin_max", "rise"),
}

# Figures that lie in [0, 1]: a threshold outside it (95 meaning 95 %) could only pass always or fail always.
UNIT_METRICS = frozenset({"aiq", "network_efficiency", "accuracy"})

MARGIN_SPLIT = "train+test"  # CNA-Margin belongs to the pair of splits, not to one
# A change is a difference of two floats: 0.80 − 0.78 is 0.020000000000000018, which must still
# meet an allowed drop of 0.02. Far below any figure's printed precision.
ROUNDING = 1e-12


# The settings a baseline must record, and match, for its figures to be comparable with an audit's.
COMPARED_SETTINGS = tuple(key for key in AuditConfig().to_dict() if key not in SETTINGS_WITHOUT_EFFECT)
_RECORDED_MAX = 40  # characters of one recorded value or name quoted in a refusal
_NAMES_SHOWN = 5


@dataclass(frozen=True)
class Check:
    """One threshold and whether the audited report meets it.

    ``op`` is ``>=`` or ``<=`` for an absolute bound on ``value``; ``drop`` or ``rise`` for a
    bound on how far ``value`` may move from ``base``, the baseline report's figure.
    """

    metric: str
    split: str
    value: float | None
    threshold: float
    op: str
    base: float | None = None

    @property
    def relative(self) -> bool:
        return self.op in ("drop", "rise")

    @property
    def change(self) -> float | None:
        """How far the metric moved in the bounded direction (a drop as a positive number)."""
        if self.value is None or self.base is None:
            return None
        return self.base - self.value if self.op == "drop" else self.value - self.base

    @property
    def passed(self) -> bool:
        if self.relative:
            change = self.change
            return change is not None and change <= self.threshold + ROUNDING
        if self.value is None:
            return False
        return self.value >= self.threshold if self.op == ">=" else self.value <= self.threshold

    @property
    def name(self) -> str:
        """The JUnit testcase name: the threshold itself."""
        if self.relative:
            return f"{self.metric} {self.op} <= {self.threshold:g} vs baseline"
        return f"{self.metric} {self.op} {self.threshold:g}"

    def describe(self) -> str:
        """One line: verdict, metric, the values compared and the bound."""
        verdict = "ok  " if self.passed else "FAIL"
        if self.relative:
            change = self.change
            moved = "n/a" if change is None else f"{change:.4f}"
            return (
                f"{verdict} {self.metric} on {self.split}: baseline {_shown(self.base)}, now {_shown(self.value)} "
                f"({self.op} {moved}; allowed {self.op} <= {self.threshold:g})"
            )
        return f"{verdict} {self.metric} on {self.split}: {_shown(self.value)} (needs {self.op} {self.threshold:g})"


def gate_checks(report: Report, thresholds: Mapping[str, float | None], split: str) -> list[Check]:
    """One check per absolute threshold given (``GATE_METRICS`` keys); None means not given."""
    return _checks(report, None, thresholds, GATE_METRICS, split)


def baseline_checks(
    report: Report, baseline: Report, thresholds: Mapping[str, float | None], split: str
) -> list[Check]:
    """One check per relative threshold given (``BASELINE_METRICS`` keys) against ``baseline``."""
    return _checks(report, baseline, thresholds, BASELINE_METRICS, split)


def _checks(
    report: Report,
    baseline: Report | None,
    thresholds: Mapping[str, float | None],
    metrics: Mapping[str, tuple[str, str]],
    split: str,
) -> list[Check]:
    """A check per threshold given, of the metric and comparison ``metrics`` names for its key."""
    _require_split(report, split)
    checks = []
    for key, threshold in thresholds.items():
        if threshold is None:
            continue
        metric, op = metrics[key]
        where = MARGIN_SPLIT if metric == "cna_margin_max" else split
        base = None if baseline is None else baseline.metric(metric, split)
        checks.append(Check(metric, where, report.metric(metric, split), threshold, op, base))
    return checks


def threshold_problem(key: str, value: float) -> str | None:
    """Why the threshold ``key`` (a ``GATE_METRICS`` or ``BASELINE_METRICS`` key) cannot be ``value``,
    or None: never NaN or infinite, a figure in [0, 1] is held to a threshold in [0, 1], and a
    largest allowed change is never negative."""
    option = "--" + key.replace("_", "-")
    if not math.isfinite(value):
        return f"{option} must be a finite number, got {value}"
    if key in GATE_METRICS and GATE_METRICS[key][0] in UNIT_METRICS and not 0 <= value <= 1:
        return f"{option} is a figure in [0, 1] (not a percentage), got {value:g}"
    if key in BASELINE_METRICS and value < 0:
        return f"{option} is the largest change allowed and must be >= 0, got {value:g}"
    return None


def _require_split(report: Report, split: str) -> None:
    if split not in report.splits:
        raise ValueError(f"the report has no {split!r} split (it has {sorted(report.splits)})")


def _shown(value: float | None) -> str:
    return "null (see warnings)" if value is None else f"{value:.4f}"


def baseline_settings_problem(
    recorded: Mapping[str, Any], audit: Mapping[str, Any], allowed: Collection[str] = ()
) -> str | None:
    """Why a baseline whose report ``config`` is ``recorded`` cannot be gated against an audit
    with settings ``audit`` (``AuditConfig.to_dict()``), or None when it can.

    Figures are comparable only between audits made the same way, so every setting that changes
    the numbers (``COMPARED_SETTINGS``: β, the state point, CNA's aggregate, the margins,
    preprocessing, …) must be recorded in the baseline and equal this audit's, in type as in value
    (``"2"`` is not 2, ``true`` is not 1, NaN equals nothing). A missing or partial ``config``
    is refused: an edited report or one written before a setting existed cannot show it was
    audited the same way. ``allowed`` names the settings the user lets differ or be missing.
    """
    compared = [key for key in COMPARED_SETTINGS if key not in allowed]
    missing = [key for key in compared if key not in recorded]
    unknown = [key for key in recorded if key not in audit]
    differing = [key for key in compared if key in recorded and not _same_setting(recorded[key], audit[key])]
    problems = []
    if missing:
        problems.append(f"does not record {_names(missing)}, so it cannot show it was audited the same way")
    if differing:
        pairs = "; ".join(
            f"{key} {_recorded(recorded[key])} (baseline) vs {_recorded(audit[key])} (this audit)" for key in differing
        )
        problems.append(f"was audited with settings that change the numbers: {pairs}")
    if unknown:
        problems.append(f"records settings this auditor does not know: {_names(unknown)}")
    if not problems:
        return None
    return (
        "; and it ".join(problems)
        + "; audit both the same way, or let named settings differ with --allow-difference SETTING"
    )


def _same_setting(a: Any, b: Any) -> bool:
    """Equal in value and kind: numbers compare as numbers (an int 2 is a float 2.0), but a bool
    is only a bool and a string only a string; lists element by element."""
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(_same_setting(x, y) for x, y in zip(a, b, strict=True))
    numbers = (int, float)
    if isinstance(a, numbers) and isinstance(b, numbers) and not isinstance(a, bool) and not isinstance(b, bool):
        return a == b
    return type(a) is type(b) and a == b


def _recorded(value: Any) -> str:
    if isinstance(value, list | tuple):
        text = " ".join(_recorded(v) for v in value)
    else:  # a string shows its quotes, so that "2" and 2 read apart
        text = _number(value) if isinstance(value, float) else json.dumps(value, default=str)
    return text if len(text) <= _RECORDED_MAX else text[: _RECORDED_MAX - 1] + "…"


def _number(value: float) -> str:
    """Short (``2``, ``0.1``) unless that would hide a difference: then every digit."""
    short = f"{value:g}"
    return short if float(short) == value else repr(value)


def _names(names: Sequence[str]) -> str:
    shown = ", ".join(
        name if len(name) <= _RECORDED_MAX else name[: _RECORDED_MAX - 1] + "…" for name in names[:_NAMES_SHOWN]
    )
    return shown + (f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")


def junit_xml(checks: Sequence[Check], report: Report) -> str:
    """JUnit XML with one testcase per threshold; a failure's message is the check's one line.
    Every string in it, the model's name and the layer names in particular, holds only
    XML-legal characters (``auditor.sinks.for_xml``), so any parser reads the file."""
    failures = [c for c in checks if not c.passed]
    suites = ET.Element("testsuites", tests=str(len(checks)), failures=str(len(failures)))
    suite = ET.SubElement(
        suites,
        "testsuite",
        name=for_xml(f"auditor.reporting.gate {report.model.name}"),
        tests=str(len(checks)),
        failures=str(len(failures)),
    )
    for check in checks:
        case = ET.SubElement(suite, "testcase", classname="auditor.reporting.gate", name=for_xml(check.name))
        if not check.passed:
            line = for_xml(check.describe())
            ET.SubElement(case, "failure", message=line).text = line
    ET.SubElement(suite, "system-out").text = for_xml(render_table(report), multiline=True)
    return ET.tostring(suites, encoding="unicode", xml_declaration=True)


def summary_markdown(checks: Sequence[Check], report: Report, baseline: Report | None, split: str) -> str:
    """A Markdown summary for a CI run page: the verdict, every threshold, and the headline figures
    of the gated ``split`` (which both reports have: the checks were made on it)."""
    failed = [c for c in checks if not c.passed]
    verdict = "FAILED" if failed else "passed"
    against = f", against baseline {_model(baseline)}" if baseline else ""
    lines = [
        f"### auditor gate {verdict}: {len(checks) - len(failed)}/{len(checks)} thresholds met",
        "",
        f"Model {_model(report)}{against}; gated split: {_md(split)}.",
        "",
        "| metric | split | baseline | value | change | threshold | result |",
        "|---|---|---:|---:|---:|---|---|",
    ]
    for check in checks:
        if check.relative:
            change = "–" if check.change is None else f"{check.op} {check.change:.4f}"
            bound, base = f"{check.op} ≤ {check.threshold:g}", _cell(check.base)
        else:
            change, bound, base = "–", f"{check.op} {check.threshold:g}", "–"
        result = "✅ pass" if check.passed else "❌ FAIL"
        lines.append(
            f"| {check.metric} | {_md(check.split)} | {base} | {_cell(check.value)} | {change} | {bound} | {result} |"
        )
    lines += ["", "| headline | value | baseline | change |", "|---|---:|---:|---:|"]
    for metric in ("accuracy", "network_efficiency", "aiq", "cna", "cna_margin_max"):
        value = report.metric(metric, split)
        base = baseline.metric(metric, split) if baseline else None
        change = "–" if value is None or base is None else f"{value - base:+.4f}"
        label = metric if metric == "cna_margin_max" else f"{metric} ({_md(split)})"
        lines.append(f"| {label} | {_cell(value)} | {_cell(base) if baseline else '–'} | {change} |")
    return "\n".join(lines) + "\n"


def _model(report: Report) -> str:
    return f"`{_md(report.model.name)}` (sha256 `{report.model.sha256[:12]}`)"


def _cell(value: float | None) -> str:
    return "null" if value is None else f"{value:.4f}"


def _md(text: str) -> str:
    """Text safe inside a Markdown table cell or inline code, and printable on a CI log."""
    return for_terminal(text).replace("|", "\\|").replace("`", "'")
