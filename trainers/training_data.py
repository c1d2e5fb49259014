"""Training data as PyTorch tensors: the auditor's dataset loader, scaled to [0, 1].

Images come from ``auditor.datasets.splits.load_arrays`` so ``AUDITOR_DATA_DIR`` and its checksummed files
apply here too, except the Gaussian-noise set (``trainers.noise_data``), generated from its seed.
Label noise is applied by the caller (``trainers.label_noise``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from auditor.errors import AuditError
from trainers.noise_data import dataset_arrays, is_noise
from trainers.records import CLASSES


@dataclass(frozen=True)
class Split:
    """One split as tensors: images float32 (N, C, H, W) in [0, 1], labels int64 (N,)."""

    x: torch.Tensor
    y: torch.Tensor


def load_split(dataset: str, split: str, limit: int | None = None, *, any_shape: bool = False) -> Split:
    """The first ``limit`` samples (all when None) of ``split`` ("train" or "test").

    ``dataset`` is anything ``auditor.datasets.splits`` opens (``mnist``, ``fashion-mnist``, an ``.npz``) or
    ``gaussian-noise[:SEED]``. The LeNets need labelled 28×28 images; with ``any_shape`` (the MLP,
    which flattens its input) any labelled image shape is taken.
    """
    images, labels = dataset_arrays(dataset, split, limit)
    mnist_shaped = images.shape[1:] in ((28, 28), (1, 28, 28))
    if labels is None or not (mnist_shaped or (any_shape and images.ndim >= 2)):
        raise AuditError(
            f"{dataset} {split}: the LeNets train on labelled 28x28 images, got samples shaped "
            f"{images.shape[1:]}{' without labels' if labels is None else ''}"
        )
    _check_values(dataset, split, images, labels)
    scaled = np.asarray(images, dtype=np.float32) / (1.0 if is_noise(dataset) else 255.0)
    x = torch.from_numpy(scaled)
    x = x.reshape(-1, 1, 28, 28) if mnist_shaped else x
    return Split(x=x, y=torch.from_numpy(np.asarray(labels, dtype=np.int64)))


def _check_values(dataset: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    """Refuse, in one line, what training would turn into NaN weights or a torch error: images
    that are not all finite, labels outside 0..CLASSES-1 (the loader has checked both are numbers)."""
    bad = int(np.size(images) - np.count_nonzero(np.isfinite(images)))
    if bad:
        raise AuditError(f"{dataset} {split}: the images hold {bad} NaN/inf values; clean them before training")
    labels = np.asarray(labels)  # whole numbers: the dataset loader refuses other labels
    if labels.size and (labels.min() < 0 or labels.max() >= CLASSES):
        raise AuditError(
            f"{dataset} {split}: labels must be whole numbers in 0..{CLASSES - 1} (the networks have {CLASSES} "
            f"outputs), got {labels.min()}..{labels.max()}"
        )
