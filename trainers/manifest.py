"""``manifest.jsonl``: one JSON line per finished network of a grid, the grid's source of truth.

A line is appended (then flushed and fsynced) only after the network's ONNX file has been renamed
into place, so a line always points at a complete file. ``reconcile`` brings a folder back to that
invariant before a grid resumes: it deletes temporary files of interrupted writes, drops a torn
last line, lines whose file is gone and repeated names, and rewrites the manifest atomically if
anything was dropped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from auditor.errors import AuditError
from trainers.files import remove_leftovers, save_atomic
from trainers.records import TrainedNetwork

MANIFEST = "manifest.jsonl"


def read(path: Path) -> list[TrainedNetwork]:
    """The complete records of a manifest, in order; a torn last line (no newline) is ignored."""
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").split("\n")[:-1]  # a line without its newline was never finished
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(TrainedNetwork.from_manifest(json.loads(line)))
        except json.JSONDecodeError:
            raise AuditError(f"{path} line {number} is not JSON; delete that line and rerun") from None
        except (KeyError, TypeError, ValueError, AuditError):
            raise AuditError(f"{path} line {number} is not a network record; delete that line and rerun") from None
    return records


def _line(network: TrainedNetwork) -> str:
    return json.dumps(network.to_manifest(), sort_keys=True) + "\n"


def append(path: Path, network: TrainedNetwork) -> None:
    """Append one record durably: write, flush and fsync before returning."""
    with open(path, "a", encoding="utf-8") as handle:
        handle.write(_line(network))
        handle.flush()
        os.fsync(handle.fileno())


def finished(folder: Path) -> dict[str, TrainedNetwork]:
    """The networks of ``folder`` whose manifest line and file both exist, by name (last line wins)."""
    kept: dict[str, TrainedNetwork] = {}
    for network in read(folder / MANIFEST):
        if (folder / network.file).is_file():
            kept.pop(network.name, None)
            kept[network.name] = network
    return kept


def reconcile(folder: Path) -> dict[str, TrainedNetwork]:
    """Make ``folder``'s manifest list exactly the ``finished`` networks, and return them.

    Temporary files of interrupted writes are deleted first. The manifest is rewritten
    (atomically) only when it changes.
    """
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder)
    path = folder / MANIFEST
    kept = finished(folder)
    text = "".join(_line(network) for network in kept.values())
    if path.exists() and path.read_text(encoding="utf-8") != text:
        save_atomic(path, text.encode("utf-8"))
    return kept
