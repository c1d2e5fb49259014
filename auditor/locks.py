"""Ownership of a folder on disk, proved by an exclusive ``flock`` that the kernel drops on death.

Two things the auditor writes must have one owner at a time: a server's store (its staging
folder, its job table) and an audit's spill folder. Each owner holds an exclusive, non-blocking
``flock`` on a lock file in the folder for as long as it lives, and writes its process id there
for the messages. The kernel releases the lock when the process ends, however it ends (``kill
-9`` included), so "the lock can be taken" is the proof that the owner is gone: a restarted
server may take its store over, and a spill folder whose lock is free may be removed.

The descriptor is never inherited (``O_CLOEXEC``), so a child process cannot keep a folder owned
after its parent has died.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

LOCK_FILE = "owner.lock"


@dataclass
class Ownership:
    """An exclusive lock held on ``path``: the folder that holds it is ours until ``release``."""

    path: Path
    fd: int

    def release(self) -> None:
        """Give the folder up (closing the descriptor drops the lock). Calling it twice is harmless."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def take(path: Path, *, create: bool = True) -> Ownership | None:
    """Lock ``path`` (created if missing, unless ``create`` is false) and write our process id
    into it; None when another process holds it. ``OSError`` when the file cannot be opened."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_CREAT if create else 0)
    fd = os.open(path, flags, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return Ownership(path, fd)


def owner_pid(path: Path) -> int | None:
    """The process id written in a lock file, or None when there is none to read."""
    try:
        text = path.read_text(encoding="ascii", errors="replace").strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def remove_abandoned(root: Path, prefix: str) -> list[Path]:
    """Remove the folders named ``prefix*`` directly under ``root`` whose owner is provably gone:
    their lock file exists and can be locked. A folder without a lock file (still being set up,
    or not ours) and a folder whose owner lives are left alone. Returns what was removed."""
    removed = []
    try:
        candidates = [entry for entry in os.scandir(root) if entry.name.startswith(prefix)]
    except OSError:
        return removed
    for entry in candidates:
        if not entry.is_dir(follow_symlinks=False):
            continue
        folder = Path(entry.path)
        lock = folder / LOCK_FILE
        if not lock.is_file() or lock.is_symlink():
            continue
        try:
            held = take(lock, create=False)  # never recreate a lock another cleaner is removing
        except OSError:
            continue
        if held is None:
            continue
        try:
            shutil.rmtree(folder, ignore_errors=True)
        finally:
            held.release()
        removed.append(folder)
    return removed
