"""Exact, mergeable counting of layer states in bounded memory (SPEC §2).

A state is the bit-vector of a layer's firing neurons at one (sample, position). The graph hands
us those bits packed into int32 groups, one per byte or of at most 24 bits (``graph.packing``);
``join_groups`` turns them into exact keys: one integer when the layer has ≤ 64 neurons, else rows
of 64-bit words.

Each counted layer owns a store. A narrow layer gets a dense histogram. Any other queues raw keys
and folds them, by one sort, into *runs*: record arrays of distinct keys with their counts, in key
order. One ``MemoryBudget`` per audit watches what all its stores hold; past its limit the largest
stores write their runs to files in a private spill folder, removed when the budget closes.

The figures need only the counts. So the end of an audit is a streaming merge of a layer's runs,
one bounded range of keys at a time, into a *count of counts*: how many states were seen c times,
for each c (at most about √(2T) entries). Distinct states, entropy, exact quantiles and the top
counts all follow from it (``summarize``). Held and spilled runs go through the same merge, so
counts and entropies do not depend on the budget, the batching or how counters were merged.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import math
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from auditor.errors import AuditError, LimitError

DEFAULT_MEMORY_BUDGET = 1 << 30
HISTOGRAM_BITS = 20  # up to 2**20 states: a dense histogram beats sorting
MERGE_ROWS_MIN = 1 << 16  # a fold or merge step may always take this many rows, however small the budget
MAX_SPILLED_RUNS = 64  # spilled runs of one store before they are merged into one file
QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# --- Keys and runs ---------------------------------------------------------------------------


def join_groups(packed: np.ndarray, groups: list[tuple[int, int]], group_axis: int) -> np.ndarray:
    """Exact keys, one per (sample, position): 1-D when ≤ 64 neurons, else rows of uint64 words.

    One group is its own key, as it came. Several are shifted to their places in their 64-bit
    words (groups never straddle words) and or-ed together: into uint32 keys for layers of at
    most 32 neurons, uint64 beyond.
    """
    axis = group_axis % packed.ndim
    if len(groups) == 1:
        return packed.reshape(-1)
    neurons = groups[-1][1]
    where: list[slice | int] = [slice(None)] * packed.ndim
    unsigned = packed.view(np.uint32) if packed.dtype == np.int32 else packed  # group values are ≥ 0

    def group(g: int) -> np.ndarray:
        where[axis] = g
        return unsigned[tuple(where)]

    dtype = np.uint32 if neurons <= 32 else np.uint64
    words: dict[int, np.ndarray] = {}
    for g, (start, _) in enumerate(groups):
        word, shift = divmod(start, 64)
        part = group(g).astype(dtype)
        if shift:
            part <<= dtype(shift)
        if word in words:
            np.bitwise_or(words[word], part, out=words[word])
        else:
            words[word] = part
    keys = [words[w].reshape(-1) for w in sorted(words)]
    return keys[0] if len(keys) == 1 else np.stack(keys, axis=1)


def key_words(neurons: int) -> int:
    """How many 64-bit words hold one key of a layer with ``neurons`` neurons."""
    return max(1, -(-neurons // 64))


def record_dtype(words: int) -> np.dtype:
    """A run's record: ``head`` (the order key), ``count``, and the key's ``words`` when it has several.

    ``head`` is the key itself when it fits one word, else ``hash_rows`` of its words. Runs are
    sorted by head, then by the words; equality is always decided on the whole key.
    """
    fields: list[tuple] = [("head", "<u8"), ("count", "<i8")]
    if words > 1:
        fields.append(("words", "<u8", (words,)))
    return np.dtype(fields)


def hash_rows(rows: np.ndarray) -> np.ndarray:
    """A 64-bit hash of each row of uint64 words (chained fmix64): only spreads keys out, never decides equality."""
    acc = _fmix64(rows[:, 0].copy())
    for j in range(1, rows.shape[1]):
        acc ^= rows[:, j]
        acc = _fmix64(acc)
    return acc


def _fmix64(x: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place on a uint64 array (multiplications wrap, as intended)."""
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xFF51AFD7ED558CCD)
    x ^= x >> np.uint64(33)
    x *= np.uint64(0xC4CEB9FE1A85EC53)
    x ^= x >> np.uint64(33)
    return x


def fold_keys(keys: np.ndarray) -> np.ndarray:
    """The run of raw keys (1-D integers or rows of uint64 words): each distinct key once, with its count."""
    words = 1 if keys.ndim == 1 else keys.shape[1]
    if not len(keys):
        return np.zeros(0, record_dtype(words))
    if keys.ndim == 1:  # a plain sort is several times faster than an argsort
        ordered = np.sort(keys)
        starts = _run_starts(ordered)
        run = np.empty(len(starts), record_dtype(1))
        run["head"] = ordered[starts]
        del ordered
        np.subtract(starts[1:], starts[:-1], out=run["count"][:-1])
        run["count"][-1] = len(keys) - starts[-1]
        return run
    rows = np.ascontiguousarray(keys, dtype=np.uint64)
    head = hash_rows(rows)
    # argsort is slow without AVX-512; sort (head's top bits | row index) instead and settle the rare ties.
    index_bits = max(1, (len(rows) - 1).bit_length())
    mask = np.uint64((1 << index_bits) - 1)
    tagged = (head & ~mask) | np.arange(len(rows), dtype=np.uint64)
    tagged.sort()
    order = (tagged & mask).astype(np.intp)
    return _distinct(head, rows, None, _settle_ties(head, rows, order, index_bits))


def merge_runs(runs: list[np.ndarray]) -> np.ndarray:
    """One run from several (of one record type): counts of equal keys add up."""
    records = np.concatenate(runs) if len(runs) > 1 else runs[0]
    if not len(records):
        return records
    head = np.ascontiguousarray(records["head"])
    order = np.argsort(head, kind="stable")  # timsort: fast on concatenated sorted runs
    rows = np.ascontiguousarray(records["words"]) if "words" in records.dtype.names else None
    if rows is not None:
        order = _settle_ties(head, rows, order, 0)
    return _distinct(head, rows, records["count"], order)


def _settle_ties(head: np.ndarray, rows: np.ndarray, order: np.ndarray, shift: int) -> np.ndarray:
    """Make ``order`` sort rows by (head, words), given that it sorts them by ``head >> shift``.

    Neighbours with equal ``head >> shift`` but a different head or different words are rare
    (hash collisions); only the groups holding them are sorted again, exactly, with lexsort.
    """
    coarse = head[order] >> np.uint64(shift)
    pairs = np.flatnonzero(coarse[1:] == coarse[:-1])
    a, b = order[pairs], order[pairs + 1]
    unsettled = pairs[(head[a] != head[b]) | (_take(rows, a) != _take(rows, b)).any(axis=1)]
    if not unsettled.size:
        return order
    values = np.unique(coarse[unsettled])
    lo, hi = np.searchsorted(coarse, values, "left"), np.searchsorted(coarse, values, "right")
    lengths = hi - lo
    positions = np.arange(lengths.sum()) + np.repeat(lo - np.cumsum(lengths) + lengths, lengths)
    group = order[positions]
    keys = [rows[group, j] for j in reversed(range(rows.shape[1]))] + [head[group]]
    order[positions] = group[np.lexsort(keys)]
    return order


def _distinct(head: np.ndarray, rows: np.ndarray | None, counts: np.ndarray | None, order: np.ndarray) -> np.ndarray:
    """The run of records taken in ``order`` (sorted by key): equal keys become one, their counts summed."""
    ordered = head[order]
    boundary = ordered[1:] != ordered[:-1]
    if rows is not None:  # equal heads: the words decide
        pairs = np.flatnonzero(~boundary)
        boundary[pairs] = (_take(rows, order[pairs]) != _take(rows, order[pairs + 1])).any(axis=1)
    starts = np.flatnonzero(np.r_[True, boundary])
    run = np.empty(len(starts), record_dtype(1 if rows is None else rows.shape[1]))
    run["head"] = ordered[starts]
    run["count"] = np.diff(np.r_[starts, len(order)]) if counts is None else np.add.reduceat(counts[order], starts)
    if rows is not None:
        run["words"] = _take(rows, order[starts])
    return run


def _take(rows: np.ndarray, index: np.ndarray) -> np.ndarray:
    """Rows at ``index``: ``np.take`` along axis 0 is several times faster than fancy indexing here."""
    return np.take(rows, index, axis=0)


def _run_starts(ordered: np.ndarray) -> np.ndarray:
    """Indices where a run of equal values begins in a sorted, non-empty 1-D array."""
    begins = np.empty(len(ordered), bool)
    begins[0] = True
    np.not_equal(ordered[1:], ordered[:-1], out=begins[1:])
    return np.flatnonzero(begins)


def key_ranges(heads: list[Sequence[int]], max_rows: int) -> Iterator[list[tuple[int, int]]]:
    """Cut sorted head columns into consecutive key ranges of at most ``max_rows`` records in all.

    Yields, per range and in key order, one ``(start, stop)`` slice per column. A range is split
    at the middle head of its largest slice until it fits, so skewed keys cost nothing extra; a
    range of one head value is never split (equal heads must merge together).
    """
    pending = [[(0, len(h)) for h in heads]]
    while pending:
        bounds = pending.pop()
        if sum(stop - start for start, stop in bounds) <= max_rows:
            yield bounds
            continue
        widest = max(range(len(bounds)), key=lambda i: bounds[i][1] - bounds[i][0])
        start, stop = bounds[widest]
        pivot = int(heads[widest][(start + stop) // 2])
        cuts = _cuts(heads, bounds, pivot, "left")
        if cuts == [start for start, _ in bounds]:  # the pivot is the range's smallest head
            cuts = _cuts(heads, bounds, pivot, "right")
        if cuts == [stop for _, stop in bounds]:  # every head in the range is the pivot
            yield bounds
            continue
        pending.append([(cut, stop) for cut, (_, stop) in zip(cuts, bounds, strict=True)])
        pending.append([(start, cut) for cut, (start, _) in zip(cuts, bounds, strict=True)])


def _cuts(heads: list[Sequence[int]], bounds: list[tuple[int, int]], pivot: int, side: str) -> list[int]:
    # bisect, not np.searchsorted: searchsorted copies a strided column (a held run's heads) whole.
    find = bisect.bisect_left if side == "left" else bisect.bisect_right
    return [find(h, pivot, start, stop) for h, (start, stop) in zip(heads, bounds, strict=True)]


# --- The budget ------------------------------------------------------------------------------


class MemoryBudget:
    """What one audit may hold for counting, across all its layers, and the spill folder beyond it.

    Stores report what they hold; past three quarters of ``limit_bytes`` the largest ones write
    their runs to files until half is left, so folding and merging have room to work. Files go to
    a private folder made under ``spill_dir`` (default: the system's temp folder) on the first
    spill, and ``close`` removes it; use the budget as a context manager so that happens on
    success, error, Ctrl-C and cancellation alike. ``spilled_bytes`` counts every byte written.
    Not thread-safe: one audit counts in one thread.
    """

    def __init__(self, limit_bytes: int, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if limit_bytes < 1:
            raise ValueError(f"a memory budget must be at least 1 byte, got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None and not (
            self.spill_dir.is_dir() and os.access(self.spill_dir, os.W_OK | os.X_OK)
        ):
            raise AuditError("the spill folder (--spill-dir) is not a writable folder; point it at one")
        self.spilled_bytes = 0
        self.closed = False
        self._stores: list[RunStore] = []
        self._dense_bytes = 0
        self._folder: Path | None = None
        self._remove_folder: weakref.finalize | None = None
        self._names = itertools.count()

    @property
    def step_bytes(self) -> int:
        """Input of one fold or merge step: raw keys queued, or runs merged (sorting needs ~6× this)."""
        return max(1, self.limit_bytes // 32)

    def merge_rows(self, dtype: np.dtype) -> int:
        """Records one merge step may hold."""
        return max(MERGE_ROWS_MIN, self.step_bytes // dtype.itemsize)

    @property
    def held_bytes(self) -> int:
        """Bytes held by all stores now: queued keys, runs in memory and dense histograms."""
        return self._dense_bytes + sum(store.held_bytes for store in self._stores)

    def reserve_dense(self, nbytes: int) -> bool:
        """Set aside room for a dense histogram if it fits in a quarter of the budget with the others."""
        if self._dense_bytes + nbytes > self.limit_bytes // 4:
            return False
        self._dense_bytes += nbytes
        return True

    def register(self, store: RunStore) -> None:
        self._stores.append(store)

    def settle(self) -> None:
        """Spill the stores holding most until the budget is half free, once it is three quarters used."""
        held = self.held_bytes
        if held <= self.limit_bytes * 3 // 4:
            return
        for store in sorted(self._stores, key=lambda s: s.held_bytes, reverse=True):
            if held <= self.limit_bytes // 2:
                break
            held -= store.held_bytes
            store.spill()
            held += store.held_bytes

    def write(self, runs: Iterable[Iterable[np.ndarray]]) -> list[SpilledRun]:
        """Write runs, each given as record arrays in key order, one after another into a new spill file."""
        path = self._new_path()
        spilled = []
        try:
            with open(path, "wb") as out:
                for run in runs:
                    start, rows = out.tell(), 0
                    for piece in run:
                        out.write(np.ascontiguousarray(piece).view(np.uint8))  # tofile would lose errno
                        rows += len(piece)
                        self.spilled_bytes += piece.nbytes
                    spilled.append(SpilledRun(path, start, rows))
        except OSError as exc:
            path.unlink(missing_ok=True)
            raise _spill_error(exc) from None
        return spilled

    def _new_path(self) -> Path:
        if self.closed:
            raise ValueError("this memory budget is closed")
        if self._folder is None:
            try:
                self._folder = Path(tempfile.mkdtemp(prefix="auditor-spill-", dir=self.spill_dir))
            except OSError as exc:
                raise _spill_error(exc) from None
            # Removes the folder if the budget is dropped unclosed, at the latest when Python exits.
            self._remove_folder = weakref.finalize(self, shutil.rmtree, self._folder, ignore_errors=True)
        return self._folder / f"{next(self._names)}.run"

    def close(self) -> None:
        """Remove the spill folder and every file in it; runs that were spilled are gone after this."""
        self.closed = True
        if self._remove_folder is not None:
            self._remove_folder()

    def __enter__(self) -> MemoryBudget:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def _spill_error(exc: OSError) -> AuditError:
    """One line naming the setting and the reason, never the path."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        return LimitError(
            f"the spill folder (--spill-dir) is full ({reason}); free space there, "
            "point --spill-dir at a larger disk, or raise --memory-budget"
        )
    return AuditError(f"cannot write to the spill folder (--spill-dir): {reason}; point it at a writable folder")


# --- Stores ----------------------------------------------------------------------------------


class StateStore(Protocol):
    """Counts of distinct keys in bounded memory; ``merge`` adds another store's counts."""

    @property
    def held_bytes(self) -> int: ...

    def add(self, keys: np.ndarray) -> None: ...

    def merge(self, other: StateStore) -> None: ...

    def merged(self) -> Iterator[np.ndarray]:
        """Every distinct key once with its count, as runs in key order, one bounded piece at a time."""
        ...


class HistogramStore:
    """A dense count per possible key, for narrow layers; its fixed size is reserved from the budget."""

    def __init__(self, bits: int) -> None:
        self.counts = np.zeros(1 << bits, np.int64)

    @property
    def held_bytes(self) -> int:
        return self.counts.nbytes

    def add(self, keys: np.ndarray) -> None:
        self.counts += np.bincount(keys.ravel(), minlength=self.counts.size)

    def merge(self, other: StateStore) -> None:
        for run in other.merged():
            np.add.at(self.counts, run["head"].astype(np.intp), run["count"])

    def merged(self) -> Iterator[np.ndarray]:
        keys = np.flatnonzero(self.counts)
        run = np.empty(len(keys), record_dtype(1))
        run["head"], run["count"] = keys, self.counts[keys]
        yield run


@dataclass(frozen=True)
class SpilledRun:
    """A run in a spill file: ``rows`` records of ``record_dtype`` from byte ``offset``, in key order."""

    path: Path
    offset: int
    rows: int


class RunReader:
    """Reads a spilled run by plain file reads: a range at a time, heads one by one for bisection.

    Not a memory map: pages a map has read stay in the process's resident memory until unmapped,
    and the budget is about resident memory.
    """

    def __init__(self, run: SpilledRun, dtype: np.dtype) -> None:
        self.file = open(run.path, "rb")  # noqa: SIM115 (closed by close(), from the merge's ExitStack)
        self.offset = run.offset
        self.rows = run.rows
        self.dtype = dtype
        self.heads = _Heads(self.file.fileno(), run.offset, run.rows, dtype.itemsize)

    def __len__(self) -> int:
        return self.rows

    def read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty(stop - start, self.dtype)
        self.file.seek(self.offset + start * self.dtype.itemsize)
        if self.file.readinto(memoryview(out.view(np.uint8))) != out.nbytes:
            raise AuditError("a spill file was cut short; is something cleaning the spill folder (--spill-dir)?")
        return out

    def close(self) -> None:
        self.file.close()


class _Heads:
    """The head column of a spill file as a sequence, for ``bisect``: one small read per item."""

    def __init__(self, fd: int, offset: int, rows: int, itemsize: int) -> None:
        self.fd, self.offset, self.rows, self.itemsize = fd, offset, rows, itemsize

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int) -> int:
        return int.from_bytes(os.pread(self.fd, 8, self.offset + i * self.itemsize), "little")


class RunStore:
    """Sorted runs of (key, count), held or spilled, plus raw keys queued for the next fold.

    Held runs of similar size are merged as they come (a log-structured merge), so layers with
    few distinct states stay small and never spill; the others spill their runs when the budget
    asks, and more than ``MAX_SPILLED_RUNS`` spilled runs are merged into one file.
    """

    def __init__(self, words: int, budget: MemoryBudget) -> None:
        self.dtype = record_dtype(words)
        self.budget = budget
        self.queued: list[np.ndarray] = []
        self.queued_bytes = 0
        self.runs: list[np.ndarray] = []  # held in memory, largest first
        self.spilled: list[SpilledRun] = []
        budget.register(self)

    @property
    def held_bytes(self) -> int:
        return self.queued_bytes + sum(run.nbytes for run in self.runs)

    def add(self, keys: np.ndarray) -> None:
        """Queue raw keys; fold them once a budget step has queued, and let the budget spill if it must."""
        self.queued.append(keys)
        self.queued_bytes += keys.nbytes
        if self.queued_bytes >= self.budget.step_bytes:
            self.fold()
        self.budget.settle()

    def fold(self) -> None:
        """Count the queued keys into held runs, a budget step at a time (a big batch is cut up)."""
        if not self.queued:
            return
        keys = np.concatenate(self.queued) if len(self.queued) > 1 else self.queued[0]
        self.queued, self.queued_bytes = [], 0
        step = max(MERGE_ROWS_MIN, self.budget.step_bytes * len(keys) // max(1, keys.nbytes))
        for start in range(0, len(keys), step):
            self._hold(fold_keys(keys[start : start + step]))

    def merge(self, other: StateStore) -> None:
        """Add another store's counts; the budget may spill as they come in."""
        if other is self:
            raise ValueError("a store cannot merge itself")
        if not isinstance(other, RunStore):
            for run in other.merged():
                self._hold(run)
                self.budget.settle()
            return
        if other.dtype != self.dtype:
            raise ValueError("stores of keys of different widths cannot merge")
        other.fold()
        held, spilled = list(other.runs), list(other.spilled)  # before settling can spill either store
        for run in held:
            self._hold(run)  # runs are never changed in place, so sharing them is safe
        if spilled:  # copied: the other budget removes its files when it closes
            rows = self.budget.merge_rows(self.dtype)
            self.spilled += self.budget.write(_read_run(s, self.dtype, rows) for s in spilled)
        self._limit_spilled()
        self.budget.settle()

    def spill(self) -> None:
        """Write every held run (and the queue, folded) to spill files, freeing their memory."""
        self.fold()
        if self.runs:
            self.spilled += self.budget.write([run] for run in self.runs)
            self.runs = []
        self._limit_spilled()

    def merged(self) -> Iterator[np.ndarray]:
        """Every distinct key with its count, in key order, a bounded range at a time (add nothing meanwhile)."""
        self.fold()
        yield from _merge_ranges(self.runs, self.spilled, self.dtype, self.budget.merge_rows(self.dtype))

    def _hold(self, run: np.ndarray) -> None:
        """Keep a run in memory, merging it with the last held runs while they are of similar size."""
        if not len(run):
            return
        self.runs.append(run)
        while len(self.runs) > 1 and self.runs[-2].nbytes <= 2 * self.runs[-1].nbytes:
            if self.runs[-2].nbytes + self.runs[-1].nbytes > self.budget.step_bytes:
                break  # merging big runs needs room the budget may not have: they wait to be spilled
            last = self.runs.pop()
            self.runs[-1] = merge_runs([self.runs[-1], last])

    def _limit_spilled(self) -> None:
        """Merge the spilled runs into one file once there are too many (bounds open files in a merge)."""
        if len(self.spilled) <= MAX_SPILLED_RUNS:
            return
        old = self.spilled
        self.spilled = self.budget.write([_merge_ranges([], old, self.dtype, self.budget.merge_rows(self.dtype))])
        for path in {spilled.path for spilled in old}:
            path.unlink(missing_ok=True)


def _read_run(run: SpilledRun, dtype: np.dtype, rows: int) -> Iterator[np.ndarray]:
    """A spilled run's records, ``rows`` at a time."""
    with contextlib.closing(RunReader(run, dtype)) as reader:
        for start in range(0, run.rows, rows):
            yield reader.read(start, min(start + rows, run.rows))


def _merge_ranges(
    held: list[np.ndarray], spilled: list[SpilledRun], dtype: np.dtype, max_rows: int
) -> Iterator[np.ndarray]:
    """The streaming merge: all runs cut into key ranges of bounded size, each merged in memory, in key order."""
    with contextlib.ExitStack() as stack:
        readers = [stack.enter_context(contextlib.closing(RunReader(s, dtype))) for s in spilled if s.rows]
        runs: list[np.ndarray | RunReader] = [run for run in held if len(run)] + readers
        heads = [run.heads if isinstance(run, RunReader) else run["head"] for run in runs]
        for bounds in key_ranges(heads, max_rows):
            pieces = [
                run.read(start, stop) if isinstance(run, RunReader) else run[start:stop]
                for run, (start, stop) in zip(runs, bounds, strict=True)
                if stop > start
            ]
            if pieces:
                yield merge_runs(pieces)


def make_store(neurons: int, budget: MemoryBudget) -> StateStore:
    """The store for a layer of ``neurons``: dense when narrow and the budget has room, sorted runs otherwise."""
    if neurons <= HISTOGRAM_BITS and budget.reserve_dense(8 << neurons):
        return HistogramStore(neurons)
    return RunStore(key_words(neurons), budget)


# --- Counting a layer, and what the counts say -----------------------------------------------


@dataclass(frozen=True, eq=False)
class StateSummary:
    """What a layer's state counts say, derived exactly from its count of counts.

    ``top_counts`` holds the ``top_k`` largest counts, descending; ``count_quantiles`` the counts
    at ``QUANTILES`` of the per-state counts, interpolated as ``numpy.quantile`` does.
    """

    total: int
    distinct: int
    entropy_bits: float
    top_counts: np.ndarray
    count_quantiles: np.ndarray


class LayerCounter:
    """Turns one layer's packed groups into exact keys and counts them in its audit's budget.

    Without a ``budget`` the counter gets one of its own (``DEFAULT_MEMORY_BUDGET``, spilling to
    the system's temp folder, removed when the counter is dropped).
    """

    def __init__(
        self, neurons: int, groups: list[tuple[int, int]], group_axis: int, budget: MemoryBudget | None = None
    ) -> None:
        self.neurons = neurons
        self.groups = groups
        self.group_axis = group_axis
        self.budget = budget if budget is not None else MemoryBudget(DEFAULT_MEMORY_BUDGET)
        self.store = make_store(neurons, self.budget)
        self.total = 0

    def add(self, packed: np.ndarray) -> None:
        """Count the states in a packed output of shape (batch, …, groups, …)."""
        keys = join_groups(packed, self.groups, self.group_axis)
        self.total += len(keys)
        self.store.add(keys)

    def merge(self, other: LayerCounter) -> None:
        """Add another counter's counts of the same layer (a shard's, a worker's): SPEC §2."""
        if other.neurons != self.neurons:
            raise ValueError(f"cannot merge counts of {other.neurons} neurons into a layer of {self.neurons}")
        self.store.merge(other.store)
        self.total += other.total

    def count_histogram(self) -> tuple[np.ndarray, np.ndarray]:
        """The count of counts: distinct count values ascending, and how many states have each."""
        values, states = np.zeros(0, np.int64), np.zeros(0, np.int64)
        for run in self.store.merged():
            values, states = add_histograms((values, states), count_of_counts(run["count"]))
        return values, states

    def summary(self, top_k: int = 100) -> StateSummary:
        """Distinct states, entropy, top counts and count quantiles, by one streaming merge."""
        return summarize(*self.count_histogram(), top_k=top_k)

    def counts(self) -> np.ndarray:
        """Every distinct state's count, in key order, all in memory at once: for tests and small layers."""
        return np.concatenate([run["count"] for run in self.store.merged()] or [np.zeros(0, np.int64)])


def count_of_counts(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The count of counts of per-state counts: distinct values ascending, and how often each occurs."""
    values, states = np.unique(np.asarray(counts, np.int64), return_counts=True)
    return values, states.astype(np.int64)


def add_histograms(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Two counts of counts over disjoint sets of states, as one."""
    values, where = np.unique(np.concatenate([a[0], b[0]]), return_inverse=True)
    states = np.zeros(len(values), np.int64)
    np.add.at(states, where, np.concatenate([a[1], b[1]]))
    return values, states


def summarize(values: np.ndarray, states: np.ndarray, top_k: int = 100) -> StateSummary:
    """A layer's figures from its count of counts (``values`` ascending, ``states`` having each).

    Entropy is ``log2 T − (1/T) Σ c·log2 c``, summed as ``(1/T) Σ c·log2(T/c)``: every term is
    ≥ 0, so nothing large cancels, and ``math.fsum`` adds them in a fixed order. The same
    histogram always gives the same bits, whether its runs were held or spilled.
    """
    values, states = np.asarray(values, np.int64), np.asarray(states, np.int64)
    total, distinct = int(np.dot(values, states)), int(states.sum())
    if distinct == 0:
        raise ValueError("no states were counted")
    terms = states * values * np.log2(total / values)
    entropy = math.fsum(terms.tolist()) / total
    return StateSummary(
        total=total,
        distinct=distinct,
        entropy_bits=entropy,
        top_counts=_top_counts(values, states, top_k),
        count_quantiles=_count_quantiles(values, states),
    )


def _top_counts(values: np.ndarray, states: np.ndarray, k: int) -> np.ndarray:
    """The k largest per-state counts, descending, without expanding the histogram."""
    taken = np.minimum(states[::-1], np.maximum(0, k - (np.cumsum(states[::-1]) - states[::-1])))
    return np.repeat(values[::-1], taken)


def _count_quantiles(values: np.ndarray, states: np.ndarray) -> np.ndarray:
    """``numpy.quantile(counts, QUANTILES)`` from the histogram: exact order statistics, numpy's interpolation."""
    last = np.cumsum(states) - 1  # index, in ascending order, of the last state with each value
    n = int(last[-1]) + 1
    out = np.empty(len(QUANTILES))
    for i, q in enumerate(QUANTILES):
        position = q * (n - 1)
        below = math.floor(position)
        pair = values[np.searchsorted(last, [below, min(below + 1, n - 1)])].astype(np.float64)
        out[i] = np.quantile(pair, position - below)  # numpy's own lerp between the two neighbours
    return out
