"""auditor.persist: content-addressed models and SQLite reports, on a real temporary folder."""

from __future__ import annotations

import hashlib
import sqlite3
from pathlib import Path

import pytest

from auditor import audit, prepare
from auditor.data import open_splits, tagged
from auditor.errors import AuditError, LimitError, ModelError, NotFoundError
from auditor.persist import MODEL_FILE, ModelStore, ReportStore, check_data_file_name, model_digest


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _accept(path: Path, sha256: str) -> None:
    """A check that lets every model in."""


# ---- content addresses and file names ------------------------------------------------------


def test_a_model_without_data_files_is_addressed_by_its_own_sha256() -> None:
    assert model_digest(_sha(b"graph"), {}) == _sha(b"graph")


def test_with_data_files_the_address_is_the_sha256sum_manifest() -> None:
    data = {"w2.bin": _sha(b"two"), "w1.bin": _sha(b"one")}
    manifest = f"{_sha(b'graph')}  model.onnx\n{_sha(b'one')}  w1.bin\n{_sha(b'two')}  w2.bin\n"
    assert model_digest(_sha(b"graph"), data) == _sha(manifest.encode())
    assert model_digest(_sha(b"graph"), {**data, "w1.bin": _sha(b"new weights")}) != _sha(manifest.encode())


@pytest.mark.parametrize(
    "name", ["", ".", "..", "../w.bin", "/etc/passwd", "sub/w.bin", "..\\w.bin", "a\0b", MODEL_FILE]
)
def test_data_file_names_that_could_leave_the_folder_are_refused(name: str) -> None:
    with pytest.raises(ModelError, match="not allowed"):
        check_data_file_name(name)


def test_plain_data_file_names_pass() -> None:
    assert check_data_file_name("model.onnx.data") == "model.onnx.data"


# ---- the model store ------------------------------------------------------------------------


@pytest.fixture
def models(tmp_path: Path) -> ModelStore:
    return ModelStore(tmp_path / "models", max_bytes=1000)


def _leftovers(store: ModelStore) -> list[Path]:
    return list((store.root / ".staging").iterdir())


def test_put_stores_a_model_once_and_reuploads_are_no_ops(models: ModelStore) -> None:
    checked = []
    sha, created = models.put([("", b"gra"), ("", b"ph")], lambda path, sha: checked.append(path.read_bytes()))
    assert (sha, created) == (_sha(b"graph"), True)
    assert checked == [b"graph"]
    assert models.has(sha) and models.path(sha).read_bytes() == b"graph"
    assert models.put([("", b"graph")], lambda *_: pytest.fail("re-upload must not be checked")) == (sha, False)
    assert _leftovers(models) == []


def test_data_files_interleave_and_land_beside_the_model(models: ModelStore) -> None:
    chunks = [("", b"gr"), ("w.bin", b"wei"), ("", b"aph"), ("w.bin", b"ghts")]
    sha, _ = models.put(chunks, _accept)
    assert sha == model_digest(_sha(b"graph"), {"w.bin": _sha(b"weights")})
    folder = models.path(sha).parent
    assert folder.name == sha
    assert sorted(p.name for p in folder.iterdir()) == [MODEL_FILE, "w.bin"]
    assert (folder / "w.bin").read_bytes() == b"weights"


def test_a_refused_model_leaves_nothing_behind(models: ModelStore) -> None:
    def refuse(path: Path, sha: str) -> None:
        raise ModelError("not a model")

    with pytest.raises(ModelError, match="not a model"):
        models.put([("", b"junk")], refuse)
    assert not models.has(_sha(b"junk")) and _leftovers(models) == []


@pytest.mark.parametrize(
    ("chunks", "error", "message"),
    [
        ([("", b"x" * 600), ("w.bin", b"y" * 600)], LimitError, "model limit"),
        ([("../w.bin", b"y")], ModelError, "not allowed"),
        ([("w.bin", b"y")], ModelError, "no model bytes"),
        ([], ModelError, "no model bytes"),
    ],
)
def test_bad_uploads_are_refused_and_cleaned_up(
    models: ModelStore, chunks: list[tuple[str, bytes]], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        models.put(chunks, _accept)
    assert _leftovers(models) == [] and [p.name for p in models.root.iterdir()] == [".staging"]


@pytest.mark.parametrize("sha", ["0" * 64, "../../etc", "A" * 64, ""])
def test_unknown_or_malformed_addresses_are_not_found(models: ModelStore, sha: str) -> None:
    assert not models.has(sha)
    with pytest.raises(NotFoundError, match="upload it first"):
        models.path(sha)


# ---- the report store ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(shared_models):
    model = prepare(shared_models / "mnist-8_cntk_opset8.onnx")
    return audit(model, tagged(open_splits("mnist", "test", limit=32), 32))


def test_reports_round_trip_and_survive_reopening(tmp_path: Path, report) -> None:
    path = tmp_path / "reports.sqlite3"
    stored = ReportStore(path).add("a" * 64, report)
    again = ReportStore(path).get(stored.id)
    assert again == stored
    assert again.report.to_dict() == report.to_dict()


def test_the_database_is_in_wal_mode(tmp_path: Path) -> None:
    ReportStore(tmp_path / "reports.sqlite3")
    with sqlite3.connect(tmp_path / "reports.sqlite3") as db:
        assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_an_unknown_report_is_not_found(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError, match="no report with id 'nope'"):
        ReportStore(tmp_path / "r.sqlite3").get("nope")


def test_pages_are_newest_first_filtered_and_complete(tmp_path: Path, report) -> None:
    store = ReportStore(tmp_path / "r.sqlite3")
    ids = [store.add("a" * 64 if i % 2 else "b" * 64, report).id for i in range(7)]
    seen, token = [], ""
    while True:
        page, token = store.page("a" * 64, page_size=2, page_token=token)
        assert len(page) <= 2
        seen += [s.id for s in page]
        if not token:
            break
    assert seen == ids[1::2][::-1]
    everything, token = store.page()
    assert [s.id for s in everything] == ids[::-1] and token == ""


@pytest.mark.parametrize("token", ["1; DROP TABLE reports", "9" * 20])
def test_a_foreign_page_token_is_refused(tmp_path: Path, token: str) -> None:
    with pytest.raises(AuditError, match="page token"):
        ReportStore(tmp_path / "r.sqlite3").page(page_token=token)
