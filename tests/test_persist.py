"""auditor.service.persist: content-addressed models and SQLite reports, on a real temporary folder."""

from __future__ import annotations

import hashlib
import os
import sqlite3
from pathlib import Path

import pytest
from refusals import refused

from auditor import audit, prepare
from auditor.datasets.splits import open_splits
from auditor.engine.modelfile import MODEL_FILE, check_data_file_name, content_address
from auditor.errors import AuditError, LimitError, ModelError, NotFoundError
from auditor.records import check_content_address, check_id
from auditor.service.persist import ModelStore, ReportStore, claim_store


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _accept(path: Path, address: str) -> None:
    """A check that lets every model in."""


# ---- content addresses and file names ------------------------------------------------------


def test_a_model_without_data_files_is_addressed_by_its_file_sha256() -> None:
    assert content_address(_sha(b"graph"), {}) == _sha(b"graph")


def test_with_data_files_the_address_is_the_sha256sum_manifest() -> None:
    data = {"w2.bin": _sha(b"two"), "weights/w1.bin": _sha(b"one")}
    manifest = f"{_sha(b'graph')}  model.onnx\n{_sha(b'two')}  w2.bin\n{_sha(b'one')}  weights/w1.bin\n"
    assert content_address(_sha(b"graph"), data) == _sha(manifest.encode())
    assert content_address(_sha(b"graph"), {**data, "w2.bin": _sha(b"new weights")}) != _sha(manifest.encode())


@pytest.mark.parametrize(
    "name",
    [
        "",
        ".",
        "..",
        "../w.bin",
        "weights/../../w.bin",
        "/etc/passwd",
        "weights//w.bin",
        "weights/",
        "./w.bin",
        "..\\w.bin",
        "a\0b",
        "a\nb",
        "w\x7f.bin",
        "x" * 256,
        "/".join(["d" * 200] * 6),
        MODEL_FILE,
    ],
)
def test_data_file_names_that_could_leave_the_folder_or_stand_for_the_model_are_refused(name: str) -> None:
    refused(ModelError, lambda: check_data_file_name(name), "not allowed")


@pytest.mark.parametrize("name", ["model.onnx.data", "weights/w.bin", "a/b/c/d.bin", "poids é.bin"])
def test_plain_names_and_subfolders_pass(name: str) -> None:
    assert check_data_file_name(name) == name


def test_the_models_own_file_name_is_refused_as_a_data_file() -> None:
    refused(ModelError, lambda: check_data_file_name("net.onnx", "net.onnx"), "not allowed", "'net.onnx'")


@pytest.mark.parametrize("value", ["", "A" * 64, "0" * 63, "../../etc", "g" * 64, "0" * 10_000])
def test_malformed_content_addresses_and_ids_are_refused_without_echoing_them(value: str) -> None:
    message = refused(AuditError, lambda: check_content_address(value), "64 lowercase hex digits")
    assert len(message) < 200
    refused(AuditError, lambda: check_id(value, "report"), "a report id is 32 lowercase hex digits")


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


def test_data_files_interleave_and_land_where_the_model_names_them(models: ModelStore) -> None:
    chunks = [("", b"gr"), ("w.bin", b"wei"), ("", b"aph"), ("w.bin", b"ghts"), ("sub/v.bin", b"v")]
    address, _ = models.put(chunks, _accept)
    assert address == content_address(_sha(b"graph"), {"w.bin": _sha(b"weights"), "sub/v.bin": _sha(b"v")})
    folder = models.path(address).parent
    assert folder.name == address
    assert sorted(str(p.relative_to(folder)) for p in folder.rglob("*")) == [MODEL_FILE, "sub", "sub/v.bin", "w.bin"]
    assert (folder / "w.bin").read_bytes() == b"weights"


def test_a_refused_model_leaves_nothing_behind(models: ModelStore) -> None:
    def refuse(path: Path, address: str) -> None:
        raise ModelError("not a model")

    with pytest.raises(ModelError, match="not a model"):
        models.put([("", b"junk")], refuse)
    assert not models.has(_sha(b"junk")) and _leftovers(models) == []


@pytest.mark.parametrize(
    ("chunks", "error", "message"),
    [
        ([("", b"x" * 600), ("w.bin", b"y" * 600)], LimitError, "model limit"),
        ([("../w.bin", b"y")], ModelError, "not allowed"),
        ([("", b"x"), ("w", b"y"), ("w/v.bin", b"z")], ModelError, "clashes"),
        ([("", b"x"), ("w/v.bin", b"z"), ("w", b"y")], ModelError, "clashes"),
        ([("w.bin", b"y")], ModelError, "no model bytes"),
        ([], ModelError, "no model bytes"),
    ],
)
def test_bad_uploads_are_refused_and_cleaned_up(
    models: ModelStore, chunks: list[tuple[str, bytes]], error: type[Exception], message: str
) -> None:
    refused(error, lambda: models.put(chunks, _accept), message)
    assert _leftovers(models) == [] and [p.name for p in models.root.iterdir()] == [".staging"]


def test_an_upload_a_crash_interrupted_is_removed_when_the_store_opens_again(tmp_path: Path) -> None:
    first = ModelStore(tmp_path / "models", max_bytes=1000)
    interrupted = first.root / ".staging" / "tmp123"
    interrupted.mkdir()
    (interrupted / MODEL_FILE).write_bytes(b"half a model")
    ModelStore(tmp_path / "models", max_bytes=1000)
    assert _leftovers(first) == []


def test_unknown_addresses_are_not_found_and_malformed_ones_refused(models: ModelStore) -> None:
    assert not models.has("0" * 64)
    refused(NotFoundError, lambda: models.path("0" * 64), "upload it first")
    assert not models.has("../../etc")
    refused(AuditError, lambda: models.path("../../etc"), "64 lowercase hex digits")


# ---- the report store ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def report(shared_models):
    return audit(prepare(shared_models / "mnist-8_cntk_opset8.onnx"), open_splits("mnist", "test", limit=32))


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


def test_an_unknown_report_is_not_found_and_a_malformed_id_refused(tmp_path: Path) -> None:
    store = ReportStore(tmp_path / "r.sqlite3")
    refused(NotFoundError, lambda: store.get("0" * 32), f"no report with id {'0' * 32!r}")
    refused(AuditError, lambda: store.get("nope"), "32 lowercase hex digits")


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


@pytest.mark.parametrize("token", ["1; DROP TABLE reports", "9" * 20, "²", "١٢", "-1", " 1", "1" * 10_000])
def test_a_foreign_page_token_is_refused(tmp_path: Path, token: str) -> None:
    refused(AuditError, lambda: ReportStore(tmp_path / "r.sqlite3").page(page_token=token), "page token")


# ---- one server per store ----------------------------------------------------------------------


def test_a_store_is_claimed_by_one_owner_at_a_time_and_free_again_once_released(tmp_path: Path) -> None:
    store = tmp_path / "new" / "store"  # made when claimed
    first = claim_store(store)
    for _ in range(3):  # however often a second owner tries, in this process or another
        refused(AuditError, lambda: claim_store(store), f"the store {store} is in use", f"pid {os.getpid()}")
    first.release()
    first.release()  # twice is harmless
    claim_store(store).release()


@pytest.mark.parametrize("under", ["", "file/", "file/deeper/"])
def test_a_store_that_cannot_be_claimed_is_refused_in_one_line(tmp_path: Path, under: str) -> None:
    (tmp_path / "file").write_text("not a folder")
    store = tmp_path / (under + "store") if under else tmp_path / "file"
    refused(AuditError, lambda: claim_store(store), f"cannot use the store {store}", "--store")
