"""Files a command will write, checked before it does any work.

An audit, a shrink or a training run takes minutes; an output that cannot be written should be
refused before it starts, not after, and an output that names a file the command reads (the
model, the data, a report) or another output would destroy it. Both command lines use this.
"""

from __future__ import annotations

import os
from pathlib import Path

from auditor.errors import AuditError


def check_outputs(
    inputs: dict[str, str | Path | None], outputs: dict[str, str | Path | None], *, make_folders: bool = False
) -> None:
    """Refuse, before any work, an output that would overwrite an input (the model, a report, the
    data) or another output, or that cannot be written: a folder, a folder that does not exist
    (unless the command makes it: ``make_folders``), one that is not writable. A path is the same
    file however it is named (symlinks, hard links). ``-`` (stdout, stdin) may stand for one
    output only; flags not given (None) are skipped, an empty name is refused; keys are how a
    refusal names them."""
    to_stdout = [flag for flag, path in outputs.items() if path is not None and str(path) == "-"]
    if len(to_stdout) > 1:
        raise AuditError(f"{' and '.join(to_stdout)} both name '-' (stdout); give one of them a file")
    taken = {_file_key(Path(path)): name for name, path in inputs.items() if path and str(path) != "-"}
    for flag, path in outputs.items():
        if path is None or str(path) == "-":
            continue
        if str(path) == "":
            raise AuditError(f"{flag} '' names no file; give a path")
        path = Path(path)
        key = _file_key(path)
        if key in taken:
            raise AuditError(f"{flag} {path} is {taken[key]} too; write it to another file")
        if path.is_dir():
            raise AuditError(f"{flag} {path} is a folder; name a file")
        folder = path.resolve().parent
        existing = next(above for above in [folder, *folder.parents] if above.exists())
        if not existing.is_dir() or (existing != folder and not make_folders):
            raise AuditError(f"{flag} {path}: its folder does not exist")
        if not os.access(existing, os.W_OK) or (path.exists() and not os.access(path, os.W_OK)):
            raise AuditError(f"{flag} {path} cannot be written: permission denied")
        taken[key] = flag


def _file_key(path: Path) -> tuple[int, int] | Path:
    """What names one file: device and inode where it exists (links included), else its resolved path."""
    try:
        status = path.stat()
    except (OSError, ValueError):  # absent, unreadable, or a name with a NUL byte
        return path.resolve()
    return (status.st_dev, status.st_ino)
