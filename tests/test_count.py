"""Exact state counting (SPEC §2), pinned against a slow reference.

The reference takes the raw pre-activation tensor from onnxruntime, makes one row of firing bits
per (sample, position), and counts whole rows with ``np.unique(axis=0)``. The auditor's in-graph
packing, key joining, stores and counters must give exactly the same sorted count vector; the
stores and key joining have their own tests (test_stores.py, test_keys.py).
"""

from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx
import pytest
from models import CASES, NEURONS, POSITIONS, Net, conv_case, pack, reference_counts, reference_entropy, run, state_rows

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Batch
from auditor.engine import count, metrics
from auditor.engine.count import CountOfCounts, LayerCounter
from auditor.engine.expose import word_groups
from auditor.engine.stores import MemoryBudget
from auditor.errors import CancelledError

HUGE = 1 << 40  # a budget that never fills


@pytest.mark.parametrize("layout", CASES)
@pytest.mark.parametrize("neurons", NEURONS)
def test_audit_counts_match_the_reference(neurons: int, layout: str) -> None:
    """Report figures and the exact sorted count vector, for every word/group boundary."""
    model, x, axis = CASES[layout](neurons)
    (pre,) = run(model, x, ["pre"])
    expected = reference_counts(pre, axis)
    assert len(expected) > 1 and expected.max() > 1  # repeats and variety: the comparison has teeth

    prepared = prepare(model)
    (layer,) = prepared.structure.layers
    assert (layer.name, layer.neurons) == ("pre", neurons)
    cut = len(x) // 3 + 1  # two uneven batches: counts must merge across them
    report = audit(prepared, [("test", Batch(x[:cut])), ("test", Batch(x[cut:]))])
    (stats,) = report.splits["test"].layers
    positions = math.prod(POSITIONS) if layout == "conv" else 1
    entropy = reference_entropy(expected)
    assert stats.neurons == neurons and stats.positions == positions
    assert stats.states_total == len(x) * positions == expected.sum()
    assert stats.states_distinct == len(expected)
    assert stats.entropy_bits == pytest.approx(entropy, rel=1e-12, abs=1e-12)
    assert stats.efficiency == pytest.approx(entropy / neurons, rel=1e-12, abs=1e-12)
    assert stats.max_entropy_bits == pytest.approx(math.log2(expected.sum()))

    # The same packed keys through LayerCounter, to compare whole count vectors exactly.
    (out,) = prepared.exposed.layers
    counter = LayerCounter(neurons, out.groups, out.group_axis)
    for part in (x[:cut], x[cut:]):
        counter.add(prepared.runner.run(part, [out.keys])[out.keys])
    assert counter.total == expected.sum()
    np.testing.assert_array_equal(np.sort(counter.counts()), expected)


def test_general_position_gemm_matches_the_reference() -> None:
    """Random (not near-identity) weights and biases over two layers of 33 and 70 neurons."""
    net = Net(("batch", 5), seed=3)
    h1 = net.dense(net.input, 5, 33, out="h1")
    h2 = net.dense(net.op("Tanh", h1), 33, 70, out="h2")
    model = net.build(net.dense(net.op("Elu", h2), 70, 4, out="logits"))
    rng = np.random.default_rng(3)
    x = rng.standard_normal((40, 5)).astype(np.float32)[rng.integers(40, size=500)]
    tensors = run(model, x, ["h1", "h2"])
    stats = audit(model, [("test", Batch(x[:200])), ("test", Batch(x[200:]))]).splits["test"].layers
    assert [s.name for s in stats] == ["h1", "h2"]
    for layer, tensor in zip(stats, tensors, strict=True):
        expected = reference_counts(tensor, 1)
        assert (layer.states_total, layer.states_distinct) == (500, len(expected))
        assert layer.entropy_bits == pytest.approx(reference_entropy(expected), rel=1e-12)


# --- Cases worked out by hand ----------------------------------------------------------------


def identity_model() -> onnx.ModelProto:
    """``Gemm(I₂) → Relu``: the firing bits are the signs of the input itself."""
    net = Net(("batch", 2))
    pre = net.dense(net.input, 2, 2, weight=np.eye(2, dtype=np.float32), bias=False, out="pre")
    return net.build(net.op("Relu", pre))


def test_four_equally_likely_states_give_two_bits() -> None:
    x = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]], np.float32)
    y = np.array([0, 0, 1, 0])  # argmax of the Relu output; ties go to class 0
    split = audit(identity_model(), [("test", Batch(x, y))]).splits["test"]
    (layer,) = split.layers
    assert (layer.states_total, layer.states_distinct) == (4, 4)
    assert layer.entropy_bits == pytest.approx(2.0)
    assert layer.efficiency == pytest.approx(1.0)
    assert layer.max_entropy_bits == pytest.approx(2.0)
    assert split.network_efficiency == pytest.approx(1.0)
    assert split.accuracy == 1.0
    assert split.aiq == pytest.approx(1.0)


def test_one_state_gives_zero_entropy() -> None:
    x = np.array([[1, 1]] * 4, np.float32)
    split = audit(identity_model(), [("test", Batch(x, np.array([0, 1, 1, 1])))]).splits["test"]
    (layer,) = split.layers
    assert (layer.states_total, layer.states_distinct) == (4, 1)
    assert layer.entropy_bits == 0.0
    assert layer.efficiency == 0.0
    assert split.network_efficiency == 0.0
    assert split.accuracy == pytest.approx(0.25)
    assert split.aiq == 0.0


def test_zero_pre_activation_does_not_fire() -> None:
    """SPEC §2: a neuron fires when its pre-activation is > 0; exactly 0 is not firing."""
    x = np.array([[0, 0], [0, 1], [1e-30, 0], [-0.0, 0]], np.float32)
    (layer,) = audit(identity_model(), [("test", Batch(x))]).splits["test"].layers
    assert (layer.states_total, layer.states_distinct) == (4, 3)  # 00, 01 (twice: 00 again), 10
    assert layer.entropy_bits == pytest.approx(1.5)


# --- Batching never changes the result ---------------------------------------------------------


def two_layer_cnn() -> onnx.ModelProto:
    net = Net(("batch", 2, 5, 5), seed=5)
    r1 = net.op("Relu", net.conv(net.input, 2, 5))
    r2 = net.op("Relu", net.dense(net.op("Flatten", r1), 125, 30))
    return net.build(net.dense(r2, 30, 3, out="logits"))


@pytest.fixture(scope="module")
def batch_reports() -> dict[int, dict]:
    model = two_layer_cnn()
    prepared = prepare(model)
    rng = np.random.default_rng(6)
    x = rng.standard_normal((120, 2, 5, 5)).astype(np.float32)
    y = rng.integers(0, 3, 120)
    reports = {}
    for size in (1, 7, 256):
        batches = [("test", Batch(x[i : i + size], y[i : i + size])) for i in range(0, len(x), size)]
        reports[size] = audit(prepared, batches).to_dict()["splits"]
    return reports


def test_batch_size_does_not_change_counts_or_metrics(batch_reports: dict[int, dict]) -> None:
    """Batches of 1, 7 and 256: every layer figure, accuracy, η_N and aIQ are bit-identical (SPEC §2)."""
    without_cna = {  # CNA's per-sample sums may move by float rounding with the batch size
        size: {**splits["test"], "cna": None, "cna_points": None} for size, splits in batch_reports.items()
    }
    assert without_cna[1] == without_cna[7] == without_cna[256]
    split = batch_reports[256]["test"]
    assert [layer["states_total"] for layer in split["layers"]] == [120 * 25, 120]
    cna = [batch_reports[size]["test"]["cna"] for size in (1, 7, 256)]
    assert None not in cna
    assert cna[0] == pytest.approx(cna[2], rel=1e-6) and cna[1] == pytest.approx(cna[2], rel=1e-6)


# --- Whole audits under a budget -----------------------------------------------------------------


@pytest.mark.parametrize("neurons", [16, 21, 130])
def test_an_audit_that_spills_everything_equals_one_that_spills_nothing(tmp_path, neurons: int) -> None:
    """A one-byte budget: every layer (narrow, one-word, multi-word) spills at every batch. The
    report's splits are bit-identical to the default budget's, and match the np.unique reference."""
    model, x, axis = conv_case(neurons)
    (pre,) = run(model, x, ["pre"])
    expected = reference_counts(pre, axis)
    prepared = prepare(model)
    batches = [("test", Batch(x[i : i + 8])) for i in range(0, len(x), 8)]
    held = audit(prepared, batches, AuditConfig(batch_size=8))
    spilled = audit(prepared, batches, AuditConfig(batch_size=8, memory_budget=1), spill_dir=tmp_path)
    assert held.spilled_bytes == 0 < spilled.spilled_bytes
    assert spilled.to_dict()["splits"] == held.to_dict()["splits"]
    (layer,) = spilled.splits["test"].layers
    assert (layer.states_total, layer.states_distinct) == (expected.sum(), len(expected))
    assert layer.entropy_bits == pytest.approx(reference_entropy(expected), rel=1e-12)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("how", ["error", "ctrl-c", "cancelled"])
def test_an_interrupted_audit_leaves_no_spill_files(tmp_path, how: str) -> None:
    """The data source fails, Ctrl-C arrives, or the caller cancels, after spill files exist."""
    model, x, _ = conv_case(40)
    seen: list[int] = []

    def batches():
        for start in range(0, len(x), 10):
            if start == 40 and how == "error":
                raise RuntimeError("the data source failed")
            if start == 40 and how == "ctrl-c":
                raise KeyboardInterrupt
            yield "test", Batch(x[start : start + 10])

    def progress(split: str, done: int) -> None:
        seen.append(len(list(tmp_path.rglob("*.run"))))

    expected = {"error": RuntimeError, "ctrl-c": KeyboardInterrupt, "cancelled": CancelledError}[how]
    with pytest.raises(expected):
        audit(
            model,
            batches(),
            AuditConfig(batch_size=10, memory_budget=1),
            spill_dir=tmp_path,
            progress=progress,
            cancelled=lambda: how == "cancelled" and len(seen) >= 3,
        )
    assert seen and seen[-1] > 0  # spill files existed when the audit was stopped
    assert not list(tmp_path.iterdir())


# --- LayerCounter: packed groups in, figures out -------------------------------------------------


def layer_bits(neurons: int, seed: int, samples: int = 120) -> np.ndarray:
    """(samples, neurons, 2, 3) firing bits drawn from a small pattern pool, so states repeat unevenly."""
    rng = np.random.default_rng(seed)
    pool = rng.random((25, neurons)) < 0.5
    pick = (rng.random((samples, 2, 3)) ** 2 * len(pool)).astype(int)
    return np.moveaxis(pool[pick], -1, 1)


def packed_batches(bits: np.ndarray, pieces: int = 4) -> tuple[list[np.ndarray], list[tuple[int, int]], int]:
    groups = word_groups(bits.shape[1])
    packed, axis = pack(bits, 1, groups, "nchw")
    return np.array_split(packed, pieces), groups, axis


@pytest.mark.parametrize("neurons", NEURONS)
def test_counter_summary_matches_the_reference_whether_held_or_spilled(tmp_path, neurons: int) -> None:
    """Narrow (dense), ≤ 64-bit and multi-word layers: exact figures, and bit-identical entropy
    whether nothing spills or everything does."""
    bits = layer_bits(neurons, seed=neurons)
    want = np.unique(state_rows(bits, 1), axis=0, return_counts=True)[1]
    batches, groups, axis = packed_batches(bits)
    summaries = []
    for limit in (HUGE, 1):
        with MemoryBudget(limit, tmp_path) as budget:
            counter = LayerCounter(neurons, groups, axis, budget)
            for batch in batches:
                counter.add(batch)
            summaries.append(counter.summary(top_k=7))
            assert (budget.spilled_bytes > 0) == (limit == 1)
    held, spilled = summaries
    for summary in summaries:
        assert summary.total == want.sum() == bits.shape[0] * 6
        assert summary.distinct == len(want)
        np.testing.assert_array_equal(summary.top_counts, np.sort(want)[::-1][:7])
        np.testing.assert_array_equal(summary.count_quantiles, np.quantile(want, count.QUANTILES))
        assert summary.entropy_bits == pytest.approx(reference_entropy(want), rel=1e-12, abs=1e-15)
    assert held.entropy_bits == spilled.entropy_bits  # bit for bit
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("neurons", [16, 40, 130])
def test_counters_of_shards_merge_to_a_single_pass(tmp_path, neurons: int) -> None:
    """Ray shards: three counters, each in its own tiny budget (all spilled), merged into a fourth,
    equal one counter that saw everything."""
    bits = layer_bits(neurons, seed=100 + neurons, samples=300)
    batches, groups, axis = packed_batches(bits, pieces=6)
    with MemoryBudget(HUGE) as whole_budget:
        whole = LayerCounter(neurons, groups, axis, whole_budget)
        for batch in batches:
            whole.add(batch)
        want = whole.summary()
        with contextlib.ExitStack() as stack:
            shards = []
            for part in (batches[:1], batches[1:4], batches[4:]):
                budget = stack.enter_context(MemoryBudget(1, tmp_path))
                shard = LayerCounter(neurons, groups, axis, budget)
                for batch in part:
                    shard.add(batch)
                shards.append(shard)
            driver = LayerCounter(neurons, groups, axis, stack.enter_context(MemoryBudget(1, tmp_path)))
            for shard in shards:
                driver.merge(shard)
            got = driver.summary()
    assert (got.total, got.distinct, got.entropy_bits) == (want.total, want.distinct, want.entropy_bits)
    np.testing.assert_array_equal(got.top_counts, want.top_counts)
    np.testing.assert_array_equal(got.count_quantiles, want.count_quantiles)
    assert not list(tmp_path.iterdir())


def test_counter_refuses_to_merge_another_layer() -> None:
    with MemoryBudget(HUGE) as budget:
        a = LayerCounter(30, word_groups(30), -1, budget)
        with pytest.raises(ValueError, match="30"):
            a.merge(LayerCounter(31, word_groups(31), -1, budget))


# --- Summaries from a count of counts ------------------------------------------------------------


def test_summary_of_hand_worked_cases() -> None:
    four = CountOfCounts.of(np.array([3, 3, 3, 3])).summary()
    assert (four.total, four.distinct, four.entropy_bits) == (12, 4, 2.0)
    one = CountOfCounts.of(np.array([9])).summary()
    assert (one.total, one.distinct, one.entropy_bits) == (9, 1, 0.0)
    np.testing.assert_array_equal(one.top_counts, [9])
    np.testing.assert_array_equal(one.count_quantiles, [9, 9, 9, 9, 9])
    skewed = CountOfCounts.of(np.array([1, 1, 2])).summary(top_k=2)  # p = 1/4, 1/4, 1/2
    assert skewed.entropy_bits == 1.5
    np.testing.assert_array_equal(skewed.top_counts, [2, 1])
    with pytest.raises(ValueError):
        CountOfCounts.of(np.zeros(0, np.int64)).summary()


@pytest.mark.parametrize("seed", range(6))
def test_summary_matches_numpy_on_random_counts(seed: int) -> None:
    """Quantiles equal numpy.quantile's bit for bit, top counts equal a full sort, entropy agrees
    with the direct −Σ p log2 p (and metrics.entropy_bits) to rounding."""
    rng = np.random.default_rng(seed)
    counts = (rng.pareto(1.0 + seed / 3, size=int(rng.integers(1, 3000))) + 1).astype(np.int64)
    summary = CountOfCounts.of(rng.permutation(counts)).summary(top_k=50)
    assert summary.total == counts.sum() and summary.distinct == len(counts)
    np.testing.assert_array_equal(summary.top_counts, np.sort(counts)[::-1][:50])
    np.testing.assert_array_equal(summary.count_quantiles, np.quantile(counts, count.QUANTILES))
    assert summary.entropy_bits == pytest.approx(reference_entropy(counts), rel=1e-13, abs=1e-15)
    assert summary.entropy_bits == pytest.approx(metrics.entropy_bits(counts), rel=1e-13, abs=1e-15)


def test_counts_of_counts_of_disjoint_states_add() -> None:
    a, b = np.array([1, 1, 4, 9]), np.array([4, 2, 1])
    added = CountOfCounts.sum([CountOfCounts.of(a), CountOfCounts.of(b)])
    whole = CountOfCounts.of(np.concatenate([a, b]))
    np.testing.assert_array_equal(added.values, whole.values)
    np.testing.assert_array_equal(added.states, whole.states)
    assert added.total == whole.total == 22
