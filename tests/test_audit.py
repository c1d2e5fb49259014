"""auditor.engine.audit end to end: real onnxruntime sessions on hand-built models, real MNIST, real
third-party models. Every expected number is worked out here, by hand or by an independent
numpy computation of SPEC.md, never by calling the auditor's own math.

Where the parts of an audit are tested on their own: ``test_config`` (settings), ``test_modelfile``
(reading models), ``test_prepare``, ``test_feed``, ``test_run``, ``test_summary`` and
``test_report`` (the JSON contract).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import Net, dense_model, lenet_model, mnist_layers, run
from onnx import TensorProto, helper
from refusals import refused

from auditor import AuditConfig, Prepared, Report, audit, prepare
from auditor.datasets.batches import Batch
from auditor.datasets.splits import open_splits
from auditor.engine.audit import prepared_for
from auditor.engine.metrics import probability_margins, sample_uniforms
from auditor.engine.run import cuda_usable
from auditor.errors import AuditError, CancelledError, DataError, NotFoundError

CPU = AuditConfig(device="cpu")


# The hand model: two identity hidden layers of 2 neurons, then logits [s - 0.5, 0.5 - s], s = a2₁ + a2₂.
EYE2 = np.eye(2)
HAND_LAYERS = [
    (EYE2, np.zeros(2)),
    (EYE2, np.zeros(2)),
    (np.array([[1.0, -1.0], [1.0, -1.0]]), np.array([-0.5, 0.5])),
]
HAND_X = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
HAND_Y = np.array([0, 0, 1, 1])


def entropy(counts: Sequence[int]) -> float:
    p = np.asarray(counts, np.float64) / sum(counts)
    return float(-(p * np.log2(p)).sum())


def run_audit(model, x, y=None, config: AuditConfig = CPU, split: str = "test") -> Report:
    return audit(model, [(split, Batch(np.asarray(x), None if y is None else np.asarray(y)))], config)


# --- §2 and §3 by hand ------------------------------------------------------------------------


def test_hand_model_every_figure_by_hand() -> None:
    report = run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y)
    split = report.splits["test"]
    assert split.samples == 4
    assert [s.name for s in split.layers] == ["h1", "h2"]  # the output layer is left out by default
    for stats in split.layers:
        # h1 = x and h2 = relu(x): both give the four states 11, 10, 01, 00 once each.
        assert (stats.neurons, stats.positions) == (2, 1)
        assert (stats.states_total, stats.states_distinct) == (4, 4)
        assert stats.entropy_bits == pytest.approx(2.0, abs=1e-12)
        assert stats.efficiency == pytest.approx(1.0, abs=1e-12)
        assert stats.max_entropy_bits == pytest.approx(math.log2(4))
        assert stats.suggested_neurons == 2  # ceil(2 / 0.75) = 3, clamped to N = 2
        assert stats.wider_than_data is False  # N = 2 = ceil(log2 4)
    assert split.network_efficiency == pytest.approx(1.0, abs=1e-12)
    # logits: s = 2, 1, 1, 0 → predictions 0, 0, 0, 1 against labels 0, 0, 1, 1.
    assert split.accuracy == 0.75
    assert split.beta == 2.0
    assert split.aiq == pytest.approx((0.75**2 * 1.0) ** (1 / 3), abs=1e-12)
    # α = 0, 1, 1, 0 (the −1s clip to 0); β = (φ3 − φ1)/2 with φ1 = 2, 0, 0, −2 and φ3 = 0:
    # β = −1, 0, 0, 1, uncorrelated with α.
    assert split.cna == pytest.approx(0.0, abs=1e-12)
    assert report.cna_margin is None
    # four −1 values fell outside the default alpha_range [0, 1]
    assert any("4 input values fell outside alpha_range" in w for w in report.warnings), report.warnings


def test_hand_model_other_beta_and_alpha_range() -> None:
    config = AuditConfig(device="cpu", beta=0.5, alpha_range=(-1.0, 1.0))
    report = run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y, config)
    split = report.splits["test"]
    assert split.beta == 0.5
    assert split.aiq == pytest.approx((0.75**0.5) ** (1 / 1.5), abs=1e-12)
    assert not any("clipped" in w for w in report.warnings), report.warnings
    assert split.cna == pytest.approx(0.0, abs=1e-12)


def test_include_output_layer_adds_it_to_efficiency() -> None:
    config = AuditConfig(device="cpu", include_output_layer=True)
    split = run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y, config).splits["test"]
    assert [s.name for s in split.layers] == ["h1", "h2", "logits"]
    out = split.layers[2]
    # logit bits: 10, 10, 10, 01 → H(3/4, 1/4)
    e_out = entropy([3, 1])
    assert (out.states_total, out.states_distinct) == (4, 2)
    assert out.entropy_bits == pytest.approx(e_out, abs=1e-12)
    assert out.efficiency == pytest.approx(e_out / 2, abs=1e-12)
    assert out.suggested_neurons == 2  # ceil(0.811 / 0.75) = 2
    assert split.network_efficiency == pytest.approx((1.0 * 1.0 * e_out / 2) ** (1 / 3), abs=1e-12)
    assert split.aiq == pytest.approx((0.75**2 * split.network_efficiency) ** (1 / 3), abs=1e-12)

    tight = AuditConfig(device="cpu", include_output_layer=True, target_efficiency=0.9)
    out = run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y, tight).splits["test"].layers[2]
    assert out.suggested_neurons == 1  # ceil(0.811 / 0.9) = 1


def test_repeated_states_entropy_by_hand() -> None:
    # states 11 ×4, 10 ×2, 01 ×1, 00 ×1 → E = 1.75 bits in both hidden layers
    x = np.array([[1, 1]] * 4 + [[2, -1]] * 2 + [[-1, 3]] + [[-2, -2]], np.float32)
    y = np.zeros(8, np.int64)
    split = run_audit(dense_model(HAND_LAYERS), x, y).splits["test"]
    for stats in split.layers:
        assert (stats.states_total, stats.states_distinct) == (8, 4)
        assert stats.entropy_bits == pytest.approx(1.75, abs=1e-12)
        assert stats.efficiency == pytest.approx(0.875, abs=1e-12)
        assert stats.max_entropy_bits == pytest.approx(3.0)
        assert stats.suggested_neurons == 2  # ceil(1.75 / 0.75) = 3, clamped
    assert split.network_efficiency == pytest.approx(0.875, abs=1e-12)


def test_wide_layer_suggestion_and_single_layer_cna() -> None:
    # one hidden layer of 6 neurons that repeats the 2 input signs three times
    wide = dense_model([(np.hstack([EYE2] * 3), np.zeros(6)), (np.ones((6, 2)), np.zeros(2))])
    config = AuditConfig(device="cpu", cna_include_output_layer=False)
    report = run_audit(wide, HAND_X, HAND_Y, config)
    split = report.splits["test"]
    (stats,) = split.layers
    assert (stats.neurons, stats.states_total, stats.states_distinct) == (6, 4, 4)
    assert stats.entropy_bits == pytest.approx(2.0, abs=1e-12)
    assert stats.efficiency == pytest.approx(1 / 3, abs=1e-12)
    assert stats.suggested_neurons == 3  # ceil(2 / 0.75), below N
    assert stats.wider_than_data is True  # 6 > ceil(log2 4) = 2
    assert split.network_efficiency == pytest.approx(1 / 3, abs=1e-12)
    # L = 1 without the output layer: no slope, so no CNA, and the report says why
    assert split.cna is None
    assert any("CNA needs at least 2 layers, found 1" in w for w in report.warnings), report.warnings
    # with the output layer back in, L = 2 and CNA is defined (or null for a stated reason)
    report = run_audit(wide, HAND_X, HAND_Y)
    assert not any("at least 2 layers" in w for w in report.warnings)


def test_conv_layer_positions_by_hand() -> None:
    # 1×1 conv with channels (x, −x) over a 2×2 image [[1, −1], [0, 2]]:
    # position bits 10, 01, 00, 10 → counts 2, 1, 1 → E = 1.5 bits, T = 4 positions
    net = Net(("N", 1, 2, 2), opset=17)
    conv = net.op("Conv", net.input, net.const(np.reshape([1, -1], (2, 1, 1, 1))), out="c")
    flat = net.op("Flatten", net.op("Relu", conv), axis=1)
    model = net.build(net.op("MatMul", flat, net.const(np.ones((8, 3))), out="logits"))
    x = np.array([[[1, -1], [0, 2]]], np.float32)  # (1, 2, 2): reshaped to (1, 1, 2, 2) by the engine
    (stats,) = run_audit(model, x).splits["test"].layers
    assert (stats.name, stats.neurons, stats.positions) == ("c", 2, 4)
    assert (stats.states_total, stats.states_distinct) == (4, 3)
    assert stats.entropy_bits == pytest.approx(1.5, abs=1e-12)
    assert stats.efficiency == pytest.approx(0.75, abs=1e-12)
    assert stats.max_entropy_bits == pytest.approx(2.0)
    assert stats.suggested_neurons == 2


def _reference_states(values: np.ndarray, axis: int) -> tuple[int, float]:
    """(distinct states, entropy) with states as whole rows of firing bits, counted by np.unique."""
    bits = np.moveaxis(values > 0, axis, -1).reshape(-1, values.shape[axis])
    _, counts = np.unique(bits, axis=0, return_counts=True)
    return len(counts), entropy(counts)


def test_state_counts_match_an_exact_reference() -> None:
    # widths 100 and 70 cross the packed groups (bytes, or 24 bits in float packing) and the
    # 64-bit words the counter packs states into
    rng = np.random.default_rng(4)
    layers = [
        (rng.standard_normal((784, 100)) * 0.05, rng.standard_normal(100) * 0.1),
        (rng.standard_normal((100, 70)) * 0.1, rng.standard_normal(70) * 0.1),
        (rng.standard_normal((70, 10)) * 0.1, np.zeros(10)),
    ]
    x = next(open_splits("mnist", "test", limit=400)[0].batches(400)).x
    xf = (x.reshape(400, 784) / np.float32(255)).astype(np.float32)
    model = dense_model(layers)
    split = run_audit(model, x, config=AuditConfig(device="cpu", include_output_layer=True)).splits["test"]
    for stats, values in zip(split.layers, run(model, xf, ["h1", "h2", "logits"]), strict=True):
        distinct, bits = _reference_states(values, -1)
        assert (stats.states_total, stats.states_distinct) == (400, distinct)
        assert stats.entropy_bits == pytest.approx(bits, abs=1e-12)

    lenet = lenet_model()
    xl = xf.reshape(400, 1, 28, 28)
    split = run_audit(lenet, x, config=CPU).splits["test"]
    reference = zip(run(lenet, xl, ["c1", "c2", "f1"]), (1, 1, -1), strict=True)
    for stats, (values, axis) in zip(split.layers, reference, strict=True):
        distinct, bits = _reference_states(values, axis)
        assert stats.states_total == values.size // values.shape[axis]
        assert stats.states_distinct == distinct
        assert stats.entropy_bits == pytest.approx(bits, abs=1e-12)


# --- §4 CNA by hand ---------------------------------------------------------------------------

# x (4 values) → Gemm(ones 4×2) → h1 = (s, s) → Relu → Gemm(0.5·ones 2×3, −1) → h2 = 3 × (s − 1) → Relu →
# Gemm(ones 3×2) → logits = 2 × 3·max(s − 1, 0). So φ1 = 2s, φ2 = 3(s − 1), φ3 = 6·max(s − 1, 0).
CNA_LAYERS = [
    (np.ones((4, 2)), np.zeros(2)),
    (np.full((2, 3), 0.5), np.full(3, -1.0)),
    (np.ones((3, 2)), np.zeros(2)),
]
CNA_X = np.array(
    [
        [0.25, 0.25, 0.25, 0.25],  # 1 distinct value  → α = 0, s = 1
        [0.5, 0.5, 0.5, 0.5],  # α = 0, s = 2
        [0.25, 0.25, 0.75, 0.75],  # 2 values, twice each → α = 1, s = 2
        [0.125, 0.125, 0.375, 0.375],  # α = 1, s = 1
        [0.125, 0.375, 0.625, 0.875],  # 4 distinct values → α = 2, s = 2
        [0.0625, 0.1875, 0.3125, 0.4375],  # α = 2, s = 1
        [0.875, 0.875, 0.875, 0.875],  # α = 0, s = 3.5
    ],
    np.float32,
)
CNA_ALPHA = np.array([0, 0, 1, 1, 2, 2, 0], np.float64)


def _alpha_by_histogram(x: np.ndarray) -> np.ndarray:
    out = []
    for row in x.reshape(len(x), -1).astype(np.float64):
        hist, _ = np.histogram(row, bins=1000, range=(0.0, 1.0))
        p = hist[hist > 0] / row.size
        out.append(float(-(p * np.log2(p)).sum()))
    return np.array(out)


def _phi(x: np.ndarray) -> np.ndarray:
    s = x.astype(np.float64).sum(axis=1)
    return np.stack([2 * s, 3 * (s - 1), 6 * np.maximum(s - 1, 0)], axis=1)


def _slope(phi: np.ndarray) -> np.ndarray:
    depth = np.arange(1, phi.shape[1] + 1)
    return np.polyfit(depth, phi.T, 1)[0]


def test_cna_inputs_are_what_the_test_claims() -> None:
    assert np.allclose(_alpha_by_histogram(CNA_X), CNA_ALPHA, atol=1e-12)
    assert CNA_X.sum(axis=1).tolist() == [1, 2, 2, 1, 2, 1, 3.5]


@pytest.mark.parametrize("include_output", [True, False])
def test_cna_is_the_pearson_correlation_computed_by_hand(include_output: bool) -> None:
    config = AuditConfig(device="cpu", cna_include_output_layer=include_output)
    phi = _phi(CNA_X) if include_output else _phi(CNA_X)[:, :2]
    beta = _slope(phi)
    if not include_output:
        assert np.allclose(beta, CNA_X.sum(axis=1) - 3)  # φ2 − φ1 = s − 3
    expected = np.corrcoef(CNA_ALPHA, beta)[0, 1]
    report = run_audit(dense_model(CNA_LAYERS), CNA_X, config=config)
    assert report.splits["test"].cna == pytest.approx(expected, abs=1e-9)
    assert not any("clipped" in w or "outside alpha_range" in w for w in report.warnings)


def test_cna_with_mean_aggregate() -> None:
    # mean: φ1 = s, φ2 = s − 1, φ3 = 3·max(s − 1, 0). With the output layer β is half the sum-β,
    # so CNA is unchanged; without it β = φ2 − φ1 = −1 for every sample: zero variance, CNA null.
    with_output = AuditConfig(device="cpu", aggregate="mean")
    expected = np.corrcoef(CNA_ALPHA, _slope(_phi(CNA_X)))[0, 1]
    assert run_audit(dense_model(CNA_LAYERS), CNA_X, config=with_output).splits["test"].cna == pytest.approx(
        expected, abs=1e-9
    )
    hidden_only = AuditConfig(device="cpu", aggregate="mean", cna_include_output_layer=False)
    report = run_audit(dense_model(CNA_LAYERS), CNA_X, config=hidden_only)
    assert report.splits["test"].cna is None
    assert any("CNA is null" in w and "slope β has zero variance" in w for w in report.warnings), report.warnings


def test_cna_null_when_alpha_has_zero_variance() -> None:
    # every sample is one repeated value: α = 0 for all, while β still varies
    x = np.repeat(np.array([[0.1], [0.3], [0.6], [0.9]], np.float32), 4, axis=1)
    report = run_audit(dense_model(CNA_LAYERS), x)
    assert report.splits["test"].cna is None
    assert any("input entropy α has zero variance" in w for w in report.warnings), report.warnings


def test_one_prepared_model_serves_every_metric_setting() -> None:
    # metric settings are applied after the run, so the one session serves them all, unprepared again
    prepared = prepare(dense_model(CNA_LAYERS), device="cpu")
    for config in (
        AuditConfig(device="cpu", aggregate="sum"),
        AuditConfig(device="cpu", aggregate="mean"),
        AuditConfig(device="auto", beta=5.0, margin_fraction=0.5, include_output_layer=True),
    ):
        assert prepared_for(prepared, config) is prepared
        shared = audit(prepared, [("test", Batch(CNA_X))], config)
        fresh = audit(dense_model(CNA_LAYERS), [("test", Batch(CNA_X))], config)
        assert shared.to_dict() == fresh.to_dict()
    assert prepared_for(prepared, AuditConfig(device="cpu", states_at="block-output")) is not prepared


def test_audit_honours_session_settings_a_prepared_model_lacks() -> None:
    # a model prepared for the pre-activation is prepared again when the config asks for the block output
    prepared = prepare(dense_model(CNA_LAYERS), device="cpu")
    config = AuditConfig(device="cpu", states_at="block-output")
    report = audit(prepared, [("test", Batch(CNA_X))], config)
    assert report.config["states_at"] == "block-output"
    assert report.to_dict() == audit(dense_model(CNA_LAYERS), [("test", Batch(CNA_X))], config).to_dict()


def test_audit_applies_the_batch_size_to_datasets_and_large_batches() -> None:
    seen: list[int] = []
    config = AuditConfig(device="cpu", batch_size=3)
    audit(dense_model(CNA_LAYERS), [("test", Batch(CNA_X))], config, progress=lambda _, done: seen.append(done))
    assert seen == [3, 6, 7]


# --- §5 CNA-Margin ----------------------------------------------------------------------------


def _forward(layers: list[tuple[np.ndarray, np.ndarray]], x: np.ndarray) -> list[np.ndarray]:
    """Pre-activations of every Gemm, in float64: h1, h2, …, logits."""
    out, current = [], x.reshape(len(x), -1).astype(np.float64) / 255
    for i, (w, b) in enumerate(layers):
        pre = current @ w.astype(np.float32).astype(np.float64) + b.astype(np.float32)
        out.append(pre)
        current = np.maximum(pre, 0) if i < len(layers) - 1 else pre
    return out


def _uint8_alpha(x: np.ndarray) -> np.ndarray:
    # every byte value has its own 1000-bin bin, so α is the entropy of the byte-value counts
    return np.array([entropy(np.unique(row, return_counts=True)[1]) for row in x.reshape(len(x), -1)])


def _reference_area(train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> float:
    """SPEC §5.1–5.2 spelled out directly."""
    curves = []
    for alpha, beta in (train, test):
        order = np.argsort(alpha, kind="stable")
        kernel = np.ones(25) / 25
        curves.append((np.convolve(alpha[order], kernel, "valid"), np.convolve(beta[order], kernel, "valid")))
    (a1, b1), (a2, b2) = curves
    a_lo, a_hi = min(a1.min(), a2.min()), max(a1.max(), a2.max())
    b_lo, b_hi = min(b1.min(), b2.min()), max(b1.max(), b2.max())
    a1, a2 = (a1 - a_lo) / (a_hi - a_lo), (a2 - a_lo) / (a_hi - a_lo)
    b1, b2 = (b1 - b_lo) / (b_hi - b_lo), (b2 - b_lo) / (b_hi - b_lo)
    grid = np.linspace(max(a1[0], a2[0]), min(a1[-1], a2[-1]), 100)
    gap = np.abs(np.interp(grid, a1, b1) - np.interp(grid, a2, b2))
    return float(np.sum((gap[1:] + gap[:-1]) / 2 * np.diff(grid)))


def test_cna_margin_matches_spec_reference_on_mnist() -> None:
    layers = mnist_layers()
    model = dense_model(layers, softmax=True)
    datasets = open_splits("mnist", "both", limit=100)
    config = AuditConfig(device="cpu", margin_fraction=1.0, batch_size=32)
    report = audit(model, datasets, config)
    assert list(report.splits) == ["train", "test"]
    margin = report.cna_margin
    assert margin is not None, report.warnings
    assert (margin.window, margin.points) == (25, 100)

    points, logit_margins, prob_margins = {}, None, None
    for dataset in datasets:
        x, y = next(dataset.batches(dataset.count)).x, next(dataset.batches(dataset.count)).y
        pre = _forward(layers, x)
        alpha = _uint8_alpha(x)
        gaps = np.diff(np.sort(alpha))
        assert gaps.min() > 1e-9  # no near-ties, so the auditor's α sorts the same way as ours
        beta = _slope(np.stack([p.sum(axis=1) for p in pre], axis=1))
        points[dataset.split] = (alpha, beta)
        split = report.splits[dataset.split]
        assert split.cna == pytest.approx(np.corrcoef(alpha, beta)[0, 1], abs=1e-5)
        z = pre[-1]
        assert split.accuracy == np.mean(z.argmax(axis=1) == y)
        if dataset.split == "train":
            rows = np.arange(len(y))
            others = np.where(np.arange(10) == y[:, None], -np.inf, z)
            logit_margins = z[rows, y] - others.max(axis=1)
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            others = np.where(np.arange(10) == y[:, None], -np.inf, p)
            prob_margins = p[rows, y] - others.max(axis=1)

    area = _reference_area(points["train"], points["test"])
    assert margin.area == pytest.approx(area, rel=1e-4, abs=1e-7)
    assert margin.margin_max == pytest.approx(prob_margins.max(), abs=1e-5)
    assert margin.margin_p5 == pytest.approx(np.percentile(logit_margins, 5), abs=1e-4)
    assert margin.cna_margin_max == margin.margin_max * margin.area
    assert margin.cna_margin_p5 == margin.margin_p5 * margin.area


def test_cna_margin_default_fraction_takes_a_subset() -> None:
    datasets = open_splits("mnist", "both", limit=60)
    report = audit(dense_model(mnist_layers()), datasets, replace(CPU, batch_size=25))
    margin = report.cna_margin
    assert margin is not None, report.warnings
    assert -1.0 <= margin.margin_max <= 1.0
    assert margin.cna_margin_max == margin.margin_max * margin.area
    assert margin.cna_margin_p5 == margin.margin_p5 * margin.area


def test_cna_margin_null_below_the_window() -> None:
    datasets = open_splits("mnist", "both", limit=24)
    report = audit(dense_model(mnist_layers()), datasets, replace(CPU, batch_size=10))
    assert report.cna_margin is None
    assert report.splits["train"].cna is not None  # CNA itself needs only 2 samples
    assert any("CNA-Margin is null" in w and "24 samples" in w and "25" in w for w in report.warnings), report.warnings


def test_no_labels_gives_null_accuracy_aiq_and_margin() -> None:
    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (30, 28, 28), dtype=np.uint8)
    model = dense_model(mnist_layers())
    report = audit(model, [("train", Batch(x)), ("test", Batch(x[::-1].copy()))], CPU)
    for name in ("train", "test"):
        split = report.splits[name]
        assert split.accuracy is None and split.aiq is None
        assert split.network_efficiency is not None and split.cna is not None
        assert f"{name}: no labels, so accuracy and aIQ are null" in report.warnings
    assert report.cna_margin is None
    assert any("CNA-Margin is null" in w and "label" in w for w in report.warnings), report.warnings


def test_auto_device_reports_the_providers_that_ran() -> None:
    report = run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y, AuditConfig())
    assert report.providers[-1] == "CPUExecutionProvider"
    assert set(report.providers) <= {"CUDAExecutionProvider", "CPUExecutionProvider"}
    if not cuda_usable():
        assert report.providers == ["CPUExecutionProvider"]


# --- Real third-party models on real MNIST ----------------------------------------------------

MNIST_MODELS = {
    "mnist-8_cntk_opset8.onnx": (AuditConfig(device="cpu"), 0.9),
    "cnn_pytorch25_opset17.onnx": (AuditConfig(device="cpu", mean=0.1307, std=0.3081), 0.9),
    "qdq_int8_pytorch21_opset17.onnx": (AuditConfig(device="cpu", mean=0.1307, std=0.3081), 0.8),
}
IMAGENET_MODELS = ["squeezenet1.0_fp16_opset7.onnx", "light_resnet50_opset9.onnx"]


@pytest.mark.parametrize("name", list(MNIST_MODELS))
def test_real_mnist_models_audit_on_mnist(shared_models: Path, name: str) -> None:
    config, min_accuracy = MNIST_MODELS[name]
    path = shared_models / name
    report = audit(str(path), open_splits("mnist", "test", limit=500), replace(config, batch_size=128))
    split = report.splits["test"]
    assert split.samples == 500
    assert split.accuracy > min_accuracy
    assert split.layers and all(0 <= s.efficiency <= 1 for s in split.layers)
    assert all(s.states_total == 500 * s.positions for s in split.layers)
    assert 0 < split.network_efficiency <= 1
    assert split.aiq == pytest.approx((split.accuracy**2 * split.network_efficiency) ** (1 / 3))
    assert split.cna is not None
    assert report.model.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_refuse_mnist_with_the_expected_shape(shared_models: Path, name: str) -> None:
    prepared = prepare(shared_models / name, device="cpu")
    refused(
        DataError,
        lambda: audit(prepared, open_splits("mnist", "test", limit=8), CPU),
        "28×28",
        "3×224×224",
    )


@pytest.mark.parametrize("name", IMAGENET_MODELS)
def test_imagenet_models_audit_on_right_shaped_data(shared_models: Path, name: str) -> None:
    x = np.random.default_rng(0).random((3, 3, 224, 224), dtype=np.float32)
    report = audit(str(shared_models / name), [("test", Batch(x, np.array([0, 1, 2])))], CPU)
    split = report.splits["test"]
    assert split.samples == 3
    assert len(split.layers) >= 20
    assert all(0 <= s.efficiency <= 1 for s in split.layers)
    assert split.accuracy is not None and 0 <= split.accuracy <= 1


# --- Batching never changes the result --------------------------------------------------------


def assert_close(got: object, expected: object, rel: float) -> None:
    """Nested dicts and lists equal, their floats to ``rel``."""
    if isinstance(expected, dict):
        assert isinstance(got, dict) and set(got) == set(expected)
        for key in expected:
            assert_close(got[key], expected[key], rel)
    elif isinstance(expected, list):
        assert isinstance(got, list) and len(got) == len(expected)
        for item, want in zip(got, expected, strict=True):
            assert_close(item, want, rel)
    elif isinstance(expected, float):
        assert got == pytest.approx(expected, rel=rel, abs=rel * 1e-3)
    else:
        assert got == expected


def assert_same_splits(got: dict, expected: dict) -> None:
    """Every count-derived figure bit-identical; α exact; CNA (from float sums onnxruntime adds in
    an order that may change with the batch) to 1e-9, and each sample's slope β to 1e-6."""
    assert set(got) == set(expected)
    for name in expected:
        a, b = dict(got[name]), dict(expected[name])
        assert a.pop("cna") == pytest.approx(b.pop("cna"), rel=1e-9, abs=1e-12)
        points, expected_points = a.pop("cna_points", None), b.pop("cna_points", None)
        if expected_points is not None:
            assert points["alpha"] == expected_points["alpha"]
            assert points["beta"] == pytest.approx(expected_points["beta"], rel=1e-6, abs=1e-6)
        assert a == b, name


@pytest.fixture(scope="module")
def lenet_prepared() -> Prepared:
    return prepare(lenet_model(), device="cpu")


def test_batch_size_invariance_on_mnist(lenet_prepared: Prepared) -> None:
    datasets = open_splits("mnist", "test", limit=600)
    results = [audit(lenet_prepared, datasets, replace(CPU, batch_size=size)).to_dict() for size in (600, 64, 7)]
    assert results[0]["splits"]["test"]["samples"] == 600
    assert [layer["positions"] for layer in results[0]["splits"]["test"]["layers"]] == [576, 64, 1]
    for other in results[1:]:
        assert_same_splits(other["splits"], results[0]["splits"])
        assert other["warnings"] == results[0]["warnings"]


def test_interleaved_splits_merge_like_one_pass(lenet_prepared: Prepared) -> None:
    train, test = open_splits("mnist", "both", limit=90)
    one = audit(lenet_prepared, [train, test], replace(CPU, batch_size=90)).to_dict()
    pieces = zip(train.batches(20), test.batches(20), strict=True)
    interleaved = [item for a, b in pieces for item in (("train", a), ("test", b))]
    two = audit(lenet_prepared, interleaved, CPU).to_dict()
    assert_same_splits(two["splits"], one["splits"])
    assert_close(two["cna_margin"], one["cna_margin"], rel=1e-9)


def test_fixed_batch_model_is_padded_and_matches_dynamic(lenet_prepared: Prepared) -> None:
    fixed = prepare(lenet_model(batch=4), device="cpu")
    assert fixed.structure.input.shape[0] == 4
    datasets = open_splits("mnist", "test", limit=50)
    expected = audit(lenet_prepared, datasets, replace(CPU, batch_size=50)).to_dict()["splits"]
    for size in (10, 4, 3, 50):  # chunks with and without a zero-padded tail
        splits = audit(fixed, datasets, replace(CPU, batch_size=size)).to_dict()["splits"]
        assert_same_splits(splits, expected)


# --- Refusals: one line, the right kind -------------------------------------------------------


def test_data_shape_that_cannot_match() -> None:
    refused(
        DataError,
        lambda: run_audit(dense_model(HAND_LAYERS), np.zeros((3, 5), np.float32)),
        "5 values",
        "expects 2",
    )


def test_empty_dataset(tmp_path: Path) -> None:
    path = tmp_path / "empty.npz"
    np.savez(path, x=np.zeros((0, 2), np.float32), y=np.zeros(0, np.int64))
    refused(DataError, lambda: open_splits(str(path), "test"), "no samples")
    refused(DataError, lambda: audit(dense_model(HAND_LAYERS), [], CPU), "empty")
    refused(DataError, lambda: run_audit(dense_model(HAND_LAYERS), np.zeros((0, 2), np.float32)), "empty")


def test_unknown_dataset_name() -> None:
    refused(NotFoundError, lambda: open_splits("cifar-11", "test"), "unknown dataset", "cifar-11")


def test_labels_out_of_range() -> None:
    model = dense_model(mnist_layers())
    x = np.zeros((4, 784), np.uint8)
    refused(DataError, lambda: run_audit(model, x, np.array([0, 1, 10, 2])), "10", "10 classes")
    refused(DataError, lambda: run_audit(model, x, np.array([0, -1, 3, 2])), "-1")


def test_non_integer_labels(tmp_path: Path) -> None:
    refused(DataError, lambda: run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y.astype(np.float64)), "float64")
    path = tmp_path / "floaty.npz"
    np.savez(path, x=HAND_X, y=HAND_Y.astype(np.float32))
    refused(DataError, lambda: open_splits(str(path), "test"), "integers")
    refused(DataError, lambda: run_audit(dense_model(HAND_LAYERS), HAND_X, HAND_Y[:3]), "label")


def test_nan_in_data_is_refused_with_a_count() -> None:
    x = np.ones((5, 2), np.float32)
    x[1, 0] = x[3, 1] = np.nan
    x[4, 0] = np.inf
    refused(DataError, lambda: run_audit(dense_model(HAND_LAYERS), x), "3 NaN/inf")


def test_nan_inside_the_model_is_reported_not_hidden() -> None:
    # pre-activation of the first layer = Gemm(x) + Log(x): NaN wherever x < 0
    net = Net(("N", 2), opset=17)
    g1 = net.dense(net.input, 2, 2, weight=np.eye(2), bias=False)
    h1 = net.op("Add", g1, net.op("Log", net.input), out="h1")
    h2 = net.dense(net.op("Relu", h1), 2, 2, weight=np.eye(2), bias=False, out="h2")
    model = net.build(net.dense(net.op("Relu", h2), 2, 2, weight=np.ones((2, 2)), bias=False, out="logits"))
    x = np.array([[0.5, 0.5], [0.25, -0.5], [0.75, 0.75], [0.5, 0.25], [-0.25, 0.5]], np.float32)
    report = run_audit(model, x, np.zeros(5, np.int64))
    assert report.splits["test"].layers[0].name == "h1"
    text = " ".join(report.warnings)
    assert "NaN" in text
    assert any("'h1'" in w and "NaN" in w and "2 samples" in w for w in report.warnings), report.warnings


def test_nan_outputs_leave_cna_margin_null_and_the_json_valid() -> None:
    # hidden layers stay finite; the logits get + Log(x₀), NaN for the samples with x₀ < 0
    rng = np.random.default_rng(0)
    net = Net(("N", 4), opset=17)
    h1 = net.dense(net.input, 4, 6, weight=rng.standard_normal((4, 6)), bias=False, out="h1")
    h2 = net.dense(net.op("Relu", h1), 6, 5, weight=rng.standard_normal((6, 5)), bias=False, out="h2")
    g3 = net.dense(net.op("Relu", h2), 5, 3, weight=rng.standard_normal((5, 3)), bias=False)
    x0 = net.op("Gather", net.input, net.const([0, 0, 0], dtype=np.int64), axis=1)
    model = net.build(net.op("Add", g3, net.op("Log", x0), out="logits"))
    x = rng.random((40, 4)).astype(np.float32)
    x[::8, 0] = -0.5  # 5 samples per split
    y = rng.integers(0, 3, 40)
    config = AuditConfig(device="cpu", cna_include_output_layer=False, margin_fraction=1.0)
    report = audit(model, [("train", Batch(x, y)), ("test", Batch(x[::-1].copy(), y[::-1].copy()))], config)
    assert report.splits["train"].cna is not None  # β comes from the finite hidden layers only
    assert report.cna_margin is None
    assert "train: the model output held 15 NaN/inf values" in report.warnings
    assert any("'logits'" in w and "5 samples" in w for w in report.warnings), report.warnings
    assert any(w.startswith("CNA-Margin is null") and "NaN" in w for w in report.warnings), report.warnings
    json.dumps(report.to_dict(), allow_nan=False)  # NaN and Infinity are not JSON (RFC 8259)


# --- Progress and cancellation ----------------------------------------------------------------


def test_cancelled_audit_raises() -> None:
    datasets = open_splits("mnist", "test", limit=64)
    refused(
        CancelledError,
        lambda: audit(dense_model(mnist_layers()), datasets, replace(CPU, batch_size=16), cancelled=lambda: True),
        "cancelled",
    )


def test_cancelled_midway_stops_the_audit() -> None:
    calls = Counter()

    def cancelled() -> bool:
        calls["n"] += 1
        return calls["n"] > 2

    datasets = open_splits("mnist", "test", limit=200)
    message = refused(
        CancelledError,
        lambda: audit(dense_model(mnist_layers()), datasets, replace(CPU, batch_size=20), cancelled=cancelled),
    )
    assert "after 40 samples" in message


def test_progress_counts_increase_per_split() -> None:
    seen: list[tuple[str, int]] = []
    datasets = open_splits("mnist", "both", limit=50)
    config = replace(CPU, batch_size=16)
    report = audit(dense_model(mnist_layers()), datasets, config, progress=lambda s, n: seen.append((s, n)))
    for name in ("train", "test"):
        counts = [n for s, n in seen if s == name]
        assert counts == [16, 32, 48, 50]
        assert report.splits[name].samples == 50


# --- Regressions found in review -------------------------------------------------------------


def _uint8_input_model(w1: np.ndarray, w2: np.ndarray) -> onnx.ModelProto:
    """A model that scales its own uint8 input: Cast → Div(255) → Gemm(w1) → Relu → Gemm(w2)."""
    net = Net(("N", 4), opset=17)
    net.inputs = [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 4])]
    scaled = net.op("Div", net.op("Cast", net.input, to=TensorProto.FLOAT), net.const(np.float32(255)))
    h1 = net.dense(scaled, 4, 3, weight=w1, bias=np.zeros(3), out="h1")
    return net.build(net.dense(net.op("Relu", h1), 3, 2, weight=w2, bias=np.zeros(2), out="logits"))


def test_an_integer_model_input_gets_the_raw_values_not_scaled_ones() -> None:
    rng = np.random.default_rng(3)
    w1, w2 = rng.standard_normal((4, 3)), rng.standard_normal((3, 2))
    x = np.random.default_rng(4).integers(0, 256, (40, 4)).astype(np.uint8)
    model = _uint8_input_model(w1, w2)
    report = audit(model, [("test", Batch(x))], CPU)
    reference = audit(
        dense_model([(w1, np.zeros(3)), (w2, np.zeros(2))]), [("test", Batch(x.astype(np.float32) / 255))], CPU
    )
    assert report.splits["test"].layers[0].states_distinct == reference.splits["test"].layers[0].states_distinct
    with pytest.raises(DataError, match="cannot apply"):
        audit(model, [("test", Batch(x))], AuditConfig(device="cpu", mean=0.5))
    with pytest.raises(DataError, match="cannot hold"):
        audit(model, [("test", Batch(x.astype(np.float32) + 0.5))], CPU)


def test_samples_without_values_are_refused() -> None:
    model = dense_model([(np.eye(2), np.zeros(2)), (np.eye(2), np.zeros(2))])
    with pytest.raises(DataError, match="hold no values"):
        audit(model, [("test", Batch(np.zeros((3, 0), np.float32)))], CPU)


def test_labels_for_a_single_score_model_are_refused_in_one_line() -> None:
    model = dense_model([(np.eye(2), np.zeros(2)), (np.ones((2, 1)), np.zeros(1))])
    with pytest.raises(DataError, match="1 score per sample"):
        audit(model, [("test", Batch(np.ones((4, 2), np.float32), np.zeros(4, np.int64)))], CPU)


def test_margin_max_uses_exactly_the_fraction_even_on_a_tiny_split() -> None:
    """30 training samples at 1%: still one sample, never a null CNA-Margin for want of a draw."""
    rng = np.random.default_rng(5)
    layers = [(rng.standard_normal((16, 3)), np.zeros(3)), (rng.standard_normal((3, 2)), np.zeros(2))]
    x = (rng.random((30, 16)) * np.arange(1, 31)[:, None] * 8).astype(np.uint8)  # α grows down the rows
    y = np.zeros(30, np.int64)
    config = AuditConfig(device="cpu", margin_fraction=0.01)
    report = audit(dense_model(layers), [("train", Batch(x, y)), ("test", Batch(x, y))], config)
    assert report.cna_margin is not None, report.warnings
    hidden = np.maximum(x / 255.0 @ layers[0][0] + layers[0][1], 0)
    gamma = probability_margins(hidden @ layers[1][0] + layers[1][1], y, already_probabilities=False)
    (chosen,) = np.argsort(sample_uniforms(np.arange(30), config.margin_seed), kind="stable")[:1]
    assert report.cna_margin.margin_max == pytest.approx(gamma[chosen], abs=1e-6)  # that one sample's γ


def test_one_split_says_why_cna_margin_is_null() -> None:
    model = dense_model([(np.eye(2), np.zeros(2)), (np.eye(2), np.zeros(2))])
    report = audit(model, [("test", Batch(np.ones((3, 2), np.float32)))], CPU)
    assert report.cna_margin is None
    assert any("--split both" in w for w in report.warnings)


# --- A memory budget spills, and changes nothing -------------------------------------------------


def _audit_with_budget(budget: int, spill_dir: Path, **kwargs) -> Report:
    datasets = open_splits("mnist", "both", limit=1500)
    config = AuditConfig(device="cpu", batch_size=128, memory_budget=budget)
    return audit(lenet_model(), datasets, config, spill_dir=spill_dir, **kwargs)


def test_a_tiny_budget_spills_every_layer_and_gives_the_same_report(tmp_path: Path) -> None:
    roomy = _audit_with_budget(1 << 30, tmp_path)
    tight = _audit_with_budget(1 << 12, tmp_path)
    assert roomy.spilled_bytes == 0 and tight.spilled_bytes > 0
    a, b = roomy.to_dict(), tight.to_dict()
    for report in (a, b):
        report.pop("spilled_bytes")
        report["config"].pop("memory_budget")
    assert a == b  # counts, entropies and every other figure, bit for bit
    assert list(tmp_path.iterdir()) == []  # the spill folder is gone once the audit ends


def test_spill_files_are_removed_when_the_audit_is_cancelled_or_fails(tmp_path: Path) -> None:
    calls = []

    def cancel_later() -> bool:
        calls.append(1)
        return len(calls) > 6

    with pytest.raises(CancelledError):
        _audit_with_budget(1 << 12, tmp_path, cancelled=cancel_later)
    assert list(tmp_path.iterdir()) == []

    x, y = np.zeros((300, 28, 28), np.uint8), np.zeros(300, np.int64)
    y[-1] = 99  # a label the model cannot have, in the last batch: the audit fails after spilling
    batches = [("test", Batch(x[i : i + 50], y[i : i + 50])) for i in range(0, 300, 50)]
    config = AuditConfig(device="cpu", memory_budget=1 << 12)
    refused(DataError, lambda: audit(lenet_model(), batches, config, spill_dir=tmp_path), "labels run from")
    assert list(tmp_path.iterdir()) == []


def test_an_unwritable_spill_folder_is_refused_in_one_line(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    refused(
        AuditError,
        lambda: audit(lenet_model(), [("test", Batch(np.zeros((2, 28, 28), np.uint8)))], CPU, spill_dir=missing),
        "spill folder (spill_dir)",
    )
