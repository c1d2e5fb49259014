"""Exact, mergeable counting of layer states (SPEC §2).

A state is the bit-vector of a layer's firing neurons at one (sample, position). The graph hands
us those bits packed into int32 groups of at most 24 bits (``graph.word_groups``); here they are
joined into exact keys (one integer when the layer has ≤ 64 neurons, several 64-bit words
otherwise) and counted. Two stores share one small contract, so a counter can hold either, and
counts from batches or workers merge by adding, bit-identical to a single pass.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np

HISTOGRAM_BITS = 20  # up to 2**20 states: a dense histogram beats sorting
COMPACT_AT = 1 << 23  # pending keys held before they are folded into sorted counts


class StateStore(Protocol):
    """Counts of distinct keys; ``add`` takes raw keys, ``merge`` adds another store's counts."""

    def add(self, keys: np.ndarray) -> None: ...

    def merge(self, other: StateStore) -> None: ...

    def items(self) -> tuple[np.ndarray, np.ndarray]: ...


class HistogramStore:
    """A dense count per possible key, for layers of at most ``HISTOGRAM_BITS`` neurons."""

    def __init__(self, bits: int) -> None:
        self.counts = np.zeros(1 << bits, np.int64)

    def add(self, keys: np.ndarray) -> None:
        self.counts += np.bincount(keys.ravel(), minlength=self.counts.size)

    def merge(self, other: StateStore) -> None:
        keys, counts = other.items()
        np.add.at(self.counts, keys.ravel().astype(np.intp), counts)

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        keys = np.flatnonzero(self.counts)
        return keys, self.counts[keys]


class SortedStore:
    """Sorted distinct keys with counts; raw keys queue up and are folded in by one sort.

    Keys are 1-D integers, or rows of several uint64 words for layers wider than 64 neurons.
    """

    def __init__(self) -> None:
        self.keys: np.ndarray | None = None
        self.counts = np.zeros(0, np.int64)
        self.pending: list[np.ndarray] = []
        self.pending_size = 0

    def add(self, keys: np.ndarray) -> None:
        self.pending.append(keys)
        self.pending_size += len(keys)
        if self.pending_size >= COMPACT_AT:
            self._fold_pending()

    def merge(self, other: StateStore) -> None:
        self._combine(*other.items())

    def items(self) -> tuple[np.ndarray, np.ndarray]:
        self._fold_pending()
        if self.keys is None:
            return np.zeros(0, np.uint64), self.counts
        return self.keys, self.counts

    def _fold_pending(self) -> None:
        """Count the queued raw keys with one plain sort (cheaper than an argsort), then add them in."""
        if not self.pending:
            return
        raw = np.concatenate(self.pending)
        self.pending, self.pending_size = [], 0
        if not len(raw):
            return
        ordered = np.sort(raw) if raw.ndim == 1 else raw[_sort_order(raw)]
        starts = _run_starts(ordered)
        self._combine(ordered[starts], np.diff(np.r_[starts, len(ordered)]))

    def _combine(self, keys: np.ndarray, counts: np.ndarray) -> None:
        """Add distinct keys with counts to those held, summing the counts of equal keys."""
        if not len(keys):  # an empty store: nothing to add (its 1-D uint64 stub must not meet 2-D rows)
            return
        if self.keys is None:
            self.keys, self.counts = keys, counts
            return
        all_keys, all_counts = np.concatenate([self.keys, keys]), np.concatenate([self.counts, counts])
        order = _sort_order(all_keys)
        all_keys, all_counts = all_keys[order], all_counts[order]
        starts = _run_starts(all_keys)
        self.keys, self.counts = all_keys[starts], np.add.reduceat(all_counts, starts)


def _sort_order(keys: np.ndarray) -> np.ndarray:
    if keys.ndim == 1:
        return np.argsort(keys, kind="stable")
    return np.lexsort(keys.T[::-1])


def _run_starts(sorted_keys: np.ndarray) -> np.ndarray:
    """Indices where a run of equal keys begins in a sorted, non-empty key array."""
    step = sorted_keys[1:] != sorted_keys[:-1]
    return np.flatnonzero(np.r_[True, step if step.ndim == 1 else step.any(axis=1)])


def make_store(neurons: int) -> StateStore:
    """The store that counts a layer of ``neurons`` fastest: dense when small, sorted otherwise."""
    return HistogramStore(neurons) if neurons <= HISTOGRAM_BITS else SortedStore()


class LayerCounter:
    """Turns one layer's packed groups into exact keys and counts them."""

    def __init__(self, neurons: int, groups: list[tuple[int, int]], group_axis: int) -> None:
        self.neurons = neurons
        self.groups = groups
        self.group_axis = group_axis
        self.store = make_store(neurons)
        self.total = 0

    def add(self, packed: np.ndarray) -> None:
        """Count the states in a packed output of shape (batch, …, groups, …)."""
        keys = join_groups(packed, self.groups, self.group_axis)
        self.total += len(keys)
        self.store.add(keys)

    def counts(self) -> np.ndarray:
        """The count of each distinct state seen so far."""
        return self.store.items()[1]


def join_groups(packed: np.ndarray, groups: list[tuple[int, int]], group_axis: int) -> np.ndarray:
    """Exact keys, one per (sample, position): 1-D when ≤ 64 neurons, else rows of uint64 words."""
    axis = group_axis % packed.ndim
    if len(groups) == 1:
        return packed.reshape(-1)
    neurons = groups[-1][1]
    dtype = np.uint32 if neurons <= 32 else np.uint64
    words: dict[int, np.ndarray] = {}
    for g, (start, _) in enumerate(groups):
        word, shift = divmod(start, 64)
        part = np.take(packed, g, axis=axis).reshape(-1).astype(dtype)
        if shift:
            part <<= dtype(shift)
        words[word] = part if word not in words else words[word] | part
    if len(words) == 1:
        return words[0]
    return np.stack([words[w] for w in sorted(words)], axis=1)
