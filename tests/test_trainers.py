"""The LeNet trainer: architectures, recipe, export, grids and the grid report, on real MNIST.

Everything runs for real (PyTorch, onnxruntime, the auditor) on small slices of MNIST and one
epoch, so the whole file stays well under a minute on two cores. The one-epoch accuracy check on
the full training set and the Ray run are marked slow.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="the trainer needs the 'train' extra")

from auditor import AuditConfig  # noqa: E402
from auditor.data import load_arrays  # noqa: E402
from auditor.errors import AuditError  # noqa: E402
from trainers import manifest  # noqa: E402
from trainers.cli import main  # noqa: E402
from trainers.data import randomize_labels  # noqa: E402
from trainers.export import to_onnx, verify  # noqa: E402
from trainers.files import TEMP_MARK  # noqa: E402
from trainers.grid import plan, run_grid, width_combinations  # noqa: E402
from trainers.job import Job, run_job  # noqa: E402
from trainers.models import Architecture, build, parameter_count  # noqa: E402
from trainers.report import make_report, summarize  # noqa: E402
from trainers.stats import mean_ci, t_critical  # noqa: E402
from trainers.train import Recipe, fit, make_optimizer  # noqa: E402

FAST = Recipe(max_epochs=1)
LIMIT = 1000


def tiny_job(arch: str = "lenet-300-100", widths: tuple[int, ...] = (4, 2), **changes) -> Job:
    return Job(Architecture(arch, widths, **changes.pop("net", {})), recipe=FAST, limit=LIMIT, **changes)


def metadata(data: bytes) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load_from_string(data).metadata_props}


# --- architectures (SPEC §7) -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "widths", "variant", "expected"),
    [
        ("lenet-300-100", (11, 4), "none", 8_733),  # the paper's count
        ("lenet-5", (3, 9, 4), "none", 1_392),  # the paper's count
        ("lenet-300-100", (300, 100), "none", 266_610),  # the original LeNet-300-100
        ("lenet-5", (32, 64, 128), "none", 184_586),  # 832 + 51,264 + 131,200 + 1,290
        ("lenet-300-100", (11, 4), "batchnorm", 8_733 + 2 * (11 + 4)),  # gamma and beta per neuron
        ("lenet-5", (3, 9, 4), "dropout", 1_392),
    ],
)
def test_parameter_counts_match_the_paper(arch, widths, variant, expected):
    assert parameter_count(build(Architecture(arch, widths, variant))) == expected


def test_lenet5_shapes_run_28_24_12_8_4():
    model = build(Architecture("lenet-5", (3, 9, 4)))
    x = torch.zeros(2, 1, 28, 28)
    shapes = []
    for layer in model:
        x = layer(x)
        shapes.append(tuple(x.shape[1:]))
    assert shapes[:6] == [(3, 24, 24), (3, 24, 24), (3, 12, 12), (9, 8, 8), (9, 8, 8), (9, 4, 4)]
    assert shapes[-1] == (10,)


def test_glorot_uniform_kernels_and_zero_biases():
    torch.manual_seed(0)
    model = build(Architecture("lenet-300-100", (300, 100)))
    largest = float(model[1].weight.detach().abs().max())
    bound = math.sqrt(6 / (784 + 300))
    assert 0.95 * bound < largest <= bound  # uniform over the whole Glorot range
    assert all(float(m.bias.detach().abs().max()) == 0 for m in model if isinstance(m, torch.nn.Linear))


def test_l2_applies_to_kernels_only():
    model = build(Architecture("lenet-5", (3, 9, 4), "batchnorm"))
    kernels, others = make_optimizer(model, Recipe()).param_groups
    assert kernels["weight_decay"] == pytest.approx(0.001)  # gradient of 0.0005·Σw²
    assert others["weight_decay"] == 0 and kernels["nesterov"] and kernels["momentum"] == 0.9
    assert all(p.ndim > 1 for p in kernels["params"]) and len(kernels["params"]) == 4
    assert all(p.ndim == 1 for p in others["params"])  # biases, BatchNorm gamma and beta


@pytest.mark.parametrize(
    ("arch", "widths", "variant", "message"),
    [
        ("lenet-7", (2, 2), "none", "unknown architecture"),
        ("lenet-5", (2, 2), "none", "takes 3 widths"),
        ("lenet-300-100", (2, 0), "none", "positive"),
        ("lenet-300-100", (2, 2), "maxout", "unknown variant"),
    ],
)
def test_bad_architectures_are_refused(arch, widths, variant, message):
    with pytest.raises(AuditError, match=message):
        Architecture(arch, widths, variant)


# --- recipe ----------------------------------------------------------------------------------


def test_early_stopping_waits_patience_epochs_after_the_best():
    from trainers.data import Split

    torch.manual_seed(0)
    model = build(Architecture("lenet-300-100", (2, 2)))
    data = Split(x=torch.rand(64, 1, 28, 28), y=torch.randint(0, 10, (64,)))
    # A vanishing learning rate freezes the running accuracy after epoch 1: it never rises again.
    result = fit(model, data, Recipe(lr=1e-30, patience=3), seed=0)
    assert (result.epochs, result.best_epoch, result.stopped_early) == (4, 1, True)
    capped = fit(model, data, Recipe(lr=1e-30, patience=3, max_epochs=2), seed=0)
    assert (capped.epochs, capped.stopped_early) == (2, False)


# --- label randomisation ---------------------------------------------------------------------


@pytest.mark.parametrize("fraction", [0.0, 0.25, 0.5, 1.0])
def test_randomize_labels_resamples_exactly_round_fraction_n(fraction):
    labels = np.arange(1001) % 10
    noisy, positions = randomize_labels(labels, fraction, seed=3)
    assert len(positions) == len(set(positions.tolist())) == round(fraction * len(labels))
    untouched = np.setdiff1d(np.arange(len(labels)), positions)
    assert np.array_equal(noisy[untouched], labels[untouched])
    assert noisy.min() >= 0 and noisy.max() <= 9
    assert np.array_equal(labels, np.arange(1001) % 10)  # the input is not modified
    again, same_positions = randomize_labels(labels, fraction, seed=3)
    assert np.array_equal(again, noisy) and np.array_equal(same_positions, positions)
    if fraction == 1.0:  # resampling keeps the old class by chance about one time in ten
        assert 0.05 < np.mean(noisy == labels) < 0.15


def test_label_noise_leaves_test_labels_untouched():
    result = run_job(tiny_job(label_noise=1.0))
    x, y = load_arrays("mnist", "test", limit=LIMIT)
    session = ort.InferenceSession(result.onnx, providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"input": (x[:, None] / 255.0).astype(np.float32)})
    assert result.record["test_accuracy"] == pytest.approx(float(np.mean(logits.argmax(1) == y)))
    assert np.array_equal(load_arrays("mnist", "test", limit=LIMIT)[1], y)


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["none", "batchnorm", "dropout"])
def test_export_matches_pytorch_in_onnxruntime(variant):
    torch.manual_seed(1)
    model = build(Architecture("lenet-5", (3, 9, 4), variant))
    model.train()
    model(torch.rand(16, 1, 28, 28))  # move BatchNorm's running statistics off their defaults
    sample = torch.rand(8, 1, 28, 28)
    data = to_onnx(model, sample, {"arch": "lenet-5"})
    proto = onnx.load_from_string(data)
    assert proto.ir_version <= 13 and proto.opset_import[0].version == 17
    assert "Dropout" not in {node.op_type for node in proto.graph.node}  # inference form
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch axis
    assert proto.graph.output[0].name == "logits"
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batch = torch.rand(5, 1, 28, 28)
    with torch.inference_mode():
        expected = model.eval()(batch).numpy()
    np.testing.assert_allclose(session.run(None, {"input": batch.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_verify_refuses_an_export_that_disagrees():
    torch.manual_seed(0)
    model = build(Architecture("lenet-300-100", (4, 2)))
    sample = torch.rand(4, 1, 28, 28)
    data = to_onnx(model, sample, {})
    torch.manual_seed(1)
    with pytest.raises(AuditError, match="does not match PyTorch"):
        verify(data, build(Architecture("lenet-300-100", (4, 2))), sample)


def test_job_metadata_carries_architecture_recipe_and_results():
    result = run_job(tiny_job("lenet-5", (3, 9, 4), net={"variant": "batchnorm"}, seed=2, label_noise=0.25))
    props = metadata(result.onnx)
    assert props["arch"] == "lenet-5" and props["widths"] == "3,9,4" and props["seed"] == "2"
    assert props["variant"] == "batchnorm" and props["label_noise"] == "0.25"
    assert props["epochs"] == "1" and props["max_epochs"] == "1" and props["restore_best"] == "false"
    assert (props["lr"], props["momentum"], props["l2"], props["batch_size"], props["patience"]) == (
        "0.001",
        "0.9",
        "0.0005",
        "32",
        "5",
    )
    assert props["optimizer"] == "sgd-nesterov" and props["init"] == "glorot-uniform"
    assert float(props["train_accuracy"]) == result.record["train_accuracy"]
    assert float(props["test_accuracy"]) == result.record["test_accuracy"]
    assert props["params"] == str(1_392 + 2 * (3 + 9 + 4))


def test_jobs_are_reproducible_byte_for_byte():
    job = tiny_job(seed=5)
    assert run_job(job).onnx == run_job(job).onnx
    assert run_job(job).onnx != run_job(replace(job, seed=6)).onnx


# --- grid ------------------------------------------------------------------------------------


def test_width_combinations():
    assert width_combinations("lenet-300-100", [2, 4]) == [(2, 2), (2, 4), (4, 2), (4, 4)]
    assert width_combinations("lenet-300-100", layer_widths=[[2, 4], [8]]) == [(2, 8), (4, 8)]
    assert len(width_combinations("lenet-5", [2, 4, 8])) == 27
    with pytest.raises(AuditError, match="3 hidden layers"):
        width_combinations("lenet-5", layer_widths=[[2], [4]])


def test_plan_names_are_predictable():
    jobs = plan(tiny_job(), [(11, 4), (2, 2)], replicates=2)
    assert [job.name for job in jobs] == [
        "lenet-300-100_w11-4_none_n0_s0",
        "lenet-300-100_w11-4_none_n0_s1",
        "lenet-300-100_w2-2_none_n0_s0",
        "lenet-300-100_w2-2_none_n0_s1",
    ]
    assert replace(jobs[0], label_noise=0.25).name == "lenet-300-100_w11-4_none_n0.25_s0"


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A finished 2×2 LeNet-300-100 grid with two replicates: 8 networks."""
    folder = tmp_path_factory.mktemp("grid")
    outcome = run_grid(plan(tiny_job(), width_combinations("lenet-300-100", [2, 4]), 2), folder)
    assert len(outcome.trained) == 8 and outcome.skipped == []
    return folder


def test_grid_writes_one_file_and_one_manifest_line_per_network(grid):
    records = manifest.read(grid / manifest.MANIFEST)
    assert len(records) == 8 == len({r["name"] for r in records})
    assert sorted(p.name for p in grid.glob("*.onnx")) == sorted(r["file"] for r in records)
    assert {tuple(r["widths"]) for r in records} == {(2, 2), (2, 4), (4, 2), (4, 4)}
    assert {r["seed"] for r in records} == {0, 1}


def test_grid_resumes_only_what_is_missing(grid, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in grid.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    records = manifest.read(folder / manifest.MANIFEST)
    deleted, interrupted = records[1]["name"], records[2]["name"]
    # One file lost after it was listed; one network interrupted mid-write: a temporary file and
    # no manifest line; and a torn last line from a crash while appending.
    (folder / f"{deleted}.onnx").unlink()
    (folder / f"{interrupted}.onnx").unlink()
    (folder / f"{interrupted}.onnx{TEMP_MARK}4242").write_bytes(b"half a model")
    kept = [r for r in records if r["name"] != interrupted]
    text = "".join(json.dumps(r) + "\n" for r in kept) + '{"name": "torn'
    (folder / manifest.MANIFEST).write_text(text)
    untouched = folder / records[0]["file"]
    before = untouched.stat().st_mtime_ns

    jobs = plan(tiny_job(), width_combinations("lenet-300-100", [2, 4]), 2)
    outcome = run_grid(jobs, folder)

    assert sorted(outcome.trained) == sorted([deleted, interrupted]) and len(outcome.skipped) == 6
    after = manifest.read(folder / manifest.MANIFEST)
    assert len(after) == 8 == len({r["name"] for r in after})
    assert not list(folder.glob(f"*{TEMP_MARK}*"))
    assert untouched.stat().st_mtime_ns == before
    # Same seeds, same machine, same threads: the redone networks are bit-identical.
    assert (folder / f"{deleted}.onnx").read_bytes() == (grid / f"{deleted}.onnx").read_bytes()
    assert run_grid(jobs, folder).trained == []


def test_grid_refuses_to_mix_settings(grid):
    jobs = plan(replace(tiny_job(), recipe=Recipe(max_epochs=2)), [(2, 2)], 1)
    with pytest.raises(AuditError, match=r"other settings.*max_epochs"):
        run_grid(jobs, grid)


def test_parallel_grid_matches_serial_grid(grid, tmp_path):
    jobs = plan(tiny_job(), [(2, 4), (4, 2)], 1)
    outcome = run_grid(jobs, tmp_path, workers=2)
    assert sorted(outcome.trained) == sorted(job.name for job in jobs)
    for job in jobs:
        assert (tmp_path / f"{job.name}.onnx").read_bytes() == (grid / f"{job.name}.onnx").read_bytes()


# --- report ----------------------------------------------------------------------------------


def test_t_critical_values_and_intervals():
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_critical(df) == pytest.approx(value, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, None)
    mean, half = mean_ci([1.0, 2.0, 3.0, None])
    assert mean == 2.0 and half == pytest.approx(4.3027 * 1 / math.sqrt(3), abs=1e-4)


def test_summarize_pools_replicates_and_counts_fold_decrease():
    def row(widths, seed, accuracy, params):
        return {"arch": "lenet-300-100", "widths": widths, "variant": "none", "dropout_p": 0.5,
                "label_noise": 0.0, "seed": seed, "params": params, "accuracy": accuracy,
                "aiq": None, "network_efficiency": 0.5, "layer1_efficiency": 0.4}  # fmt: skip

    table = summarize([row([4, 4], 0, 0.9, 4000), row([4, 4], 1, 0.8, 4000), row([2, 2], 0, 0.7, 1000)])
    assert [r["widths"] for r in table] == [[2, 2], [4, 4]]
    small, big = table
    assert big["replicates"] == 2 and big["accuracy_mean"] == pytest.approx(0.85)
    assert big["accuracy_ci95"] == pytest.approx(12.7062 * 0.1 / 2, abs=1e-4)
    assert small["accuracy_ci95"] is None and small["aiq_mean"] is None
    assert (small["fold_decrease"], big["fold_decrease"]) == (4.0, 1.0)


def test_report_on_a_tiny_grid(grid, tmp_path, capsys):
    summary = make_report(grid, tmp_path, dataset="mnist", limit=LIMIT, config=AuditConfig(), top_k=2)
    table = json.loads((tmp_path / "table.json").read_text())
    networks = json.loads((tmp_path / "networks.json").read_text())
    assert len(table) == 4 and len(networks) == 8
    assert all(r["replicates"] == 2 and r["accuracy_ci95"] is not None for r in table)
    assert {"layer1_efficiency_mean", "layer2_efficiency_ci95", "aiq_mean", "fold_decrease"} <= set(table[0])
    # The auditor sees the same test images the trainer scored: the accuracies agree.
    for network in networks:
        assert network["accuracy"] == pytest.approx(network["test_accuracy"])
    assert (tmp_path / "table.csv").read_text().count("\n") == 5
    for metric in ("accuracy", "aiq", "layer1_efficiency", "layer2_efficiency"):
        assert (tmp_path / f"heatmap_lenet-300-100_none_n0_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    page = (tmp_path / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 4 and "<table>" in page
    assert "top 2 by accuracy:" in summary and "top 2 by aiq:" in summary


# --- CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["train", "--arch", "lenet-7", "--widths", "2,2", "--out", "m.onnx"], "unknown architecture"),
        (["train", "--arch", "lenet-5", "--widths", "2,2", "--out", "m.onnx"], "takes 3 widths"),
        (["train", "--arch", "lenet-5", "--widths", "2,x,2", "--out", "m.onnx"], "comma-separated integers"),
        (["train", "--arch", "lenet-5", "--widths", "2,2,2", "--randomize-labels", "1.5", "--out", "m"], "[0, 1]"),
        (["train", "--arch", "lenet-5", "--widths", "2,2,2", "--variant", "maxout", "--out", "m"], "variant"),
        (["grid", "--arch", "lenet-5", "--layer-widths", "2;4", "--out", "g"], "3 hidden layers"),
        (["report", "no-such-grid", "--out", "r"], "no finished networks"),
    ],
)
def test_cli_bad_input_is_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        raise SystemExit(main(argv))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_cli_train_writes_a_verified_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["train", "--arch", "lenet-300-100", "--widths", "4,2", "--max-epochs", "1", "--limit", "500"]
    assert main([*argv, "--out", str(out)]) == 0
    assert metadata(out.read_bytes())["widths"] == "4,2"
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "epoch 1: train accuracy" in captured.err


# --- slow: acceptance and Ray ----------------------------------------------------------------


@pytest.mark.slow
def test_lenet300_11_4_reaches_70_percent_after_one_epoch_on_60k():
    job = Job(Architecture("lenet-300-100", (11, 4)), recipe=Recipe(max_epochs=1))
    record = run_job(job).record
    assert record["epochs"] == 1
    assert record["test_accuracy"] >= 0.70


@pytest.mark.slow
def test_ray_grid_matches_local_grid(grid, tmp_path):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    jobs = plan(tiny_job(), [(2, 2), (4, 4)], 1)
    outcome = run_grid(jobs, tmp_path, ray_address="local")
    assert sorted(outcome.trained) == sorted(job.name for job in jobs)
    for job in jobs:
        assert (tmp_path / f"{job.name}.onnx").read_bytes() == (grid / f"{job.name}.onnx").read_bytes()
