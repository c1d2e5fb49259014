"""The stores and the budget (stores.py): counts as np.unique gives them, held or spilled, in bounded memory,
and spill folders that are always removed."""

from __future__ import annotations

import contextlib
import gc
import resource
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from auditor.engine import stores
from auditor.engine.stores import SPILL_PREFIX, HistogramStore, MemoryBudget, RunStore, make_store
from auditor.errors import AuditError, CancelledError, LimitError
from auditor.exits import TERMINATING
from auditor.locks import take

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
    record = runs[0].dtype if runs else stores.record_dtype(1)
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
    monkeypatch.setattr(stores, "hash_rows", lambda rows: rows[:, -1] & np.uint64(1))
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
    monkeypatch.setattr(stores, "MERGE_ROWS_MIN", 40)
    rng = np.random.default_rng(5)
    pool = rng.integers(0, 2**64 - 1, size=(2000, 3 if wide else 1), dtype=np.uint64, endpoint=True)
    keys = pool[rng.integers(len(pool), size=6000)]
    keys = keys if wide else keys[:, 0]
    dtype = stores.record_dtype(3 if wide else 1)
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
    monkeypatch.setattr(stores, "MAX_SPILLED_RUNS", 3)
    keys = some_keys(6)
    store = make("spilled")
    for piece in np.array_split(keys, 40):
        feed(store, piece)
        assert len(store.spilled) <= 4
    folder = next(store.budget.spill_dir.iterdir())
    assert len(list(folder.glob("*.run"))) == len(store.spilled)  # merged-away files are deleted
    assert_same(store, keys)


def test_make_store_picks_dense_for_narrow_layers_when_the_budget_has_room(tmp_path) -> None:
    """Dense histograms of all layers share a quarter of the budget; layers past that get runs."""
    with MemoryBudget(HUGE) as roomy, MemoryBudget(4 << 20, tmp_path) as small:
        assert isinstance(make_store(1, roomy), HistogramStore)
        assert isinstance(make_store(stores.HISTOGRAM_BITS, roomy), HistogramStore)
        assert isinstance(make_store(stores.HISTOGRAM_BITS + 1, roomy), RunStore)
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


SPILLING_CHILD = """
import signal, sys, time
import numpy as np
# What the test relies on, set here: a process started in the background inherits SIGINT ignored,
# and an ignored signal stays ignored (ending_on_signals respects that, as nohup needs).
signal.signal(signal.SIGINT, signal.default_int_handler)
from auditor.exits import TERMINATING, Terminated, ending_on_signals
for sig in TERMINATING:
    signal.signal(sig, signal.SIG_DFL)
from auditor.engine.stores import MemoryBudget, RunStore
try:
    with ending_on_signals(), MemoryBudget(1, sys.argv[1]) as budget:
        store = RunStore(1, budget)
        for i in range(100_000):
            store.add(np.arange(i, i + 500, dtype=np.uint64))
            if i == 3:
                print("spilling", flush=True)
            time.sleep(0.005)
except Terminated as exc:
    sys.exit(exc.exit_code)
except KeyboardInterrupt:
    sys.exit(128 + signal.SIGINT)
"""


def _spilling_child(root: Path) -> subprocess.Popen[str]:
    """A process counting states under a 1-byte budget, so every add spills; returns once it has spilled."""
    child = subprocess.Popen(
        [sys.executable, "-c", SPILLING_CHILD, str(root)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert child.stdout is not None and child.stdout.readline().strip() == "spilling"
    assert list(root.rglob("*.run"))
    return child


@pytest.mark.parametrize("sig", [signal.SIGINT, *TERMINATING], ids=lambda s: signal.Signals(s).name)
def test_every_terminating_signal_removes_the_spill_folder_and_exits_128_plus_its_number(tmp_path, sig) -> None:
    """A real signal to a process that is spilling: it stops with 128 + signum, and its spill folder is gone."""
    child = _spilling_child(tmp_path)
    try:
        child.send_signal(sig)
        _, err = child.communicate(timeout=60)
    finally:
        child.kill()
    assert child.returncode == 128 + sig, err
    assert "Traceback" not in err
    assert not list(tmp_path.iterdir())


def test_a_spill_folder_left_by_a_killed_audit_is_removed_by_the_next_audit_only_once_its_owner_is_gone(
    tmp_path,
) -> None:
    child = _spilling_child(tmp_path)
    child.kill()  # SIGKILL: nothing of the child's runs any more, its folder stays
    child.communicate(timeout=60)
    [left] = list(tmp_path.iterdir())
    assert left.name.startswith(SPILL_PREFIX) and (left / "owner.lock").read_text().strip() == str(child.pid)
    alive = tmp_path / f"{SPILL_PREFIX}alive"  # owned by a living audit (this process)
    alive.mkdir()
    owner = take(alive / "owner.lock")
    unowned = tmp_path / f"{SPILL_PREFIX}being-made"  # no lock yet: not provably abandoned
    unowned.mkdir()
    elsewhere = tmp_path.parent / f"{tmp_path.name}-elsewhere"  # a symlink is never followed out of the root
    elsewhere.mkdir()
    (elsewhere / "owner.lock").write_text("1\n")
    (tmp_path / f"{SPILL_PREFIX}link").symlink_to(elsewhere)
    lock_link = tmp_path / f"{SPILL_PREFIX}lock-link"  # a lock file that is a symlink is not ours
    lock_link.mkdir()
    (lock_link / "owner.lock").symlink_to(elsewhere / "owner.lock")
    (tmp_path / f"{SPILL_PREFIX}a-file").write_text("not a folder")
    (tmp_path / "not-ours").mkdir()
    with MemoryBudget(1, tmp_path) as budget:
        spill_something(budget)
        remaining = {p.name for p in tmp_path.iterdir()}
    assert left.name not in remaining
    assert {alive.name, unowned.name, f"{SPILL_PREFIX}link", lock_link.name, f"{SPILL_PREFIX}a-file", "not-ours"} <= (
        remaining
    )
    assert (elsewhere / "owner.lock").read_text() == "1\n"
    owner.release()
    with MemoryBudget(1, tmp_path) as budget:  # its owner gone, the next audit removes it too
        spill_something(budget)
    assert not alive.exists() and unowned.exists()


@pytest.mark.parametrize("where", ["missing", "a file"])
def test_an_unusable_spill_folder_is_refused_in_one_line(tmp_path, where: str) -> None:
    target = tmp_path / "spill"
    if where == "a file":
        target.write_text("not a folder")
    with pytest.raises(AuditError) as caught:
        MemoryBudget(1 << 30, target)
    message = caught.value.message
    assert "spill_dir" in message and str(tmp_path) not in message and "\n" not in message


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
    assert "full" in message and "spill_dir" in message and "memory_budget" in message and str(tmp_path) not in message
    assert not list(tmp_path.iterdir())
