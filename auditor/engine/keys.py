"""Exact keys of layer states, from the packed groups the rewritten graph outputs (SPEC §2).

A state is the bit-vector of a layer's firing neurons at one (sample, position). The graph hands
us those bits packed into int32 groups, one per byte or of at most 24 bits (``expose.packing``);
``join_groups`` turns them into exact keys: one integer when the layer has ≤ 64 neurons, else rows
of 64-bit words. ``hash_rows`` spreads wide keys out (an order to sort by, a partition to send
them to); it never decides whether two keys are equal.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import Any

import numpy as np


def namespace(array: Any) -> ModuleType:
    """The array module ``array`` belongs to: numpy, or CuPy for a CuPy array (sklearn's get_namespace, in short)."""
    root = type(array).__module__.partition(".")[0]
    return np if root == "numpy" else importlib.import_module(root)


def join_groups(packed: np.ndarray, groups: list[tuple[int, int]], group_axis: int) -> np.ndarray:
    """Exact keys, one per (sample, position): 1-D when ≤ 64 neurons, else rows of uint64 words.

    One group is its own key, as it came. Several are shifted to their places in their 64-bit
    words (groups never straddle words) and or-ed together: into uint32 keys for layers of at
    most 32 neurons, uint64 beyond. Works in the array module ``packed`` lives in (``namespace``),
    so the keys of a CuPy array are joined on its device.
    """
    xp = namespace(packed)
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
            xp.bitwise_or(words[word], part, out=words[word])
        else:
            words[word] = part
    keys = [words[w].reshape(-1) for w in sorted(words)]
    return keys[0] if len(keys) == 1 else xp.stack(keys, axis=1)


def key_words(neurons: int) -> int:
    """How many 64-bit words hold one key of a layer with ``neurons`` neurons."""
    return max(1, -(-neurons // 64))


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
