"""The CNA paper's Gaussian-noise data set ([C], appendix), generated from a seed.

``gaussian-noise`` (seed 0) or ``gaussian-noise:SEED``: 50,000 training and 10,000 test images of
3×32×32 values drawn from N(0, 1), rescaled to [0, 1] with the minimum and maximum over the whole
split, and labels drawn uniformly from the 10 classes. Nothing in them can be learned, so a
network's test accuracy is chance and its gap is what it memorised.

Samples are drawn in chunks of ``CHUNK`` from generators seeded by (seed, split, chunk), so the
first N samples are the same whatever ``limit`` asks for; the split's minimum and maximum are
found in a first pass over every chunk, so memory stays that of the samples returned.
"""

from __future__ import annotations

import numpy as np

from auditor.datasets.splits import load_arrays
from auditor.errors import AuditError

NAME = "gaussian-noise"
SHAPE = (3, 32, 32)
SIZES = {"train": 50_000, "test": 10_000}
CHUNK = 1000
CLASSES = 10
_SPLIT_IDS = {"train": 0, "test": 1}


def is_noise(dataset: str) -> bool:
    """Whether ``dataset`` names the Gaussian-noise set (``gaussian-noise`` or ``gaussian-noise:SEED``)."""
    return dataset == NAME or dataset.startswith(f"{NAME}:")


def noise_seed(dataset: str) -> int:
    """The seed a ``gaussian-noise[:SEED]`` name asks for (0 by default)."""
    _, _, seed = dataset.partition(":")
    try:
        value = int(seed) if seed else 0
    except ValueError:
        raise AuditError(f"{dataset!r}: the Gaussian-noise seed must be a whole number, e.g. {NAME}:7") from None
    if value < 0:
        raise AuditError(f"{dataset!r}: the Gaussian-noise seed must be >= 0")
    return value


def _chunk(seed: int, split: str, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _SPLIT_IDS[split], index])
    return rng.standard_normal((size, *SHAPE), dtype=np.float32), rng.integers(0, CLASSES, size=size)


def _chunks(total: int) -> list[tuple[int, int]]:
    return [(index, min(CHUNK, total - start)) for index, start in enumerate(range(0, total, CHUNK))]


def gaussian_noise(dataset: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The first ``limit`` (all when None) images, float32 (N, 3, 32, 32) in [0, 1], and their labels."""
    if split not in SIZES:
        raise AuditError(f"{NAME} has the splits train and test, not {split!r}")
    seed, total = noise_seed(dataset), SIZES[split]
    low, high = np.inf, -np.inf
    for index, size in _chunks(total):
        values, _ = _chunk(seed, split, index, size)
        low, high = min(low, float(values.min())), max(high, float(values.max()))
    wanted = total if limit is None else min(limit, total)
    images, labels = [], []
    for index, size in _chunks(total):
        if index * CHUNK >= wanted:
            break
        values, classes = _chunk(seed, split, index, size)
        images.append((values - np.float32(low)) / np.float32(high - low))
        labels.append(classes)
    x = np.concatenate(images)[:wanted]
    return np.clip(x, 0, 1, out=x), np.concatenate(labels)[:wanted].astype(np.int64)


def dataset_arrays(dataset: str, split: str, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The first ``limit`` samples of ``split`` as the auditor reads them: uint8 images for the
    files ``auditor.datasets.splits`` opens, float32 in [0, 1] for the Gaussian-noise set. No PyTorch."""
    if is_noise(dataset):
        return gaussian_noise(dataset, split, limit)
    return load_arrays(dataset, split, limit=limit)
