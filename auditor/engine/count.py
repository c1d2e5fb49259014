"""Counting a layer's states exactly, and what the counts say (SPEC §2).

A ``LayerCounter`` turns one layer's packed groups into exact keys (``keys.join_groups``) and
counts them in a store of its audit's ``MemoryBudget`` (``stores``); or it takes (key, count)
pairs that were already counted elsewhere, on a device (``devcount``), into the same store.

The figures need only the counts. So the end of an audit reads a layer's store back, one
bounded range of keys at a time, into a ``CountOfCounts``: how many states were seen c times,
for each c (at most about √(2T) entries). Counts of counts over disjoint sets of states add
exactly, so a sharded audit's reducers give the same record a local audit does, and distinct
states, entropy, exact quantiles and the top counts all follow from it (``CountOfCounts.summary``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from auditor.config import DEFAULT_MEMORY_BUDGET
from auditor.engine.keys import join_groups
from auditor.engine.stores import MemoryBudget, make_store

QUANTILES = (0.0, 0.25, 0.5, 0.75, 1.0)


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


@dataclass(frozen=True, eq=False)
class CountOfCounts:
    """How many states were seen each number of times: ``values`` ascending, ``states`` having each.

    The one record the local and the sharded paths both fold counts into; plain arrays, so it
    pickles to and from Ray tasks.
    """

    values: np.ndarray
    states: np.ndarray

    @classmethod
    def empty(cls) -> CountOfCounts:
        return cls(np.zeros(0, np.int64), np.zeros(0, np.int64))

    @classmethod
    def of(cls, counts: np.ndarray) -> CountOfCounts:
        """The count of counts of per-state counts (one count per distinct state)."""
        values, states = np.unique(np.asarray(counts, np.int64), return_counts=True)
        return cls(values, states.astype(np.int64))

    @classmethod
    def of_runs(cls, runs: Iterable[np.ndarray]) -> CountOfCounts:
        """The count of counts of runs of distinct keys (a store's ``merged()``), folded as they come."""
        return cls.sum(cls.of(run["count"]) for run in runs)

    @classmethod
    def sum(cls, parts: Iterable[CountOfCounts]) -> CountOfCounts:
        """Counts of counts over disjoint sets of states, added into one."""
        total = cls.empty()
        for part in parts:
            total = total + part
        return total

    def __add__(self, other: CountOfCounts) -> CountOfCounts:
        values, where = np.unique(np.concatenate([self.values, other.values]), return_inverse=True)
        states = np.zeros(len(values), np.int64)
        np.add.at(states, where, np.concatenate([self.states, other.states]))
        return CountOfCounts(values, states)

    @property
    def total(self) -> int:
        """States counted, repeats included."""
        return int(np.dot(self.values, self.states))

    def summary(self, top_k: int = 100) -> StateSummary:
        """Distinct states, entropy, the ``top_k`` largest counts and count quantiles.

        Entropy is ``log2 T − (1/T) Σ c·log2 c``, summed as ``(1/T) Σ c·log2(T/c)``: every term
        is ≥ 0, so nothing large cancels, and ``math.fsum`` adds them in a fixed order. The same
        record always gives the same bits, whether its runs were held, spilled or sharded.
        """
        values, states = np.asarray(self.values, np.int64), np.asarray(self.states, np.int64)
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


class LayerCounter:
    """Turns one layer's packed groups into exact keys and counts them in its audit's budget.

    Without a ``budget`` the counter gets one of its own (``DEFAULT_MEMORY_BUDGET``, spilling to
    the system's temp folder, removed when the counter is dropped). ``absorb`` and ``absorb_run``
    touch this counter's store only, so counters of different layers may take a batch on
    different threads; the budget then settles once, on the audit's thread.
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
        """Count the states in a packed output of shape (batch, …, groups, …); the budget may spill."""
        self.absorb(packed)
        self.budget.settle()

    def absorb(self, packed: np.ndarray) -> None:
        """``add`` without settling the budget: safe beside other layers' counters on other threads."""
        keys = join_groups(packed, self.groups, self.group_axis)
        self.total += len(keys)
        self.store.absorb(keys)

    def absorb_run(self, run: np.ndarray) -> None:
        """Take a run of distinct keys with their counts (``stores.record_dtype``, in key order),
        counted elsewhere; the budget is not settled."""
        self.total += int(run["count"].sum())
        self.store.absorb_run(run)

    def merge(self, other: LayerCounter) -> None:
        """Add another counter's counts of the same layer (a shard's, a worker's): SPEC §2."""
        if other.neurons != self.neurons:
            raise ValueError(f"cannot merge counts of {other.neurons} neurons into a layer of {self.neurons}")
        self.store.merge(other.store)
        self.total += other.total

    def count_of_counts(self) -> CountOfCounts:
        """The layer's count of counts, by one streaming merge of its store."""
        return CountOfCounts.of_runs(self.store.merged())

    def summary(self, top_k: int = 100) -> StateSummary:
        """Distinct states, entropy, top counts and count quantiles, by one streaming merge."""
        return self.count_of_counts().summary(top_k)

    def counts(self) -> np.ndarray:
        """Every distinct state's count, in key order, all in memory at once: for tests and small layers."""
        return np.concatenate([run["count"] for run in self.store.merged()] or [np.zeros(0, np.int64)])


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
