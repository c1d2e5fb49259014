"""auditor.datasets.idxcache on the real MNIST files: decompressed copies made once in the user cache (never
beside the originals), checked, remade when wrong, and skipped when they cannot be kept."""

from __future__ import annotations

import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest

from auditor.datasets import idxcache
from auditor.datasets.idx import locate
from auditor.datasets.splits import open_dataset

TEST_FILES = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


@pytest.fixture
def mnist_copy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A data folder holding the four original MNIST files, and an empty user cache."""
    folder = tmp_path / "data" / "mnist"
    folder.mkdir(parents=True)
    for file in locate("mnist").iterdir():
        if file.name.endswith(".gz"):
            shutil.copy(file, folder / file.name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    return folder


def gzip_content(path: Path) -> bytes:
    with gzip.open(path, "rb") as stream:
        return stream.read()


def read_test_split(data_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    batches = list(open_dataset("mnist", "test", data_dir=data_dir).batches(4096))
    return np.concatenate([b.x for b in batches]), np.concatenate([b.y for b in batches])


def test_the_copy_is_made_in_the_cache_and_holds_its_content(mnist_copy: Path, tmp_path: Path) -> None:
    before = sorted(mnist_copy.iterdir())
    x, y = read_test_split(mnist_copy.parent)
    assert sorted(mnist_copy.iterdir()) == before  # the data folder is only read
    cache = tmp_path / "cache" / "onnx-auditor" / "mnist"
    for file in TEST_FILES:
        assert (cache / file.removesuffix(".gz")).read_bytes() == gzip_content(mnist_copy / file)
    assert not (cache / "train-images-idx3-ubyte").exists()  # only the split that was opened
    raw = gzip_content(mnist_copy / TEST_FILES[0])
    np.testing.assert_array_equal(x, np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28))
    assert y.dtype == np.int64 and len(y) == len(x) == 10000
    assert list(mnist_copy.glob("*.part")) == []


def test_a_copy_that_does_not_check_out_is_made_again(mnist_copy: Path, tmp_path: Path) -> None:
    original = mnist_copy / TEST_FILES[0]
    copy = idxcache.raw_copy("mnist", original, tmp_path / "cache")
    assert copy == tmp_path / "cache" / "mnist" / "t10k-images-idx3-ubyte"
    content = bytearray(copy.read_bytes())
    content[5000] ^= 0xFF  # same size, one pixel changed
    copy.write_bytes(bytes(content))
    assert idxcache.raw_copy("mnist", original, tmp_path / "cache") == copy
    assert copy.read_bytes() == gzip_content(original)


def test_with_nowhere_to_keep_a_copy_the_gzip_stream_is_read(mnist_copy: Path, tmp_path: Path) -> None:
    for file in TEST_FILES:  # the names are taken: no copy can be renamed into the cache
        (tmp_path / "cache" / "onnx-auditor" / "mnist" / file.removesuffix(".gz")).mkdir(parents=True)
    assert idxcache.raw_copy("mnist", mnist_copy / TEST_FILES[0], tmp_path / "cache" / "onnx-auditor") is None
    x, y = read_test_split(mnist_copy.parent)
    raw = gzip_content(mnist_copy / TEST_FILES[0])
    np.testing.assert_array_equal(x, np.frombuffer(raw, np.uint8, offset=16).reshape(-1, 28, 28))
    assert len(y) == 10000


def test_files_it_does_not_know_get_no_copy(tmp_path: Path) -> None:
    other = tmp_path / "notes.gz"
    other.write_bytes(gzip.compress(b"not an IDX file"))
    assert idxcache.raw_copy("mnist", other, tmp_path / "cache") is None
    assert idxcache.raw_copy("emnist", other, tmp_path / "cache") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.gz"]
