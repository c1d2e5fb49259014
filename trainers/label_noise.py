"""Label noise (SPEC §7): a seeded fraction of the *training* labels changed, never the test labels.

Two kinds, named apart (``trainers.records.LABEL_NOISE_KINDS``):

- ``random`` (the aIQ paper): each chosen label is resampled uniformly from all classes;
- ``shuffled`` (the CNA paper's appendix): the chosen labels are permuted among themselves, so the
  class counts are unchanged.

It is a property of the data, not of the model, and it is plain NumPy: the trainer applies it
before training, and the grid report applies it again to audit a network on the very labels it
was trained on.
"""

from __future__ import annotations

import numpy as np

from auditor.errors import require


def randomize_labels(
    labels: np.ndarray, fraction: float, seed: int, classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Replace exactly ``round(fraction * N)`` labels, chosen by ``seed``, by uniform random classes.

    Returns the new labels (a copy) and the sorted positions that were resampled. A resampled
    label is drawn from all ``classes`` classes, so about one in ten keeps its old class by chance:
    the fraction is of labels *resampled*, not of labels changed, as in the paper's "replaced by
    uniformly random classes".
    """
    require([(0 <= fraction <= 1, f"label-noise fraction must be in [0, 1], got {fraction}")])
    rng = np.random.default_rng(seed)
    count = round(fraction * len(labels))
    positions = np.sort(rng.choice(len(labels), size=count, replace=False))
    noisy = np.array(labels, dtype=np.int64, copy=True)
    noisy[positions] = rng.integers(0, classes, size=count)
    return noisy, positions


def shuffle_labels(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Permute the labels of exactly ``round(fraction * N)`` samples, chosen by ``seed``, among themselves.

    Returns the new labels (a copy) and the sorted positions whose labels were permuted. The
    class counts are those of ``labels``; a permuted label can land on a sample of its own class,
    so slightly fewer than the fraction actually change.
    """
    require([(0 <= fraction <= 1, f"label-noise fraction must be in [0, 1], got {fraction}")])
    rng = np.random.default_rng(seed)
    count = round(fraction * len(labels))
    positions = np.sort(rng.choice(len(labels), size=count, replace=False))
    noisy = np.array(labels, dtype=np.int64, copy=True)
    noisy[positions] = noisy[positions][rng.permutation(count)]
    return noisy, positions


def noisy_labels(labels: np.ndarray, kind: str, fraction: float, seed: int) -> np.ndarray:
    """The training labels a job of label-noise ``kind`` ("random" or "shuffled") trains on."""
    if kind == "shuffled":
        return shuffle_labels(labels, fraction, seed)[0]
    return randomize_labels(labels, fraction, seed)[0]
