"""Training data: the auditor's dataset loader, scaled for PyTorch, and label randomisation.

Images come from ``auditor.data.load_arrays`` so ``AUDITOR_DATA_DIR`` and its checksummed files
apply here too. The label-noise variant of SPEC §7 lives here because it is a property of the
data, not of the model: a seeded fraction of the *training* labels is resampled, never the test
labels.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from auditor.data import load_arrays
from auditor.errors import AuditError


@dataclass(frozen=True)
class Split:
    """One split as tensors: images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor


def load_split(dataset: str, split: str, limit: int | None = None) -> Split:
    """The first ``limit`` samples (all when None) of ``split`` ("train" or "test").

    ``dataset`` is anything ``auditor.data`` opens (``mnist``, ``fashion-mnist``, an ``.npz``)
    as long as it holds labelled 28×28 images.
    """
    images, labels = load_arrays(dataset, split, limit=limit)
    if labels is None or images.shape[1:] not in ((28, 28), (1, 28, 28)):
        raise AuditError(
            f"{dataset} {split}: the LeNets train on labelled 28x28 images, got samples shaped "
            f"{images.shape[1:]}{' without labels' if labels is None else ''}"
        )
    x = torch.from_numpy(np.asarray(images, dtype=np.float32) / 255.0).reshape(-1, 1, 28, 28)
    return Split(x=x, y=torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def randomize_labels(
    labels: np.ndarray, fraction: float, seed: int, classes: int = 10
) -> tuple[np.ndarray, np.ndarray]:
    """Replace exactly ``round(fraction * N)`` labels, chosen by ``seed``, by uniform random classes.

    Returns the new labels (a copy) and the sorted positions that were resampled. A resampled
    label is drawn from all ``classes`` classes, so about one in ten keeps its old class by chance:
    the fraction is of labels *resampled*, not of labels changed, as in the paper's "replaced by
    uniformly random classes".
    """
    if not 0 <= fraction <= 1:
        raise AuditError(f"label-noise fraction must be in [0, 1], got {fraction}")
    rng = np.random.default_rng(seed)
    count = round(fraction * len(labels))
    positions = np.sort(rng.choice(len(labels), size=count, replace=False))
    noisy = np.array(labels, dtype=np.int64, copy=True)
    noisy[positions] = rng.integers(0, classes, size=count)
    return noisy, positions
