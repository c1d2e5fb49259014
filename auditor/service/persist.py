"""What the service keeps: finished reports in SQLite, uploaded models content-addressed on disk.

Layout under the store folder (one server per store, held by ``claim_store``)::

    owner.lock                            flock held by the one server using the store (its pid inside)
    reports.sqlite3                       one row per finished report, one per job (WAL mode)
    models/<content address>/model.onnx   an uploaded model ...
    models/<content address>/<location>   ... and its external data files, as the model names them
    models/.staging/                      uploads in progress; emptied when a server starts

A report row is written in one transaction once the audit has finished, and a model folder
appears by one rename once every file is complete, so a crash never leaves half a report or
half a model behind; an upload a crash interrupted is removed from staging at the next start.

Two hashes name a model: its ``file_sha256`` (the .onnx file alone, a report's
``model.sha256``) and its ``content_address`` (the file and its external data files), which the
store files it under.
"""

from __future__ import annotations

import hashlib
import re
import shutil
import sqlite3
import tempfile
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import closing, contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from auditor import locks
from auditor.engine.modelfile import MODEL_FILE, check_data_file_name, content_address
from auditor.errors import AuditError, LimitError, ModelError, NotFoundError
from auditor.records import StoredReport, check_content_address, check_id, is_content_address
from auditor.report import Report

MAX_FILES = 4096  # external data files per model; each tensor in its own file stays well under
PAGE_SIZE = 100

_PAGE_TOKEN = re.compile(r"[0-9]{1,18}")
_SCHEMA = """
CREATE TABLE IF NOT EXISTS reports (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    id TEXT NOT NULL UNIQUE,
    model_sha256 TEXT NOT NULL,  -- the content address (the column keeps its first name)
    created TEXT NOT NULL,
    report_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS reports_by_model ON reports (model_sha256, seq);
"""


def claim_store(store: Path) -> locks.Ownership:
    """Make ``store`` this process's alone for as long as the ownership is held, or refuse in one
    line naming the store: a second server on it would run the first's jobs again and clean away
    its uploads in progress. Take it before anything else touches the store (staging cleanup, job
    recovery). The kernel drops the lock when the owner dies, ``kill -9`` included."""
    try:
        store.mkdir(parents=True, exist_ok=True)
        ownership = locks.take(store / locks.LOCK_FILE)
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise AuditError(f"cannot use the store {store}: {reason}; give --store a writable folder") from None
    if ownership is None:
        pid = locks.owner_pid(store / locks.LOCK_FILE)
        by = f"another auditor server (pid {pid})" if pid else "another auditor server"
        raise AuditError(f"the store {store} is in use by {by}; stop that server or give another --store")
    return ownership


def page_bounds(page_size: int, page_token: str) -> tuple[int, int | None]:
    """The rows one List call returns (default and cap ``PAGE_SIZE``) and where it starts (None = newest)."""
    if page_token and not _PAGE_TOKEN.fullmatch(page_token):
        raise AuditError("the page token is not one this server gave out; start again from the first page")
    size = min(page_size, PAGE_SIZE) if page_size > 0 else PAGE_SIZE
    return size, int(page_token) if page_token else None


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the store's database; a connection per call keeps every thread safe."""
    return sqlite3.connect(path, timeout=30)


def create_tables(path: Path, schema: str) -> None:
    """Make the SQLite file at ``path`` (and its folder) in WAL mode and run ``schema`` on it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with closing(connect(path)) as db:
        db.execute("PRAGMA journal_mode=WAL")
        db.executescript(schema)


class ReportStore:
    """Finished reports in one SQLite file; safe to use from many threads (a connection per call)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        create_tables(path, _SCHEMA)

    def add(self, address: str, report: Report) -> StoredReport:
        """Store a finished report in one transaction and give it an id."""
        stored = StoredReport(uuid.uuid4().hex, address, datetime.now(UTC), report)
        with closing(connect(self.path)) as db, db:
            db.execute(
                "INSERT INTO reports (id, model_sha256, created, report_json) VALUES (?, ?, ?, ?)",
                (stored.id, address, stored.created.isoformat(), report.to_json(indent=None)),
            )
        return stored

    def get(self, report_id: str) -> StoredReport:
        check_id(report_id, "report")
        with closing(connect(self.path)) as db:
            row = db.execute(
                "SELECT id, model_sha256, created, report_json FROM reports WHERE id = ?", (report_id,)
            ).fetchone()
        if row is None:
            raise NotFoundError(f"no report with id {report_id!r}; list the reports to see their ids")
        return _stored(row)

    def page(
        self, address: str = "", page_size: int = PAGE_SIZE, page_token: str = ""
    ) -> tuple[list[StoredReport], str]:
        """One page of reports, newest first, and the token of the next page ("" on the last)."""
        size, before = page_bounds(page_size, page_token)
        where, params = [], []
        if address:
            where.append("model_sha256 = ?")
            params.append(check_content_address(address))
        if before is not None:
            where.append("seq < ?")
            params.append(before)
        query = "SELECT seq, id, model_sha256, created, report_json FROM reports"
        query += f" WHERE {' AND '.join(where)}" if where else ""
        with closing(connect(self.path)) as db:
            rows = db.execute(f"{query} ORDER BY seq DESC LIMIT ?", [*params, size + 1]).fetchall()
        page = rows[:size]
        token = str(page[-1][0]) if len(rows) > size else ""
        return [_stored(row[1:]) for row in page], token


def _stored(row: tuple[str, str, str, str]) -> StoredReport:
    report_id, address, created, text = row
    return StoredReport(report_id, address, datetime.fromisoformat(created), Report.load(text, strict=False))


class Upload:
    """One model arriving in chunks, written to a private staging folder, never held in memory."""

    def __init__(self, folder: Path, max_bytes: int) -> None:
        self.folder = folder
        self.max_bytes = max_bytes
        self.bytes = 0
        self._hashes: dict[str, Any] = {}

    def write(self, file: str, content: bytes) -> None:
        """Append a chunk to its file ("" = the model) within the size and file-count limits."""
        name = check_data_file_name(file) if file else MODEL_FILE
        if name not in self._hashes and len(self._hashes) > MAX_FILES:
            raise LimitError(f"the upload names more than {MAX_FILES} external data files")
        self.bytes += len(content)
        if self.bytes > self.max_bytes:
            raise LimitError(
                f"the upload is over the server's {self.max_bytes // 2**20} MB model limit "
                "(serve --max-model-mb); shrink the model or raise the limit"
            )
        path = self.folder / name
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "ab") as out:
                out.write(content)
        except (NotADirectoryError, IsADirectoryError, FileExistsError):
            raise ModelError(
                f"external data file name {name!r} clashes with another file of the upload (a file and a "
                "folder of the same name)"
            ) from None
        self._hashes.setdefault(name, hashlib.sha256()).update(content)

    def address(self) -> str:
        """The content address of everything received (the model is checked by the store's ``check``)."""
        if MODEL_FILE not in self._hashes or (self.folder / MODEL_FILE).stat().st_size == 0:
            raise ModelError("the upload held no model bytes; send the model file's content with file=''")
        data = {name: h.hexdigest() for name, h in self._hashes.items() if name != MODEL_FILE}
        return content_address(self._hashes[MODEL_FILE].hexdigest(), data)


class ModelStore:
    """Uploaded models, one folder per content address, written by staging then renaming."""

    def __init__(self, root: Path, max_bytes: int) -> None:
        self.root = root
        self.max_bytes = max_bytes
        self._staging = root / ".staging"
        shutil.rmtree(self._staging, ignore_errors=True)  # uploads a crash interrupted (one server per store)
        self._staging.mkdir(parents=True, exist_ok=True)

    def has(self, address: str) -> bool:
        return is_content_address(address) and (self.root / address / MODEL_FILE).is_file()

    def path(self, address: str) -> Path:
        """The stored model file for a content address; ``NotFoundError`` when there is none."""
        if not self.has(check_content_address(address)):
            raise NotFoundError(f"the server has no model with content address {address}; upload it first")
        return self.root / address / MODEL_FILE

    @contextmanager
    def receive(self) -> Iterator[Upload]:
        """An upload in a fresh staging folder, removed when the block ends, whatever happens."""
        staging = Path(tempfile.mkdtemp(dir=self._staging))
        try:
            yield Upload(staging, self.max_bytes)
        finally:
            shutil.rmtree(staging, ignore_errors=True)

    def keep(self, upload: Upload, check: Callable[[Path, str], None]) -> tuple[str, bool]:
        """File a complete upload under its content address; returns (address, created).

        A model the store already has is dropped unchecked. ``check(model_path, address)`` vets a
        new model before it is renamed into place, and raises to refuse it.
        """
        address = upload.address()
        if self.has(address):
            return address, False
        check(upload.folder / MODEL_FILE, address)
        try:
            upload.folder.rename(self.root / address)
        except OSError:  # a concurrent upload of the same model got there first
            if not self.has(address):
                raise
            return address, False
        return address, True

    def put(self, chunks: Iterable[tuple[str, bytes]], check: Callable[[Path, str], None]) -> tuple[str, bool]:
        """Store a model sent as ``(file, bytes)`` chunks ("" = the model file); returns (address, created)."""
        with self.receive() as upload:
            for file, content in chunks:
                upload.write(file, content)
            return self.keep(upload, check)
