"""Sharded audits on Ray: each split cut into contiguous shards, merged exactly by a partitioned reduce.

The driver (this process) opens the data to learn each split's size, cuts every split into
``shards`` contiguous ranges and starts one Ray task per range. A task audits its range under its
own memory budget, exactly as a local audit would, and returns two kinds of partial result:

- the split's ``SplitFigures`` (sample counts and a few floats per sample), which the driver
  appends in shard order, so per-sample arrays end up in the order a local audit sees them;
- every counted layer's distinct states with their counts, cut into ``partitions`` parts by a
  hash of the key, each part a separate Ray object.

One reducer task per partition merges that partition's part from every shard (equal keys always
land in the same partition) and returns, per layer, the count of counts of its states. Counts of
counts over disjoint sets of states add exactly, and the driver derives each layer's distinct
count, entropy and top states from their sum with the same function a local audit uses, so state
counts and entropies are bit-identical to a local audit; no process ever holds every key.

``ray`` is imported only here (the ``ray`` extra). Named datasets are read by each worker from its
own data folder (``AUDITOR_DATA_DIR`` is passed on); files and image folders must be readable at
the same path on every node.
"""

from __future__ import annotations

import importlib
import itertools
import logging
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from auditor.audit import tally
from auditor.config import AuditConfig
from auditor.count import MemoryBudget, RunStore, add_histograms, count_of_counts, hash_rows, summarize
from auditor.data import Batch, Dataset, open_splits, skipped_warning
from auditor.errors import AuditError, first_line
from auditor.modelfile import external_tensors, load_model
from auditor.prepare import describe_model, prepare, structure_of
from auditor.records import ImageOptions
from auditor.report import Report
from auditor.summary import TOP_STATES
from auditor.summary import summarize as summarize_report
from auditor.tally import SplitFigures, SplitResult

MAX_SHARDS = 4096
_POLL_S = 0.5


@dataclass(frozen=True)
class Shard:
    """One contiguous range ``[start, stop)`` of one split, and everything a task needs to audit it."""

    split: str
    start: int
    stop: int
    data: str
    images: ImageOptions | None
    config: AuditConfig
    partitions: int


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task returns besides its partitions: the providers that ran, and its figures."""

    shard: Shard
    providers: list[str]
    figures: SplitFigures
    totals: dict[str, int]  # states counted per layer
    skipped: tuple[str, ...]


def plan(counts: dict[str, int], shards: int) -> list[tuple[str, int, int]]:
    """``(split, start, stop)`` of every shard: each split in ``shards`` contiguous, near-equal ranges."""
    if not 1 <= shards <= MAX_SHARDS:
        raise AuditError(f"--shards must be between 1 and {MAX_SHARDS}, got {shards}")
    ranges = []
    for split, count in counts.items():
        bounds = np.linspace(0, count, min(shards, count) + 1).round().astype(int)
        ranges += [(split, int(a), int(b)) for a, b in itertools.pairwise(bounds) if b > a]
    return ranges


def partition_of(heads: np.ndarray, partitions: int) -> np.ndarray:
    """The reducer of each record, from a hash of its key's head: equal keys always share one."""
    mixed = hash_rows(np.ascontiguousarray(heads, dtype=np.uint64)[:, None])
    return (mixed % np.uint64(partitions)).astype(np.intp)


def audit_on_ray(
    model_path: Path,
    data: str,
    split: str,
    limit: int | None,
    config: AuditConfig,
    *,
    address: str,
    shards: int,
    images: ImageOptions | None = None,
    progress: Callable[[str, int], None] | None = None,
) -> Report:
    """Audit ``model_path`` on ``data`` as ``shards`` Ray tasks per split; the report a local audit gives.

    ``address`` is ``local`` (a private instance on this machine), ``auto``, ``host:6379`` or
    ``ray://host:10001``. A task that dies is retried twice; a task that fails stops the audit
    with its one-line reason, and no partial report is ever returned.
    """
    loaded = load_model(model_path)
    datasets = open_splits(data, split, limit=limit, images=images)
    ranges = plan({d.split: d.count for d in datasets}, shards)
    ray = _ray()
    started = _connect(ray, address)
    try:
        model = str(model_path.resolve()) if external_tensors(loaded.proto) else ray.put(model_path.read_bytes())
        partitions = max(1, min(shards, 64))
        work = [Shard(s, a, b, data, images, config, partitions) for s, a, b in ranges]
        outcomes, parts = _run_shards(ray, model, work, progress)
        states = _reduce(ray, loaded, config, outcomes, parts, partitions)
    finally:
        if started:
            ray.shutdown()
    structure = structure_of(loaded)
    results = {}
    for name in dict.fromkeys(o.shard.split for o in outcomes):
        figures = SplitFigures()
        for outcome in sorted((o for o in outcomes if o.shard.split == name), key=lambda o: o.shard.start):
            figures.merge(outcome.figures)
        results[name] = SplitResult(figures, states[name])
    skipped = [
        skipped_warning(d.split, d.name, sorted({n for o in outcomes if o.shard.split == d.split for n in o.skipped}))
        for d in datasets
    ]
    report = summarize_report(
        describe_model(loaded), outcomes[0].providers, structure.layers, results, config, [s for s in skipped if s]
    )
    return replace(report, sharding={"address": address, "shards": shards, "partitions": partitions})


def _ray() -> ModuleType:
    try:
        return importlib.import_module("ray")
    except ImportError:
        raise AuditError("--ray needs Ray: pip install 'onnx-auditor[ray]'") from None


def _connect(ray: ModuleType, address: str) -> bool:
    """Join (or, for ``local``, start) a Ray instance; True when this call started it."""
    if ray.is_initialized():
        return False
    env = {key: os.environ[key] for key in ("AUDITOR_DATA_DIR",) if key in os.environ}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Ray warns before it raises; the refusal says it in one line
            ray.init(
                address=None if address == "local" else address,
                runtime_env={"env_vars": env} if env else None,
                log_to_driver=False,
                logging_level=logging.ERROR,
                include_dashboard=False,
            )
    except Exception as exc:  # ConnectionError, ValueError, RuntimeError, … depending on the address form
        raise AuditError(f"cannot reach the Ray cluster at {address!r}: {first_line(exc)}") from None
    return True


def _run_shards(
    ray: ModuleType, model: Any, work: list[Shard], progress: Callable[[str, int], None] | None
) -> tuple[list[ShardOutcome], list[list[Any]]]:
    """Run every shard task; returns their outcomes and, per shard, its partition references."""
    partitions = work[0].partitions
    counter = ray.remote(_Progress).options(num_cpus=0).remote()
    task = ray.remote(audit_shard).options(num_returns=1 + partitions, max_retries=2)
    refs = [task.remote(model, shard, counter) for shard in work]
    pending = [r[0] for r in refs]
    try:
        while pending:
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=_POLL_S)
            if progress is not None:
                for split, done in ray.get(counter.totals.remote()).items():
                    progress(split, done)
        outcomes = [_unwrap(ray, lambda r=r: ray.get(r[0])) for r in refs]
    except BaseException:
        for r in refs:
            ray.cancel(r[0], force=True)
        raise
    return outcomes, [r[1:] for r in refs]


def _reduce(
    ray: ModuleType,
    loaded: Any,
    config: AuditConfig,
    outcomes: list[ShardOutcome],
    parts: list[list[Any]],
    partitions: int,
) -> dict[str, dict[str, Any]]:
    """Each split's state summaries, from one reducer task per (split, partition)."""
    task = ray.remote(reduce_partition).options(max_retries=2)
    states: dict[str, dict[str, Any]] = {}
    for split in dict.fromkeys(o.shard.split for o in outcomes):
        mine = [i for i, o in enumerate(outcomes) if o.shard.split == split]
        totals = {layer: sum(outcomes[i].totals[layer] for i in mine) for layer in outcomes[mine[0]].totals}
        refs = [task.remote(config.memory_budget, *(parts[i][p] for i in mine)) for p in range(partitions)]
        histograms = [_unwrap(ray, lambda r=r: ray.get(r)) for r in refs]
        states[split] = {}
        for layer, total in totals.items():
            values, counts = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for histogram in histograms:
                values, counts = add_histograms((values, counts), histogram.get(layer, (values[:0], counts[:0])))
            summary = summarize(values, counts, top_k=TOP_STATES)
            if summary.total != total:
                raise AuditError(f"layer {layer!r} lost states in the sharded merge ({summary.total} of {total})")
            states[split][layer] = summary
    return states


def _unwrap(ray: ModuleType, get: Callable[[], Any]) -> Any:
    """``get()``, with a task's own refusal re-raised as itself and other failures as one line."""
    try:
        return get()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        if isinstance(cause, AuditError):
            raise cause from None
        raise AuditError(f"a Ray task of the audit failed: {first_line(cause or exc)}") from None
    except ray.exceptions.RayError as exc:
        raise AuditError(f"the Ray cluster lost part of the audit: {first_line(exc)}; run it again") from None


class _Progress:
    """A Ray actor that adds up the samples every shard has audited, per split."""

    def __init__(self) -> None:
        self.done: dict[str, int] = {}

    def add(self, split: str, samples: int) -> None:
        self.done[split] = self.done.get(split, 0) + samples

    def totals(self) -> dict[str, int]:
        return dict(self.done)


def audit_shard(model: Any, shard: Shard, counter: Any = None) -> tuple[Any, ...]:
    """Audit one shard (a Ray task): its outcome, then one part of its distinct states per partition.

    ``model`` is the model's bytes, or a path readable on this node (models with external data).
    """
    settings = shard.config.session
    source = model if isinstance(model, str) else bytes(model)
    prepared = prepare(source, device=settings.device, states_at=settings.states_at)
    (dataset,) = open_splits(shard.data, shard.split, limit=shard.stop, images=shard.images)
    last = [0]

    def report(split: str, done: int) -> None:
        if counter is not None:
            counter.add.remote(split, done - last[0])
        last[0] = done

    with MemoryBudget(shard.config.memory_budget) as budget:
        tallies = tally(
            prepared,
            _window(dataset, shard.start, shard.config.batch_size),
            shard.config,
            budget,
            first={shard.split: shard.start},
            progress=report,
        )
        (split,) = tallies.values()
        parts: list[dict[str, np.ndarray]] = [{} for _ in range(shard.partitions)]
        for name, layer in split.counters.items():
            pieces: list[list[np.ndarray]] = [[] for _ in range(shard.partitions)]
            for run in layer.store.merged():
                where = partition_of(run["head"], shard.partitions)
                for p in range(shard.partitions):
                    pieces[p].append(run[where == p])
            for p in range(shard.partitions):
                parts[p][name] = np.concatenate(pieces[p])
        totals = {name: layer.total for name, layer in split.counters.items()}
    outcome = ShardOutcome(shard, prepared.providers, split.figures, totals, dataset.skipped)
    return (outcome, *parts)


def reduce_partition(budget_bytes: int, *parts: dict[str, np.ndarray]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Merge one partition's states from every shard (a Ray task): per layer, its count of counts."""
    out = {}
    with MemoryBudget(budget_bytes) as budget:
        for name in parts[0]:
            runs = [part[name] for part in parts]
            words = runs[0].dtype["words"].shape[0] if "words" in runs[0].dtype.names else 1
            store = RunStore(words, budget)
            store.merge(_Runs(runs))
            histogram = np.zeros(0, np.int64), np.zeros(0, np.int64)
            for run in store.merged():
                histogram = add_histograms(histogram, count_of_counts(run["count"]))
            out[name] = histogram
    return out


class _Runs:
    """Sorted runs already in memory, offered to a store's ``merge`` as another store would."""

    def __init__(self, runs: list[np.ndarray]) -> None:
        self.runs = runs

    def merged(self) -> Iterator[np.ndarray]:
        yield from (run for run in self.runs if len(run))


def _window(dataset: Dataset, start: int, batch_size: int) -> Iterator[tuple[str, Batch]]:
    """The dataset's samples from ``start`` on, tagged with its split (earlier samples are read, not run)."""
    seen = 0
    for batch in dataset.batches(batch_size):
        n = len(batch.x)
        if seen + n > start:
            cut = max(0, start - seen)
            yield dataset.split, Batch(batch.x[cut:], None if batch.y is None else batch.y[cut:])
        seen += n

