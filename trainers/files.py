"""Atomic file writes: a reader, or a resumed grid, never sees a half-written file.

Every output goes to ``<name>.tmp-<pid>`` next to its target, is flushed to disk, then renamed
over the target with ``os.replace`` (atomic on POSIX and Windows). Leftover temporary files mean
a write was interrupted; ``remove_leftovers`` clears them before a grid resumes.
"""

from __future__ import annotations

import os
from pathlib import Path

TEMP_MARK = ".tmp-"


def save_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` (parents created) through a temporary file and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}{TEMP_MARK}{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def remove_leftovers(folder: Path) -> list[Path]:
    """Delete the temporary files of interrupted writes in ``folder``; returns what was deleted."""
    leftovers = sorted(p for p in folder.glob(f"*{TEMP_MARK}*") if p.is_file())
    for path in leftovers:
        path.unlink(missing_ok=True)
    return leftovers
