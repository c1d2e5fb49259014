"""Arrays as data sets: any ``.npz`` or ``.npy`` file, streamed in batches.

A ``.npz`` holds one split (keys ``x`` and optional ``y``) or two (``x_train``/``y_train``/
``x_test``/``y_test``); each member is decompressed batch by batch as it is read, so taking
``--limit`` samples of a small file that claims huge arrays (a zip bomb) costs only those samples.
A ``.npy`` holds one split's samples without labels and is memory-mapped, so it suits data larger
than memory. Pickled objects are never loaded.
"""

from __future__ import annotations

import zipfile
import zlib
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import numpy as np

from auditor.datasets.batches import Dataset, Source, in_memory, make_dataset, unknown_source
from auditor.errors import DataError, NotFoundError, first_line
from auditor.records import SPLITS


def array_file(spec: str) -> Path:
    """The existing ``.npz``/``.npy`` file that ``spec`` names."""
    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".npz", ".npy"):
        raise unknown_source(spec)
    if not path.is_file():
        raise NotFoundError(f"data file {path} not found; check the path")
    return path


def read_arrays(path: Path, splits: tuple[str, ...]) -> list[tuple[Source, Source | None]]:
    """``(x, y)`` of each wanted split, the content deciding the layout.

    A ``.npy`` is memory-mapped and holds one split without labels. A ``.npz`` member is read in
    batches straight from the zip, never inflated whole: a small file that claims huge arrays (a
    zip bomb) costs only the batches actually read.
    """
    try:
        with path.open("rb") as stream:
            head = stream.read(6)
        if head == b"\x93NUMPY":
            _refuse_both(path, splits)
            return [(in_memory(np.load(path, mmap_mode="r", allow_pickle=False)), None)]
        if not head.startswith(b"PK"):  # zip's magic
            raise DataError(f"{path} is neither a .npy nor a .npz file; save the arrays with numpy.save or numpy.savez")
        with zipfile.ZipFile(path) as archive:
            names = [name.removesuffix(".npy") for name in archive.namelist() if name.endswith(".npy")]
            keys = _npz_keys(path, names, splits)
            return [(_member(archive, path, x), None if y is None else _member(archive, path, y)) for x, y in keys]
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(
            f"cannot read {path}: {first_line(exc)}; the auditor reads numeric arrays saved with "
            "numpy.save or numpy.savez (no pickled objects)"
        ) from None


def _member(archive: zipfile.ZipFile, path: Path, key: str) -> Source:
    """A source over the ``.npz`` member ``key``, after reading only its ``.npy`` header."""
    with archive.open(f"{key}.npy") as stream:
        version = np.lib.format.read_magic(stream)
        if version == (1, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(stream)
        elif version == (2, 0):
            shape, fortran_order, dtype = np.lib.format.read_array_header_2_0(stream)
        else:
            raise DataError(f"{path}: member {key!r} has .npy format {version}; save it with numpy.savez")
        offset = stream.tell()
    if dtype.hasobject:
        raise DataError(f"{path}: member {key!r} holds Python objects; save numeric arrays (no pickles)")
    if fortran_order and len(shape) > 1:
        raise DataError(f"{path}: member {key!r} is in Fortran order; save np.ascontiguousarray(x) instead")
    return Source(tuple(shape), dtype, partial(_member_rows, path, f"{key}.npy", offset, tuple(shape), dtype))


def _member_rows(
    path: Path, member: str, offset: int, shape: tuple[int, ...], dtype: np.dtype, count: int, batch_size: int
) -> Iterator[np.ndarray]:
    """The first ``count`` rows of a ``.npz`` member, decompressed ``batch_size`` rows at a time."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(member) as stream:
            stream.read(offset)
            for start in range(0, count, batch_size):
                out = np.empty((min(batch_size, count - start), *shape[1:]), dtype)
                if stream.readinto(memoryview(out.reshape(-1).view(np.uint8))) != out.nbytes:
                    raise DataError(f"{path}: member {member!r} declares {shape[0]} rows but ends early; save it again")
                yield out
    except (OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {first_line(exc)}; save the arrays again with numpy.savez") from None


def _npz_keys(path: Path, keys: list[str], splits: tuple[str, ...]) -> list[tuple[str, str | None]]:
    """The (x key, y key or None) of each wanted split in a ``.npz`` with these keys."""
    if any(f"x_{split}" in keys for split in SPLITS):
        suffixes = [f"_{split}" for split in splits]
        for suffix in suffixes:
            if f"x{suffix}" not in keys:
                raise DataError(
                    f"{path} has no x{suffix} key (keys: {', '.join(sorted(keys))}); "
                    f"add x{suffix}/y{suffix} or choose the other --split"
                )
    elif "x" in keys:
        _refuse_both(path, splits)
        suffixes = [""]
    else:
        raise DataError(
            f"{path} has keys {', '.join(sorted(keys)) or 'none'}; expected x (and optional y) "
            "for one split, or x_train/y_train/x_test/y_test"
        )
    return [(f"x{suffix}", f"y{suffix}" if f"y{suffix}" in keys else None) for suffix in suffixes]


def _refuse_both(path: Path, splits: tuple[str, ...]) -> None:
    """Refuse to serve a file that holds one split as both train and test."""
    if len(splits) > 1:
        raise DataError(
            f"{path} holds a single split, so it cannot serve both; use --split train or "
            "--split test, or provide a .npz with x_train/y_train and x_test/y_test keys"
        )


def array_dataset(name: str, split: str, x: Source, y: Source | None, limit: int | None) -> Dataset:
    """One split from arrays, once ``x`` is numeric with samples on its first axis."""
    if not x.shape or x.dtype.kind not in "biuf":
        raise DataError(
            f"{name} {split}: x must be a numeric array with samples on the first axis, "
            f"got {x.dtype} of shape {x.shape}"
        )
    return make_dataset(name, split, x, y, limit)
