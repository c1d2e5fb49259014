"""shrink: statistics, exact and budgeted plans, and the command, on hand-built graphs and real models.

Exact removals must leave every output as it was on the audited data (max abs difference
≤ 1e-5); a budgeted shrink must keep held-out accuracy within the allowed percentage points.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from auditor.cli import main
from auditor.config import AuditConfig
from auditor.datasets.splits import open_dataset
from auditor.engine.find import describe
from auditor.engine.modelfile import load_model
from auditor.engine.run import Session
from auditor.pruning.plan import exact_plan, measure, shrink
from auditor.pruning.report import render_text
from auditor.pruning.surgery import find_sites
from tests.models import Net, conv_flatten_net, mlp, save
from tests.refusals import cli_refused

REPO = Path(__file__).resolve().parents[1]
CPU = AuditConfig(device="cpu", batch_size=64)
MNIST_MODELS = {  # name → preprocessing its README gives
    "mnist-8_cntk_opset8.onnx": AuditConfig(device="cpu", batch_size=64),
    "cnn_pytorch25_opset17.onnx": AuditConfig(device="cpu", batch_size=64, mean=0.1307, std=0.3081),
    "qdq_int8_pytorch21_opset17.onnx": AuditConfig(device="cpu", batch_size=64, mean=0.1307, std=0.3081),
}
IMAGENET_MODELS = ["squeezenet1.0_fp16_opset7.onnx", "light_resnet50_opset9.onnx"]


def npz(path: Path, shape: tuple[int, ...], classes: int, seed: int = 0, count: int = 64) -> Path:
    """Random samples of ``shape`` with random labels, as x_train/y_train/x_test/y_test."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split in ("train", "test"):
        arrays[f"x_{split}"] = rng.standard_normal((count, *shape)).astype(np.float32)
        arrays[f"y_{split}"] = rng.integers(0, classes, count)
    np.savez(path, **arrays)
    return path


def splits(path: Path, limit: int | None = None) -> tuple[list, list]:
    return [open_dataset(str(path), "train", limit=limit)], [open_dataset(str(path), "test", limit=limit)]


def test_dead_channels_are_found_on_the_data_and_removed_without_changing_an_output(tmp_path: Path) -> None:
    model = conv_flatten_net(dead=(1, 3))
    data, _ = splits(npz(tmp_path / "d.npz", (1, 8, 8), 3))
    report = shrink(model, data, data, CPU, latency_repeats=1)  # accuracy on the audited data: unchanged
    rows = {row.name: row for row in report.layers}
    assert (rows["c1"].neurons_before, rows["c1"].neurons_after, rows["c1"].dead) == (4, 2, 2)
    assert rows["c1"].removed == [1, 3]
    assert report.max_abs_difference <= 1e-5
    assert report.after.params < report.before.params and report.after.multiply_adds < report.before.multiply_adds
    assert report.after.accuracy == report.before.accuracy
    onnx.checker.check_model(report.model, full_check=True)
    text = render_text(report)
    assert f"{2 + rows['f1'].dead} neurons removed" in text.splitlines()[0]


@pytest.mark.parametrize(("activation", "dead"), [("Clip", {1: "dead", 3: "dead"}), ("Elu", {3: "duplicate"})])
def test_relu6_channels_that_never_fire_are_dead_and_elu_ones_only_duplicates(
    tmp_path: Path, activation: str, dead: dict
) -> None:
    """Both silent channels have the same weights (0) and bias (−1): through ReLU6 they output 0
    and are dead; through ELU they output a constant ≠ 0, and the second merges into the first."""
    model = conv_flatten_net(dead=(1, 3), activation=activation)
    data, _ = splits(npz(tmp_path / "d.npz", (1, 8, 8), 3))
    sites = find_sites(model)
    assert exact_plan(model, sites, measure(model, sites, data, CPU)).why.get("c1") == dead


def test_duplicates_are_merged_by_the_exact_plan(tmp_path: Path) -> None:
    net = Net(("N", 4), opset=17, seed=7)
    w, b = net.random(4, 6), net.random(6)
    w[:, 4], b[4] = 2.5 * w[:, 1], 2.5 * b[1]
    w[:, 5], b[5] = w[:, 2], b[2]
    hidden = net.dense(net.input, 4, 6, weight=w, bias=b, out="h1")
    model = net.build(net.dense(net.op("Relu", hidden), 6, 3, out="logits"), name="dup")
    data, holdout = splits(npz(tmp_path / "d.npz", (4,), 3))
    sites = find_sites(model)
    plan = exact_plan(model, sites, measure(model, sites, data, CPU))
    assert plan.why["h1"] == {4: "duplicate", 5: "duplicate"}
    assert plan.merged["h1"][4] == (1, pytest.approx(2.5)) and plan.merged["h1"][5] == (2, pytest.approx(1.0))
    report = shrink(model, data, holdout, CPU, latency_repeats=1)
    assert report.layers[0].duplicate == 2 and report.max_abs_difference <= 1e-5


def test_elu_duplicates_merge_only_when_equal(tmp_path: Path) -> None:
    net = Net(("N", 4), opset=17, seed=7)
    w, b = net.random(4, 5), net.random(5)
    w[:, 3], b[3] = 2.0 * w[:, 0], 2.0 * b[0]  # Elu(2z) ≠ 2·Elu(z): not a duplicate
    w[:, 4], b[4] = w[:, 1], b[1]
    hidden = net.dense(net.input, 4, 5, weight=w, bias=b, out="h1")
    model = net.build(net.dense(net.op("Elu", hidden), 5, 3, out="logits"), name="elu")
    data, _ = splits(npz(tmp_path / "d.npz", (4,), 3))
    sites = find_sites(model)
    assert exact_plan(model, sites, measure(model, sites, data, CPU)).why["h1"] == {4: "duplicate"}


def test_a_residual_network_is_cut_inside_its_block_and_left_whole_where_it_adds(tmp_path: Path) -> None:
    """stem Conv → Relu → [Conv → BN → Relu → Conv(pad 1)] + stem → Relu → GlobalAveragePool →
    Flatten → Gemm: the block's inner layer (two channels dead through its BN shift) is cut
    and nothing changes; the stem and the sum feed or are the residual Add, and stay whole."""
    net = Net(("N", 2, 6, 6), opset=17, seed=12)
    stem = net.op("Relu", net.conv(net.input, 2, 4, out="stem"))
    inner = net.conv(stem, 4, 5, out="inner_conv")
    shift = np.array([0.1, -50.0, 0.2, -50.0, 0.3], np.float32)
    bn = net.op(
        "BatchNormalization", inner, net.const(np.ones(5)), net.const(shift), net.const(np.zeros(5)),
        net.const(np.ones(5)), out="inner",
    )  # fmt: skip
    summed = net.op("Add", net.conv(net.op("Relu", bn), 5, 4), stem, out="sum")
    pooled = net.op("Flatten", net.op("GlobalAveragePool", net.op("Relu", summed)), axis=1)
    model = net.build(net.dense(pooled, 4, 3, out="logits"), name="resnet")
    data, _ = splits(npz(tmp_path / "d.npz", (2, 6, 6), 3))
    report = shrink(model, data, data, CPU, latency_repeats=1)
    rows = {row.name: row for row in report.layers}
    assert (rows["inner"].dead, rows["inner"].neurons_after, rows["inner"].removed) == (2, 3, [1, 3])
    assert "residual Add" in rows["stem"].left_whole and "residual block" in rows["sum"].left_whole
    assert report.max_abs_difference <= 1e-5


def test_mnist8_exact_shrink_keeps_every_output(shared_models: Path) -> None:
    data = [open_dataset("mnist", "train", limit=300)]
    holdout = [open_dataset("mnist", "test", limit=300)]
    report = shrink(shared_models / "mnist-8_cntk_opset8.onnx", data, holdout, CPU, latency_repeats=1)
    assert report.max_abs_difference <= 1e-5
    assert all(row.left_whole is None for row in report.layers)
    assert all(row.budget == 0 for row in report.layers)
    original = onnx.load(shared_models / "mnist-8_cntk_opset8.onnx")
    assert [i.name for i in report.model.graph.output] == [o.name for o in original.graph.output]
    assert report.model.opset_import == original.opset_import and report.model.ir_version == original.ir_version
    onnx.checker.check_model(report.model)


def test_budget_keeps_heldout_accuracy_within_the_allowed_drop(shared_models: Path) -> None:
    data = [open_dataset("mnist", "train", limit=500)]
    holdout = [open_dataset("mnist", "test", limit=500)]
    config = MNIST_MODELS["cnn_pytorch25_opset17.onnx"]
    report = shrink(shared_models / "cnn_pytorch25_opset17.onnx", data, holdout, config, max_accuracy_drop=1.0)
    before, after = report.before.accuracy, report.after.accuracy
    assert (before - after) * 100 <= 1.0 + 1e-9
    assert report.search[0] == (0, before)
    within = [k for k, accuracy in report.search if (before - accuracy) * 100 <= 1.0 + 1e-9]
    assert sum(row.budget for row in report.layers) == max(within) > 0
    assert all(row.neurons_after >= 1 for row in report.layers)
    assert report.after.params < report.before.params


def test_the_command_writes_model_reports_and_external_data(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    source = tmp_path / "in" / "lenet.onnx"
    source.parent.mkdir()
    proto = onnx.load(REPO / "examples" / "lenet5_3_9_4.onnx")
    onnx.save_model(proto, str(source), save_as_external_data=True, location="lenet.data", size_threshold=0)
    out = tmp_path / "small.onnx"
    args = ["shrink", str(source), "--data", "mnist", "--limit", "200", "--max-accuracy-drop", "1", "--out", str(out)]
    files = ["--json", str(tmp_path / "s.json"), "--html", str(tmp_path / "s.html")]
    (tmp_path / "small.onnx.data").write_bytes(b"stale bytes from an earlier run")
    assert main([*args, *files, "--baseline-json", str(tmp_path / "base.json")]) == 0
    assert "neurons removed" in capsys.readouterr().out
    assert (tmp_path / "small.onnx.data").is_file()
    assert not (tmp_path / "small.onnx.data").read_bytes().startswith(b"stale")
    loaded = load_model(out)
    Session(loaded.proto, describe(loaded.proto).input, "cpu")
    shrunk = json.loads((tmp_path / "s.json").read_text())
    assert shrunk["schema"] == "auditor.shrink/v1" and shrunk["max_accuracy_drop_pp"] == 1.0
    assert 'id="shrink"' in (tmp_path / "s.html").read_text()
    gate = ["gate", str(out), "--data", "mnist", "--limit", "200", "--no-progress", "--device", "auto"]
    code = main([*gate, "--baseline", str(tmp_path / "base.json"), "--max-accuracy-drop", "0.01"])
    assert code == 0, capsys.readouterr()


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        (["--max-accuracy-drop", "nan"], "must be a finite number, got 'nan'"),
        (["--max-accuracy-drop", "-1"], "must be in [0, 100], got -1"),
        (["--max-accuracy-drop", "1e9"], "got 1e+09"),
        (["--max-accuracy-drop", "inf"], "must be a finite number"),
        (["--max-accuracy-drop", "x"], "must be a number, got 'x'"),
        (["--limit", "0"], "must be in 1.."),
        (["--limit", "1e3"], "must be a whole number"),
        (["--holdout", "both"], "invalid choice"),
        (["--batch-size", "0"], "must be in 1..2147483647"),
        (["--align", "0"], "must be in 1..1024"),
        (["--align", "99999999999999999999"], "must be in 1..1024"),
        (["--scale", "١"], "must be a number"),
        (["--beta", "1e400"], "must be a finite number"),
        (["--std", "0"], "std must not be 0"),
    ],
)
def test_the_command_refuses_bad_values_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], fragment: str
) -> None:
    model = REPO / "examples" / "lenet5_3_9_4.onnx"
    try:
        code = main(["shrink", str(model), "--data", "mnist", "--out", str(tmp_path / "o.onnx"), *extra])
    except SystemExit as usage:  # argparse's own refusals: one line, exit 2 (``usage.Parser``)
        code = usage.code
        err = capsys.readouterr().err
        assert code == 2 and len(err.strip().splitlines()) == 1 and fragment in err, err
        return
    cli_refused(capsys, code, fragment)
    assert not (tmp_path / "o.onnx").exists()


def test_the_command_never_overwrites_the_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = save(onnx.load(REPO / "examples" / "lenet5_3_9_4.onnx"), tmp_path / "m.onnx")
    code = main(["shrink", str(model), "--data", "mnist", "--out", str(model)])
    cli_refused(capsys, code, "--out", "is the model too")
    code = main(["shrink", str(model), "--data", "mnist", "--out", str(tmp_path / "no" / "m.onnx")])
    cli_refused(capsys, code, "its folder does not exist")


@pytest.mark.parametrize(
    ("outputs", "fragment"),
    [
        (["--out", "{link}"], "--out {link} is the model too"),
        (["--out", "{hard}"], "--out {hard} is the model too"),
        (["--out", "{tmp}/o.onnx", "--json", "{model}"], "--json {model} is the model too"),
        (["--out", "{tmp}/o.onnx", "--html", "{data}"], "is --data too"),
        (["--out", "{tmp}/o.onnx", "--baseline-json", "{tmp}/o.onnx"], "is --out too"),
        (["--out", "{tmp}/o.onnx", "--json", "{tmp}/s.json", "--html", "{tmp}/s.json"], "is --json too"),
        (["--out", "{tmp}"], "is a folder"),
        (["--out", ""], "is a folder"),
        (["--out", "{tmp}/o.onnx", "--json", "{tmp}"], "--json {tmp} is a folder"),
        (["--out", "{tmp}/o.onnx", "--html", "{tmp}/none/p.html"], "its folder does not exist"),
        (["--out", "{tmp}/o\x1b[2J.onnx/x"], "\\x1b"),
    ],
)
def test_no_output_overwrites_an_input_or_another_output_and_each_is_checked_before_any_work(
    tmp_path: Path, capsys: pytest.CaptureFixture, outputs: list[str], fragment: str
) -> None:
    """Every file the command writes is checked before the model is read: a symlink or a hard link
    to the model, the data file, another output or a folder is refused, and nothing is written."""
    model = save(onnx.load(REPO / "examples" / "lenet5_3_9_4.onnx"), tmp_path / "m.onnx")
    data = npz(tmp_path / "d.npz", (1, 28, 28), 10)
    (tmp_path / "link.onnx").symlink_to(model)
    (tmp_path / "hard.onnx").hardlink_to(model)
    names = {
        "tmp": tmp_path,
        "model": model,
        "data": data,
        "link": tmp_path / "link.onnx",
        "hard": tmp_path / "hard.onnx",
    }
    before = sorted(tmp_path.iterdir())
    argv = [item.format(**names) for item in ["shrink", "{model}", "--data", "{data}", *outputs]]
    cli_refused(capsys, main(argv), fragment.format(**names))
    assert sorted(tmp_path.iterdir()) == before and load_model(model).proto.graph.node


def test_a_model_with_no_layer_to_cut_is_refused_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    model = save(mlp([4, 3]), tmp_path / "m.onnx")  # one Gemm: logits, no hidden activation
    data = npz(tmp_path / "d.npz", (4,), 3)
    cli_refused(
        capsys, main(["shrink", str(model), "--data", str(data), "--out", str(tmp_path / "o.onnx")]), "no layers"
    )
    assert not (tmp_path / "o.onnx").exists()


@pytest.mark.slow
@pytest.mark.parametrize("name", [*MNIST_MODELS, *IMAGENET_MODELS])
def test_every_shared_model_shrinks_or_is_refused_per_layer(shared_models: Path, tmp_path: Path, name: str) -> None:
    if name in MNIST_MODELS:
        config = MNIST_MODELS[name]
        data, holdout = [open_dataset("mnist", "train", limit=64)], [open_dataset("mnist", "test", limit=64)]
    else:
        config = AuditConfig(device="cpu", batch_size=2)
        data, holdout = splits(npz(tmp_path / "img.npz", (3, 224, 224), 1000, count=2))
    report = shrink(shared_models / name, data, holdout, config, latency_repeats=1)
    assert report.max_abs_difference <= 1e-5 * max(1.0, report.max_abs_output)  # float rounding, relative
    assert all(row.left_whole is None or row.neurons_after == row.neurons_before for row in report.layers)
    onnx.checker.check_model(report.model)
    Session(report.model, describe(report.model).input, "cpu")
    if name == "light_resnet50_opset9.onnx":
        assert any("residual block" in (row.left_whole or "") for row in report.layers)
    if name == "squeezenet1.0_fp16_opset7.onnx":
        assert any("Concat" in (row.left_whole or "") for row in report.layers)
