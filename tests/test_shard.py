"""Sharded audits (``auditor.engine.shard``): the plan, the partitioned reduce, and a real local Ray run.

The in-process tests run the whole sharded audit on ``InlineExecutor`` (the plan, every shard's
audit and the exact reduce, as Ray would run them) and check it against a local audit; the slow
tests start a real private Ray instance.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from auditor import AuditConfig, audit
from auditor.cli import main
from auditor.datasets.splits import open_splits
from auditor.engine.count import CountOfCounts
from auditor.engine.modelfile import load_model
from auditor.engine.shard import InlineExecutor, audit_sharded, audit_streamed, partition_of, plan, reduce_partition
from auditor.engine.stores import fold_keys
from auditor.errors import AuditError
from auditor.records import DataSpec

REPO = Path(__file__).resolve().parents[1]
LENET5 = REPO / "examples" / "lenet5_3_9_4.onnx"
CPU = AuditConfig(device="cpu", batch_size=100)


def test_the_plan_cuts_each_split_into_contiguous_ranges() -> None:
    ranges = plan({"train": 10, "test": 3}, 4)
    assert [(s, a, b) for s, a, b in ranges if s == "train"] == [
        ("train", 0, 2), ("train", 2, 5), ("train", 5, 8), ("train", 8, 10)
    ]  # fmt: skip
    assert [(a, b) for s, a, b in ranges if s == "test"] == [(0, 1), (1, 2), (2, 3)]  # never an empty shard


@pytest.mark.parametrize("shards", [0, -1, 5000])
def test_a_shard_count_out_of_range_is_refused(shards: int) -> None:
    with pytest.raises(AuditError, match="--shards must be between 1 and"):
        plan({"test": 10}, shards)


def test_equal_keys_always_meet_in_one_partition() -> None:
    heads = np.random.default_rng(0).integers(0, 2**63, 5000, dtype=np.uint64)
    parts = partition_of(np.concatenate([heads, heads[::-1]]), 7)
    np.testing.assert_array_equal(parts[:5000], parts[5000:][::-1])
    assert set(parts.tolist()) == set(range(7))  # the hash spreads keys over every partition


@pytest.mark.parametrize("words", [1, 2])
def test_reduced_partitions_give_the_exact_count_of_counts(words: int) -> None:
    rng = np.random.default_rng(1)
    keys = rng.integers(0, 50, (6000, words)).astype(np.uint64)
    keys = keys[:, 0] if words == 1 else keys
    shards = [fold_keys(part) for part in np.array_split(keys, 3)]
    partitions = 4
    by_part = [[run[partition_of(run["head"], partitions) == p] for run in shards] for p in range(partitions)]
    reduced = CountOfCounts.sum(
        reduce_partition(1 << 20, *({"layer": run} for run in by_part[p]))["layer"] for p in range(partitions)
    )
    expected = np.unique(keys, axis=0, return_counts=True)[1]
    reference = CountOfCounts.of(expected)
    np.testing.assert_array_equal(reduced.values, reference.values)
    np.testing.assert_array_equal(reduced.states, reference.states)
    assert reduced.summary().entropy_bits == reference.summary().entropy_bits


@pytest.mark.parametrize("shards", [1, 4])
def test_the_sharded_audit_run_in_process_equals_a_local_audit(shards: int) -> None:
    """The plan, the shard audits and the exact reduce of a sharded audit, without Ray: the same
    counts, entropies and accuracy as a local audit, and CNA to float rounding."""
    data = DataSpec("mnist", "test", 900)
    local = audit(str(LENET5), open_splits("mnist", "test", limit=900), CPU)
    seen: list[tuple[str, int]] = []
    sharded = audit_sharded(
        load_model(LENET5), open_splits("mnist", "test", limit=900), data, CPU, InlineExecutor(),
        shards=shards, progress=lambda split, done: seen.append((split, done)),
    )  # fmt: skip
    assert sharded.sharding == {"shards": shards, "partitions": shards}
    a, b = local.splits["test"], sharded.splits["test"]
    assert a.layers == b.layers and a.accuracy == b.accuracy  # counts and entropies, bit for bit
    assert b.cna == pytest.approx(a.cna, abs=1e-9)  # float32 sums may round apart between batchings
    assert sharded.warnings == local.warnings
    assert sharded.weights == local.weights is not None  # read from the same weights
    assert seen[-1] == ("test", 900)


def test_a_streamed_audit_in_chunks_equals_a_local_audit_of_the_same_batches() -> None:
    """Streamed batches (splits interleaved) gathered into chunks of three batches, each a shard."""
    train, test = open_splits("mnist", "both", limit=600)
    stream = [
        (d.split, b)
        for pair in zip(train.batches(100), test.batches(100), strict=True)
        for d, b in zip((train, test), pair, strict=True)
    ]
    local = audit(str(LENET5), iter(stream), CPU)
    seen: dict[str, int] = {}
    streamed = audit_streamed(
        load_model(LENET5), iter(stream), CPU, InlineExecutor(), partitions=3, in_flight=2,
        chunk_bytes=3 * 100 * 28 * 28, progress=seen.__setitem__,
    )  # fmt: skip
    assert streamed.sharding == {"shards": 4, "partitions": 3}
    assert streamed.splits == local.splits and streamed.model == local.model
    assert seen == {"train": 600, "test": 600}


def test_an_empty_stream_is_refused() -> None:
    with pytest.raises(AuditError, match="empty"):
        audit_streamed(load_model(LENET5), iter([]), CPU, InlineExecutor(), partitions=1, in_flight=1)


def test_a_failing_shard_stops_the_sharded_audit_with_its_own_reason() -> None:
    data = DataSpec("mnist", "test", 900)
    with pytest.raises(AuditError, match="model"):
        audit_sharded(
            load_model(LENET5), open_splits("mnist", "test", limit=900), data, CPU, _CorruptingExecutor(), shards=2
        )


class _CorruptingExecutor(InlineExecutor):
    """Hands the shard tasks a model that is not one, as a broken object store would."""

    def share(self, model: bytes | str) -> bytes:
        return b"not a model"


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "auditor.cli", *args], capture_output=True, text=True, timeout=600, cwd=REPO
    )


@pytest.mark.slow
def test_ray_local_four_shards_on_all_of_mnist_equal_a_local_audit(tmp_path: Path) -> None:
    local, sharded = tmp_path / "local.json", tmp_path / "ray.json"
    common = [str(LENET5), "--data", "mnist", "--split", "both", "--device", "cpu", "--no-progress"]
    assert _cli("audit", *common, "--json", str(local)).returncode == 0
    run = _cli("audit", *common, "--ray", "local", "--shards", "4", "--json", str(sharded))
    assert run.returncode == 0, run.stderr
    a, b = json.loads(local.read_text()), json.loads(sharded.read_text())
    assert b["sharding"] == {"address": "local", "shards": 4, "partitions": 4}
    for split in ("train", "test"):
        assert a["splits"][split]["layers"] == b["splits"][split]["layers"]  # counts and entropies, bit for bit
        assert a["splits"][split]["accuracy"] == b["splits"][split]["accuracy"]
        assert b["splits"][split]["cna"] == pytest.approx(a["splits"][split]["cna"], abs=1e-9)
    assert b["cna_margin"]["area"] == pytest.approx(a["cna_margin"]["area"], abs=1e-9)
    assert a["warnings"] == b["warnings"]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--shards", "2"], "--shards needs --ray"),
        (["--ray", "local", "--server", "127.0.0.1:1"], "apply to local audits"),
    ],
)
def test_bad_sharding_settings_are_one_line_exit_2(argv: list[str], fragment: str, capsys) -> None:
    assert main(["audit", str(LENET5), "--data", "mnist", "--limit", "10", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert fragment in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_an_unreachable_cluster_is_one_line_exit_2() -> None:
    run = _cli("audit", str(LENET5), "--data", "mnist", "--limit", "10", "--ray", "ray://127.0.0.1:1", "--no-progress")
    assert run.returncode == 2
    assert (
        run.stderr.strip().startswith("auditor: error: cannot reach the Ray cluster")
        and len(run.stderr.strip().splitlines()) == 1
    )
