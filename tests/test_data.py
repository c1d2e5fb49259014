"""The data sets (idx, arrays, splits, batches) on the real MNIST / Fashion-MNIST files, real
.npz/.npy files and a real HTTP mirror."""

from __future__ import annotations

import gzip
import hashlib
import io
import shutil
import socket
import struct
import threading
import tracemalloc
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from auditor.datasets import idx
from auditor.datasets.batches import Batch, Dataset, tagged
from auditor.datasets.idx import locate
from auditor.datasets.splits import load_arrays, open_dataset, open_splits
from auditor.errors import AuditError, DataError, NotFoundError

LABEL_FILES = ("train-labels-idx1-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
IMAGE_FILES = ("train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")


def refused(kind: type[AuditError], call: Callable[[], object], *fragments: str) -> None:
    """Run ``call``, expect a one-line refusal of ``kind`` that contains every fragment."""
    with pytest.raises(kind) as caught:
        call()
    message = str(caught.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture(scope="module")
def mnist_test() -> tuple[np.ndarray, np.ndarray]:
    x, y = load_arrays("mnist", "test")
    assert y is not None
    return x, y


# --- The real datasets ------------------------------------------------------------------------


def test_mnist_train_is_the_original_data() -> None:
    x, y = load_arrays("mnist", "train")
    assert x.shape == (60000, 28, 28) and x.dtype == np.uint8
    assert y is not None and y.dtype == np.int64
    assert y[:5].tolist() == [5, 0, 4, 1, 9]
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    assert (x.min(), x.max()) == (0, 255)
    assert abs(x.mean() / 255 - 0.1307) < 1e-4  # the well-known MNIST normalisation mean


def test_open_dataset_describes_the_split_without_reading_it() -> None:
    dataset = open_dataset("mnist", "train")
    assert (dataset.name, dataset.split, dataset.count) == ("mnist", "train", 60000)
    assert dataset.sample_shape == (28, 28)
    assert dataset.dtype == np.uint8
    assert dataset.has_labels


def test_mnist_test_split(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = mnist_test
    assert x.shape == (10000, 28, 28)
    assert y[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]
    assert np.bincount(y).tolist() == [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def test_fashion_mnist_test_split() -> None:
    x, y = load_arrays("fashion-mnist", "test")
    assert x.shape == (10000, 28, 28) and x.dtype == np.uint8
    assert y is not None
    assert y[:5].tolist() == [9, 2, 1, 1, 6]  # ankle boot, pullover, trouser, trouser, shirt
    assert np.bincount(y).tolist() == [1000] * 10


@pytest.mark.parametrize("batch_size", [7, 256, 9999, 10000, 65536])
def test_batches_hold_the_same_bytes_whatever_the_batch_size(
    batch_size: int, mnist_test: tuple[np.ndarray, np.ndarray]
) -> None:
    batches = list(open_dataset("mnist", "test").batches(batch_size))
    assert all(len(b.x) == batch_size for b in batches[:-1]) and 0 < len(batches[-1].x) <= batch_size
    assert all(b.y is not None and len(b.y) == len(b.x) for b in batches)
    x, y = mnist_test
    np.testing.assert_array_equal(np.concatenate([b.x for b in batches]), x)
    np.testing.assert_array_equal(np.concatenate([b.y for b in batches if b.y is not None]), y)


def test_a_dataset_can_be_read_again_from_the_start() -> None:
    dataset = open_dataset("fashion-mnist", "test", limit=100)
    first, again = (np.concatenate([b.x for b in dataset.batches(32)]) for _ in range(2))
    np.testing.assert_array_equal(first, again)
    assert len(first) == 100


def test_limit_takes_the_first_samples(mnist_test: tuple[np.ndarray, np.ndarray]) -> None:
    x, y = load_arrays("mnist", "test", limit=1000)
    assert y is not None
    np.testing.assert_array_equal(x, mnist_test[0][:1000])
    np.testing.assert_array_equal(y, mnist_test[1][:1000])
    assert open_dataset("mnist", "test", limit=10**9).count == 10000
    assert [d.count for d in open_splits("mnist", "both", limit=1000)] == [1000, 1000]


def test_tagged_yields_each_split_in_turn() -> None:
    datasets = open_splits("mnist", "both", limit=300)
    assert [d.split for d in datasets] == ["train", "test"]
    tags = [(split, len(batch.x)) for split, batch in tagged(datasets, 128)]
    assert tags == [("train", 128), ("train", 128), ("train", 44), ("test", 128), ("test", 128), ("test", 44)]


# --- .npz and .npy files ----------------------------------------------------------------------


@pytest.fixture
def samples() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((50, 3, 4), dtype=np.float32), rng.integers(0, 10, 50, dtype=np.int32)


def read_all(dataset: Dataset, batch_size: int = 16) -> Batch:
    batches = list(dataset.batches(batch_size))
    ys = [b.y for b in batches if b.y is not None]
    return Batch(np.concatenate([b.x for b in batches]), np.concatenate(ys) if ys else None)


def test_npz_with_one_split_serves_train_or_test(tmp_path: Path, samples: tuple[np.ndarray, ...]) -> None:
    x, y = samples
    np.savez(tmp_path / "one.npz", x=x, y=y)
    for split in ("train", "test"):
        dataset = open_dataset(str(tmp_path / "one.npz"), split, limit=40)
        assert (dataset.name, dataset.split, dataset.count) == ("one.npz", split, 40)
        assert (dataset.sample_shape, dataset.dtype, dataset.has_labels) == ((3, 4), np.float32, True)
        batch = read_all(dataset)
        np.testing.assert_array_equal(batch.x, x[:40])
        assert batch.y is not None and batch.y.dtype == np.int64
        np.testing.assert_array_equal(batch.y, y[:40])


def test_npz_with_two_splits(tmp_path: Path, samples: tuple[np.ndarray, ...]) -> None:
    x, y = samples
    np.savez_compressed(tmp_path / "two.npz", x_train=x[:30], y_train=y[:30], x_test=x[30:])
    train, test = open_splits(str(tmp_path / "two.npz"), "both")
    assert (train.count, train.has_labels, test.count, test.has_labels) == (30, True, 20, False)
    np.testing.assert_array_equal(read_all(train).y, y[:30])
    assert read_all(test).y is None
    loaded_x, loaded_y = load_arrays(str(tmp_path / "two.npz"), "test")
    np.testing.assert_array_equal(loaded_x, x[30:])
    assert loaded_y is None


def test_npy_is_memory_mapped_and_unlabelled(tmp_path: Path, samples: tuple[np.ndarray, ...]) -> None:
    x = samples[0]
    np.save(tmp_path / "x.npy", x)
    dataset = open_dataset(str(tmp_path / "x.npy"), "test")
    assert (dataset.name, dataset.count, dataset.has_labels) == ("x.npy", 50, False)
    batches = list(dataset.batches(16))
    assert all(type(b.x) is np.ndarray and b.x.flags.writeable for b in batches)  # copies, not map views
    np.testing.assert_array_equal(np.concatenate([b.x for b in batches]), x)
    assert all(b.y is None for b in batches)


# --- Refusals ---------------------------------------------------------------------------------


def test_unknown_names_and_missing_files_are_not_found(tmp_path: Path) -> None:
    for call in (lambda: open_dataset("mnsit", "train"), lambda: locate("emnist")):
        refused(NotFoundError, call, "unknown dataset", "mnist or fashion-mnist", ".npz or .npy")
    gone = str(tmp_path / "gone.npz")
    refused(NotFoundError, lambda: open_dataset(gone, "test"), f"data file {gone} not found")


def test_bad_arguments_are_refused() -> None:
    refused(DataError, lambda: open_dataset("mnist", "valid"), "split must be train or test", "'valid'")
    refused(DataError, lambda: open_dataset("mnist", "both"), "split must be train or test")
    refused(DataError, lambda: open_splits("mnist", "all"), "train or test or both")
    refused(DataError, lambda: open_dataset("mnist", "test", limit=-1), "limit must be >= 0", "-1")
    refused(DataError, lambda: open_dataset("mnist", "test", limit=0), "limit 0 leaves no samples of mnist")
    refused(DataError, lambda: open_dataset("mnist", "test").batches(0), "batch size must be >= 1")


@pytest.mark.parametrize(
    ("arrays", "fragments"),
    [
        ({"images": np.zeros((5, 2))}, ["has keys images", "expected x (and optional y)", "x_train"]),
        ({"x": np.zeros((0, 2))}, ["has no samples"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros(4, np.int64)}, ["5 samples but labels of shape (4,)"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros((5, 10), np.int64)}, ["labels of shape (5, 10)"]),
        ({"x": np.zeros((5, 2)), "y": np.zeros(5, np.float32)}, ["labels must be integers, got float32"]),
        ({"x": np.array(["a", "b"])}, ["x must be a numeric array", "<U1"]),
        ({"x_train": np.zeros((5, 2))}, ["no x_test key", "keys: x_train", "choose the other --split"]),
    ],
)
def test_bad_npz_contents_are_refused(tmp_path: Path, arrays: dict[str, np.ndarray], fragments: list[str]) -> None:
    np.savez(tmp_path / "bad.npz", **arrays)
    refused(DataError, lambda: open_dataset(str(tmp_path / "bad.npz"), "test"), *fragments)


def test_single_split_files_cannot_serve_both(tmp_path: Path) -> None:
    np.savez(tmp_path / "one.npz", x=np.zeros((5, 2)))
    np.save(tmp_path / "one.npy", np.zeros((5, 2)))
    for name in ("one.npz", "one.npy"):
        refused(
            DataError,
            lambda name=name: open_splits(str(tmp_path / name), "both"),
            "single split",
            "--split train or --split test",
            "x_train/y_train and x_test/y_test",
        )


def test_unreadable_files_are_refused(tmp_path: Path) -> None:
    (tmp_path / "junk.npz").write_bytes(b"not numpy at all")
    refused(DataError, lambda: open_dataset(str(tmp_path / "junk.npz"), "test"), "neither a .npy nor a .npz")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 but no zip after all")
    refused(DataError, lambda: open_dataset(str(tmp_path / "broken.npz"), "test"), "cannot read")
    np.save(tmp_path / "objects.npy", np.array([{}, []], dtype=object))
    refused(DataError, lambda: open_dataset(str(tmp_path / "objects.npy"), "test"), "no pickled objects")


# The published checksums make a damaged IDX file fail before it is parsed, so the header checks
# are exercised on the reader itself.
def write_gzip(path: Path, content: bytes) -> Path:
    with gzip.open(path, "wb") as stream:
        stream.write(content)
    return path


def test_idx_header_with_the_wrong_magic_is_refused(tmp_path: Path) -> None:
    labels_as_images = write_gzip(tmp_path / "a.gz", struct.pack(">II", 2049, 1) + b"\x05")
    refused(DataError, lambda: idx._idx_header(labels_as_images, 2051), "IDX header of magic 2051")
    too_short = write_gzip(tmp_path / "b.gz", struct.pack(">II", 2051, 1))
    refused(DataError, lambda: idx._idx_header(too_short, 2051), "IDX header of magic 2051")
    not_gzip = tmp_path / "c.gz"
    not_gzip.write_bytes(struct.pack(">IIII", 2051, 1, 28, 28))
    refused(DataError, lambda: idx._idx_header(not_gzip, 2051), "cannot read", "original download")


def test_truncated_idx_file_is_refused(tmp_path: Path) -> None:
    three_declared_one_present = struct.pack(">IIII", 2051, 3, 28, 28) + bytes(784)
    path = write_gzip(tmp_path / "t.gz", three_declared_one_present)
    assert idx._idx_header(path, 2051) == (3, 28, 28)
    refused(DataError, lambda: list(idx._idx_batches(path, 3, 2)), "truncated", "declares 3 records")


def test_found_file_with_other_bytes_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    folder = tmp_path / "mnist"
    folder.mkdir()
    for file in (*IMAGE_FILES, LABEL_FILES[0]):
        (folder / file).symlink_to(data_dir / "mnist" / file)
    altered = altered_copy(data_dir / "mnist" / LABEL_FILES[1])
    (folder / LABEL_FILES[1]).write_bytes(altered)
    monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path))
    refused(
        DataError,
        lambda: open_dataset("mnist", "test"),
        str(folder / LABEL_FILES[1]),
        f"sha256 {hashlib.sha256(altered).hexdigest()}",
        f"expected {idx._FILES['mnist'][LABEL_FILES[1]][1]}",
        "delete it",
    )


def altered_copy(path: Path) -> bytes:
    """The file's bytes with one byte flipped: same size, different SHA-256."""
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF
    return bytes(content)


# --- Finding and downloading ------------------------------------------------------------------


def test_data_home_follows_xdg(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert idx.data_home() == tmp_path / "onnx-auditor"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert idx.data_home() == tmp_path / "home" / ".cache" / "onnx-auditor"


@dataclass
class Mirror:
    root: Path  # served as http://127.0.0.1:<port>/, files at <name>/<file>
    requested: list[str]

    def serve(self, name: str, file: str, content: bytes) -> None:
        (self.root / name).mkdir(parents=True, exist_ok=True)
        (self.root / name / file).write_bytes(content)


@pytest.fixture
def mirror(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Mirror]:
    """A real HTTP mirror on 127.0.0.1, with AUDITOR_DATA_DIR and XDG_CACHE_HOME set to empty folders."""
    served = Mirror(tmp_path / "mirror", [])
    served.root.mkdir()

    class Handler(SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(served.root), **kwargs)

        def log_message(self, *args) -> None:  # record the request instead of printing it
            served.requested.append(self.path)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    monkeypatch.setenv("AUDITOR_DATA_MIRROR", f"http://127.0.0.1:{server.server_port}/")
    monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "*")  # reach 127.0.0.1 directly even where a proxy is configured
    yield served
    server.shutdown()
    server.server_close()
    thread.join()


def link_images(folder: Path, data_dir: Path) -> None:
    """Put the two large image files in place, so that only the small label files are downloaded."""
    folder.mkdir(parents=True)
    for file in IMAGE_FILES:
        (folder / file).symlink_to(data_dir / "mnist" / file)


def test_missing_files_are_downloaded_into_the_data_dir(mirror: Mirror, tmp_path: Path, data_dir: Path) -> None:
    target = tmp_path / "data" / "mnist"
    link_images(target, data_dir)
    for file in LABEL_FILES:
        mirror.serve("mnist", file, (data_dir / "mnist" / file).read_bytes())
    assert locate("mnist") == target
    assert sorted(mirror.requested) == sorted(f"/mnist/{file}" for file in LABEL_FILES)
    for file in LABEL_FILES:
        assert (target / file).read_bytes() == (data_dir / "mnist" / file).read_bytes()
    assert not list(target.glob("*.part"))
    _, y = load_arrays("mnist", "test", limit=5)
    assert y is not None and y.tolist() == [7, 2, 1, 0, 4]
    assert locate("mnist") == target and len(mirror.requested) == 2  # found now, not fetched again


@pytest.mark.parametrize("data_dir_setting", ["unset", "not writable"])
def test_downloads_go_to_the_user_cache_otherwise(
    data_dir_setting: str, mirror: Mirror, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_dir: Path
) -> None:
    if data_dir_setting == "unset":
        monkeypatch.delenv("AUDITOR_DATA_DIR")
    else:
        (tmp_path / "a-file").touch()  # a folder cannot be made inside a file, even by root
        monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path / "a-file" / "data"))
    cache = tmp_path / "cache" / "onnx-auditor" / "mnist"
    link_images(cache, data_dir)
    for file in LABEL_FILES:
        mirror.serve("mnist", file, (data_dir / "mnist" / file).read_bytes())
    assert locate("mnist") == cache
    assert all((cache / file).is_file() for file in LABEL_FILES)


def test_downloaded_file_with_other_bytes_is_deleted(mirror: Mirror, tmp_path: Path, data_dir: Path) -> None:
    target = tmp_path / "data" / "mnist"
    link_images(target, data_dir)
    altered = altered_copy(data_dir / "mnist" / LABEL_FILES[0])
    mirror.serve("mnist", LABEL_FILES[0], altered)
    shutil.copy(data_dir / "mnist" / LABEL_FILES[1], mirror.root / "mnist" / LABEL_FILES[1])
    refused(
        DataError,
        lambda: locate("mnist"),
        LABEL_FILES[0],
        f"sha256 {hashlib.sha256(altered).hexdigest()}",
        f"expected {idx._FILES['mnist'][LABEL_FILES[0]][1]}",
    )
    assert sorted(p.name for p in target.iterdir()) == sorted(IMAGE_FILES)  # nothing left behind


def test_unreachable_mirror_gives_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as probe:  # a port that was just free and is closed again
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("AUDITOR_DATA_MIRROR", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AUDITOR_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setenv("NO_PROXY", "*")
    refused(
        DataError,
        lambda: open_dataset("fashion-mnist", "test"),
        *IMAGE_FILES,
        *LABEL_FILES,
        f"missing from {tmp_path / 'data' / 'fashion-mnist'}",
        f"http://127.0.0.1:{port}/fashion-mnist/",
        "place the files in $AUDITOR_DATA_DIR/fashion-mnist/ or allow network access",
    )
    assert not list((tmp_path / "data" / "fashion-mnist").iterdir())


# --- .npz members are streamed, never inflated whole --------------------------------------------


def _npz_with_header(path: Path, key: str, header: dict, body: bytes) -> Path:
    """A .npz whose member ``key`` has the given .npy header and body (which may disagree with it)."""
    head = io.BytesIO()
    np.lib.format.write_array_header_1_0(head, header)
    with (
        zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as archive,
        archive.open(f"{key}.npy", "w", force_zip64=True) as member,
    ):
        member.write(head.getvalue())
        member.write(body)
    return path


def test_a_zip_bomb_costs_only_the_samples_taken(tmp_path: Path) -> None:
    # about 1.5 GB of zero images compressed into about 1.5 MB
    header = {"descr": "|u1", "fortran_order": False, "shape": (2_000_000, 28, 28)}
    path = _npz_with_header(tmp_path / "bomb.npz", "x", header, bytes(28 * 28 * 2_000_000))
    assert path.stat().st_size < 4 * 2**20
    tracemalloc.start()
    try:
        (dataset,) = open_splits(str(path), "test", limit=100)
        batches = list(dataset.batches(32))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert dataset.count == 100 and [len(b.x) for b in batches] == [32, 32, 32, 4]
    assert peak < 16 * 2**20, peak


def test_npz_members_stream_the_same_samples_as_numpy_reads(tmp_path: Path) -> None:
    x = np.random.default_rng(0).integers(0, 255, (50, 3, 4), dtype=np.uint8)
    y = np.arange(50, dtype=np.int32) % 7
    np.savez_compressed(tmp_path / "d.npz", x_train=x, y_train=y, x_test=x[:9], y_test=y[:9])
    train, test = open_splits(str(tmp_path / "d.npz"), "both")
    got = list(train.batches(16))
    np.testing.assert_array_equal(np.concatenate([b.x for b in got]), x)
    np.testing.assert_array_equal(np.concatenate([b.y for b in got]), y)
    assert all(b.y.dtype == np.int64 for b in got)
    assert test.count == 9


def test_a_member_shorter_than_its_header_is_refused_when_read(tmp_path: Path) -> None:
    header = {"descr": "<f4", "fortran_order": False, "shape": (10, 4)}
    path = _npz_with_header(tmp_path / "short.npz", "x", header, bytes(4 * 4 * 3))
    (dataset,) = open_splits(str(path), "test")
    refused(DataError, lambda: list(dataset.batches(4)), "declares 10 rows but ends early")


def test_fortran_ordered_and_object_members_are_refused(tmp_path: Path) -> None:
    header = {"descr": "<f4", "fortran_order": True, "shape": (10, 4)}
    path = _npz_with_header(tmp_path / "f.npz", "x", header, bytes(4 * 40))
    refused(DataError, lambda: open_splits(str(path), "test"), "Fortran order")
    header = {"descr": "|O", "fortran_order": False, "shape": (3,)}
    path = _npz_with_header(tmp_path / "o.npz", "x", header, b"")
    refused(DataError, lambda: open_splits(str(path), "test"), "objects")
