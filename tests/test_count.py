"""Exact state counting (SPEC §2), pinned against a slow reference.

The reference takes the raw pre-activation tensor from onnxruntime, makes one row of firing bits
per (sample, position), and counts whole rows with ``np.unique(axis=0)``. The auditor's in-graph
packing, key joining and stores must give exactly the same sorted count vector.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest
from models import Net, reference_counts, reference_entropy, run, state_rows

from auditor import count
from auditor.audit import audit, prepare
from auditor.count import HistogramStore, LayerCounter, SortedStore, join_groups, make_store
from auditor.data import Batch
from auditor.graph import word_groups

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
    without_cna = {size: {**splits["test"], "cna": None} for size, splits in batch_reports.items()}
    assert without_cna[1] == without_cna[7] == without_cna[256]
    split = batch_reports[256]["test"]
    assert [layer["states_total"] for layer in split["layers"]] == [120 * 25, 120]
    cna = [batch_reports[size]["test"]["cna"] for size in (1, 7, 256)]
    assert None not in cna
    assert cna[0] == pytest.approx(cna[2], rel=1e-6) and cna[1] == pytest.approx(cna[2], rel=1e-6)


# --- Stores ------------------------------------------------------------------------------------

STORES = {"histogram": lambda: HistogramStore(12), "sorted": SortedStore}


def reference(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Distinct keys (rows when 2-D) in sorted order with their counts."""
    return np.unique(keys, axis=0 if keys.ndim == 2 else None, return_counts=True)


def assert_same(store, keys: np.ndarray) -> None:
    got_keys, got_counts = store.items()
    want_keys, want_counts = reference(keys)
    np.testing.assert_array_equal(np.asarray(got_keys), want_keys)
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
def test_store_adds_in_pieces_like_at_once(kind: str) -> None:
    keys = some_keys()
    whole = STORES[kind]()
    whole.add(keys)
    assert_same(whole, keys)
    pieces = STORES[kind]()
    for piece in np.array_split(keys, [1, 2, 700, 701, 3000]):
        pieces.add(piece)
    assert_same(pieces, keys)


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_adds_counts(kind: str) -> None:
    """SPEC §2: counts from workers merge by adding, equal to one store fed everything."""
    keys = some_keys(1)
    parts = np.array_split(keys, [1200, 3100])
    workers = []
    for part in parts:
        worker = STORES[kind]()
        worker.add(part)
        workers.append(worker)
    total = STORES[kind]()
    for worker in workers:
        total.merge(worker)
    assert_same(total, keys)
    workers[0].merge(workers[1])
    workers[0].merge(workers[2])
    assert_same(workers[0], keys)


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_of_empty_stores(kind: str) -> None:
    """A worker that saw no data merges as nothing, however often and in whatever order."""
    keys = some_keys(2)
    store = STORES[kind]()
    store.merge(STORES[kind]())
    store.merge(STORES[kind]())
    store.add(keys)
    store.merge(STORES[kind]())
    assert_same(store, keys)
    assert np.asarray(store.items()[0]).dtype.kind in "iu"  # keys stay integers


@pytest.mark.parametrize("kind", STORES)
def test_store_merge_then_add_keeps_counting(kind: str) -> None:
    keys = some_keys(3)
    a, b = STORES[kind](), STORES[kind]()
    a.add(keys[:100])
    b.add(keys[100:2000])
    a.merge(b)
    a.add(keys[2000:])
    assert a.items()[1].sum() == len(keys)
    assert_same(a, keys)


def test_sorted_store_counts_multiword_rows_exactly() -> None:
    keys = wide_keys()
    store = SortedStore()
    for piece in np.array_split(keys, 7):
        store.add(piece)
    assert_same(store, keys)
    assert len(store.items()[1]) == 50  # twins that differ in a single bit are distinct


def test_sorted_store_merges_multiword_rows() -> None:
    keys = wide_keys(1)
    a, b = SortedStore(), SortedStore()
    a.add(keys[:1500])
    b.add(keys[1500:])
    a.merge(b)
    assert_same(a, keys)


def test_sorted_store_merges_empty_stores_into_multiword_rows() -> None:
    """An empty worker's store holds no rows; merging it must not break 2-D keys."""
    keys = wide_keys(2)
    store = SortedStore()
    store.merge(SortedStore())
    store.add(keys[:1000])
    store.merge(SortedStore())
    store.add(keys[1000:])
    assert_same(store, keys)


@pytest.mark.parametrize("wide", [False, True], ids=["1-D", "rows"])
def test_sorted_store_folding_early_gives_the_same_counts(monkeypatch: pytest.MonkeyPatch, wide: bool) -> None:
    """COMPACT_AT small: the queue is folded many times; counts are unchanged."""
    monkeypatch.setattr(count, "COMPACT_AT", 50)
    keys = wide_keys(3) if wide else some_keys(4).astype(np.uint64)
    store = SortedStore()
    for piece in np.array_split(keys, 97):
        store.add(piece)
    assert store.keys is not None and store.pending_size < 50  # folded along the way, not only at the end
    assert_same(store, keys)


def test_make_store_picks_dense_for_narrow_layers() -> None:
    assert isinstance(make_store(1), HistogramStore)
    assert isinstance(make_store(count.HISTOGRAM_BITS), HistogramStore)
    assert isinstance(make_store(count.HISTOGRAM_BITS + 1), SortedStore)


@pytest.mark.parametrize("neurons", [1, 5, 20])
def test_histogram_store_covers_every_key_of_its_width(neurons: int) -> None:
    keys = np.array([0, (1 << neurons) - 1, (1 << neurons) - 1], np.int32)
    store = make_store(neurons)
    store.add(keys)
    assert_same(store, keys)


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


@pytest.mark.parametrize("layout", ["dense", "last", "nchw", "rows"])
@pytest.mark.parametrize("neurons", NEURONS)
def test_join_groups_matches_direct_bit_packing(neurons: int, layout: str) -> None:
    rng = np.random.default_rng(neurons)
    shape, axis = ((50, neurons), 1) if layout == "dense" else ((20, neurons, 3, 2), 1)
    bits = rng.random(shape) < 0.5
    if layout == "last":
        bits, axis = np.ascontiguousarray(np.moveaxis(bits, 1, -1)), 3  # channels-last
    groups = word_groups(neurons)
    packed, group_axis = pack(bits, axis, groups, "last" if layout in ("dense", "last") else layout)
    keys = join_groups(packed, groups, group_axis)
    rows = state_rows(bits, axis)
    want = reference_keys(rows)
    assert keys.shape == want.shape
    np.testing.assert_array_equal(keys.astype(np.uint64), want)
    distinct_rows = len(np.unique(rows, axis=0))
    assert len(np.unique(keys, axis=0 if keys.ndim == 2 else None)) == distinct_rows


def test_join_groups_top_bits_survive() -> None:
    """All-ones states: the top bit of every word is set and nothing overflows or sign-extends."""
    for neurons in (24, 25, 32, 33, 63, 64, 65, 128, 130):
        groups = word_groups(neurons)
        bits = np.ones((1, neurons), bool)
        keys = join_groups(pack(bits, 1, groups, "last")[0], groups, -1)
        np.testing.assert_array_equal(keys.astype(np.uint64), reference_keys(bits))
