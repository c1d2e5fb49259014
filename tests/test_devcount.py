"""The device counting core, run on the numpy-backed stand-in device: bit for bit the host's runs.

``devcount.count_keys`` must give exactly the run ``stores.fold_keys`` gives for the same keys
(same records, same order, same dtype), so that runs counted on a GPU join the host stores as
if the host had counted them. The stand-in (``fakedevice``) refuses numpy's own functions on
its arrays, so a step that would silently run on the host fails here.
"""

from __future__ import annotations

from pathlib import Path

import fakedevice
import numpy as np
import pytest
from models import CASES, NEURONS

from auditor import prepare
from auditor.datasets.splits import open_splits
from auditor.engine import devcount, keys, stores
from auditor.engine.devcount import count_keys, count_packed
from auditor.engine.expose import expose
from auditor.engine.keys import join_groups, namespace
from auditor.engine.modelfile import load_model
from auditor.engine.prepare import structure_of
from auditor.engine.run import Session
from auditor.engine.stores import fold_keys

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def on_device(array: np.ndarray) -> fakedevice.DeviceArray:
    return fakedevice.asarray(array)


def assert_same_run(got: np.ndarray, want: np.ndarray) -> None:
    assert got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("dtype", [np.int32, np.uint32, np.uint64])
def test_narrow_keys_give_the_host_run(dtype: type) -> None:
    keys_ = np.random.default_rng(0).integers(0, 300, 5000).astype(dtype)
    assert_same_run(count_keys(on_device(keys_), fakedevice, fakedevice.asnumpy), fold_keys(keys_))


@pytest.mark.parametrize("words", [2, 3, 32])
def test_wide_keys_give_the_host_run(words: int) -> None:
    rng = np.random.default_rng(words)
    pool = rng.integers(0, 2**63, (60, words), dtype=np.uint64)
    rows = pool[rng.integers(60, size=4000)]
    assert_same_run(count_keys(on_device(rows), fakedevice, fakedevice.asnumpy), fold_keys(rows))


def test_hash_collisions_never_merge_different_wide_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    """A hash with two values for 50 rows: sorting stays exact, and every row is counted apart."""
    colliding = lambda rows: rows[:, -1] & np.uint64(1)  # noqa: E731
    monkeypatch.setattr(devcount, "hash_rows", colliding)
    monkeypatch.setattr(stores, "hash_rows", colliding)
    rows = np.stack([np.arange(50, dtype=np.uint64).repeat(3), np.arange(150, dtype=np.uint64) % 2], axis=1)
    run = count_keys(on_device(rows), fakedevice, fakedevice.asnumpy)
    assert len(run) == 100 and run["count"].sum() == 150
    assert_same_run(run, fold_keys(rows))


def test_empty_keys_give_an_empty_run() -> None:
    for shape in [(0,), (0, 3)]:
        run = count_keys(on_device(np.zeros(shape, np.uint64)), fakedevice, fakedevice.asnumpy)
        assert len(run) == 0 and run.dtype == stores.record_dtype(1 if len(shape) == 1 else 3)


def test_only_the_distinct_pairs_cross_to_the_host() -> None:
    rows = np.random.default_rng(1).integers(0, 4, (100_000, 3)).astype(np.uint64)  # 64 distinct states
    before = fakedevice.HOST_BYTES[0]
    run = count_keys(on_device(rows), fakedevice, fakedevice.asnumpy)
    assert len(run) == 64
    assert fakedevice.HOST_BYTES[0] - before == run.nbytes  # 2.6 kB, against 2.4 MB of keys


def test_namespace_finds_the_module_of_the_arrays() -> None:
    assert namespace(np.zeros(1)) is np
    assert namespace(on_device(np.zeros(1))) is fakedevice


@pytest.mark.parametrize("layout", CASES)
@pytest.mark.parametrize("neurons", NEURONS)
def test_packed_outputs_of_real_sessions_give_the_host_run(neurons: int, layout: str) -> None:
    """Keys joined on the device from onnxruntime's packed groups, at every group and word boundary."""
    model, x, _ = CASES[layout](neurons)
    prepared = prepare(model, device="cpu")
    (out,) = prepared.exposed.layers
    packed = prepared.runner.run(x, [out.keys])[out.keys]
    counted = count_packed(on_device(packed), out.groups, out.group_axis, fakedevice, fakedevice.asnumpy)
    host_keys = join_groups(packed, out.groups, out.group_axis)
    assert counted.states == len(host_keys)
    assert_same_run(counted.run, fold_keys(host_keys))


@pytest.mark.parametrize("neurons", [20, 24, 25, 64, 65, 130])
def test_the_float_packing_cuda_sessions_use_gives_the_host_run(neurons: int) -> None:
    """CUDA sessions pack firing bits in float, into groups of up to 24 bits (``word_groups``)."""
    model, x, _ = CASES["conv"](neurons)
    loaded = load_model(model)
    structure = structure_of(loaded)
    exposed = expose(loaded.proto, structure, "pre-activation", integer_packing=False)
    (out,) = exposed.layers
    packed = Session(exposed.model, structure.input, "cpu").run(x, [out.keys])[out.keys]
    counted = count_packed(on_device(packed), out.groups, out.group_axis, fakedevice, fakedevice.asnumpy)
    assert_same_run(counted.run, fold_keys(join_groups(packed, out.groups, out.group_axis)))
    assert counted.run["count"].sum() == len(x) * 9


def test_the_trained_example_gives_the_host_runs_on_mnist() -> None:
    prepared = prepare(str(EXAMPLES / "lenet5_3_9_4.onnx"), device="cpu")
    (test,) = open_splits("mnist", "test", limit=512)
    x = next(test.batches(512)).x.astype(np.float32)[:, None] / 255
    outputs = prepared.runner.run(x, [out.keys for out in prepared.exposed.layers])
    for out in prepared.exposed.layers:
        packed = outputs[out.keys]
        counted = count_packed(on_device(packed), out.groups, out.group_axis, fakedevice, fakedevice.asnumpy)
        assert_same_run(counted.run, fold_keys(keys.join_groups(packed, out.groups, out.group_axis)))
