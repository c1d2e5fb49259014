"""What the service keeps: finished reports in SQLite, uploaded models content-addressed on disk.

Layout under the store folder (one server per store)::

    reports.sqlite3               one row per finished report (WAL mode)
    models/<sha256>/model.onnx    an uploaded model, its external data files beside it
    models/.staging/              uploads in progress; a finished upload is renamed into place

A report row is written in one transaction once the audit has finished, and a model folder
appears by one rename once every file is complete, so a crash never leaves half a report or
half a model behind.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Mapping
from contextlib import closing
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from auditor.errors import AuditError, LimitError, ModelError, NotFoundError
from auditor.report import Report

MODEL_FILE = "model.onnx"
MAX_FILES = 4096  # external data files per model; each tensor in its own file stays well under
PAGE_SIZE = 100

_SHA256 = re.compile(r"[0-9a-f]{64}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model_sha256 TEXT NOT NULL,
    created TEXT NOT NULL,
    report_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_model ON reports (model_sha256, seq);
"""


def model_digest(model_sha256: str, data_sha256: Mapping[str, str]) -> str:
    """A model's content address from the SHA-256 of its file and of each external data file.

    Without external data it is the file's own SHA-256 (what ``sha256sum model.onnx`` prints).
    With it, it is the SHA-256 of the ``sha256sum``-style manifest, model first, then data files
    by name, so that new weights under an unchanged graph get a new address.
    """
    if not data_sha256:
        return model_sha256
    lines = [f"{model_sha256}  {MODEL_FILE}\n", *(f"{data_sha256[n]}  {n}\n" for n in sorted(data_sha256))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_data_file_name(name: str) -> str:
    """Refuse an external data file name that could leave the model's folder or replace the model."""
    if not name or name in (".", "..", MODEL_FILE) or any(c in name for c in "/\\\0") or len(name.encode()) > 255:
        raise ModelError(
            f"external data file name {name!r} is not allowed: use a plain file name in the model's "
            f"folder (no path separators, no '..', not {MODEL_FILE!r})"
        )
    return name


@dataclass(frozen=True)
class StoredReport:
    """A finished report with the service's bookkeeping around it."""

    id: str
    model_sha256: str
    created: datetime
    report: Report


class ReportStore:
    """Finished reports in one SQLite file; safe to use from many threads (a connection per call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with closing(self._connect()) as db:
            db.execute("PRAGMA journal_mode=WAL")
            db.executescript(_SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, timeout=30)

    def add(self, model_sha256: str, report: Report) -> StoredReport:
        """Store a finished report in one transaction and give it an id."""
        stored = StoredReport(uuid.uuid4().hex, model_sha256, datetime.now(UTC), report)
        with closing(self._connect()) as db, db:
            db.execute(
                "INSERT INTO reports (id, model_sha256, created, report_json) VALUES (?, ?, ?, ?)",
                (stored.id, model_sha256, stored.created.isoformat(), report.to_json(indent=None)),
            )
        return stored

    def get(self, report_id: str) -> StoredReport:
        with closing(self._connect()) as db:
            row = db.execute(
                "SELECT id, model_sha256, created, report_json FROM reports WHERE id = ?", (report_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no report with id {report_id!r}; list the reports to see their ids")
        return _stored(row)

    def page(
        self, model_sha256: str = "", page_size: int = PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[StoredReport], str]:
        """One page of reports, newest first, and the token of the next page ("" on the last)."""
        if page_token and not (page_token.isdigit() and len(page_token) <= 18):
            raise AuditError(f"page token {page_token!r} is not from this server; start from page one")
        size = min(page_size, PAGE_SIZE) if page_size > 0 else PAGE_SIZE
        where, params = [], []
        if model_sha256:
            where.append("model_sha256 = ?")
            params.append(model_sha256)
        if page_token:
            where.append("seq < ?")
            params.append(int(page_token))
        query = "SELECT seq, id, model_sha256, created, report_json FROM reports"
        query += f" WHERE {' AND '.join(where)}" if where else ""
        with closing(self._connect()) as db:
            rows = db.execute(f"{query} ORDER BY seq DESC LIMIT ?", [*params, size + 1]).fetchall()
        page = rows[:size]
        token = str(page[-1][0]) if len(rows) > size else ""
        return [_stored(row[1:]) for row in page], token


def _stored(row: tuple[str, str, str, str]) -> StoredReport:
    report_id, model_sha256, created, text = row
    return StoredReport(report_id, model_sha256, datetime.fromisoformat(created), Report.from_json(text))


class ModelStore:
    """Uploaded models, one folder per content address, written by staging then renaming."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._staging = root / ".staging"
        self._staging.mkdir(parents=True, exist_ok=True)

    def has(self, sha256: str) -> bool:
        return bool(_SHA256.fullmatch(sha256)) and (self.root / sha256 / MODEL_FILE).is_file()

    def path(self, sha256: str) -> Path:
        """The stored model file for a content address; ``NotFoundError`` when there is none."""
        if not self.has(sha256):
            raise NotFoundError(f"the server has no model with sha256 {sha256!r}; upload it first")
        return self.root / sha256 / MODEL_FILE

    def put(self, chunks: Iterable[tuple[str, bytes]], check: Callable[[Path, str], None]) -> tuple[str, bool]:
        """Store a model sent as ``(file, bytes)`` chunks ("" = the model file); returns (sha256, created).

        Chunks go straight to a private staging folder, never into memory; a model the store
        already has is dropped unchecked. ``check(model_path, sha256)`` vets a new model before
        it is renamed into place, and raises to refuse it.
        """
        staging = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            hashes = self._receive(chunks, staging)
            if MODEL_FILE not in hashes:
                raise ModelError("the upload held no model bytes; send the model file's content with file=''")
            data = {name: h.hexdigest() for name, h in hashes.items() if name != MODEL_FILE}
            sha256 = model_digest(hashes[MODEL_FILE].hexdigest(), data)
            if self.has(sha256):
                return sha256, False
            check(staging / MODEL_FILE, sha256)
            try:
                staging.rename(self.root / sha256)
            except OSError:  # a concurrent upload of the same model got there first
                if not self.has(sha256):
                    raise
                return sha256, False
            return sha256, True
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def _receive(self, chunks: Iterable[tuple[str, bytes]], folder: Path) -> dict[str, Any]:
        """Append each chunk to its file in ``folder`` within the size and file-count limits."""
        hashes: dict[str, Any] = {}
        total = 0
        for file, content in chunks:
            name = check_data_file_name(file) if file else MODEL_FILE
            if name not in hashes and len(hashes) > MAX_FILES:
                raise LimitError(f"the upload names more than {MAX_FILES} external data files")
            total += len(content)
            if total > self.max_bytes:
                raise LimitError(
                    f"the upload is over the server's {self.max_bytes // 2**20} MB model limit "
                    "(serve --max-model-mb); shrink the model or raise the limit"
                )
            with open(folder / name, "ab") as out:
                out.write(content)
            hashes.setdefault(name, hashlib.sha256()).update(content)
        return hashes
