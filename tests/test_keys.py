"""Keys from packed groups (keys.py): exactly the bits of each state, whatever the layout and grouping."""

from __future__ import annotations

import numpy as np
import pytest
from models import NEURONS, pack, state_rows

from auditor.engine.expose import byte_groups, word_groups
from auditor.engine.keys import join_groups

# --- join_groups ---------------------------------------------------------------------------------


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
