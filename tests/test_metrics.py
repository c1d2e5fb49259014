"""SPEC §2–§6 pinned by cases worked out by hand, and fast paths checked against slow references."""

from __future__ import annotations

import gzip
import math
from pathlib import Path

import numpy as np
import pytest

from auditor.engine import metrics as m

# Every metric must be computable without numpy warnings (overflow, divide by zero, invalid casts).
pytestmark = pytest.mark.filterwarnings("error")


# --- §2 entropy and efficiency -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("counts", "bits"),
    [([1, 1, 1, 1], 2.0), ([2, 2], 1.0), ([5], 0.0), ([1, 1, 2], 1.5), ([0, 3, 0, 3], 1.0), ([7, 0], 0.0)],
)
def test_entropy_bits_by_hand(counts: list[int], bits: float) -> None:
    assert m.entropy_bits(np.array(counts)) == pytest.approx(bits, abs=1e-15)


def test_entropy_of_one_state_is_positive_zero() -> None:
    assert math.copysign(1.0, m.entropy_bits(np.array([9]))) == 1.0


@pytest.mark.parametrize("counts", [[], [0, 0], [3, -1]])
def test_entropy_bits_refuses_empty_or_negative_counts(counts: list[int]) -> None:
    with pytest.raises(ValueError):
        m.entropy_bits(np.array(counts))


def test_efficiency_is_entropy_per_neuron() -> None:
    assert m.efficiency(2.0, 4) == 0.5
    with pytest.raises(ValueError):
        m.efficiency(1.0, 0)


def test_network_efficiency_is_the_geometric_mean() -> None:
    assert m.network_efficiency([0.5, 0.125]) == 0.25
    assert m.network_efficiency([0.3]) == pytest.approx(0.3)
    assert m.network_efficiency([0.5, 0.0, 1.0]) == 0.0
    assert m.network_efficiency([]) is None


def test_network_efficiency_does_not_underflow() -> None:
    # The direct product 1e-800 underflows to 0; the log-space mean does not.
    assert m.network_efficiency([1e-200] * 4) == pytest.approx(1e-200, rel=1e-12)


def test_network_efficiency_refuses_impossible_values() -> None:
    for bad in ([-0.1, 0.5], [float("nan")]):
        with pytest.raises(ValueError):
            m.network_efficiency(bad)


def test_max_entropy_and_wider_than_data() -> None:
    assert m.max_entropy_bits(1024) == 10.0
    assert m.max_entropy_bits(1) == 0.0
    assert m.max_entropy_bits(0) == 0.0
    # ceil(log2 1024) = 10, ceil(log2 1025) = 11, ceil(log2 1) = 0.
    assert not m.wider_than_data(10, 1024)
    assert m.wider_than_data(11, 1024)
    assert not m.wider_than_data(11, 1025)
    assert m.wider_than_data(1, 1)


def test_wider_than_data_is_exact_for_huge_counts() -> None:
    # float log2(2**60 + 1) rounds to exactly 60.0; the exact ceiling is 61.
    assert m.wider_than_data(61, 2**60)
    assert not m.wider_than_data(61, 2**60 + 1)


# --- §3 aIQ --------------------------------------------------------------------------------------


def test_aiq_by_hand() -> None:
    # (1² · 0.125)^(1/3) = 0.5
    assert m.aiq(1.0, 0.125) == pytest.approx(0.5)
    # Non-integer β: (0.25^0.5 · 0.5)^(1/1.5) = 0.25^(2/3) = 2^(-4/3)
    assert m.aiq(0.25, 0.5, beta=0.5) == pytest.approx(2 ** (-4 / 3))
    assert m.aiq(0.0, 0.5) == 0.0


def test_aiq_is_absent_without_accuracy_or_efficiency() -> None:
    assert m.aiq(None, 0.5) is None
    assert m.aiq(0.9, None) is None


@pytest.mark.parametrize("beta", [0.0, -1.0, float("nan")])
def test_aiq_refuses_non_positive_beta(beta: float) -> None:
    with pytest.raises(ValueError):
        m.aiq(0.9, 0.5, beta=beta)


@pytest.mark.parametrize(("accuracy", "eta"), [(-0.5, 0.5), (1.5, 0.5), (0.5, 1.2), (float("nan"), 0.5)])
def test_aiq_refuses_inputs_outside_unit_range(accuracy: float, eta: float) -> None:
    with pytest.raises(ValueError):
        m.aiq(accuracy, eta, beta=0.5)


# --- §6 right-sizing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("entropy", "neurons", "target", "width"),
    [
        (3.0, 16, 0.75, 4),
        (3.0000000000000004, 16, 0.75, 4),  # float noise must not add a neuron
        (3.1, 16, 0.75, 5),  # ceil(4.133…)
        (0.0, 8, 0.75, 1),  # never below 1
        (10.0, 8, 0.75, 8),  # never above N
        (3.0, 16, 0.5, 6),
    ],
)
def test_suggested_neurons(entropy: float, neurons: int, target: float, width: int) -> None:
    assert m.suggested_neurons(entropy, neurons, target) == width


def test_suggested_neurons_refuses_bad_target() -> None:
    for target in (0.0, 1.5):
        with pytest.raises(ValueError):
            m.suggested_neurons(3.0, 16, target)


# --- §4 α: scaling and input entropy -------------------------------------------------------------


def _mnist_train_images(data_dir: Path, count: int) -> np.ndarray:
    with gzip.open(data_dir / "mnist" / "train-images-idx3-ubyte.gz") as f:
        raw = f.read(16 + count * 784)
    return np.frombuffer(raw[16:], dtype=np.uint8).reshape(count, 1, 28, 28)


def test_alpha_scale_flattens_scales_and_counts_clipped_values() -> None:
    x = np.array([[[0, 51], [255, 102]]], dtype=np.uint8)
    x01, clipped = m.alpha_scale(x, (0, 255))
    assert x01.shape == (1, 4) and x01.dtype == np.float64
    np.testing.assert_allclose(x01, [[0.0, 0.2, 1.0, 0.4]])
    assert clipped == 0

    x01, clipped = m.alpha_scale(np.array([[-1.0, 0.0, 1.0, 3.0]]), (-1.0, 1.0))
    np.testing.assert_allclose(x01, [[0.0, 0.5, 1.0, 1.0]])
    assert clipped == 1


def test_alpha_scale_leaves_nan_to_the_caller() -> None:
    x01, clipped = m.alpha_scale(np.array([[-0.5, 0.5, 1.5, np.nan]]), (0.0, 1.0))
    assert clipped == 2
    np.testing.assert_array_equal(x01[0, :3], [0.0, 0.5, 1.0])
    assert np.isnan(x01[0, 3])


def test_input_entropy_by_hand() -> None:
    rows = np.array(
        [
            [0.3, 0.3, 0.3, 0.3],  # one bin: 0 bits
            [0.0, 0.25, 0.5, 0.75],  # four bins, equally full: 2 bits
            [0.1001, 0.1009, 0.1001, 0.1009],  # all in bin 100: 0 bits
            [0.1, 0.1, 0.2, 0.2],  # two bins: 1 bit
            [0.9995, 1.0, 0.9995, 1.0],  # 1.0 falls in the last bin, 999, with 0.9995: 0 bits
            [0.998, 1.0, 0.998, 1.0],  # bins 998 and 999: 1 bit
        ]
    )
    np.testing.assert_array_equal(m.input_entropy(rows), [0.0, 2.0, 0.0, 1.0, 0.0, 1.0])


def test_input_entropy_matches_a_numpy_histogram_reference() -> None:
    x01 = np.random.default_rng(0).random((50, 300)) ** 3
    reference = []
    for row in x01:
        hist = np.histogram(row, bins=1000, range=(0.0, 1.0))[0]
        reference.append(m.entropy_bits(hist))
    np.testing.assert_allclose(m.input_entropy(x01), reference, rtol=0, atol=1e-12)


def test_input_entropy_is_the_same_however_rows_are_batched() -> None:
    x01 = np.random.default_rng(1).random((1000, 64))
    whole = m.input_entropy(x01)
    parts = np.concatenate([m.input_entropy(x01[i : i + 37]) for i in range(0, 1000, 37)])
    np.testing.assert_array_equal(whole, parts)
    assert m.input_entropy(x01[:0]).shape == (0,)


@pytest.mark.parametrize("bad", [np.array([[0.5, np.nan]]), np.array([[-0.1, 0.5]]), np.array([[0.5, 1.2]])])
def test_input_entropy_refuses_values_outside_unit_range(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        m.input_entropy(bad)


def test_every_byte_value_has_its_own_alpha_bin() -> None:
    bins = np.minimum(np.floor(np.arange(256) / 255 * 1000), 999)
    assert np.all(np.diff(bins) > 0)
    # The same fact through the public paths: 256 distinct bytes, once each, carry 8 bits.
    all_bytes = np.arange(256, dtype=np.uint8)[None, :]
    assert m.input_entropy(m.alpha_scale(all_bytes, (0, 255))[0])[0] == pytest.approx(8.0)
    assert m.input_entropy_uint8(all_bytes)[0] == pytest.approx(8.0)


def test_input_entropy_uint8_equals_the_float_path_on_random_bytes() -> None:
    x = np.random.default_rng(2).integers(0, 256, size=(500, 3, 7, 9), dtype=np.uint8)
    expected = m.input_entropy(m.alpha_scale(x, (0, 255))[0])
    np.testing.assert_array_equal(m.input_entropy_uint8(x), expected)


def test_input_entropy_uint8_equals_the_float_path_on_mnist(data_dir: Path) -> None:
    x = _mnist_train_images(data_dir, 2000)
    fast = m.input_entropy_uint8(x)
    np.testing.assert_array_equal(fast, m.input_entropy(m.alpha_scale(x, (0, 255))[0]))
    assert np.all((fast > 0) & (fast < math.log2(784)))


def test_input_entropy_uint8_refuses_other_dtypes() -> None:
    with pytest.raises(ValueError):
        m.input_entropy_uint8(np.zeros((2, 4), dtype=np.int16))


# --- §4 β and CNA --------------------------------------------------------------------------------


def test_slopes_by_hand() -> None:
    phi = np.array([[1.0, 2.0, 3.0], [3.0, 2.0, 1.0], [0.0, 5.0, 0.0]])
    np.testing.assert_allclose(m.slopes(phi), [1.0, -1.0, 0.0], atol=1e-15)
    # ℓ − mean ℓ = (−1.5, −0.5, 0.5, 1.5), Σ² = 5; φ·(ℓ − mean ℓ) = 6 → 1.2
    assert m.slopes(np.array([[0.0, 1.0, 1.0, 4.0]]))[0] == pytest.approx(1.2)


def test_slopes_match_polyfit() -> None:
    phi = np.random.default_rng(3).normal(size=(20, 6))
    expected = [np.polyfit(np.arange(1, 7), row, 1)[0] for row in phi]
    np.testing.assert_allclose(m.slopes(phi), expected, rtol=1e-10)


@pytest.mark.parametrize("phi", [np.ones((4, 1)), np.ones(3)])
def test_slopes_need_two_layers_per_sample(phi: np.ndarray) -> None:
    with pytest.raises(ValueError):
        m.slopes(phi)


def test_pearson() -> None:
    a = np.arange(10.0)
    assert m.pearson(a, 3 * a + 2) == (pytest.approx(1.0), None)
    assert m.pearson(a, -a) == (pytest.approx(-1.0), None)
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=200), rng.normal(size=200)
    r, reason = m.pearson(x, y + x)
    assert reason is None and r == pytest.approx(np.corrcoef(x, y + x)[0, 1])


def test_pearson_is_scale_free_at_extreme_magnitudes() -> None:
    a = np.arange(10.0)
    assert m.pearson(a * 1e-200, a * 1e200)[0] == pytest.approx(1.0)


def test_pearson_reports_why_it_is_absent() -> None:
    a = np.arange(5.0)
    r, reason = m.pearson(np.full(5, 0.1), a)
    assert r is None and reason == "input entropy α has zero variance over the split"
    r, reason = m.pearson(a, np.full(5, 0.1))
    assert r is None and reason == "slope β has zero variance over the split"
    r, reason = m.pearson(np.array([1.0]), np.array([2.0]))
    assert r is None and "at least 2 samples" in reason
    r, reason = m.pearson(np.array([1.0, np.nan, 2.0]), a[:3])
    assert r is None and "non-finite" in reason


# --- §5 slope-entropy curves and CNA_A -----------------------------------------------------------

N = 125  # smoothed with K = 25: α = 12, 13, …, 112, 101 points
LINE = np.arange(N, dtype=np.float64)


def test_identical_curves_have_zero_area() -> None:
    beta = np.random.default_rng(5).normal(size=N)
    assert m.cna_area((LINE, beta), (LINE, beta)) == 0.0


def test_shifted_curve_area_by_hand() -> None:
    # Smoothed: α 12..112 on both; β_train 12..112, β_test 22..122. Joint normalisation:
    # α → [0, 1]; β spans 12..122, so the gap of 10 becomes 10/110 = 1/11 over a grid of width 1.
    grid, beta_train, beta_test = m.slope_entropy_curves((LINE, LINE), (LINE, LINE + 10))
    assert grid.shape == (100,) and grid[0] == 0.0 and grid[-1] == pytest.approx(1.0)
    np.testing.assert_allclose(beta_test - beta_train, 1 / 11, atol=1e-12)
    assert m.cna_area((LINE, LINE), (LINE, LINE + 10)) == pytest.approx(1 / 11)


def test_crossing_curves_do_not_cancel() -> None:
    # Normalised β_train = t and β_test = 1 − t cross at t = 0.5: the signed area is 0.
    train, test = (LINE, LINE), (LINE, LINE[::-1].copy())
    grid, beta_train, beta_test = m.slope_entropy_curves(train, test, points=3)
    np.testing.assert_allclose(grid, [0.0, 0.5, 1.0])
    assert np.trapezoid(beta_train - beta_test, grid) == pytest.approx(0.0, abs=1e-12)
    # ∫|2t − 1| dt = 1/2; on the grid 0, ½, 1 the trapezoid rule is exact.
    assert m.cna_area(train, test, points=3) == pytest.approx(0.5)
    # On 100 points the kink falls inside [49/99, 50/99], where the trapezoid gives 1/99² instead
    # of the true 1/(2·99²): an excess of 1/19602.
    assert m.cna_area(train, test) == pytest.approx(0.5 + 1 / 19602)


def test_smoothing_keeps_only_full_windows() -> None:
    # 30 train points give 30 − 24 = 6 means, α = 12..17; 100 test points give α = 12..87.
    # Jointly normalised over 12..87, the shared range ends at (17 − 12) / 75 = 1/15.
    flat = np.zeros(100)
    grid, beta_train, beta_test = m.slope_entropy_curves((LINE[:30], flat[:30]), (LINE[:100], flat))
    assert grid[0] == 0.0 and grid[-1] == pytest.approx(1 / 15)
    np.testing.assert_array_equal(beta_train, 0.0)  # flat β normalises to 0
    np.testing.assert_array_equal(beta_test, 0.0)


def test_tied_alpha_values_are_interpolated() -> None:
    # Half the points at α = 0, half at α = 1: the smoothed α repeats at both ends.
    alpha = np.repeat([0.0, 1.0], 50)
    area = m.cna_area((alpha, np.zeros(100)), (alpha, np.ones(100)))
    assert area == pytest.approx(1.0)


def test_too_few_points_or_no_shared_range_raise() -> None:
    with pytest.raises(ValueError, match="needs 25"):
        m.slope_entropy_curves((LINE[:24], LINE[:24]), (LINE, LINE))
    with pytest.raises(ValueError, match="share no α range"):
        m.slope_entropy_curves((LINE[:50], LINE[:50]), (LINE[:50] + 100, LINE[:50]))


def test_tied_alpha_values_keep_their_input_order() -> None:
    # The sort is stable: ties in α stay in input order, which decides the β running means.
    rng = np.random.default_rng(9)
    alpha, beta = rng.integers(0, 4, size=400).astype(np.float64), rng.normal(size=400)
    by_alpha_then_position = np.lexsort((np.arange(400), alpha))
    test = (rng.random(300) * 3, rng.normal(size=300))
    got = m.slope_entropy_curves((alpha, beta), test)
    presorted = m.slope_entropy_curves((alpha[by_alpha_then_position], beta[by_alpha_then_position]), test)
    for g, p in zip(got, presorted, strict=True):
        np.testing.assert_array_equal(g, p)


def test_curves_without_ties_do_not_depend_on_sample_order() -> None:
    rng = np.random.default_rng(6)
    alpha, beta = rng.random(300), rng.normal(size=300)
    order = rng.permutation(300)
    test = (rng.random(200), rng.normal(size=200))
    assert m.cna_area((alpha, beta), test) == m.cna_area((alpha[order], beta[order]), test)


# --- §5.3 margins --------------------------------------------------------------------------------


def test_logit_margins_by_hand() -> None:
    logits = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0]])
    np.testing.assert_array_equal(m.logit_margins(logits, np.array([0, 2])), [1.0, -2.0])


def test_probability_margins_by_hand() -> None:
    probabilities = np.array([[0.7, 0.2, 0.1], [0.7, 0.2, 0.1]])
    np.testing.assert_allclose(m.probability_margins(probabilities, np.array([0, 1]), True), [0.5, -0.5])
    # softmax(ln 2, 0, 0) = (1/2, 1/4, 1/4)
    logits = np.array([[math.log(2), 0.0, 0.0], [math.log(2), 0.0, 0.0]])
    np.testing.assert_allclose(m.probability_margins(logits, np.array([0, 1]), False), [0.25, -0.25])


def test_softmax_is_stable_for_large_logits() -> None:
    # softmax(1000, 999, 0) ≈ (e, 1, 0)/(e + 1): margin (e − 1)/(e + 1) = tanh(1/2)
    margin = m.probability_margins(np.array([[1000.0, 999.0, 0.0]]), np.array([0]), False)
    assert margin[0] == pytest.approx(math.tanh(0.5))


def test_margins_refuse_bad_labels() -> None:
    logits = np.zeros((2, 3))
    for labels in (np.array([0, 3]), np.array([-1, 0]), np.array([0])):
        with pytest.raises(ValueError):
            m.logit_margins(logits, labels)


def test_margin_p5_is_numpys_linear_percentile() -> None:
    assert m.margin_p5(np.arange(21.0)) == 1.0  # index 0.05 · 20 = 1
    assert m.margin_p5(np.array([0.0, 10.0])) == 0.5  # index 0.05 · 1 = 0.05
    values = np.random.default_rng(7).normal(size=1001)
    assert m.margin_p5(values) == np.percentile(values, 5)
    with pytest.raises(ValueError):
        m.margin_p5(np.array([]))


def _splitmix64(seed: int, n: int) -> int:
    """The n-th output (n >= 1) of Vigna's splitmix64 seeded with ``seed``, in plain Python ints."""
    mask = 2**64 - 1
    z = (seed + n * 0x9E3779B97F4A7C15) & mask
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
    return z ^ (z >> 31)


def test_sample_uniforms_follow_a_scalar_splitmix64_reference() -> None:
    assert _splitmix64(0, 1) == 0xE220A8397B1DCDAF  # Vigna's reference stream for seed 0
    index = np.arange(200)
    for seed in (0, 42, -3):
        u = np.array([(_splitmix64(seed % 2**64, int(i) + 1) >> 11) / 2**53 for i in index])
        np.testing.assert_array_equal(m.sample_uniforms(index, seed), u)


def test_sample_uniforms_do_not_depend_on_batching() -> None:
    index = np.arange(60_000)
    whole = m.sample_uniforms(index, seed=0)
    chunks = np.concatenate([m.sample_uniforms(index[i : i + 256], seed=0) for i in range(0, 60_000, 256)])
    np.testing.assert_array_equal(whole, chunks)
    order = np.random.default_rng(8).permutation(60_000)
    np.testing.assert_array_equal(m.sample_uniforms(index[order], seed=0), whole[order])
    assert whole.min() >= 0 and whole.max() < 1 and abs(whole.mean() - 0.5) < 0.01
    assert not np.array_equal(whole, m.sample_uniforms(index, seed=1))
    for bad_index in (np.array([-1, 2]), np.array([0.0, 1.0]), np.zeros((2, 2), dtype=int)):
        with pytest.raises(ValueError):
            m.sample_uniforms(bad_index, seed=0)


def test_margin_max_takes_exactly_the_fraction_with_the_smallest_draws() -> None:
    margins = np.array([0.9, 0.1, 0.5, 0.3, 0.7, 0.2, 0.8, 0.4, 0.6, 0.0])
    uniforms = np.array([0.95, 0.05, 0.5, 0.15, 0.75, 0.25, 0.85, 0.35, 0.65, 0.45])
    assert m.margin_max(margins, uniforms, 0.2) == 0.3  # the two smallest draws: margins 0.1 and 0.3
    assert m.margin_max(margins, uniforms, 0.01) == 0.1  # never fewer than one point
    assert m.margin_max(margins, uniforms, 1.0) == 0.9
    with pytest.raises(ValueError):
        m.margin_max(margins, uniforms, 0.0)
    with pytest.raises(ValueError):
        m.margin_max(margins[:3], uniforms, 0.5)


def test_probability_rows_are_detected_without_a_softmax_node() -> None:
    mixed = np.array([[0.7, 0.2, 0.1], [math.log(2), 0.0, 0.0]])  # a probability row, then logits
    np.testing.assert_allclose(m.probability_margins(mixed, np.array([0, 0]), False), [0.5, 0.25])
