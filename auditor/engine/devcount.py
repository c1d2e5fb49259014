"""One counting core for numpy and CuPy: a batch's keys counted where they lie (docs/counting.md).

An audit on a GPU should not copy every layer's keys to the host to sort them there. This core
takes one layer's packed groups for one batch, as arrays of any namespace ``xp`` that speaks
numpy's API (numpy itself, CuPy, or the tests' numpy-backed stand-in for a device), and does
the whole count there: join the groups into exact keys (``keys.join_groups``), sort, and
run-length-encode. Only the distinct keys with their counts cross to the host, as a run of
``stores.record_dtype`` in the order the host stores keep (``stores.fold_keys`` gives the very
same run), so the bounded stores, spilling, sharding and exactness downstream are unchanged.

Exact for wide layers too: a key of ≤ 64 neurons is one integer, sorted directly; a wider key is
a row of 64-bit words, sorted lexicographically on (64-bit hash of the row, word 0, word 1, …)
by ``xp.lexsort``. The hash only puts the rows in the order the host's runs use; two rows are
one state only when every word is equal, so no hash collision can merge two states.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from auditor.engine.keys import hash_rows, join_groups
from auditor.engine.stores import record_dtype

ToHost = Callable[[Any], np.ndarray]


@dataclass(frozen=True)
class CountedKeys:
    """One layer's states of one batch, counted on a device: ``states`` keys in all, and ``run``,
    their distinct keys with counts in key order (None for a layer whose states are not counted)."""

    states: int
    run: np.ndarray | None


def count_keys(keys: Any, xp: ModuleType, to_host: ToHost) -> np.ndarray:
    """The run of raw keys (1-D integers, or rows of uint64 words) counted in ``xp``: each distinct
    key once with its count, in key order, as a host record array of ``record_dtype``."""
    words = 1 if keys.ndim == 1 else keys.shape[1]
    if keys.shape[0] == 0:
        return np.zeros(0, record_dtype(words))
    if keys.ndim == 1:
        ordered = xp.sort(keys)
        starts = _starts(ordered[1:] != ordered[:-1], xp)
        heads, rows = ordered[starts].astype(xp.uint64), None
    else:
        rows = xp.ascontiguousarray(keys, dtype=xp.uint64)
        head = hash_rows(rows)
        order = xp.lexsort(xp.stack([*(rows[:, j] for j in reversed(range(words))), head]))
        head, rows = head[order], xp.take(rows, order, axis=0)
        starts = _starts((head[1:] != head[:-1]) | xp.any(rows[1:] != rows[:-1], axis=1), xp)
        heads, rows = head[starts], xp.take(rows, starts, axis=0)
    counts = xp.diff(xp.concatenate([starts, xp.asarray([keys.shape[0]], dtype=starts.dtype)]))
    run = np.empty(int(starts.shape[0]), record_dtype(words))
    run["head"] = to_host(heads)
    run["count"] = to_host(counts)
    if rows is not None:
        run["words"] = to_host(rows)
    return run


def count_packed(
    packed: Any, groups: list[tuple[int, int]], group_axis: int, xp: ModuleType, to_host: ToHost
) -> CountedKeys:
    """A layer's packed output of one batch (batch, …, groups, …) counted in ``xp``."""
    keys = join_groups(packed, groups, group_axis)
    return CountedKeys(int(keys.shape[0]), count_keys(keys, xp, to_host))


def _starts(boundary: Any, xp: ModuleType) -> Any:
    """Where each run of equal neighbours begins, given where neighbours differ (one shorter)."""
    first = xp.ones(1, dtype=bool)
    return xp.nonzero(xp.concatenate([first, boundary]))[0]
