"""What every data set becomes: a ``Dataset`` that streams ``Batch``es, built from array sources.

Each loader (``idx`` for MNIST and Fashion-MNIST, ``arrays`` for ``.npz``/``.npy`` files,
``images`` for image folders) describes its samples as a ``Source`` (shape, dtype and a reader
of the first rows in batches) and hands it to ``make_dataset``, which checks the count and the
labels once, before anything is read. ``tagged`` is how an audit reads datasets: every batch,
tagged with its split. Every refusal is a one-line ``DataError``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import partial

import numpy as np

from auditor.errors import DataError, NotFoundError
from auditor.records import KNOWN_DATASETS


@dataclass(frozen=True)
class Batch:
    """A run of consecutive samples.

    ``x`` holds the raw samples, first axis = samples, in their stored dtype (uint8 images stay
    uint8); ``y`` holds int64 labels, or is None when the data has none. Each batch owns its arrays.
    """

    x: np.ndarray
    y: np.ndarray | None = None


@dataclass(frozen=True)
class Dataset:
    """One split of a dataset, opened and checked, ready to stream.

    Opening reads the headers and labels of IDX files, memory-maps a ``.npy`` and lists an image
    folder; the samples are read (or, from a ``.npz`` already in memory, copied) by :meth:`batches`.
    ``count`` is exact except for an image folder read with ``skip_bad``, which yields ``count``
    minus the files in :attr:`skipped`.
    """

    name: str
    split: str
    count: int
    sample_shape: tuple[int, ...]
    dtype: np.dtype
    has_labels: bool
    _read: Callable[[int], Iterator[Batch]] = field(repr=False, compare=False)
    _skipped: Callable[[], tuple[str, ...]] = field(default=tuple, repr=False, compare=False)

    @property
    def skipped(self) -> tuple[str, ...]:
        """The bad images skipped so far (``skip_bad``), by their name in the folder, sorted.

        Read it after streaming; reading the data again never counts a file twice.
        """
        return self._skipped()

    def batches(self, batch_size: int) -> Iterator[Batch]:
        """The ``count`` samples in order, ``batch_size`` at a time (the last batch may be smaller).

        IDX and ``.npy`` samples are read one batch at a time, never the whole split. Each call
        starts again from the first sample, so one ``Dataset`` can be read any number of times.
        """
        if batch_size < 1:
            raise DataError(f"batch size must be >= 1, got {batch_size}")
        return self._read(batch_size)


def skipped_warnings(datasets: Sequence[Dataset]) -> list[str]:
    """One report warning per split that skipped bad images (``skip_bad``); read after the audit."""
    lines = [skipped_warning(dataset.split, dataset.name, dataset.skipped) for dataset in datasets]
    return [line for line in lines if line]


def skipped_warning(split: str, name: str, skipped: Sequence[str]) -> str | None:
    """The warning for the bad images of ``name`` that a split skipped, or None when it skipped none."""
    if not skipped:
        return None
    shown = ", ".join(repr(file) for file in skipped[:3]) + (", …" if len(skipped) > 3 else "")
    plural = "image" if len(skipped) == 1 else "images"
    return f"{split}: --skip-bad skipped {len(skipped)} bad {plural} of {name}: {shown}"


def tagged(datasets: Sequence[Dataset], batch_size: int) -> Iterator[tuple[str, Batch]]:
    """Every batch of each dataset in turn, tagged with the dataset's split: what ``audit`` reads."""
    for dataset in datasets:
        for batch in dataset.batches(batch_size):
            yield dataset.split, batch


def unknown_source(spec: str) -> NotFoundError:
    return NotFoundError(
        f"unknown dataset {spec!r}; use {' or '.join(KNOWN_DATASETS)}, a path to a .npz or .npy file, "
        "or a folder of images"
    )


@dataclass(frozen=True)
class Source:
    """An array to stream: its shape and dtype, and ``read(count, batch_size)`` for its first rows."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], Iterator[np.ndarray]]


def in_memory(array: np.ndarray) -> Source:
    """A source over an array in memory or memory-mapped."""
    return Source(tuple(array.shape), array.dtype, partial(array_batches, array))


def array_batches(x: np.ndarray, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """The first ``count`` samples of ``x``, copied ``batch_size`` at a time into C-ordered arrays
    (so a memory-mapped ``x`` is read one batch at a time)."""
    for start in range(0, count, batch_size):
        yield np.array(x[start : min(start + batch_size, count)], order="C")


def make_dataset(name: str, split: str, x: Source, y: Source | None, limit: int | None) -> Dataset:
    """A Dataset over the first ``limit`` samples of ``x``, after checking that there are some and
    that the labels ``y`` fit them (from their shape and dtype: nothing is read yet)."""
    total = x.shape[0]
    count = total if limit is None else min(limit, total)
    if count == 0:
        raise DataError(
            f"limit 0 leaves no samples of {name} {split}; use a limit >= 1, or none"
            if total
            else f"{name} {split} has no samples; provide at least one"
        )
    if y is not None:
        _check_labels(y, total, f"{name} {split}")
    return Dataset(
        name=name,
        split=split,
        count=count,
        sample_shape=tuple(int(d) for d in x.shape[1:]),
        dtype=x.dtype,
        has_labels=y is not None,
        _read=partial(_stream, x.read, None if y is None else y.read, count),
    )


def _check_labels(y: Source, total: int, where: str) -> None:
    """Refuse labels that are not one integer per sample."""
    if y.dtype.kind not in "iu":
        raise DataError(f"{where}: labels must be integers, got {y.dtype}; save y as integer class indices")
    if y.shape != (total,):
        raise DataError(f"{where}: {total} samples but labels of shape {y.shape}; provide one label per sample")


def _stream(
    read_x: Callable[[int, int], Iterator[np.ndarray]],
    read_y: Callable[[int, int], Iterator[np.ndarray]] | None,
    count: int,
    batch_size: int,
) -> Iterator[Batch]:
    """Batches of the first ``count`` samples, each with its int64 labels when there are labels."""
    if read_y is None:
        for x in read_x(count, batch_size):
            yield Batch(x)
        return
    for x, y in zip(read_x(count, batch_size), read_y(count, batch_size), strict=True):
        yield Batch(x, y.astype(np.int64))
