"""Decompressed copies of the IDX files, made once and checked whenever used, so that opening a
split of MNIST or Fashion-MNIST does not inflate its gzip file again.

The gzip originals stay what is trusted: ``auditor.datasets.idx`` checks each against its published
size and SHA-256 before anything is read. In the user cache, ``<cache>/<name>/``, this module
keeps the decompressed file, named without ``.gz``; never beside the original, whose folder may be
shared (a team's data folder, CI's ``../shared/data``) and is only ever read.
A copy is used only when its size and SHA-256 match those of the original's content, listed in
``RAW`` below (checked once per process, like the originals); a copy that does not match is
made again, and where no copy can be written the caller reads the gzip stream as before.

Why: inflating the 47 MB of MNIST's training images costs about 0.22 s of CPU in every audit;
hashing the decompressed copy costs about 0.03 s (SHA-256 is hardware-accelerated on these
machines) and reading it is a copy from the page cache (docs/performance.md, "The whole command").
"""

from __future__ import annotations

import gzip
import hashlib
import os
import threading
import zlib
from pathlib import Path

# (size, sha256) of the decompressed content of each original file, by dataset and file name.
RAW: dict[str, dict[str, tuple[int, str]]] = {
    "mnist": {
        "train-images-idx3-ubyte.gz": (47040016, "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        "train-labels-idx1-ubyte.gz": (60008, "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        "t10k-images-idx3-ubyte.gz": (7840016, "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        "t10k-labels-idx1-ubyte.gz": (10008, "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": (47040016, "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888"),
        "train-labels-idx1-ubyte.gz": (60008, "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9"),
        "t10k-images-idx3-ubyte.gz": (7840016, "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b"),
        "t10k-labels-idx1-ubyte.gz": (10008, "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34"),
    },
}
_CHUNK = 1 << 20

# (real path, size, mtime_ns) of the copies already checked in this process; a changed file is
# checked again.
_CHECKED: set[tuple[str, int, int]] = set()


def raw_copy(name: str, original: Path, cache: Path) -> Path | None:
    """The checked decompressed copy of ``original``, a verified gzip file of dataset ``name``.

    An existing copy in ``cache/name`` is used when it checks out; otherwise one is written
    there. None when the file is not one ``RAW`` knows, or no copy can be written (the cache
    cannot be written, disk full).
    """
    expected = RAW.get(name, {}).get(original.name)
    if expected is None:
        return None
    path = cache / name / original.name.removesuffix(".gz")
    if _checks_out(path, expected) or _write(original, path, expected):
        return path
    return None


def _checks_out(path: Path, expected: tuple[int, str]) -> bool:
    """Whether ``path`` is a file of the expected size and SHA-256 (hashed once per process)."""
    try:
        stat = path.stat()
        key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
        if key in _CHECKED:
            return True
        if stat.st_size != expected[0]:
            return False
        with path.open("rb") as stream:
            if hashlib.file_digest(stream, "sha256").hexdigest() != expected[1]:
                return False
    except OSError:
        return False
    _CHECKED.add(key)
    return True


def _write(original: Path, path: Path, expected: tuple[int, str]) -> bool:
    """Decompress ``original`` into ``path`` through a private ``.part`` file, renamed into place
    only when its size and SHA-256 are the expected ones; False when that cannot be done."""
    part = path.with_name(f"{path.name}.{os.getpid()}-{threading.get_ident()}.part")
    digest, size = hashlib.sha256(), 0
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with gzip.open(original, "rb") as source, part.open("wb") as out:
            while chunk := source.read(_CHUNK):
                digest.update(chunk)
                size += out.write(chunk)
        if size != expected[0] or digest.hexdigest() != expected[1]:
            return False
        os.replace(part, path)
        stat = path.stat()
    except (OSError, EOFError, zlib.error):
        return False
    finally:
        part.unlink(missing_ok=True)
    _CHECKED.add((str(path.resolve()), stat.st_size, stat.st_mtime_ns))
    return True
