"""Exact state counting (SPEC §2), pinned against a slow reference.

The reference takes the raw pre-activation tensor from onnxruntime, makes one row of firing bits
per (sample, position), and counts whole rows with ``np.unique(axis=0)``. The auditor's in-graph
packing, key joining and stores must give exactly the same sorted count vector.
"""

from __future__ import annotations

import contextlib
import gc
import math
import resource
import signal
import subprocess
import sys

import numpy as np
import onnx
import pytest
from models import Net, reference_counts, reference_entropy, run, state_rows

from auditor import AuditConfig, audit, count, metrics, prepare
from auditor.count import (
    HistogramStore,
    LayerCounter,
    MemoryBudget,
    RunStore,
    add_histograms,
    count_of_counts,
    join_groups,
    make_store,
    summarize,
)
from auditor.data import Batch
from auditor.errors import AuditError, CancelledError, LimitError
from auditor.graph import byte_groups, word_groups

NEURONS = [1, 3, 16, 20, 21, 24, 25, 32, 33, 64, 65, 130]
POSITIONS = (3, 3)  # the conv layout's H × W


# --- Models whose firing bits the data controls ------------------------------------------------


def patterns(neurons: int, rng: np.random.Generator, count: int = 40) -> np.ndarray:
    """Sign patterns with magnitudes in [0.5, 1.5], plus near twins that differ in one bit.

    The twins differ at the bits where packing could go wrong: the top of a 24-bit group, word
    boundaries 63/64, and the last neuron. A counter that loses any group merges twins.
    """
    signs = rng.choice([-1.0, 1.0], size=(count, neurons))
    twins = []
    for bit in sorted({0, 23, 24, 47, 48, 63, 64, 127, 128, neurons - 1}):
        if bit < neurons:
            twin = signs[rng.integers(count)].copy()
            twin[bit] *= -1
            twins.append(twin)
    signs = np.vstack([signs, *twins])
    return (signs * rng.uniform(0.5, 1.5, signs.shape)).astype(np.float32)


def near_identity(net: Net, neurons: int) -> np.ndarray:
    """Random positive diagonal plus off-diagonal noise too small to flip a sign of the data."""
    weight = np.diag(net.rng.uniform(0.8, 1.2, neurons)) + net.rng.uniform(-5e-4, 5e-4, (neurons, neurons))
    return weight.astype(np.float32)


def dense_case(neurons: int, samples: int = 300, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """``Gemm(near-identity) → Relu`` on (B, N) data drawn with repeats from a pattern pool."""
    net = Net(("batch", neurons), seed=seed)
    pre = net.dense(net.input, neurons, neurons, weight=near_identity(net, neurons), bias=False, out="pre")
    model = net.build(net.op("Relu", pre))
    pool = patterns(neurons, net.rng)
    x = pool[net.rng.integers(len(pool), size=samples)]
    return model, x, 1


def conv_case(neurons: int, samples: int = 60, seed: int = 0) -> tuple[onnx.ModelProto, np.ndarray, int]:
    """``Conv 1×1(near-identity) → Relu`` on (B, N, H, W) data; each position draws a pattern."""
    net = Net(("batch", neurons, *POSITIONS), seed=seed)
    kernel = near_identity(net, neurons).T.reshape(neurons, neurons, 1, 1)
    pre = net.op("Conv", net.input, net.const(kernel), out="pre")
    model = net.build(net.op("Relu", pre))
    pool = patterns(neurons, net.rng)
    x = pool[net.rng.integers(len(pool), size=(samples, *POSITIONS))]  # (B, H, W, N)
    return model, np.ascontiguousarray(np.moveaxis(x, -1, 1)), 1


CASES = {"dense": dense_case, "conv": conv_case}


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


# --- Stores ------------------------------------------------------------------------------------
#
# Every store is run three ways: a dense histogram, runs held in memory (a budget that never
# fills) and runs that all spill (a budget of one byte: every add folds, spills and is merged
# back from files). All must give np.unique's counts exactly.

HUGE = 1 << 40  # a budget that never fills


STORES = {
    "histogram": lambda budget: HistogramStore(12),
    "held": lambda budget: RunStore(1, budget),
    "spilled": lambda budget: RunStore(1, budget),
}
LIMITS = {"histogram": HUGE, "held": HUGE, "spilled": 1}


@pytest.fixture
def make(tmp_path):
    """``make(kind, words=1)``: a store of that kind in its own budget, spilling under ``tmp_path``."""
    budgets: list[MemoryBudget] = []

    def build(kind: str, words: int = 1):
        budget = MemoryBudget(LIMITS[kind], tmp_path)
        budgets.append(budget)
        return STORES[kind](budget) if words == 1 else RunStore(words, budget)

    yield build
    for budget in budgets:
        budget.close()
    assert not list(tmp_path.iterdir())  # closing removed every spill file and folder


def feed(store, *pieces: np.ndarray) -> None:
    for piece in pieces:
        store.add(piece)


def items(store) -> tuple[np.ndarray, np.ndarray]:
    """A store's distinct keys (heads, or rows of words) and counts, sorted as np.unique sorts."""
    runs = list(store.merged())
    record = runs[0].dtype if runs else count.record_dtype(1)
    merged = np.concatenate(runs) if runs else np.zeros(0, record)
    keys = merged["words"] if "words" in record.names else merged["head"]
    order = np.lexsort(keys.T[::-1]) if keys.ndim == 2 else np.argsort(keys, kind="stable")
    return keys[order], merged["count"][order]


def reference(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys (rows when 2-D) in sorted order with their counts."""
    return np.unique(keys, axis=0 if keys.ndim == 2 else None, return_counts=True)


def assert_same(store, keys: np.ndarray) -> None:
    got_keys, got_counts = items(store)
    want_keys, want_counts = reference(keys)
    np.testing.assert_array_equal(got_keys, want_keys.astype(got_keys.dtype))
    np.testing.assert_array_equal(got_counts, want_counts)
    assert got_counts.sum() == len(keys)


def some_keys(seed: int = 0, n: int = 5000) -> np.ndarray:
    """int32 keys below 2**12, as packed layer outputs come, skewed so counts differ."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 4096, n) * rng.random(n) ** 3).astype(np.int32)


def wide_keys(seed: int = 0, n: int = 4000, words: int = 3) -> np.ndarray:
    """Rows of uint64 words with many repeats, including rows that differ only in one word."""
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 2**64 - 1, size=(30, words), dtype=np.uint64, endpoint=True)
    twins = base[:10].copy()
    twins[:, -1] ^= np.uint64(1 << 63)
    twins2 = base[10:20].copy()
    twins2[:, 0] ^= np.uint64(1)
    pool = np.vstack([base, twins, twins2])
    return pool[rng.integers(len(pool), size=n)]


@pytest.mark.parametrize("kind", STORES)
def test_store_adds_in_pieces_like_at_once(make, kind: str) -> None:
    keys = some_keys()
    whole = make(kind)
    feed(whole, keys)
    assert_same(whole, keys)
    pieces = make(kind)
    feed(pieces, *np.array_split(keys, [1, 2, 700, 701, 3000]))
    assert_same(pieces, keys)
    if kind == "spilled":
        assert pieces.spilled and not pieces.runs  # the comparison above read everything back from files


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_adds_counts(make, kind: str) -> None:
    """SPEC §2: counts from workers merge by adding, equal to one store fed everything."""
    keys = some_keys(1)
    workers = []
    for part in np.array_split(keys, [1200, 3100]):
        worker = make(kind)
        feed(worker, part)
        workers.append(worker)
    total = make(kind)
    for worker in workers:
        total.merge(worker)
    assert_same(total, keys)
    workers[0].merge(workers[1])
    workers[0].merge(workers[2])
    assert_same(workers[0], keys)


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_of_empty_stores(make, kind: str) -> None:
    """A worker that saw no data merges as nothing, however often and in whatever order."""
    keys = some_keys(2)
    store = make(kind)
    store.merge(make(kind))
    store.merge(make(kind))
    feed(store, keys)
    store.merge(make(kind))
    assert_same(store, keys)


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_then_add_keeps_counting(make, kind: str) -> None:
    keys = some_keys(3)
    a, b = make(kind), make(kind)
    feed(a, keys[:100])
    feed(b, keys[100:2000])
    a.merge(b)
    feed(a, keys[2000:])
    assert_same(a, keys)


@pytest.mark.parametrize("kinds", [("histogram", "spilled"), ("spilled", "histogram"), ("held", "spilled")])
def test_stores_of_different_kinds_merge(make, kinds: tuple[str, str]) -> None:
    """Shards with different budgets may pick different stores for one layer; their counts still add."""
    keys = some_keys(4)
    a, b = make(kinds[0]), make(kinds[1])
    feed(a, keys[:2500])
    feed(b, keys[2500:])
    a.merge(b)
    assert_same(a, keys)


@pytest.mark.parametrize("kind", ["held", "spilled"])
def test_run_store_counts_multiword_rows_exactly(make, kind: str) -> None:
    keys = wide_keys()
    store = make(kind, words=3)
    for piece in np.array_split(keys, 7):
        feed(store, piece)
    assert_same(store, keys)
    assert len(items(store)[1]) == 50  # twins that differ in a single bit are distinct


@pytest.mark.parametrize("kind", ["held", "spilled"])
def test_run_store_merges_multiword_rows_and_empty_stores(make, kind: str) -> None:
    """An empty worker's store holds no rows; merging it must not break 2-D keys."""
    keys = wide_keys(1)
    a, b = make(kind, words=3), make(kind, words=3)
    a.merge(make(kind, words=3))
    feed(a, keys[:1500])
    feed(b, keys[1500:])
    a.merge(b)
    a.merge(make(kind, words=3))
    assert_same(a, keys)


@pytest.mark.parametrize("kind", ["held", "spilled"])
def test_hash_collisions_never_merge_different_rows(make, monkeypatch: pytest.MonkeyPatch, kind: str) -> None:
    """SPEC §2: equality is decided on whole keys. With a hash that collides all the time
    (two values for 50 rows), folding, merging and spilling must still count every row apart."""
    monkeypatch.setattr(count, "hash_rows", lambda rows: rows[:, -1] & np.uint64(1))
    keys = wide_keys(2)
    a, b = make(kind, words=3), make(kind, words=3)
    for piece in np.array_split(keys[:2000], 5):
        feed(a, piece)
    feed(b, keys[2000:])
    a.merge(b)
    assert_same(a, keys)


@pytest.mark.parametrize("spill", ["all", "some"])
@pytest.mark.parametrize("wide", [False, True], ids=["1-word", "3-words"])
def test_the_merge_reads_runs_in_bounded_ranges(
    tmp_path, monkeypatch: pytest.MonkeyPatch, wide: bool, spill: str
) -> None:
    """A merge step holds at most ``merge_rows`` records (40 here; more only if they share one
    head): the merge streams held and spilled runs range by range, in key order, exactly."""
    monkeypatch.setattr(count, "MERGE_ROWS_MIN", 40)
    rng = np.random.default_rng(5)
    pool = rng.integers(0, 2**64 - 1, size=(2000, 3 if wide else 1), dtype=np.uint64, endpoint=True)
    keys = pool[rng.integers(len(pool), size=6000)]
    keys = keys if wide else keys[:, 0]
    dtype = count.record_dtype(3 if wide else 1)
    with MemoryBudget(1 if spill == "all" else 32 * 40 * dtype.itemsize, tmp_path) as budget:
        assert budget.merge_rows(dtype) == 40
        store = RunStore(3 if wide else 1, budget)
        feed(store, *np.array_split(keys, 30))
        if spill == "some" and not store.runs:  # the last add spilled all; hold one more piece
            keys = np.concatenate([keys, keys[:100]])
            feed(store, keys[-100:])
        assert store.spilled and bool(store.runs) == (spill == "some")
        pieces = list(store.merged())
        assert len(pieces) > 3 and max(len(piece) for piece in pieces) <= 40
        heads = np.concatenate([piece["head"] for piece in pieces])
        assert np.all(heads[1:] > heads[:-1])  # ranges come in key order (and these heads never collide)
        assert_same(store, keys)


def test_too_many_spilled_runs_are_merged_into_one_file(make, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(count, "MAX_SPILLED_RUNS", 3)
    keys = some_keys(6)
    store = make("spilled")
    for piece in np.array_split(keys, 40):
        feed(store, piece)
        assert len(store.spilled) <= 4
    folder = next(store.budget.spill_dir.iterdir())
    assert len(list(folder.iterdir())) == len(store.spilled)  # merged-away files are deleted
    assert_same(store, keys)


def test_make_store_picks_dense_for_narrow_layers_when_the_budget_has_room(tmp_path) -> None:
    """Dense histograms of all layers share a quarter of the budget; layers past that get runs."""
    with MemoryBudget(HUGE) as roomy, MemoryBudget(4 << 20, tmp_path) as small:
        assert isinstance(make_store(1, roomy), HistogramStore)
        assert isinstance(make_store(count.HISTOGRAM_BITS, roomy), HistogramStore)
        assert isinstance(make_store(count.HISTOGRAM_BITS + 1, roomy), RunStore)
        assert isinstance(make_store(65, roomy), RunStore) and make_store(65, roomy).dtype["words"].shape == (2,)
        assert isinstance(make_store(17, small), HistogramStore)  # 1 MiB: a quarter of 4 MiB
        assert isinstance(make_store(16, small), RunStore)  # 512 KiB more would pass the quarter
        assert isinstance(make_store(1, small), RunStore)


@pytest.mark.parametrize("neurons", [1, 5, 20])
def test_histogram_store_covers_every_key_of_its_width(neurons: int) -> None:
    keys = np.array([0, (1 << neurons) - 1, (1 << neurons) - 1], np.int32)
    with MemoryBudget(HUGE) as budget:
        store = make_store(neurons, budget)
        feed(store, keys)
        assert_same(store, keys)


def test_the_budget_bounds_what_stores_hold(tmp_path) -> None:
    """After every add, all stores of one budget together hold at most three quarters of it."""
    limit = 64 << 10
    with MemoryBudget(limit, tmp_path) as budget:
        stores = [RunStore(1, budget), RunStore(3, budget)]
        narrow, wide = some_keys(7, n=40_000).astype(np.uint64), wide_keys(7, n=20_000)
        for a, b in zip(np.array_split(narrow, 50), np.array_split(wide, 50), strict=True):
            stores[0].add(a)
            stores[1].add(b)
            assert budget.held_bytes <= limit * 3 // 4
        assert budget.spilled_bytes > 0
        assert_same(stores[0], narrow)
        assert_same(stores[1], wide)


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
    four = summarize(*count_of_counts(np.array([3, 3, 3, 3])))
    assert (four.total, four.distinct, four.entropy_bits) == (12, 4, 2.0)
    one = summarize(*count_of_counts(np.array([9])))
    assert (one.total, one.distinct, one.entropy_bits) == (9, 1, 0.0)
    np.testing.assert_array_equal(one.top_counts, [9])
    np.testing.assert_array_equal(one.count_quantiles, [9, 9, 9, 9, 9])
    skewed = summarize(*count_of_counts(np.array([1, 1, 2])), top_k=2)  # p = 1/4, 1/4, 1/2
    assert skewed.entropy_bits == 1.5
    np.testing.assert_array_equal(skewed.top_counts, [2, 1])
    with pytest.raises(ValueError):
        summarize(*count_of_counts(np.zeros(0, np.int64)))


@pytest.mark.parametrize("seed", range(6))
def test_summary_matches_numpy_on_random_counts(seed: int) -> None:
    """Quantiles equal numpy.quantile's bit for bit, top counts equal a full sort, entropy agrees
    with the direct −Σ p log2 p (and metrics.entropy_bits) to rounding."""
    rng = np.random.default_rng(seed)
    counts = (rng.pareto(1.0 + seed / 3, size=int(rng.integers(1, 3000))) + 1).astype(np.int64)
    summary = summarize(*count_of_counts(rng.permutation(counts)), top_k=50)
    assert summary.total == counts.sum() and summary.distinct == len(counts)
    np.testing.assert_array_equal(summary.top_counts, np.sort(counts)[::-1][:50])
    np.testing.assert_array_equal(summary.count_quantiles, np.quantile(counts, count.QUANTILES))
    assert summary.entropy_bits == pytest.approx(reference_entropy(counts), rel=1e-13, abs=1e-15)
    assert summary.entropy_bits == pytest.approx(metrics.entropy_bits(counts), rel=1e-13, abs=1e-15)


def test_histograms_of_disjoint_states_add() -> None:
    a, b = np.array([1, 1, 4, 9]), np.array([4, 2, 1])
    np.testing.assert_array_equal(
        np.stack(add_histograms(count_of_counts(a), count_of_counts(b))),
        np.stack(count_of_counts(np.concatenate([a, b]))),
    )


# --- Budgets: sizes, spill folders, and cleaning up ----------------------------------------------


def spill_something(budget: MemoryBudget) -> RunStore:
    store = RunStore(1, budget)
    store.add(some_keys(8))
    store.spill()
    return store


@pytest.mark.parametrize(
    "interruption",
    [None, RuntimeError("mid-audit failure"), KeyboardInterrupt(), CancelledError("the audit was cancelled")],
    ids=["success", "error", "ctrl-c", "cancelled"],
)
def test_spill_files_are_removed_however_the_audit_ends(tmp_path, interruption: BaseException | None) -> None:
    seen = []
    with contextlib.suppress(type(interruption) if interruption else ()), MemoryBudget(1, tmp_path) as budget:
        store = spill_something(budget)
        store.add(some_keys(9))  # raised between adds, as an audit's loop would
        seen = list(tmp_path.rglob("*.run"))
        if interruption:
            raise interruption
    assert seen and budget.spilled_bytes > 0
    assert not list(tmp_path.iterdir())


def test_a_dropped_budget_removes_its_files(tmp_path) -> None:
    budget = MemoryBudget(1, tmp_path)
    spill_something(budget)
    assert list(tmp_path.iterdir())
    del budget
    gc.collect()  # store and budget refer to each other
    assert not list(tmp_path.iterdir())


CTRL_C_CHILD = """
import sys, time
import numpy as np
from auditor.count import MemoryBudget, RunStore
with MemoryBudget(1, sys.argv[1]) as budget:
    store = RunStore(1, budget)
    for i in range(100_000):
        store.add(np.arange(i, i + 500, dtype=np.uint64))
        if i == 3:
            print("spilling", flush=True)
        time.sleep(0.005)
"""


def test_ctrl_c_removes_spill_files(tmp_path) -> None:
    """A real SIGINT to a process that is spilling: it stops, and its spill folder is gone."""
    child = subprocess.Popen(
        [sys.executable, "-c", CTRL_C_CHILD, str(tmp_path)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert child.stdout.readline().strip() == "spilling"
        assert list(tmp_path.rglob("*.run"))
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert "KeyboardInterrupt" in err
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_an_unusable_spill_folder_is_refused_in_one_line(tmp_path, where: str) -> None:
    target = tmp_path / "spill"
    if where == "a file":
        target.write_text("not a folder")
    with pytest.raises(AuditError) as caught:
        MemoryBudget(1 << 30, target)
    message = caught.value.message
    assert "--spill-dir" in message and str(tmp_path) not in message and "\n" not in message


def test_a_full_spill_folder_is_refused_in_one_line_and_leaves_nothing(tmp_path) -> None:
    """A real write failure: the file-size limit (RLIMIT_FSIZE) makes writes past 64 KiB fail with EFBIG,
    as a full disk does with ENOSPC."""
    keys = np.arange(100_000, dtype=np.uint64)  # a 1.6 MB run
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    with MemoryBudget(1, tmp_path) as budget:
        store = RunStore(1, budget)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, hard))
        try:
            with pytest.raises(LimitError) as caught:
                store.add(keys)  # a budget of one byte spills at once
        finally:
            resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        assert not list(tmp_path.rglob("*.run"))  # the partial file is gone
    message = caught.value.message
    assert "full" in message and "--spill-dir" in message and str(tmp_path) not in message
    assert not list(tmp_path.iterdir())


# --- join_groups ---------------------------------------------------------------------------------


def pack(bits: np.ndarray, axis: int, groups: list[tuple[int, int]], layout: str) -> tuple[np.ndarray, int]:
    """What the exposed graph emits: int32 group sums of bits × 2^k, in the given layout."""
    rows = np.moveaxis(bits, axis, -1).astype(np.int64)  # (..., N)
    packed = np.stack([(rows[..., a:b] << np.arange(b - a)).sum(axis=-1) for a, b in groups], axis=-1).astype(
        np.int32
    )  # (..., G)
    if layout == "last":
        return packed, -1
    if layout == "nchw":
        return np.moveaxis(packed, -1, 1), 1  # (B, G, H, W)
    return np.moveaxis(packed, -1, 1).reshape(len(bits), len(groups), -1), 1  # (B, G, H·W)


def reference_keys(rows: np.ndarray) -> np.ndarray:
    """Bit k of a state is bit k % 64 of word k // 64; one word when N ≤ 64."""
    n = rows.shape[1]
    words = [
        (rows[:, w : w + 64].astype(np.uint64) << np.arange(min(64, n - w), dtype=np.uint64)).sum(
            axis=1, dtype=np.uint64
        )
        for w in range(0, n, 64)
    ]
    return words[0] if len(words) == 1 else np.stack(words, axis=1)


@pytest.mark.parametrize("grouping", [word_groups, byte_groups], ids=["words", "bytes"])
@pytest.mark.parametrize("layout", ["dense", "last", "nchw", "rows"])
@pytest.mark.parametrize("neurons", NEURONS)
def test_join_groups_matches_direct_bit_packing(neurons: int, layout: str, grouping) -> None:
    rng = np.random.default_rng(neurons)
    shape, axis = ((50, neurons), 1) if layout == "dense" else ((20, neurons, 3, 2), 1)
    bits = rng.random(shape) < 0.5
    if layout == "last":
        bits, axis = np.ascontiguousarray(np.moveaxis(bits, 1, -1)), 3  # channels-last
    groups = grouping(neurons)
    packed, group_axis = pack(bits, axis, groups, "last" if layout in ("dense", "last") else layout)
    keys = join_groups(packed, groups, group_axis)
    rows = state_rows(bits, axis)
    want = reference_keys(rows)
    assert keys.shape == want.shape
    np.testing.assert_array_equal(keys.astype(np.uint64), want)
    distinct_rows = len(np.unique(rows, axis=0))
    assert len(np.unique(keys, axis=0 if keys.ndim == 2 else None)) == distinct_rows


@pytest.mark.parametrize("grouping", [word_groups, byte_groups], ids=["words", "bytes"])
def test_join_groups_top_bits_survive(grouping) -> None:
    """All-ones states: the top bit of every word is set and nothing overflows or sign-extends."""
    for neurons in (24, 25, 32, 33, 63, 64, 65, 128, 130):
        groups = grouping(neurons)
        bits = np.ones((1, neurons), bool)
        keys = join_groups(pack(bits, 1, groups, "last")[0], groups, -1)
        np.testing.assert_array_equal(keys.astype(np.uint64), reference_keys(bits))
        if len(groups) > 1:  # one group is its own int32 key
            assert keys.dtype == (np.uint32 if neurons <= 32 else np.uint64)
