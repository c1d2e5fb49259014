"""Where counted states are held in bounded memory: runs, stores, and the budget that spills them.

Each counted layer owns a store. A narrow layer gets a dense histogram. Any other queues raw keys
and folds them, by one sort, into *runs*: record arrays of distinct keys with their counts, in key
order. One ``MemoryBudget`` per audit watches what all its stores hold; past its limit the largest
stores write their runs to files in a private spill folder, removed when the budget closes. The
folder is owned through a lock inside it (``auditor.locks``): the first spill of an audit removes
the folders that killed audits left under the same spill root, once their owners are gone.

Reading a store back is a streaming merge of its runs, one bounded range of keys at a time, in
key order (``StateStore.merged``); held and spilled runs go through the same merge, so what is
read back does not depend on the budget, the batching or how stores were merged.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import itertools
import os
import shutil
import tempfile
import weakref
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from auditor import locks
from auditor.engine.keys import hash_rows, key_words
from auditor.errors import AuditError, LimitError

HISTOGRAM_BITS = 20  # up to 2**20 states: a dense histogram beats sorting
MERGE_ROWS_MIN = 1 << 16  # a fold or merge step may always take this many rows, however small the budget
MAX_SPILLED_RUNS = 64  # spilled runs of one store before they are merged into one file
SPILL_PREFIX = "auditor-spill-"  # an audit's spill folder under the spill root, owned by a lock inside

_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


# --- Runs ------------------------------------------------------------------------------------


def record_dtype(words: int) -> np.dtype:
    """A run's record: ``head`` (the order key), ``count``, and the key's ``words`` when it has several.

    ``head`` is the key itself when it fits one word, else ``hash_rows`` of its words. Runs are
    sorted by head, then by the words; equality is always decided on the whole key.
    """
    fields: list[tuple] = [("head", "<u8"), ("count", "<i8")]
    if words > 1:
        fields.append(("words", "<u8", (words,)))
    return np.dtype(fields)


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
    Not thread-safe: only the audit's own thread settles it (stores may absorb on others).
    """

    def __init__(self, limit_bytes: int, spill_dir: str | os.PathLike[str] | None = None) -> None:
        if limit_bytes < 1:
            raise ValueError(f"a memory budget must be at least 1 byte, got {limit_bytes}")
        self.limit_bytes = int(limit_bytes)
        self.spill_dir = None if spill_dir is None else Path(spill_dir)
        if self.spill_dir is not None and not (
            self.spill_dir.is_dir() and os.access(self.spill_dir, os.W_OK | os.X_OK)
        ):
            raise AuditError("the spill folder (spill_dir) is not a writable folder; point it at one")
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
                self._folder = Path(tempfile.mkdtemp(prefix=SPILL_PREFIX, dir=self.spill_dir))
                ownership = locks.take(self._folder / locks.LOCK_FILE)
            except OSError as exc:
                if self._folder is not None:
                    shutil.rmtree(self._folder, ignore_errors=True)
                    self._folder = None
                raise _spill_error(exc) from None
            # Removes the folder if the budget is dropped unclosed, at the latest when Python exits.
            self._remove_folder = weakref.finalize(self, _remove_spill_folder, self._folder, ownership)
            # What killed audits (SIGKILL, power loss) left under the same root, now that their owners are gone.
            locks.remove_abandoned(self._folder.parent, SPILL_PREFIX)
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


def _remove_spill_folder(folder: Path, ownership: locks.Ownership | None) -> None:
    shutil.rmtree(folder, ignore_errors=True)
    if ownership is not None:
        ownership.release()


def _spill_error(exc: OSError) -> AuditError:
    """One line naming the setting and the reason, never the path."""
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        return LimitError(
            f"the spill folder (spill_dir) is full ({reason}); free space there, "
            "point spill_dir at a larger disk, or raise the memory budget (memory_budget)"
        )
    return AuditError(f"cannot write to the spill folder (spill_dir): {reason}; point it at a writable folder")


# --- Stores ----------------------------------------------------------------------------------


class StateStore(Protocol):
    """Counts of distinct keys in bounded memory; ``merge`` adds another store's counts.

    ``add`` takes raw keys and lets the budget spill; ``absorb`` and ``absorb_run`` (a run of
    distinct keys counted elsewhere) touch this store alone and leave settling to the caller.
    """

    @property
    def held_bytes(self) -> int: ...

    def add(self, keys: np.ndarray) -> None: ...

    def absorb(self, keys: np.ndarray) -> None: ...

    def absorb_run(self, run: np.ndarray) -> None: ...

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
        self.absorb(keys)

    def absorb(self, keys: np.ndarray) -> None:
        self.counts += np.bincount(keys.ravel(), minlength=self.counts.size)

    def absorb_run(self, run: np.ndarray) -> None:
        self.counts[run["head"].astype(np.intp)] += run["count"]  # a run's keys are distinct

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
            raise AuditError("a spill file was cut short; is something cleaning the spill folder (spill_dir)?")
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
        self.absorb(keys)
        self.budget.settle()

    def absorb(self, keys: np.ndarray) -> None:
        """Queue raw keys and fold them once a budget step has queued; the budget is not settled."""
        self.queued.append(keys)
        self.queued_bytes += keys.nbytes
        if self.queued_bytes >= self.budget.step_bytes:
            self.fold()

    def absorb_run(self, run: np.ndarray) -> None:
        """Hold a run of distinct keys counted elsewhere (of this store's record type, in key order)."""
        if run.dtype != self.dtype:
            raise ValueError("a run of keys of another width cannot join this store")
        self._hold(run)

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
