"""The LeNet trainer: architectures, records, recipe, export, grids and the study report, on real MNIST.

Everything runs for real (PyTorch, onnxruntime, the auditor, headless Chromium) on small slices of
MNIST and one epoch. The table logic is also checked on hand-made audited networks whose answers
can be worked out by hand. The one-epoch accuracy check on the full training set, the grid →
report run through the command line, and the Ray run are marked slow.
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import shutil
import subprocess
import sys
import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="the trainer needs the 'train' extra")

from auditor import AuditConfig, audit, find_layers  # noqa: E402
from auditor.datasets.batches import Batch  # noqa: E402
from auditor.datasets.splits import load_arrays  # noqa: E402
from auditor.errors import AuditError  # noqa: E402
from tests.models import mlp  # noqa: E402
from trainers import manifest, tables  # noqa: E402
from trainers.cli import main  # noqa: E402
from trainers.export import to_onnx, verify  # noqa: E402
from trainers.files import TEMP_MARK  # noqa: E402
from trainers.grid import plan, run_grid, width_combinations  # noqa: E402
from trainers.job import run_job  # noqa: E402
from trainers.label_noise import noisy_labels, randomize_labels, shuffle_labels  # noqa: E402
from trainers.lenet import build, parameter_count  # noqa: E402
from trainers.noise_data import gaussian_noise  # noqa: E402
from trainers.records import Architecture, Recipe, TrainedNetwork, TrainingJob  # noqa: E402
from trainers.stats import Estimate, RankCorrelation, estimate, kendall_tau, mean_ci, t_critical  # noqa: E402
from trainers.study import AuditedNetwork, SplitMetrics, StudySettings, find_networks, make_report  # noqa: E402
from trainers.study_page import format_estimate  # noqa: E402
from trainers.train import fit, make_optimizer  # noqa: E402

FAST = Recipe(max_epochs=1)
LIMIT = 1000


def tiny_job(arch: str = "lenet-300-100", widths: tuple[int, ...] = (4, 2), **changes) -> TrainingJob:
    return TrainingJob(Architecture(arch, widths, **changes.pop("net", {})), recipe=FAST, limit=LIMIT, **changes)


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
        ("lenet-300-100", (10, 6), "batchnorm-pre", 7_986 + 2 * (10 + 6)),
        ("lenet-5", (3, 9, 4), "dropout", 1_392),
        ("lenet-5", (3, 9, 4), "batchnorm-pre", 1_392 + 2 * (3 + 9 + 4)),
    ],
)
def test_parameter_counts_match_the_paper(arch, widths, variant, expected):
    architecture = Architecture(arch, widths, variant)
    assert parameter_count(build(architecture)) == expected == architecture.parameter_count


def test_batchnorm_sits_after_or_before_the_activation():
    after = [type(m).__name__ for m in build(Architecture("lenet-300-100", (4, 2), "batchnorm"))]
    before = [type(m).__name__ for m in build(Architecture("lenet-300-100", (4, 2), "batchnorm-pre"))]
    assert after[1:4] == ["Linear", "ELU", "BatchNorm1d"]
    assert before[1:4] == ["Linear", "BatchNorm1d", "ELU"]
    # Exported, the auditor's pre-activation of a Dense → BatchNorm → ELU block is the BatchNorm output.
    torch.manual_seed(0)
    model = build(Architecture("lenet-300-100", (4, 2), "batchnorm-pre"))
    proto = onnx.load_from_string(to_onnx(model, torch.rand(8, 1, 28, 28), {}))
    producers = {out: node.op_type for node in proto.graph.node for out in node.output}
    hidden = [layer for layer in find_layers(proto) if layer.role == "hidden"]
    assert [producers[layer.name] for layer in hidden] == ["BatchNormalization", "BatchNormalization"]


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
        ("lenet-300-100", (2, 0), "none", "whole numbers in 1..16384"),
        ("mlp-5x500", (4, 4, 4, 4, 99999999999), "none", "whole numbers in 1..16384"),
        ("lenet-300-100", (2, 2), "maxout", "unknown variant"),
    ],
)
def test_bad_architectures_are_refused(arch, widths, variant, message):
    with pytest.raises(AuditError, match=message):
        Architecture(arch, widths, variant)


# --- records ---------------------------------------------------------------------------------


def test_a_network_reads_back_from_its_metadata_and_its_manifest_line():
    result = run_job(tiny_job("lenet-5", (3, 9, 4), net={"variant": "dropout", "dropout_p": 0.25}, label_noise=0.5))
    network = result.network
    assert TrainedNetwork.from_metadata(metadata(result.onnx)) == replace(
        network, train_history=(), seconds=None, device=None
    )  # the run-dependent fields live only in the manifest
    line = json.loads(json.dumps(network.to_manifest()))
    assert TrainedNetwork.from_manifest(line) == network
    assert line["file"] == f"{network.name}.onnx" == network.file


@pytest.mark.parametrize(
    ("props", "message"),
    [
        ({}, "not a network exported by auditor-train"),
        ({"trainer": "auditor-train", "arch": "lenet-5"}, "incomplete or malformed"),
    ],
)
def test_foreign_metadata_is_refused(props, message):
    with pytest.raises(AuditError, match=message):
        TrainedNetwork.from_metadata(props)


def test_a_manifest_line_that_is_not_a_network_is_refused_in_one_line(tmp_path):
    (tmp_path / manifest.MANIFEST).write_text('{"name": "x"}\n')
    with pytest.raises(AuditError, match="line 1 is not a network record"):
        manifest.read(tmp_path / manifest.MANIFEST)


# --- recipe ----------------------------------------------------------------------------------


def test_early_stopping_waits_patience_epochs_after_the_best():
    from trainers.training_data import Split

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
    assert result.network.test_accuracy == pytest.approx(float(np.mean(logits.argmax(1) == y)))
    assert np.array_equal(load_arrays("mnist", "test", limit=LIMIT)[1], y)


# --- export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["none", "batchnorm", "batchnorm-pre", "dropout"])
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
    assert float(props["train_accuracy"]) == result.network.train_accuracy
    assert float(props["test_accuracy"]) == result.network.test_accuracy
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


def test_plan_covers_every_variant_and_noise_level():
    jobs = plan(tiny_job(), [(2, 2), (4, 2)], 2, variants=["none", "dropout", "none"], label_noises=[0.0, 0.5])
    assert len(jobs) == 2 * 2 * 2 * 2 == len({job.name for job in jobs})
    assert [job.name for job in jobs[:3]] == [
        "lenet-300-100_w2-2_none_n0_s0",
        "lenet-300-100_w2-2_none_n0_s1",
        "lenet-300-100_w4-2_none_n0_s0",
    ]
    assert jobs[-1].name == "lenet-300-100_w4-2_dropout_n0.5_s1"
    with pytest.raises(AuditError, match="unknown variant"):
        plan(tiny_job(), [(2, 2)], 1, variants=["none", "maxout"])


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> Path:
    """A finished 2×2 LeNet-300-100 grid with two replicates: 8 networks."""
    folder = tmp_path_factory.mktemp("grid")
    outcome = run_grid(plan(tiny_job(), width_combinations("lenet-300-100", [2, 4]), 2), folder)
    assert len(outcome.trained) == 8 and outcome.skipped == []
    return folder


def test_grid_writes_one_file_and_one_manifest_line_per_network(grid):
    records = manifest.read(grid / manifest.MANIFEST)
    assert len(records) == 8 == len({r.name for r in records})
    assert sorted(p.name for p in grid.glob("*.onnx")) == sorted(r.file for r in records)
    assert {r.job.architecture.widths for r in records} == {(2, 2), (2, 4), (4, 2), (4, 4)}
    assert {r.job.seed for r in records} == {0, 1}
    assert all(r.seconds > 0 and r.device == "cpu" and len(r.train_history) == 1 for r in records)


def test_grid_resumes_only_what_is_missing(grid, tmp_path):
    folder = tmp_path / "copy"
    folder.mkdir()
    for path in grid.iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    records = manifest.read(folder / manifest.MANIFEST)
    deleted, interrupted = records[1].name, records[2].name
    # One file lost after it was listed; one network interrupted mid-write: a temporary file and
    # no manifest line; and a torn last line from a crash while appending.
    (folder / f"{deleted}.onnx").unlink()
    (folder / f"{interrupted}.onnx").unlink()
    (folder / f"{interrupted}.onnx{TEMP_MARK}4242").write_bytes(b"half a model")
    kept = [r for r in records if r.name != interrupted]
    text = "".join(json.dumps(r.to_manifest()) + "\n" for r in kept) + '{"name": "torn'
    (folder / manifest.MANIFEST).write_text(text)
    untouched = folder / records[0].file
    before = untouched.stat().st_mtime_ns

    jobs = plan(tiny_job(), width_combinations("lenet-300-100", [2, 4]), 2)
    outcome = run_grid(jobs, folder)

    assert sorted(outcome.trained) == sorted([deleted, interrupted]) and len(outcome.skipped) == 6
    after = manifest.read(folder / manifest.MANIFEST)
    assert len(after) == 8 == len({r.name for r in after})
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


# --- statistics ------------------------------------------------------------------------------


def test_t_critical_values_and_intervals():
    for df, value in [(1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)]:
        assert t_critical(df) == pytest.approx(value, abs=1e-4)
    assert mean_ci([0.5]) == (0.5, None)
    mean, half = mean_ci([1.0, 2.0, 3.0, None])
    assert mean == 2.0 and half == pytest.approx(4.3027 * 1 / math.sqrt(3), abs=1e-4)


def test_intervals_are_flagged_not_hidden():
    two = estimate([0.1, 0.5])  # mean 0.3, s = 0.2828, half-width 12.7062 · 0.2828 / √2 = 2.5412
    assert (two.n, two.few, two.wide) == (2, True, True)
    assert two.ci95 == pytest.approx(2.5412, abs=1e-4)  # not clipped at the mean
    assert format_estimate(two, 2) == '0.30 ± 2.54 <span class="flag">†‡</span>'
    three = estimate([0.80, 0.82, 0.84])
    assert not three.few and not three.wide and format_estimate(three, 2) == "0.82 ± 0.05"
    one = estimate([0.8, None])
    assert (one.n, one.ci95, one.few) == (1, None, False) and format_estimate(one, 2) == "0.80"
    assert format_estimate(Estimate(None, None, 0), 2) == "–"


def test_kendall_tau_on_hand_worked_examples():
    # 10 pairs: 7 concordant, 3 discordant, no ties: τ = 4/10; Var(C − D) = n(n−1)(2n+5)/18 = 50/3.
    result = kendall_tau([1, 2, 3, 4, 5], [3, 1, 2, 5, 4])
    assert (result.tau, result.n) == (pytest.approx(0.4), 5)
    assert (
        result.p_value
        == pytest.approx(math.erfc(4 / math.sqrt(50 / 3) / math.sqrt(2)))
        == pytest.approx(0.3272, abs=1e-4)
    )
    # One pair tied in x, another tied in y, the other 4 concordant: τ-b = 4 / √((6 − 1)(6 − 1)) = 0.8.
    assert kendall_tau([1, 1, 2, 3], [1, 2, 2, 3]).tau == pytest.approx(0.8)
    assert kendall_tau([3, 2, 1], [1, 2, 3]).tau == pytest.approx(-1.0)
    # Pairs with a missing value are dropped; a constant side has no τ (and no p).
    assert kendall_tau([None, 1, 2, 3], [9, 1, 2, float("nan")]).n == 2
    assert kendall_tau([1, 1, 1], [1, 2, 3]) == RankCorrelation(tau=None, p_value=None, n=3)


def test_kendall_tau_matches_scipy_asymptotic():
    scipy_stats = pytest.importorskip("scipy.stats", reason="scipy (from the dev extra) is the reference here")
    rng = np.random.default_rng(0)
    for n, tied in [(3, False), (12, True), (40, False), (150, True)]:
        x = rng.normal(size=n)
        y = 0.4 * x + rng.normal(size=n)
        if tied:
            x, y = np.round(x), np.round(2 * y)
        ours = kendall_tau(list(x), list(y))
        theirs = scipy_stats.kendalltau(x, y, method="asymptotic")
        assert ours.tau == pytest.approx(theirs.statistic, abs=1e-12)
        assert ours.p_value == pytest.approx(theirs.pvalue, rel=1e-9)


# --- tables, on hand-made audited networks ---------------------------------------------------


def audited(widths=(4, 4), seed=0, *, variant="none", noise=0.0, dropout_p=0.5, accuracy=0.9, aiq=0.8, gap=0.05):
    """A network as the study sees it, with figures chosen by the test."""
    job = TrainingJob(Architecture("lenet-300-100", widths, variant, dropout_p), seed=seed, label_noise=noise)
    network = TrainedNetwork(
        job, epochs=3, best_epoch=2, stopped_early=True, train_accuracy=accuracy + gap, test_accuracy=accuracy,
        params=job.architecture.parameter_count,
    )  # fmt: skip

    def split(value: float) -> SplitMetrics:
        return SplitMetrics(100, value, aiq, 0.6, 0.1, (0.5, 0.7))

    return AuditedNetwork(network.file, network, split(accuracy + gap), split(accuracy), 0.2, None)


def test_split_metrics_are_the_reports_own_figures(tmp_path):
    path = tmp_path / "mlp.onnx"
    onnx.save(mlp([4, 6, 3]), path)
    rng = np.random.default_rng(0)
    batches = [
        (split, Batch(x=rng.normal(size=(40, 4)).astype(np.float32), y=rng.integers(0, 3, 40)))
        for split in ("train", "test")
    ]
    report = audit(path, batches, AuditConfig(batch_size=40))
    for split in ("train", "test"):
        metrics, figures = SplitMetrics.of(report, split), report.splits[split]
        assert (metrics.samples, metrics.accuracy, metrics.aiq) == (40, figures.accuracy, figures.aiq)
        assert (metrics.network_efficiency, metrics.cna) == (figures.network_efficiency, figures.cna)
        assert metrics.layer_efficiencies == tuple(layer.efficiency for layer in figures.layers)
    assert report.cna_margin is not None and report.metric("cna_margin_max", "train+test") is not None


def test_cells_pool_replicates_and_measure_fold_decrease():
    networks = [audited((4, 4), 0, accuracy=0.9), audited((4, 4), 1, accuracy=0.8), audited((2, 2), 0, accuracy=0.7)]
    p44, p22 = (Architecture("lenet-300-100", w).parameter_count for w in [(4, 4), (2, 2)])
    reference = tables.references(networks, [])
    assert reference["lenet-300-100"].widths == (4, 4)  # the largest network trained
    small, big = tables.make_cells(networks, reference)
    assert big.replicates == 2 and big.metrics["accuracy"].mean == pytest.approx(0.85)
    assert big.metrics["accuracy"].ci95 == pytest.approx(12.7062 * 0.1 / 2, abs=1e-4)
    assert small.metrics["accuracy"].ci95 is None and small.metrics["gap"].mean == pytest.approx(0.05)
    assert (small.fold_decrease, big.fold_decrease) == (p44 / p22, 1.0)
    named = tables.references(networks, [Architecture("lenet-300-100", (300, 100), "batchnorm")])
    assert tables.make_cells(networks, named)[1].fold_decrease == 266_610 / p44  # the plain form's count


def test_dropout_p_matters_only_for_the_dropout_variant():
    networks = [
        audited(seed=0, dropout_p=0.5),
        audited(seed=1, dropout_p=0.3),  # the same plain network: its dropout p means nothing
        audited(variant="dropout", dropout_p=0.5),
        audited(variant="dropout", dropout_p=0.3),
    ]
    cells = tables.make_cells(networks, tables.references(networks, []))
    assert [(c.architecture.variant, c.dropout_p, c.replicates) for c in cells] == [
        ("none", None, 2),
        ("dropout", 0.3, 1),
        ("dropout", 0.5, 1),
    ]
    rows = tables.cells_table(cells, tables.Scale(), "").flat_rows(rounded=False)
    assert [row["dropout_p"] for row in rows] == [None, 0.3, 0.5]


def study_networks() -> list[AuditedNetwork]:
    """Three architectures × two variants × two noise levels × two seeds, with known winners:
    (8,8) has the best accuracy and (4,4) the best aIQ; noise costs half its level in accuracy."""
    accuracy = {(2, 2): 0.80, (4, 4): 0.90, (8, 8): 0.95}
    aiq = {(2, 2): 0.70, (4, 4): 0.90, (8, 8): 0.80}
    return [
        audited(widths, seed, variant=variant, noise=noise, aiq=aiq[widths] + seed / 100,
                accuracy=accuracy[widths] - noise / 2 + (variant == "batchnorm") / 100 + seed / 1000)
        for variant in ("none", "batchnorm") for noise in (0.0, 0.5) for widths in accuracy for seed in (0, 1)
    ]  # fmt: skip


def test_tables_1_2_3_pick_the_paper_rows():
    study = tables.build(study_networks(), "mnist", StudySettings(top_k=2))
    by_name = {table.name: table.to_json() for table in study.tables}
    assert list(by_name) == ["table1", "table2", "table3", "generalization", "cells", "networks"]
    table1 = by_name["table1"]["rows"]
    assert [(r["ranked_by"], r["widths"]) for r in table1] == [
        ("accuracy", "8,8"),
        ("accuracy", "4,4"),
        ("aIQ", "4,4"),
        ("aIQ", "8,8"),
    ]  # variant none, no label noise
    assert table1[0]["accuracy_mean"] == pytest.approx(0.9505) and table1[0]["replicates"] == 2
    table2 = by_name["table2"]["rows"]
    assert [(r["widths"], r["variant"]) for r in table2] == [
        ("4,4", "none"),
        ("4,4", "batchnorm"),
        ("8,8", "none"),
        ("8,8", "batchnorm"),
    ]
    table3 = by_name["table3"]["rows"]
    assert [(r["variant"], r["pick"], r["widths"]) for r in table3] == [
        ("none", "best aIQ", "4,4"),
        ("none", "best accuracy", "8,8"),
        ("batchnorm", "best aIQ", "4,4"),
        ("batchnorm", "best accuracy", "8,8"),
    ]
    assert table3[0]["accuracy_n0.5_mean"] == pytest.approx(0.9 - 0.25 + 0.0005)
    assert table3[0]["train_accuracy_n0.5_mean"] == pytest.approx(0.9 - 0.25 + 0.0005 + 0.05)
    assert all(r["dropout_p"] is None for r in table2 + table3)
    tau = {(r["metric"], r["split"]): r for r in by_name["generalization"]["rows"]}
    assert len(tau) == len(tables.GENERALIZATION) and tau[("aIQ", "test")]["networks"] == 24
    assert tau[("CNA", "test")]["tau"] is None  # constant CNA: no τ, said so rather than 0
    assert "2 replicate seed(s) per cell" in study.caption and "at most" not in study.caption


def test_tables_need_what_they_show():
    only_dropout = [audited(seed=s, variant="dropout") for s in (0, 1)]
    study = tables.build(only_dropout, "mnist", StudySettings())
    assert [t.name for t in study.tables] == ["generalization", "cells", "networks"]
    assert len(study.notes) == 3 and all(note.endswith("not written") for note in study.notes)


def test_csv_rounds_json_keeps_full_precision_and_percent_scales_fractions_only():
    networks = [audited(seed=0, accuracy=0.9), audited(seed=1, accuracy=0.91234567)]
    plain, percent = (tables.build(networks, "mnist", StudySettings(percent=p)) for p in (False, True))
    cells = {t.name: t for t in percent.tables}["cells"]
    row = cells.to_json()["rows"][0]
    assert row["accuracy_mean"] == pytest.approx(90.6172835) and cells.to_json()["unit"] == "percent"
    assert row["cna_mean"] == pytest.approx(0.1)  # CNA is not a fraction of 1: never scaled
    csv_row = next(csv.DictReader(io.StringIO(cells.to_csv())))
    assert csv_row["accuracy_mean"] == "90.62" and csv_row["dropout_p"] == "" and csv_row["widths"] == "4,4"
    plain_row = next(csv.DictReader(io.StringIO({t.name: t for t in plain.tables}["cells"].to_csv())))
    assert plain_row["accuracy_mean"] == "0.9062" and plain_row["fold_decrease"] == "1.0"
    assert "×100" in percent.caption and "0–1 scale" in plain.caption


# --- the study on real networks ----------------------------------------------------------------


@pytest.fixture(scope="module")
def report_dir(grid, tmp_path_factory) -> tuple[Path, str]:
    """The report of the 8-network grid, audited on the first LIMIT samples of each split."""
    out = tmp_path_factory.mktemp("report")
    return out, make_report(grid, out, StudySettings(limit=LIMIT, top_k=2))


def test_report_on_a_tiny_grid(grid, report_dir):
    out, summary = report_dir
    cells = json.loads((out / "cells.json").read_text())["rows"]
    networks = json.loads((out / "networks.json").read_text())["rows"]
    assert len(cells) == 4 and len(networks) == 8
    assert all(r["replicates"] == 2 and r["accuracy_ci95"] is not None for r in cells)
    assert {"layer1_efficiency_mean", "layer2_efficiency_ci95", "aiq_mean", "fold_decrease"} <= set(cells[0])
    # The auditor sees the images and labels the trainer scored: both accuracies agree.
    for row in networks:
        props = metadata((grid / row["file"]).read_bytes())
        assert row["accuracy"] == pytest.approx(float(props["test_accuracy"]))
        assert row["train_accuracy"] == pytest.approx(float(props["train_accuracy"]))
    assert (out / "cells.csv").read_text().count("\n") == 5
    assert len(json.loads((out / "table1.json").read_text())["rows"]) == 2 * 2
    assert not (out / "table2.json").exists() and "Table 2 needs" in summary
    assert all(row["networks"] == 8 for row in json.loads((out / "generalization.json").read_text())["rows"])
    for metric in ("accuracy", "aiq", "network_efficiency", "layer1_efficiency", "layer2_efficiency"):
        assert (out / f"heatmap_lenet-300-100_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    for metric in ("cna", "cna_margin_max", "cna_margin_p5", "aiq", "network_efficiency"):
        assert (out / f"scatter_{metric}.png").read_bytes()[:4] == b"\x89PNG"
    page = (out / "index.html").read_text()
    assert page.count("data:image/png;base64,") == 10 and page.count("<table") == 4
    assert "top 2 by accuracy:" in summary and "top 2 by aiq:" in summary


def test_states_at_reaches_the_audit(grid, report_dir, tmp_path, capsys):
    folder = tmp_path / "nets"
    folder.mkdir()
    for path in sorted(grid.glob("*_s0.onnx")):
        shutil.copy(path, folder / path.name)
    out = tmp_path / "block"
    argv = ["report", str(folder), "--limit", str(LIMIT), "--states-at", "block-output", "--out", str(out)]
    assert main(argv) == 0
    cells = json.loads((out / "cells.json").read_text())
    assert "States read at: block-output" in cells["caption"] and cells["config"]["states_at"] == "block-output"
    # No BatchNorm or Dropout after these activations: both state points read the same states (SPEC §1).
    pre = {r["file"]: r for r in json.loads((report_dir[0] / "networks.json").read_text())["rows"]}
    for row in json.loads((out / "networks.json").read_text())["rows"]:
        assert row["network_efficiency"] == pre[row["file"]]["network_efficiency"]
    assert "States read at: pre-activation" in report_dir[1]


def test_the_study_does_not_import_torch():
    code = "import sys, trainers.cli, trainers.study, trainers.study_page; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_find_networks_reads_metadata_and_leaves_out_the_rest(grid, tmp_path):
    folder = tmp_path / "gathered"
    (folder / "z-copies").mkdir(parents=True)
    names = sorted(p.name for p in grid.glob("*.onnx"))[:2]
    for name in names:
        shutil.copy(grid / name, folder / name)
    shutil.copy(grid / names[0], folder / "z-copies" / "again.onnx")
    onnx.save(mlp([4, 3, 2]), folder / "someone-elses.onnx")
    (folder / "broken.onnx").write_bytes(b"not a model")
    found, notes = find_networks(folder)
    assert [relative for relative, _ in found] == names
    assert found[0][1] == TrainedNetwork.from_metadata(metadata((grid / names[0]).read_bytes()))
    assert notes == [
        "left out 2 file(s) not exported by auditor-train: broken.onnx, someone-elses.onnx",
        "left out 1 copy(ies) of networks already found: z-copies/again.onnx",
    ]


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
        (["grid", "--arch", "lenet-300-100", "--widths", "2", "--variant", "none,maxout", "--out", "g"], "variant"),
        (["grid", "--arch", "lenet-300-100", "--widths", "2", "--randomize-labels", "0,2", "--out", "g"], "[0, 1]"),
        (["report", "no-such-folder", "--out", "r"], "is not a folder"),
        (["report", ".", "--out", "r"], "no networks made by 'auditor-train'"),
        (["report", ".", "--reference", "lenet-300-100", "--out", "r"], "--reference expects ARCH:WIDTHS"),
        (["report", ".", "--reference", "lenet-7:2,2", "--out", "r"], "unknown architecture"),
        (["report", ".", "--states-at", "output", "--out", "r"], "invalid choice"),
        (["train", "--arch", "lenet-5", "--out", "m.onnx"], "lenet-5 needs --widths"),
        (["grid", "--arch", "mlp-5x500", "--label-noise", "swapped", "--out", "g"], "invalid choice"),
        (["grid", "--arch", "mlp-5x500", "--recipe", "adam", "--out", "g"], "invalid choice"),
        (["grid", "--arch", "mlp-5x500", "--checkpoint-every", "0", "--out", "g"], "positive integer"),
        (["train", "--arch", "mlp-5x500", "--data", "gaussian-noise:x", "--out", "m"], "whole number"),
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


TRAIN = ["train", "--arch", "lenet-5", "--widths", "2,2,2", "--out", "m.onnx"]
GRID = ["grid", "--arch", "mlp-5x500", "--recipe", "cna", "--limit", "64", "--max-epochs", "1", "--out", "g"]


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        *[([*TRAIN, "--dropout-p", v], "--dropout-p") for v in ("1", "-0.1", "nan", "inf", "x", "")],
        *[([*TRAIN, "--lr", v], "--lr") for v in ("0", "-1", "nan", "1e999", "fast", "1e300", "1000001")],
        *[([*TRAIN, "--seed", v], "--seed") for v in ("-1", str(2**32), "1.5", "1e3", "")],
        *[
            ([*TRAIN, flag, v], flag)
            for flag in ("--threads", "--batch-size", "--patience", "--max-epochs", "--limit")
            for v in ("0", "-1", str(2**31), "9" * 40, "1.5")
        ],
        *[(["report", ".", "--out", "r", "--beta", v], "--beta") for v in ("0", "-2", "nan", "inf")],
        *[(["report", ".", "--out", "r", "--top-k", v], "--top-k") for v in ("0", str(2**31))],
        *[
            (["report", ".", "--out", "r", "--bootstrap", v], "--bootstrap")
            for v in ("-1", "nan", "100001", str(2**31))
        ],
        *[([*GRID, flag, v], flag) for flag in ("--jobs", "--threads", "--members") for v in ("0", "1025", "100000")],
        *[
            ([*GRID, "--widths", v], "--widths")
            for v in ("0", "-4", "16385", "99999999999", "4,,8", "4,", ",4", "١", "4,nan", " , ")
        ],
        *[([*GRID, "--layer-widths", v], "--layer-widths") for v in ("4;99999999999", "4;,", "4;")],
        *[([*GRID, "--randomize-labels", v], "--randomize-labels") for v in ("0.1,,0.2", "0.1,", "١", "nan", "-0.1")],
        *[([*GRID, "--variant", v], "--variant") for v in ("none,,dropout", ",")],
    ],
)
def test_cli_numeric_flags_are_range_checked_in_one_line(argv, flag, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*argv[:-2], f"{argv[-2]}={argv[-1]}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {flag}" in err and err.count("\n") == 1 and "Traceback" not in err
    assert not list(tmp_path.iterdir())


def _npz(path, x, y):
    np.savez(path, x_train=x, y_train=y, x_test=x, y_test=y)
    return path


MLP = ["train", "--arch", "mlp-5x500", "--recipe", "cna", "--limit", "16", "--max-epochs", "1", "--widths", "2,2,2,2,2"]


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (np.full((8, 784), np.nan, np.float32), np.zeros(8, np.int64), "the images hold 6272 NaN/inf values"),
        (
            np.zeros((8, 784), np.float32),
            np.full(8, 99),
            "labels must be whole numbers in 0..9",
        ),
        (np.zeros((8, 784), np.float32), np.full(8, -3), "got -3..-3"),
        (np.zeros((8, 784), np.float32), np.full(8, 1.5), "labels must be integers"),
        (np.array([["a"] * 784] * 8), np.zeros(8, np.int64), "must be a numeric array"),
    ],
)
def test_training_data_that_would_break_training_is_refused_in_one_line(tmp_path, capsys, x, y, message):
    data = _npz(tmp_path / "d.npz", x, y)
    code = main([*MLP, "--data", str(data), "--out", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err, err
    assert sorted(path.name for path in tmp_path.iterdir()) == ["d.npz"]


@pytest.mark.parametrize(("out", "message"), [("", "is a folder"), (".", "is a folder"), ("d.npz", "is --data too")])
def test_train_checks_its_output_before_training(tmp_path, capsys, monkeypatch, out, message):
    monkeypatch.chdir(tmp_path)
    data = _npz(tmp_path / "d.npz", np.zeros((8, 784), np.float32), np.zeros(8, np.int64))
    before = data.read_bytes()
    code = main([*MLP, "--data", "d.npz", "--out", out])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and message in err and "epoch" not in err, err
    assert data.read_bytes() == before


def test_weights_that_diverged_are_named_not_blamed_on_the_export():
    """A learning rate too large leaves NaN or infinite weights: the refusal says so, rather than
    that onnxruntime disagrees with PyTorch (NaN never equals NaN)."""
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight[0, 0] = float("inf")
    with pytest.raises(AuditError, match=r"^training diverged: the network's weights are NaN or infinite; lower --lr$"):
        to_onnx(model, torch.zeros(3, 4), {})


def test_an_unexpected_failure_is_one_line_exit_2_never_a_traceback(capsys, tmp_path, monkeypatch):
    """torch failing to allocate, or any bug, reads as one ``internal error`` line with exit 2 (exit 1
    would not be a refusal), and a library's warning adds no line of its own."""
    import trainers.grid

    def failing(*args, **kwargs):
        warnings.warn("a library's warning", UserWarning, stacklevel=1)
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:127] DefaultCPUAllocator: can't allocate memory\nmore")

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("AUDITOR_DEBUG", raising=False)
    monkeypatch.setattr(trainers.grid, "run_grid", failing)
    code = main([*GRID[:-1], str(tmp_path / "g"), "--widths", "4"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err and "Warning" not in err
    assert err.startswith("auditor-train: internal error: RuntimeError: ") and "can't allocate memory" in err


def test_cli_report_names_the_network_it_cannot_audit(grid, tmp_path, capsys):
    impostor = mlp([4, 3, 2])  # carries a real network's metadata, but takes 4 inputs, not 28x28
    onnx.helper.set_model_props(impostor, metadata((grid / "lenet-300-100_w2-2_none_n0_s0.onnx").read_bytes()))
    (tmp_path / "nets").mkdir()
    onnx.save(impostor, tmp_path / "nets" / "impostor.onnx")
    assert main(["report", str(tmp_path / "nets"), "--limit", "50", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("auditor-train: error: impostor.onnx: ") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_cli_train_writes_a_verified_model(tmp_path, capsys):
    out = tmp_path / "m.onnx"
    argv = ["train", "--arch", "lenet-300-100", "--widths", "4,2", "--max-epochs", "1", "--limit", "500"]
    assert main([*argv, "--out", str(out)]) == 0
    assert metadata(out.read_bytes())["widths"] == "4,2"
    captured = capsys.readouterr()
    assert "wrote" in captured.out and "epoch 1: train accuracy" in captured.err


# --- slow: acceptance, a whole study, and Ray ---------------------------------------------------

# Run in the page by Chromium once it has loaded: record each image's decoded size on <body>.
IMAGE_PROBE = (
    "<script>window.addEventListener('load', () => { document.body.dataset.images = Array.from(document.images)"
    ".map(i => i.complete && i.naturalWidth > 0 ? i.naturalWidth + 'x' + i.naturalHeight : 'broken').join(' '); });"
    "</script>"
)


def rendered(page: Path, profile: Path) -> tuple[str, list[str]]:
    """The DOM headless Chromium builds from ``page``, and each image's decoded size (or "broken")."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium)")
    probe = page.with_name("probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", IMAGE_PROBE + "</body>"), encoding="utf-8")
    command = [chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}"]
    command += ["--virtual-time-budget=10000", "--dump-dom", probe.as_uri()]
    result = subprocess.run(command, capture_output=True, text=True, timeout=180, check=True)
    sizes = re.search(r'data-images="([^"]*)"', result.stdout)
    assert sizes is not None, "Chromium did not run the page's load handler"
    return result.stdout, sizes.group(1).split()


@pytest.mark.slow
def test_one_grid_command_then_report_tell_the_whole_story(tmp_path, capsys):
    folder, out = tmp_path / "grid", tmp_path / "report"
    argv = ["grid", "--arch", "lenet-300-100", "--layer-widths", "2,4;3", "--variant", "none,batchnorm"]
    argv += ["--randomize-labels", "0,0.5", "--replicates", "2", "--max-epochs", "1", "--limit", "300"]
    assert main([*argv, "--out", str(folder)]) == 0
    assert "16 trained, 0 already done" in capsys.readouterr().out
    assert main([*argv, "--out", str(folder)]) == 0
    assert "0 trained, 16 already done" in capsys.readouterr().out  # resumes: nothing left to train
    assert main(["report", str(folder), "--percent", "--out", str(out)]) == 0
    names = ["table1", "table2", "table3", "generalization", "cells", "networks"]
    for name in names:
        assert (out / f"{name}.csv").stat().st_size > 0
        assert json.loads((out / f"{name}.json").read_text())["unit"] in ("percent", "fraction")
    table3 = json.loads((out / "table3.json").read_text())["rows"]
    assert {row["variant"] for row in table3} == {"none", "batchnorm"}
    assert all(row["accuracy_n0.5_mean"] is not None for row in table3)
    heatmaps = sorted(p.name for p in out.glob("heatmap_*.png"))
    scatters = sorted(p.name for p in out.glob("scatter_*.png"))
    assert len(heatmaps) == 5 and len(scatters) == 5

    dom, images = rendered(out / "index.html", tmp_path / "chromium")
    assert len(images) == 10 and "broken" not in images
    assert all(int(size.split("x")[0]) > 300 for size in images)
    assert [name for name in names if f'data-name="{name}"' in dom] == names
    assert "Do the metrics predict generalization?" in dom and "Kendall τ-b" in dom
    assert "2 replicate seed(s) per cell" in dom and "at most 1 epoch" in dom


@pytest.mark.slow
def test_lenet300_11_4_reaches_70_percent_after_one_epoch_on_60k():
    job = TrainingJob(Architecture("lenet-300-100", (11, 4)), recipe=Recipe(max_epochs=1))
    network = run_job(job).network
    assert network.epochs == 1
    assert network.test_accuracy >= 0.70


@pytest.mark.slow
def test_ray_grid_matches_local_grid(grid, tmp_path):
    pytest.importorskip("ray", reason="the 'ray' extra is not installed")
    jobs = plan(tiny_job(), [(2, 2), (4, 4)], 1)
    outcome = run_grid(jobs, tmp_path, ray_address="local")
    assert sorted(outcome.trained) == sorted(job.name for job in jobs)
    for job in jobs:
        assert (tmp_path / f"{job.name}.onnx").read_bytes() == (grid / f"{job.name}.onnx").read_bytes()


# --- the CNA paper's setup: MLP, recipe, shuffled labels, Gaussian noise, checkpoints ------------


def test_mlp_is_five_hidden_layers_of_500_relu_with_pytorch_init():
    architecture = Architecture("mlp-5x500", (500,) * 5)
    torch.manual_seed(0)
    model = build(architecture)
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(784, 500), *[(500, 500)] * 4, (500, 10)]
    assert sum(isinstance(m, torch.nn.ReLU) for m in model) == 5 and not any(isinstance(m, torch.nn.ELU) for m in model)
    assert parameter_count(model) == architecture.parameter_count == 1_399_510
    assert float(linears[1].bias.detach().abs().max()) > 0  # PyTorch's default init, not Keras' zero biases
    assert (
        next(m.in_features for m in build(architecture, inputs=3 * 32 * 32) if isinstance(m, torch.nn.Linear)) == 3072
    )


def test_shuffled_labels_permute_the_chosen_fraction_among_themselves():
    labels = np.arange(1000) % 10
    noisy, positions = shuffle_labels(labels, 0.3, seed=4)
    assert len(positions) == 300
    untouched = np.setdiff1d(np.arange(1000), positions)
    assert np.array_equal(noisy[untouched], labels[untouched])
    assert sorted(noisy[positions]) == sorted(labels[positions])  # the same labels, moved
    assert np.bincount(noisy, minlength=10).tolist() == [100] * 10  # class counts kept
    assert 0.75 * 300 < (noisy != labels).sum() <= 300
    assert np.array_equal(noisy, noisy_labels(labels, "shuffled", 0.3, 4))
    assert np.array_equal(noisy_labels(labels, "random", 0.3, 4), randomize_labels(labels, 0.3, 4)[0])


def test_shuffled_and_random_labels_are_named_apart_and_clean_is_clean():
    shuffled = tiny_job(label_noise=0.1, label_noise_kind="shuffled")
    random = tiny_job(label_noise=0.1)
    assert shuffled.name.endswith("_sh0.1_s0") and random.name.endswith("_n0.1_s0")
    assert tiny_job(label_noise_kind="shuffled") == tiny_job()  # no noise: the same job either way
    with pytest.raises(AuditError, match="unknown label noise"):
        tiny_job(label_noise=0.1, label_noise_kind="swapped")


def test_gaussian_noise_is_seeded_in_zero_one_and_a_prefix_of_itself():
    x, y = gaussian_noise("gaussian-noise", "test")
    assert x.shape == (10_000, 3, 32, 32) and x.dtype == np.float32 and y.shape == (10_000,)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # rescaled over the split
    assert set(np.unique(y)) == set(range(10))
    few, labels = gaussian_noise("gaussian-noise", "test", limit=1500)
    assert np.array_equal(few, x[:1500]) and np.array_equal(labels, y[:1500])
    other, _ = gaussian_noise("gaussian-noise:1", "test", limit=10)
    assert not np.array_equal(other, x[:10])
    centre = x.astype(np.float64).mean()
    assert 0.45 < centre < 0.55  # N(0, 1) rescaled by its own range is centred near one half


def test_a_network_and_its_checkpoints_read_back_with_their_epochs():
    job = replace(tiny_job(checkpoint_every=1), recipe=Recipe(max_epochs=3))
    result = run_job(job)
    assert [c.network.epochs for c in result.checkpoints] == [1, 2] and result.network.epochs == 3
    for checkpoint in result.checkpoints:
        props = metadata(checkpoint.onnx)
        assert props["final"] == "false" and props["epochs"] == str(checkpoint.network.epochs)
        back = TrainedNetwork.from_metadata(props)
        assert back.name == f"{job.name}_e{checkpoint.network.epochs}" and not back.final
    assert metadata(result.onnx)["final"] == "true"
    old = {k: v for k, v in metadata(result.onnx).items() if k not in ("final", "label_noise_kind", "nesterov")}
    assert TrainedNetwork.from_metadata(old).final and TrainedNetwork.from_metadata(old).job == job


def test_cli_cna_grid_trains_shuffled_levels_with_checkpoints(tmp_path, capsys):
    out = tmp_path / "cna"
    argv = ["grid", "--arch", "mlp-5x500", "--recipe", "cna", "--randomize-labels", "0,0.5", "--checkpoint-every", "1"]
    argv += ["--max-epochs", "2", "--noisy-max-epochs", "3", "--limit", "100", "--out", str(out)]
    assert main(argv) == 0
    assert "2 trained, 0 already done" in capsys.readouterr().out
    names = sorted(p.stem for p in out.glob("*.onnx"))
    stem = "mlp-5x500_w500-500-500-500-500_none"
    expected = [f"{stem}_n0_s0", f"{stem}_n0_s0_e1", f"{stem}_sh0.5_s0", f"{stem}_sh0.5_s0_e1", f"{stem}_sh0.5_s0_e2"]
    assert names == expected
    noisy = metadata((out / f"{stem}_sh0.5_s0.onnx").read_bytes())
    assert noisy["label_noise_kind"] == "shuffled" and noisy["max_epochs"] == "3" and noisy["epochs"] == "3"
    assert (noisy["lr"], noisy["momentum"], noisy["l2"], noisy["batch_size"]) == ("0.05", "0.8", "0.0", "128")
    assert (noisy["optimizer"], noisy["activation"], noisy["patience"]) == ("sgd-momentum", "relu", "null")
    assert len(manifest.read(out / manifest.MANIFEST)) == 5
    assert main(argv) == 0
    assert "0 trained, 2 already done" in capsys.readouterr().out
