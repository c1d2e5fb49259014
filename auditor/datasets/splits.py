"""Opening what a data spec names: a known dataset, a ``.npz``/``.npy`` file, or an image folder.

``open_splits`` and ``open_dataset`` send a spec to its loader (``idx``, ``arrays``, or
``images``, which is imported only for a folder since it loads Pillow) and check everything that
can be checked without reading the samples, so a bad input is refused before an audit starts. How
a folder's images become samples (the model input's layout, ``--resize``, ``--crop``,
``--skip-bad``) comes in an ``ImageOptions``, so the loaders stay model-agnostic.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from auditor.datasets.arrays import array_dataset, array_file, read_arrays
from auditor.datasets.batches import Dataset
from auditor.datasets.idx import idx_dataset
from auditor.errors import DataError
from auditor.records import KNOWN_DATASETS, SPLIT_CHOICES, SPLITS, ImageOptions


def open_dataset(
    spec: str,
    split: str,
    *,
    limit: int | None = None,
    data_dir: Path | None = None,
    images: ImageOptions | None = None,
) -> Dataset:
    """Open one split ("train" or "test") of ``spec`` for streaming.

    ``spec`` is a name in ``KNOWN_DATASETS``, a path to a ``.npz``/``.npy`` file, or a folder of
    images, which ``images`` (default: each image as it is, RGB, H×W×C) turns into samples. A
    source that holds a single split serves whichever split is asked. ``limit`` keeps the first
    ``limit`` samples (files, for a folder). Everything that can be checked without reading the
    samples is checked here, so a bad input is refused before an audit starts. ``data_dir`` is as
    in :func:`locate`.
    """
    return _open(spec, _wanted(split, SPLITS), limit, data_dir, images)[0]


def open_splits(
    spec: str,
    split: str,
    *,
    limit: int | None = None,
    data_dir: Path | None = None,
    images: ImageOptions | None = None,
) -> list[Dataset]:
    """Open ``split`` of ``spec`` for streaming: "train", "test", or "both" for [train, test].

    As :func:`open_dataset`, with ``limit`` applied to each split. "both" needs a source that
    holds two splits: a known dataset, a ``.npz`` with ``x_train`` and ``x_test``, or a folder
    with ``train/`` and ``test/``.
    """
    return _open(spec, _wanted(split, SPLIT_CHOICES), limit, data_dir, images)


def load_arrays(spec: str, split: str, *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole split in memory as ``(x, y)`` (``y`` None without labels), for training.

    It is a single batch of every sample, read by the same code that streams, so it holds
    exactly the bytes that ``Dataset.batches`` yields.
    """
    dataset = open_dataset(spec, split, limit=limit)
    batch = next(dataset.batches(dataset.count))
    return batch.x, batch.y


def _wanted(split: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """The splits that ``split`` names, refusing anything outside ``choices``."""
    if split not in choices:
        raise DataError(f"split must be {' or '.join(choices)}, got {split!r}")
    return SPLITS if split == "both" else (split,)


def _open(
    spec: str, splits: tuple[str, ...], limit: int | None, data_dir: Path | None, images: ImageOptions | None
) -> list[Dataset]:
    """The wanted splits of ``spec``; ``limit`` is checked first, before anything is read or fetched.

    A folder goes to :mod:`auditor.datasets.images`, imported only then (it loads Pillow); a dataset name
    wins over a folder of that name.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 (or none, for all samples), got {limit}")
    if spec not in KNOWN_DATASETS and Path(spec).expanduser().is_dir():
        from auditor.datasets import images as folder

        return folder.open_folder(spec, splits, limit, images or folder.ImageOptions())
    if images is not None and images.has_folder_settings:
        raise DataError(f"--resize, --crop and --skip-bad apply to image folders, and {spec} is not a folder")
    if spec in KNOWN_DATASETS:
        return [idx_dataset(spec, split, limit, data_dir) for split in splits]
    path = array_file(spec)
    pairs = zip(splits, read_arrays(path, splits), strict=True)
    return [array_dataset(path.name, split, x, y, limit) for split, (x, y) in pairs]
