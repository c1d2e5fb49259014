"""The pure math of SPEC.md §2–§6: entropy and efficiency, aIQ, CNA, CNA-Margin, right-sizing.

Every function takes plain numbers or numpy arrays and returns plain numbers or numpy arrays;
nothing here reads files, runs models or keeps state. Array inputs are never modified. Missing
results are ``None`` (aIQ without labels, network efficiency without layers, CNA of a
zero-variance split), never a guessed number. Entropies are in bits.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence

import numpy as np

ALPHA_BINS = 1000
"""Histogram bins over [0, 1] for the input entropy α (SPEC §4)."""
_ALPHA_BLOCK_ROWS = 128
"""Rows per ``bincount`` in α: a block's histogram (128 × 1000 counts, 1 MB) stays in cache."""

_U64 = np.uint64
_GOLDEN = _U64(0x9E3779B97F4A7C15)
_MIX1 = _U64(0xBF58476D1CE4E5B9)
_MIX2 = _U64(0x94D049BB133111EB)


# --- §2 state space and neural efficiency -------------------------------------------------------


def entropy_bits(counts: np.ndarray) -> float:
    """Entropy ``-Σ (c/T) log2(c/T)`` of a layer's state counts (SPEC §2).

    ``counts`` holds one count per distinct state; zeros are ignored, so a sparse table may be
    passed whole. A single state gives 0.0.
    """
    c = np.asarray(counts, dtype=np.float64).ravel()
    if np.any(c < 0):
        raise ValueError("state counts must be >= 0")
    c = c[c > 0]
    if c.size == 0:
        raise ValueError("entropy needs at least one state with a count > 0")
    p = c / c.sum()
    return 0.0 - float(np.sum(p * np.log2(p)))  # 0.0 - x turns -0.0 into 0.0


def efficiency(entropy: float, neurons: int) -> float:
    """Neural efficiency ``η = E / N`` of one layer, in [0, 1] (SPEC §2)."""
    if neurons < 1:
        raise ValueError(f"a layer needs at least one neuron, got {neurons}")
    return entropy / neurons


def network_efficiency(efficiencies: Sequence[float]) -> float | None:
    """Network efficiency ``(Π η_l)^(1/L)``, the geometric mean over the L layers (SPEC §2).

    Computed in log space so that many small efficiencies do not underflow. Exactly 0.0 when any
    layer has η = 0; ``None`` when there are no efficiency layers.
    """
    eta = np.asarray(efficiencies, dtype=np.float64)
    if eta.size == 0:
        return None
    if np.any(eta < 0) or not np.all(np.isfinite(eta)):
        raise ValueError(f"efficiencies must be finite and >= 0, got {eta.tolist()}")
    if np.any(eta == 0):
        return 0.0
    return float(np.exp2(np.mean(np.log2(eta))))


def max_entropy_bits(states_total: int) -> float:
    """``log2(T)``: the most entropy T observed states can carry (SPEC §2); 0.0 for T <= 1."""
    return math.log2(states_total) if states_total > 1 else 0.0


def wider_than_data(neurons: int, states_total: int) -> bool:
    """True when ``N > ceil(log2 T)``: the layer has more state space than the data can use (SPEC §2, §6).

    ``ceil(log2 T)`` is computed exactly in integers, as ``(T - 1).bit_length()``.
    """
    return neurons > (max(states_total, 1) - 1).bit_length()


# --- §3 aIQ --------------------------------------------------------------------------------------


def aiq(accuracy: float | None, network_efficiency: float | None, beta: float = 2.0) -> float | None:
    """``aIQ = (P^β · η_N)^(1/(β+1))`` on the 0–1 scale (SPEC §3).

    ``None`` when either input is missing (no labels, or no efficiency layers): aIQ is never
    guessed. ``beta`` may be any real number > 0.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    if accuracy is None or network_efficiency is None:
        return None
    if not (0 <= accuracy <= 1 and 0 <= network_efficiency <= 1):
        raise ValueError(f"accuracy and efficiency must lie in [0, 1], got {accuracy} and {network_efficiency}")
    return float((accuracy**beta * network_efficiency) ** (1.0 / (beta + 1.0)))


# --- §6 right-sizing -----------------------------------------------------------------------------


def suggested_neurons(entropy: float, neurons: int, target_efficiency: float = 0.75) -> int:
    """Suggested width ``ceil(E / target)``, clamped to [1, N] (SPEC §6).

    ``E / target`` is rounded to 9 decimals first, so float noise in E (3.0000000000000004 bits
    at target 0.75) does not add a neuron.
    """
    if not 0 < target_efficiency <= 1:
        raise ValueError(f"target efficiency must be in (0, 1], got {target_efficiency}")
    width = math.ceil(round(entropy / target_efficiency, 9))
    return min(max(width, 1), neurons)


# --- §4 CNA: input entropy α, slope β, correlation -----------------------------------------------


def alpha_scale(x: np.ndarray, value_range: tuple[float, float]) -> tuple[np.ndarray, int]:
    """Samples scaled to [0, 1] by their declared value range, as α needs (SPEC §4 step 1).

    ``x`` is ``(B, ...)`` raw samples; returns the ``(B, D)`` float64 values mapped by
    ``(v - lo) / (hi - lo)`` and clipped to [0, 1], and how many values were clipped (for the
    report's warnings). NaN is neither clipped nor counted: it passes through unchanged, and the
    caller must count and handle it (``input_entropy`` refuses it). uint8 images use (0, 255).
    """
    lo, hi = float(value_range[0]), float(value_range[1])
    if not lo < hi:
        raise ValueError(f"value range must be increasing, got {value_range}")
    v = np.asarray(x)
    v = (v.reshape(v.shape[0], math.prod(v.shape[1:])).astype(np.float64) - lo) / (hi - lo)
    clipped = int(np.count_nonzero((v < 0.0) | (v > 1.0)))
    np.clip(v, 0.0, 1.0, out=v)
    return v, clipped


def _entropy_by_blocks(values: np.ndarray, bins: int, bin_index: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Entropy in bits of the histogram of each row of ``values``, whose bins ``bin_index`` gives.

    Vectorised per block of rows: ``bin_index`` maps a ``(rows, D)`` block to bins in
    ``[0, bins)``, and one ``bincount`` over ``bin · rows + row`` counts the whole block, bin by
    bin, so the histogram comes out as ``(bins, rows)`` with no transpose. Blocks keep it in
    cache: 60,000 MNIST rows in one histogram are slower by half or more.
    A count c contributes ``(c/D) · log2(c/D)``, looked up in a table of every count 0..D (0 for
    c = 0) instead of a log per bin: the table holds the same values, and a row's terms are added
    in bin order, one bin after another (the empty bins add 0.0), as a sequential sum of the
    non-empty ones would. So the result is bit-identical however rows are blocked or batched,
    and for any two binnings that give the same non-empty counts in the same order.
    """
    rows, per_row = values.shape
    terms = _count_terms(per_row)
    entropy = np.empty(rows)
    for start in range(0, rows, _ALPHA_BLOCK_ROWS):
        keys = bin_index(values[start : start + _ALPHA_BLOCK_ROWS])
        block = keys.shape[0]
        keys *= block
        keys += np.arange(block, dtype=np.intp)[:, None]
        by_bin = terms[np.bincount(keys.ravel(), minlength=bins * block).reshape(bins, block)]
        # the reduction adds bin after bin, vectorised across rows
        entropy[start : start + block] = 0.0 - np.add.reduce(by_bin, axis=0)  # 0.0 - x turns -0.0 into 0.0
    return entropy


@functools.lru_cache(maxsize=4)
def _count_terms(per_row: int) -> np.ndarray:
    """``p · log2(p)`` for p = c / per_row at every count c = 0..per_row, with 0.0 at c = 0
    (read-only: an audit's rows all have one length, so the table is made once)."""
    p = np.arange(per_row + 1) / per_row
    terms = np.zeros(per_row + 1)
    terms[1:] = p[1:] * np.log2(p[1:])
    terms.setflags(write=False)
    return terms


def _alpha_bin(x01: np.ndarray) -> np.ndarray:
    """The α bin ``min(floor(v · 1000), 999)`` of each value in [0, 1], evaluated in float64."""
    bins = np.multiply(x01, float(ALPHA_BINS), dtype=np.float64).astype(np.intp)
    return np.minimum(bins, ALPHA_BINS - 1, out=bins)


def input_entropy(x01: np.ndarray) -> np.ndarray:
    """α per sample: entropy in bits of a 1000-bin histogram of its values over [0, 1] (SPEC §4).

    ``x01`` is ``(B, D)`` with values in [0, 1] (see ``alpha_scale``); NaN or values outside
    raise ``ValueError``. A value v falls in bin ``min(floor(v · 1000), 999)``, so 1.0 lands in
    the last bin. Returns ``(B,)`` float64.
    """
    v = np.asarray(x01)
    if v.ndim != 2 or v.shape[1] == 0:
        raise ValueError(f"input entropy needs a (samples, values) array with values, got shape {v.shape}")
    if v.size and not (v.min() >= 0.0 and v.max() <= 1.0):  # also false for NaN
        raise ValueError("input entropy needs finite values in [0, 1]; scale and clip them with alpha_scale")
    return _entropy_by_blocks(v, ALPHA_BINS, _alpha_bin)


def input_entropy_uint8(x: np.ndarray) -> np.ndarray:
    """α per sample for uint8 data with range 0–255, without floats (SPEC §4).

    Every byte value v lies in its own α bin ``floor(v / 255 · 1000)`` (bins are ≈3.92 apart, and
    ascend with v), so the histogram over the 256 byte values has the same non-empty counts, in
    the same order, as the 1000-bin histogram: the result equals
    ``input_entropy(alpha_scale(x, (0, 255))[0])`` bit for bit. ``x`` is ``(B, ...)`` uint8.
    """
    v = np.asarray(x)
    if v.dtype != np.uint8:
        raise ValueError(f"input_entropy_uint8 needs uint8 samples, got {v.dtype}")
    v = v.reshape(v.shape[0], math.prod(v.shape[1:]))
    if v.shape[1] == 0:
        raise ValueError(f"input entropy needs samples with values, got shape {np.shape(x)}")
    return _entropy_by_blocks(v, 256, lambda block: block.astype(np.intp))


def slopes(phi: np.ndarray) -> np.ndarray:
    """β per sample: least-squares slope of the layer sums φ_ℓ against ℓ = 1..L (SPEC §4).

    ``phi`` is ``(B, L)`` with layers in depth order; returns ``(B,)`` float64, computed in
    closed form as ``φ · (ℓ - mean ℓ) / Σ (ℓ - mean ℓ)²``. A slope needs L >= 2; with fewer
    layers this raises ``ValueError`` and the caller reports CNA as absent.
    """
    phi = np.asarray(phi, dtype=np.float64)
    if phi.ndim != 2:
        raise ValueError(f"slopes need a (samples, layers) array, got shape {phi.shape}")
    layers = phi.shape[1]
    if layers < 2:
        raise ValueError(f"a slope over depth needs at least 2 layers, got {layers}")
    centred = np.arange(1, layers + 1, dtype=np.float64) - (layers + 1) / 2
    return phi @ centred / (centred @ centred)


def pearson(a: np.ndarray, b: np.ndarray) -> tuple[float | None, str | None]:
    """CNA: Pearson correlation of α (``a``) and β (``b``) over a split (SPEC §4).

    Returns ``(r, None)``, or ``(None, reason)`` when there are fewer than 2 points, a value is
    not finite, or either vector has zero variance; ``reason`` is one sentence for the report.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"α and β need one value per sample, got {a.size} and {b.size}")
    if a.size < 2:
        return None, f"CNA needs at least 2 samples, the split has {a.size}"
    centred = []
    for v, name in ((a, "input entropy α"), (b, "slope β")):
        if not np.all(np.isfinite(v)):
            return None, f"{name} has non-finite values over the split"
        if v.max() == v.min():
            return None, f"{name} has zero variance over the split"
        v = v / np.abs(v).max()  # r is scale-free; this keeps the squares from under/overflowing
        centred.append(v - v.mean())
    da, db = centred
    r = (da @ db) / math.sqrt((da @ da) * (db @ db))
    return float(np.clip(r, -1.0, 1.0)), None


# --- §5 CNA-Margin -------------------------------------------------------------------------------


def _smoothed_curve(alpha: np.ndarray, beta: np.ndarray, window: int, split: str) -> tuple[np.ndarray, np.ndarray]:
    """A split's (α, β) points sorted stably by α, each smoothed by a full-window running mean (SPEC §5.1)."""
    alpha = np.asarray(alpha, dtype=np.float64).ravel()
    beta = np.asarray(beta, dtype=np.float64).ravel()
    if alpha.shape != beta.shape:
        raise ValueError(f"{split} split: α and β need one value per sample, got {alpha.size}, {beta.size}")
    if alpha.size < window:
        raise ValueError(f"{split} split has {alpha.size} samples; its slope-entropy curve needs {window}")
    if not (np.all(np.isfinite(alpha)) and np.all(np.isfinite(beta))):
        raise ValueError(f"{split} split has non-finite α or β values")
    order = np.argsort(alpha, kind="stable")
    kernel = np.ones(window) / window
    smooth_alpha = np.convolve(alpha[order], kernel, mode="valid")
    # np.interp needs non-decreasing α; a running mean of sorted values is, but summation order
    # inside convolve is not ours to promise, so make it hold exactly.
    np.maximum.accumulate(smooth_alpha, out=smooth_alpha)
    return smooth_alpha, np.convolve(beta[order], kernel, mode="valid")


def _joint_minmax(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both arrays min–max normalised by one joint min and max (SPEC §5.1 step 3); all 0 when flat."""
    lo = min(first.min(), second.min())
    span = max(first.max(), second.max()) - lo
    if span == 0:
        return np.zeros_like(first), np.zeros_like(second)
    return (first - lo) / span, (second - lo) / span


def slope_entropy_curves(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    window: int = 25,
    points: int = 100,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The train and test slope-entropy curves resampled on one shared α grid (SPEC §5.1).

    ``train`` and ``test`` are ``(α, β)`` per sample. Each split is sorted stably by α and
    smoothed with a running mean over ``window`` points (n points give n − window + 1), then α
    and β are each min–max normalised jointly over both splits, and both curves are linearly
    interpolated at ``points`` evenly spaced α values over the range they share. Where several
    points share one α, ``np.interp`` takes the last of them in sort order.
    Returns ``(grid, β_train, β_test)``. Raises ``ValueError`` when a split has fewer than
    ``window`` points or the curves share no α range of positive width.
    """
    if window < 1 or points < 2:
        raise ValueError(f"window must be >= 1 and points >= 2, got window={window}, points={points}")
    alpha_train, beta_train = _smoothed_curve(*train, window, "train")
    alpha_test, beta_test = _smoothed_curve(*test, window, "test")
    alpha_train, alpha_test = _joint_minmax(alpha_train, alpha_test)
    beta_train, beta_test = _joint_minmax(beta_train, beta_test)
    lo = max(alpha_train[0], alpha_test[0])
    hi = min(alpha_train[-1], alpha_test[-1])
    if not lo < hi:
        raise ValueError(
            f"the train and test slope-entropy curves share no α range (normalised train α "
            f"{alpha_train[0]:.4g}–{alpha_train[-1]:.4g}, test α {alpha_test[0]:.4g}–{alpha_test[-1]:.4g})"
        )
    grid = np.linspace(lo, hi, points)
    return grid, np.interp(grid, alpha_train, beta_train), np.interp(grid, alpha_test, beta_test)


def cna_area(
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    window: int = 25,
    points: int = 100,
) -> float:
    """CNA_A: area between the train and test slope-entropy curves, ``∫ |β_train − β_test| dα`` (SPEC §5.2).

    Trapezoid rule on the shared grid of ``slope_entropy_curves``. Unlike the official code's
    signed polygon area, lobes on either side of a crossing add up instead of cancelling.
    """
    return curve_area(*slope_entropy_curves(train, test, window, points))


def curve_area(grid: np.ndarray, beta_train: np.ndarray, beta_test: np.ndarray) -> float:
    """``∫ |β_train − β_test| dα`` over ``grid`` by the trapezoid rule (SPEC §5.2)."""
    return float(np.trapezoid(np.abs(beta_train - beta_test), grid))


def _margins(scores: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """``s[y] − max_{j≠y} s[j]`` per row of ``(B, C)`` scores."""
    scores = np.asarray(scores, dtype=np.float64)
    labels = np.asarray(labels).ravel()
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"margins need (samples, classes >= 2) outputs, got shape {scores.shape}")
    if labels.shape != (scores.shape[0],):
        raise ValueError(f"margins need one label per sample, got {labels.size} for {scores.shape[0]}")
    if labels.size and (labels.min() < 0 or labels.max() >= scores.shape[1]):
        raise ValueError(f"labels must lie in 0..{scores.shape[1] - 1}")
    rows = np.arange(scores.shape[0])
    true = scores[rows, labels]
    others = scores.copy()
    others[rows, labels] = -np.inf
    return true - others.max(axis=1)


def probability_margins(outputs: np.ndarray, labels: np.ndarray, already_probabilities: bool) -> np.ndarray:
    """γ = f(x)[y] − max_{j≠y} f(x)[j] on softmax probabilities, per sample (SPEC §5.3).

    ``outputs`` is ``(B, C)``. Softmax (numerically stable) is applied "only if the output is
    not already a probability vector": to no row when ``already_probabilities`` (the graph ends
    in Softmax), else to every row that is not already non-negative and summing to 1 (± 1e-4),
    which catches probability outputs built from Exp/ReduceSum/Div.
    """
    scores = np.asarray(outputs, dtype=np.float64)
    if not already_probabilities:
        is_probability = (scores >= 0).all(axis=-1) & (np.abs(scores.sum(axis=-1) - 1) <= 1e-4)
        logits = scores[~is_probability]
        softmax = np.exp(logits - logits.max(axis=-1, keepdims=True))
        scores = scores.copy()
        scores[~is_probability] = softmax / softmax.sum(axis=-1, keepdims=True)
    return _margins(scores, labels)


def logit_margins(logits: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Logit margin ``z[y] − max_{j≠y} z[j]`` per sample, on the output layer before Softmax (SPEC §5.3)."""
    return _margins(logits, labels)


def margin_p5(logit_margins: np.ndarray) -> float:
    """``margin_p5``: numpy's default (linear) 5th percentile of the training logit margins (SPEC §5.3)."""
    m = np.asarray(logit_margins, dtype=np.float64)
    if m.size == 0:
        raise ValueError("margin_p5 needs at least one logit margin")
    return float(np.percentile(m, 5))


def sample_uniforms(sample_index: np.ndarray, seed: int) -> np.ndarray:
    """A seeded uniform draw in [0, 1) per sample, from its global position in the split alone.

    ``u_i`` is the top 53 bits of the (i+1)-th output of a splitmix64 generator seeded with
    ``seed``, so the draws are the same however the data is batched or split across workers.
    ``sample_index`` is a 1-D array of positions (>= 0); returns float64 of the same shape.
    """
    index = np.asarray(sample_index)
    if index.ndim != 1 or not np.issubdtype(index.dtype, np.integer):
        raise ValueError(f"sample_index must be a 1-D integer array, got {index.dtype} of shape {index.shape}")
    if index.size and index.min() < 0:
        raise ValueError("sample positions must be >= 0")
    z = (index.astype(_U64) + _U64(1)) * _GOLDEN + _U64(seed % 2**64)
    z = (z ^ (z >> _U64(30))) * _MIX1
    z = (z ^ (z >> _U64(27))) * _MIX2
    z ^= z >> _U64(31)
    return (z >> _U64(11)) * 2.0**-53


def margin_max(margins: np.ndarray, uniforms: np.ndarray, fraction: float) -> float:
    """``margin_max``: the largest γ over a seeded random ``fraction`` of the training points (SPEC §5.3).

    The points are the ``max(1, round(fraction · n))`` with the smallest ``sample_uniforms``
    (ties, which need equal 53-bit draws, go to the earlier point): exactly that many, and the
    same ones whatever the batching.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"margin fraction must be in (0, 1], got {fraction}")
    gamma, u = np.asarray(margins, dtype=np.float64), np.asarray(uniforms)
    if gamma.size == 0 or gamma.shape != u.shape:
        raise ValueError(f"margin_max needs one uniform per margin and at least one, got {gamma.size} and {u.size}")
    chosen = np.argsort(u, kind="stable")[: max(1, round(fraction * gamma.size))]
    return float(gamma[chosen].max())
