"""auditor.report: the ``auditor.report/v1`` JSON contract that CI users parse, and the text table.

The contract test audits a real model on real MNIST; the table tests render a report built by
hand, so every printed figure is known.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
from models import dense_model, mnist_layers, save
from refusals import refused

from auditor import AuditConfig, Report, audit
from auditor.datasets.splits import open_splits
from auditor.report import (
    CnaMargin,
    LayerInfo,
    LayerStats,
    ModelInfo,
    ReportError,
    SplitReport,
    format_table,
    render_table,
)

CPU = AuditConfig(device="cpu")
V1_KEYS = ["schema", "model", "providers", "splits", "cna_margin", "config", "warnings"]
SPLIT_KEYS = {"samples", "accuracy", "layers", "network_efficiency", "aiq", "beta", "cna"}
LAYER_KEYS = {
    "name",
    "neurons",
    "positions",
    "states_total",
    "states_distinct",
    "entropy_bits",
    "efficiency",
    "max_entropy_bits",
    "suggested_neurons",
    "wider_than_data",
}
MARGIN_KEYS = {"area", "margin_max", "margin_p5", "cna_margin_max", "cna_margin_p5", "window", "points"}
MODEL_KEYS = {"sha256", "name", "producer", "opset", "input_name", "input_shape", "input_dtype", "layers"}
MODEL_LAYER_KEYS = {"name", "op", "activation", "role", "neurons", "positions"}


@pytest.fixture(scope="module")
def audited(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Report]:
    """A real audit of a softmax MLP file on 40 train and 40 test MNIST digits, and the file."""
    path = save(dense_model(mnist_layers(), softmax=True), tmp_path_factory.mktemp("report") / "mlp.onnx")
    return path, audit(str(path), open_splits("mnist", "both", limit=40), replace(CPU, batch_size=16))


# --- The JSON contract ----------------------------------------------------------------------------


def test_report_json_contract(audited: tuple[Path, Report]) -> None:
    """The v1 keys, in order, with the values they promise; later versions only add optional keys."""
    path, report = audited
    data = json.loads(report.to_json())
    assert [key for key in data if key in V1_KEYS] == V1_KEYS
    assert data["schema"] == "auditor.report/v1"
    assert data["model"]["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data["model"]["name"] == "mlp.onnx"
    assert data["model"]["input_name"] == "x" and data["model"]["input_shape"] == ["N", 784]
    assert [layer["name"] for layer in data["model"]["layers"]] == ["h1", "h2", "logits"]
    assert [layer["role"] for layer in data["model"]["layers"]] == ["hidden", "hidden", "output"]
    assert data["providers"] == ["CPUExecutionProvider"]
    assert data["config"] == replace(CPU, batch_size=16).to_dict()
    assert AuditConfig.from_dict(data["config"]) == replace(CPU, batch_size=16)
    assert list(data["splits"]) == ["train", "test"]
    for split in data["splits"].values():
        assert set(split) >= SPLIT_KEYS
        assert split["samples"] == 40
        for layer in split["layers"]:
            assert set(layer) >= LAYER_KEYS
            assert layer["max_entropy_bits"] == pytest.approx(math.log2(layer["states_total"]))
            assert 1 <= layer["suggested_neurons"] <= layer["neurons"]
            assert 0 <= layer["efficiency"] <= 1
    assert set(data["cna_margin"]) >= MARGIN_KEYS
    assert isinstance(data["warnings"], list)


def test_report_json_is_strict_json(audited: tuple[Path, Report]) -> None:
    """No NaN or Infinity anywhere: RFC 8259 parsers (jq, JavaScript) must read every report."""
    _, report = audited
    json.dumps(report.to_dict(), allow_nan=False)


def test_report_round_trips_through_json(audited: tuple[Path, Report]) -> None:
    _, report = audited
    data = report.to_dict()
    again = Report.load(report.to_json())
    assert again == report
    assert again.to_dict() == data
    assert Report.load(report.to_json(indent=None)).to_dict() == data
    assert Report.from_dict(json.loads(json.dumps(data))) == report


def test_provider_options_appear_only_when_cuda_ran_and_round_trip(audited: tuple[Path, Report]) -> None:
    _, report = audited
    assert report.provider_options is None and "provider_options" not in report.to_dict()  # a CPU audit
    options = {"CUDAExecutionProvider": {"use_tf32": "0", "cudnn_conv_algo_search": "DEFAULT", "device_id": "0"}}
    on_cuda = replace(report, provider_options=options)
    assert on_cuda.to_dict()["provider_options"] == options
    assert Report.load(on_cuda.to_json()) == on_cuda


@pytest.mark.parametrize("schema", ["other/v9", "auditor.report/v2", None])
def test_other_schemas_are_refused(audited: tuple[Path, Report], schema: str | None) -> None:
    data = audited[1].to_dict()
    if schema is None:
        del data["schema"]
    else:
        data["schema"] = schema
    with pytest.raises(ValueError, match=r"not an auditor\.report/v1 report"):
        Report.from_dict(data)


def test_a_report_of_the_first_v1_release_still_loads(audited: tuple[Path, Report]) -> None:
    """Keys added to v1 after its first release are optional: a report holding only the first
    release's keys reads as before, with every later key absent (None)."""
    first = first_release(audited[1].to_dict())
    old = Report.from_dict(first)
    assert first_release(old.to_dict()) == first
    assert all(layer.block_output is None for layer in old.model.layers)
    assert all(layer.top_probabilities is None for split in old.splits.values() for layer in split.layers)


def test_keys_a_later_v1_writer_adds_are_read_past_at_every_level(audited: tuple[Path, Report]) -> None:
    """v1 changes only by adding keys: a key this reader does not know, in the model, a layer, a
    split, a layer's figures or the CNA-Margin, is left out and the rest reads as before."""
    data = audited[1].to_dict()
    data["new"] = 1
    data["model"]["new"] = 1
    data["model"]["layers"][0]["new"] = 1
    for split in data["splits"].values():
        split["new"] = {"nested": [1]}
        split["layers"][0]["new"] = "x"
    if data["cna_margin"]:
        data["cna_margin"]["new"] = 1
    assert Report.load(json.dumps(data)) == audited[1]


def _mangled(report: Report, change: Callable[[dict], None]) -> str:
    data = report.to_dict()
    change(data)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        (lambda d: d["splits"]["test"].update(samples=-5), "report.splits.test.samples is -5, not a count"),
        (lambda d: d["splits"]["test"]["layers"][0].update(states_distinct=-1), "states_distinct is -1"),
        (lambda d: d["model"].update(opset=-3), "report.model.opset is -3"),
        (lambda d: d["splits"]["test"]["layers"][0].pop("neurons"), "splits.test.layers[] lacks 'neurons'"),
        (lambda d: d.update(model=[1]), "report.model is list, not an object"),
        (lambda d: d.update(splits="x"), "report.splits is str, not an object"),
        (lambda d: d["splits"].update(test=5), "report.splits.test is int, not an object"),
        (lambda d: d["splits"]["test"]["layers"].append(None), "layers[] is NoneType, not an object"),
        (lambda d: d["splits"]["test"].update(accuracy=float("nan")), "accuracy is nan, not a finite number"),
        (lambda d: d.update(schema="auditor.shrink/v1"), "what auditor shrink --json writes"),
    ],
)
def test_a_report_that_breaks_v1_is_refused_in_one_line_naming_the_field(
    audited: tuple[Path, Report], change: Callable[[dict], None], fragment: str
) -> None:
    refused(ReportError, lambda: Report.load(_mangled(audited[1], change)), fragment)


def first_release(data: dict) -> dict:
    """The report JSON cut down to the keys the first v1 release wrote."""
    cut = _keep(data, V1_KEYS)
    cut["model"] = _keep(cut["model"], MODEL_KEYS)
    cut["model"]["layers"] = [_keep(layer, MODEL_LAYER_KEYS) for layer in cut["model"]["layers"]]
    cut["splits"] = {name: _keep(split, SPLIT_KEYS) for name, split in cut["splits"].items()}
    for split in cut["splits"].values():
        split["layers"] = [_keep(layer, LAYER_KEYS) for layer in split["layers"]]
    cut["cna_margin"] = cut["cna_margin"] and _keep(cut["cna_margin"], MARGIN_KEYS)
    return cut


def _keep(data: dict, keys: object) -> dict:
    """A copy of ``data`` with only the keys in ``keys``."""
    return {key: value for key, value in data.items() if key in keys}


# --- The text table -------------------------------------------------------------------------------

LONG_NAME = "/model/features/" + "block/" * 8 + "conv/Conv_output_0"


def hand_report(margin: CnaMargin | None = None, warnings: tuple[str, ...] = ()) -> Report:
    """A report whose every figure is chosen: one exact layer and one wider than its data."""
    exact = LayerStats("h1", 2, 1, 4, 4, 2.0, 1.0, 2.0, 2, False)
    wide = LayerStats(LONG_NAME, 6, 4, 16, 4, 2.0, 1 / 3, 4.0, 3, True)
    split = SplitReport(4, 0.75, [exact, wide], 0.57735, 0.6, 2.0, None)
    layers = [LayerInfo("h1", "Gemm", "Relu", "hidden", 2, 1), LayerInfo(LONG_NAME, "Conv", "Relu", "hidden", 6, 4)]
    model = ModelInfo("ab" * 32, "hand.onnx", "", 17, "x", ["N", 2], "float32", layers)
    return Report(model, ["CPUExecutionProvider"], {"test": split}, margin, CPU.to_dict(), list(warnings))


def test_the_table_shows_the_model_each_layer_and_the_split_figures() -> None:
    lines = render_table(hand_report()).splitlines()
    assert lines[:4] == [
        "model     hand.onnx  (sha256 abababababab…, unknown producer, opset 17)",
        "providers CPUExecutionProvider",
        "",
        "test: 4 samples",
    ]
    header = ("layer", "neurons", "positions", "states", "distinct", "entropy", "max H", "effic.", "suggest")
    assert lines[4].split() == " ".join(header).split()
    assert lines[5].split() == ["h1", "2", "1", "4", "4", "2.000", "2.00", "1.0000", "2"]
    shortened = lines[6].split()[0]
    assert len(shortened) == 40 and shortened.startswith("…") and LONG_NAME.endswith(shortened[1:])
    assert lines[6].split()[1:] == ["6", "4", "16", "4", "2.000", "4.00", "0.3333", "3*"]
    assert lines[7] == "  accuracy 0.7500   network efficiency 0.5774   aIQ (beta=2, 0-1 scale) 0.6000   CNA null"
    assert lines[8].startswith("  * wider than log2(states)")
    assert len(lines) == 9  # no CNA-Margin and no warnings to show


def test_the_table_numbers_are_right_aligned_under_their_header() -> None:
    header, *rows = render_table(hand_report()).splitlines()[4:7]
    for column in ("neurons", "positions", "states", "distinct", "entropy", "effic.", "suggest"):
        end = header.index(column) + len(column)
        for row in rows:  # the cell's last character sits under the label's last one
            assert row[end - 1] != " " and row[end : end + 1] in ("", " "), (column, row)


def test_the_table_ends_with_cna_margin_and_warnings_when_there_are_any() -> None:
    margin = CnaMargin(0.25, 0.5, None, 0.125, None, 25, 100)
    lines = render_table(hand_report(margin, ("test: CNA is null: α has zero variance",))).splitlines()
    assert lines[-5:] == [
        "",
        "CNA-Margin  area 0.2500   margin_max 0.5000 -> 0.1250   margin_p5 null -> null",
        "",
        "warnings:",
        "  - test: CNA is null: α has zero variance",
    ]


def test_format_table_aligns_numbers_right_and_text_left() -> None:
    assert format_table(("name", "n"), [("a", "1"), ("bbb", "10")]) == ["name   n", "a      1", "bbb   10"]
    # "-", "?" and "null" stand in for numbers; a trailing "*" marks one
    assert format_table(("x", "y"), [("-", "3*"), ("12", "null")], indent="  ") == [
        "   x     y",
        "   -    3*",
        "  12  null",
    ]
