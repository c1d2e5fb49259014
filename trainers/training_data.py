"""Training data as PyTorch tensors: the auditor's dataset loader, scaled to [0, 1].

Images come from ``auditor.data.load_arrays`` so ``AUDITOR_DATA_DIR`` and its checksummed files
apply here too; label noise is applied by the caller (``trainers.label_noise``).
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
