"""Datasets: MNIST and Fashion-MNIST from their original IDX files, any ``.npz``/``.npy`` file, or
a folder of images (:mod:`auditor.images`), streamed in batches.

The IDX files are looked up in ``$AUDITOR_DATA_DIR/<name>/``, then in the user cache
(:func:`data_home`), and downloaded from public mirrors when missing. Every file is checked
against its published size and SHA-256 before it is read, once per process; its decompressed
copy, kept beside it or in the user cache and checked as well, is read in its place
(:mod:`auditor.idxcache`). Images are read one batch at a time, so a split is held whole only
when the caller asks for it (:func:`load_arrays`).

A ``.npz`` holds one split (keys ``x`` and optional ``y``) or two (``x_train``/``y_train``/
``x_test``/``y_test``); each member is decompressed batch by batch as it is read, so taking
``--limit`` samples of a small file that claims huge arrays (a zip bomb) costs only those samples. A
``.npy`` holds one split's samples without labels and is memory-mapped, so it suits data larger
than memory. A folder is read as images, decoded batch by batch; how they become samples (the
model input's layout, ``--resize``, ``--crop``, ``--skip-bad``) comes in an ``ImageOptions``, so
this module stays model-agnostic. Every refusal is a one-line ``DataError``, or ``NotFoundError``
for a dataset name or file that does not exist.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import threading
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from auditor.errors import DataError, NotFoundError, first_line
from auditor.idxcache import raw_copy
from auditor.records import KNOWN_DATASETS, SPLIT_CHOICES, SPLITS, ImageOptions

# The original distribution files, (bytes, sha256), as listed in ../shared/data/README.md.
_FILES: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (9912422, "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609"),
        "train-labels-idx1-ubyte.gz": (28881, "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c"),
        "t10k-images-idx3-ubyte.gz": (1648877, "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6"),
        "t10k-labels-idx1-ubyte.gz": (4542, "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (26421880, "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84"),
        "train-labels-idx1-ubyte.gz": (29515, "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845"),
        "t10k-images-idx3-ubyte.gz": (4422102, "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073"),
        "t10k-labels-idx1-ubyte.gz": (5148, "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5"),
    },
}
# The (images, labels) files of each split; both datasets use the same names.
_SPLIT_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# Tried in order; $AUDITOR_DATA_MIRROR replaces them with <base>/<name>/.
_MIRRORS = {
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"),
    "fashion-mnist": ("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
}
_IDX_IMAGES = 2051  # unsigned bytes, 3 dimensions: count, rows, cols
_IDX_LABELS = 2049  # unsigned bytes, 1 dimension: count
_DOWNLOAD_CHUNK = 1 << 20
_DOWNLOAD_TIMEOUT_S = 30

# (real path, size, mtime_ns) of the files already checked in this process; a changed file is
# checked again.
_VERIFIED: set[tuple[str, int, int]] = set()


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


def data_home() -> Path:
    """The user cache folder for downloaded datasets.

    ``$XDG_CACHE_HOME/onnx-auditor``, else ``~/.cache/onnx-auditor``. A relative
    ``XDG_CACHE_HOME`` is ignored, as the XDG spec says.
    """
    cache = os.environ.get("XDG_CACHE_HOME", "")
    return (Path(cache) if os.path.isabs(cache) else Path.home() / ".cache") / "onnx-auditor"


def locate(name: str, *, data_dir: Path | None = None) -> Path:
    """The folder that holds the four verified IDX files of dataset ``name``.

    The first of ``<data_dir>/<name>`` (``data_dir`` defaults to ``$AUDITOR_DATA_DIR`` when set) and
    ``data_home()/<name>`` that holds all four files is used. Otherwise the files missing from
    the first writable one of those folders are downloaded into it, so a partial copy is
    completed rather than duplicated. Every file is checked against its published size and
    SHA-256, once per process.
    """
    files = _files_of(name)
    folders = _search_folders(name, data_dir)
    complete = [folder for folder in folders if all((folder / file).is_file() for file in files)]
    folder = complete[0] if complete else _download_folder(name, folders)
    missing = []
    for file in files:
        if (folder / file).is_file():
            _verify(name, folder / file)
        else:
            missing.append(file)
    _download(name, missing, folder)
    return folder


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


def load_arrays(spec: str, split: str, *, limit: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """The whole split in memory as ``(x, y)`` (``y`` None without labels), for training.

    It is a single batch of every sample, read by the same code that streams, so it holds
    exactly the bytes that ``Dataset.batches`` yields.
    """
    dataset = open_dataset(spec, split, limit=limit)
    batch = next(dataset.batches(dataset.count))
    return batch.x, batch.y


# --- Finding, checking and downloading the IDX files ------------------------------------------


def _unknown(spec: str) -> NotFoundError:
    return NotFoundError(
        f"unknown dataset {spec!r}; use {' or '.join(KNOWN_DATASETS)}, a path to a .npz or .npy file, "
        "or a folder of images"
    )


def _files_of(name: str) -> dict[str, tuple[int, str]]:
    """The published (size, sha256) of each file of a known dataset."""
    if name not in _FILES:
        raise _unknown(name)
    return _FILES[name]


def _search_folders(name: str, data_dir: Path | None) -> list[Path]:
    """Where ``name``'s files are looked for, in order: ``data_dir`` (or ``$AUDITOR_DATA_DIR``), the user cache."""
    data_dir = data_dir or os.environ.get("AUDITOR_DATA_DIR")
    return ([Path(data_dir) / name] if data_dir else []) + [data_home() / name]


def _download_folder(name: str, folders: list[Path]) -> Path:
    """The first of ``folders`` that exists or can be made, and can be written."""
    for folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError:
            continue
        if os.access(folder, os.W_OK):
            return folder
    raise DataError(
        f"{name}: the files are missing and none of {', '.join(map(str, folders))} can be written; "
        f"place the files in $AUDITOR_DATA_DIR/{name}/ or set XDG_CACHE_HOME to a writable folder"
    )


def _verify(name: str, path: Path) -> None:
    """Refuse a file whose size or SHA-256 differs from the published one (hashed once per process)."""
    size, expected = _FILES[name][path.name]
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key in _VERIFIED:
        return
    if stat.st_size != size:
        problem = f"{stat.st_size} bytes, expected {size}"
    else:
        with path.open("rb") as stream:
            actual = hashlib.file_digest(stream, "sha256").hexdigest()
        if actual == expected:
            _VERIFIED.add(key)
            return
        problem = f"sha256 {actual}, expected {expected}"
    raise DataError(
        f"{path} is not the original {name} file ({problem}); "
        "delete it so that it is downloaded again, or replace it with the original"
    )


def _download(name: str, files: list[str], folder: Path) -> None:
    """Fetch ``files`` into ``folder``, each from the first mirror that answers.

    A mirror that answers with other bytes stops the download with DataError rather than being
    skipped: a wrong file is a problem to report, not a network hiccup.
    """
    if not files:
        return
    import http.client  # only a download needs it (and the email parser it imports)

    for done, file in enumerate(files):
        failures = []
        for base in _mirrors(name):
            url = base + file
            try:
                _fetch(name, url, folder / file)
                break
            except (OSError, http.client.HTTPException) as exc:
                failures.append(f"{url}: {getattr(exc, 'reason', exc)}")
        else:
            raise DataError(
                f"{name}: {', '.join(files[done:])} missing from {folder} and the download failed "
                f"({'; '.join(failures)}); place the files in $AUDITOR_DATA_DIR/{name}/ "
                "or allow network access"
            )


def _mirrors(name: str) -> tuple[str, ...]:
    """Base URLs of the folder that holds ``name``'s files, ending in a slash."""
    base = os.environ.get("AUDITOR_DATA_MIRROR")
    return (f"{base.rstrip('/')}/{name}/",) if base else _MIRRORS[name]


def _fetch(name: str, url: str, dest: Path) -> None:
    """Download ``url`` to ``dest`` through a ``.part`` file, renamed into place only once its
    SHA-256 matches; on a mismatch the ``.part`` file is deleted and DataError raised.

    At most one byte more than the published size is read: enough to tell a wrong file, and a
    bound on what a bad mirror can write to disk.
    """
    import urllib.request

    size, expected = _FILES[name][dest.name]
    part = dest.with_name(f"{dest.name}.{os.getpid()}-{threading.get_ident()}.part")
    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as response, part.open("wb") as out:
            while chunk := response.read(min(_DOWNLOAD_CHUNK, size + 1 - out.tell())):
                digest.update(chunk)
                out.write(chunk)
        if digest.hexdigest() != expected:
            raise DataError(
                f"{dest.name} from {url} has sha256 {digest.hexdigest()}, expected {expected}; "
                f"it was deleted: retry later, or place the original file in $AUDITOR_DATA_DIR/{name}/"
            )
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)
    stat = dest.stat()
    _VERIFIED.add((str(dest.resolve()), stat.st_size, stat.st_mtime_ns))


# --- Reading IDX files: one reader for images and labels --------------------------------------


@contextmanager
def _idx_open(path: Path, magic: int) -> Iterator[tuple[BinaryIO, tuple[int, ...]]]:
    """Open an IDX file, gzipped (``.gz``) or not, after checking its header against ``magic``.

    Yields the stream, positioned at the first record, and the shape the header declares (count
    first). Read errors inside the block become DataError.
    """
    ndim = magic & 0xFF
    try:
        with gzip.open(path, "rb") if path.suffix == ".gz" else path.open("rb") as stream:
            header = stream.read(4 * (1 + ndim))
            if len(header) != 4 * (1 + ndim) or int.from_bytes(header[:4], "big") != magic:
                raise DataError(
                    f"{path} does not start with an IDX header of magic {magic}; replace it with the original download"
                )
            yield stream, struct.unpack(f">{ndim}I", header[4:])
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"cannot read {path}: {exc}; replace it with the original download") from exc


def _idx_header(path: Path, magic: int) -> tuple[int, ...]:
    """The shape an IDX file declares, count first; reads the header only."""
    with _idx_open(path, magic) as (_, shape):
        return shape


def _idx_read(stream: BinaryIO, path: Path, shape: tuple[int, ...], n: int) -> np.ndarray:
    """The next ``n`` records of an open IDX stream, refusing a file that ends early."""
    out = np.empty((n, *shape[1:]), np.uint8)
    if stream.readinto(out) != out.nbytes:
        raise DataError(
            f"{path} is truncated: it declares {shape[0]} records but ends early; replace it with the original download"
        )
    return out


def _idx_batches(path: Path, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """The first ``count`` images of an IDX file, decompressed ``batch_size`` at a time."""
    with _idx_open(path, _IDX_IMAGES) as (stream, shape):
        for start in range(0, count, batch_size):
            yield _idx_read(stream, path, shape, min(batch_size, count - start))


def _idx_dataset(name: str, split: str, limit: int | None, data_dir: Path | None) -> Dataset:
    """One split of a known dataset: labels read whole (they are small), images left to stream."""
    folder = locate(name, data_dir=data_dir)
    # the verified originals' decompressed copies when they can be kept (auditor.idxcache)
    images, labels = (raw_copy(name, folder / file, data_home()) or folder / file for file in _SPLIT_FILES[split])
    with _idx_open(labels, _IDX_LABELS) as (stream, label_shape):
        y = _idx_read(stream, labels, label_shape, label_shape[0])
    shape = _idx_header(images, _IDX_IMAGES)
    x = _Source(shape, np.dtype(np.uint8), partial(_idx_batches, images))
    return _dataset(name, split, x, _in_memory(y), limit)


# --- Reading .npz and .npy files --------------------------------------------------------------


def _array_file(spec: str) -> Path:
    """The existing ``.npz``/``.npy`` file that ``spec`` names."""
    path = Path(spec).expanduser()
    if path.suffix.lower() not in (".npz", ".npy"):
        raise _unknown(spec)
    if not path.is_file():
        raise NotFoundError(f"data file {path} not found; check the path")
    return path


def _read_arrays(path: Path, splits: tuple[str, ...]) -> list[tuple[_Source, _Source | None]]:
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
            return [(_in_memory(np.load(path, mmap_mode="r", allow_pickle=False)), None)]
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


@dataclass(frozen=True)
class _Source:
    """An array to stream: its shape and dtype, and ``read(count, batch_size)`` for its first rows."""

    shape: tuple[int, ...]
    dtype: np.dtype
    read: Callable[[int, int], Iterator[np.ndarray]]


def _in_memory(array: np.ndarray) -> _Source:
    """A source over an array in memory or memory-mapped."""
    return _Source(tuple(array.shape), array.dtype, partial(_array_batches, array))


def _member(archive: zipfile.ZipFile, path: Path, key: str) -> _Source:
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
    return _Source(tuple(shape), dtype, partial(_member_rows, path, f"{key}.npy", offset, tuple(shape), dtype))


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


def _array_dataset(name: str, split: str, x: _Source, y: _Source | None, limit: int | None) -> Dataset:
    """One split from arrays, once ``x`` is numeric with samples on its first axis."""
    if not x.shape or x.dtype.kind not in "biuf":
        raise DataError(
            f"{name} {split}: x must be a numeric array with samples on the first axis, "
            f"got {x.dtype} of shape {x.shape}"
        )
    return _dataset(name, split, x, y, limit)


def _array_batches(x: np.ndarray, count: int, batch_size: int) -> Iterator[np.ndarray]:
    """The first ``count`` samples of ``x``, copied ``batch_size`` at a time into C-ordered arrays
    (so a memory-mapped ``x`` is read one batch at a time)."""
    for start in range(0, count, batch_size):
        yield np.array(x[start : min(start + batch_size, count)], order="C")


# --- Building a Dataset from any source -------------------------------------------------------


def _wanted(split: str, choices: tuple[str, ...]) -> tuple[str, ...]:
    """The splits that ``split`` names, refusing anything outside ``choices``."""
    if split not in choices:
        raise DataError(f"split must be {' or '.join(choices)}, got {split!r}")
    return SPLITS if split == "both" else (split,)


def _open(
    spec: str, splits: tuple[str, ...], limit: int | None, data_dir: Path | None, images: ImageOptions | None
) -> list[Dataset]:
    """The wanted splits of ``spec``; ``limit`` is checked first, before anything is read or fetched.

    A folder goes to :mod:`auditor.images`, imported only then (it loads Pillow); a dataset name
    wins over a folder of that name.
    """
    if limit is not None and limit < 0:
        raise DataError(f"limit must be >= 0 (or none, for all samples), got {limit}")
    if spec not in KNOWN_DATASETS and Path(spec).expanduser().is_dir():
        from auditor import images as folder

        return folder.open_folder(spec, splits, limit, images or folder.ImageOptions())
    if images is not None and images.has_folder_settings:
        raise DataError(f"--resize, --crop and --skip-bad apply to image folders, and {spec} is not a folder")
    if spec in KNOWN_DATASETS:
        return [_idx_dataset(spec, split, limit, data_dir) for split in splits]
    path = _array_file(spec)
    pairs = zip(splits, _read_arrays(path, splits), strict=True)
    return [_array_dataset(path.name, split, x, y, limit) for split, (x, y) in pairs]


def _dataset(name: str, split: str, x: _Source, y: _Source | None, limit: int | None) -> Dataset:
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


def _check_labels(y: _Source, total: int, where: str) -> None:
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
