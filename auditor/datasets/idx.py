"""MNIST and Fashion-MNIST from their original IDX files: found, checked, downloaded and read.

The IDX files are looked up in ``$AUDITOR_DATA_DIR/<name>/``, then in the user cache
(:func:`data_home`), and downloaded from public mirrors when missing. Every file is checked
against its published size and SHA-256 before it is read, once per process. Images are
decompressed one batch at a time, from a checked decompressed copy where one can be kept
(:mod:`auditor.datasets.idxcache`); labels are small and read whole.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import threading
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import BinaryIO

import numpy as np

from auditor.datasets.batches import Dataset, Source, in_memory, make_dataset, unknown_source
from auditor.datasets.idxcache import raw_copy
from auditor.errors import DataError

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


def idx_dataset(name: str, split: str, limit: int | None, data_dir: Path | None) -> Dataset:
    """One split of a known dataset: labels read whole (they are small), images left to stream."""
    folder = locate(name, data_dir=data_dir)
    # the verified originals' decompressed copies when they can be kept (auditor.datasets.idxcache)
    images, labels = (raw_copy(name, folder / file, data_home()) or folder / file for file in _SPLIT_FILES[split])
    with _idx_open(labels, _IDX_LABELS) as (stream, label_shape):
        y = _idx_read(stream, labels, label_shape, label_shape[0])
    shape = _idx_header(images, _IDX_IMAGES)
    x = Source(shape, np.dtype(np.uint8), partial(_idx_batches, images))
    return make_dataset(name, split, x, in_memory(y), limit)


def _files_of(name: str) -> dict[str, tuple[int, str]]:
    """The published (size, sha256) of each file of a known dataset."""
    if name not in _FILES:
        raise unknown_source(name)
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
