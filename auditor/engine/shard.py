"""Sharded audits: each split cut into contiguous shards, merged exactly by a partitioned reduce.

The driver (this process) opens the data once to learn each split's size, cuts every split into
``shards`` contiguous ranges and starts one task per range on a ``ShardExecutor``: Ray tasks on
a cluster (``RayExecutor``), or one after another in this process (``InlineExecutor``, which
tests the plan, the shard audits and the reduce without Ray). A task audits its range under its
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

``ray`` is never imported here: ``RayExecutor`` is handed the module ``raycluster.connected``
joined. Named datasets are read by each worker from its
own data folder (``AUDITOR_DATA_DIR`` is passed on); files and image folders must be readable at
the same path on every node.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from types import ModuleType
from typing import Any, Protocol

import numpy as np

from auditor.config import AuditConfig
from auditor.datasets.batches import Batch, Dataset, skipped_warning
from auditor.datasets.splits import open_splits
from auditor.engine.audit import cut_batches, tally
from auditor.engine.count import CountOfCounts, StateSummary
from auditor.engine.keys import hash_rows
from auditor.engine.modelfile import LoadedModel, external_tensors
from auditor.engine.prepare import describe_model, prepare, structure_of
from auditor.engine.run import gpu_math_warnings
from auditor.engine.stores import MemoryBudget, RunStore
from auditor.engine.summary import TOP_STATES
from auditor.engine.summary import summarize as summarize_report
from auditor.engine.tally import SplitFigures, SplitResult
from auditor.engine.weights import weight_norms
from auditor.errors import AuditError, CancelledError, DataError, first_line
from auditor.raycluster import MAX_SHARDS
from auditor.records import DataSpec
from auditor.report import Report

_POLL_S = 0.5
CHUNK_BYTES = 64 << 20  # samples of a stream per shard task


@dataclass(frozen=True)
class Shard:
    """One contiguous range ``[start, stop)`` of one split, and everything a task needs to audit it:
    the data to read the range from, or the range's samples themselves (a chunk of a stream)."""

    split: str
    start: int
    stop: int
    data: DataSpec | None  # its image options carry the model's input shape already; None with batches
    config: AuditConfig
    partitions: int
    batches: tuple[Batch, ...] | None = None  # a streamed chunk's batches, in order


@dataclass(frozen=True)
class ShardOutcome:
    """What a shard task returns besides its partitions: the providers that ran, and its figures."""

    shard: Shard
    providers: list[str]
    provider_options: dict[str, dict[str, str]] | None
    figures: SplitFigures
    totals: dict[str, int]  # states counted per layer
    skipped: tuple[str, ...]
    counting_warnings: tuple[str, ...] = ()  # CUDA ran but the states were counted on the host


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


class ShardExecutor(Protocol):
    """Where shard and reducer tasks run: ``RayExecutor`` on a cluster, ``InlineExecutor`` in this process.

    The plan, the shard audits and the exact reduce are the same code whichever runs them, so
    they are tested without Ray.
    """

    def share(self, model: bytes | str) -> Any:
        """A handle every task can read the model from (its bytes, or a path every node can read)."""

    def run_shards(
        self,
        model: Any,
        work: Iterable[Shard],
        progress: Callable[[str, int], None] | None,
        in_flight: int | None = None,
    ) -> tuple[list[ShardOutcome], list[list[Any]]]:
        """Every shard's outcome and, per shard, a handle to each of its partitions. ``work`` is
        read as shards are started; with ``in_flight``, no more than that many run unfinished."""

    def reduce(self, budget_bytes: int, parts: list[Any]) -> dict[str, CountOfCounts]:
        """``reduce_partition`` over one partition's parts from every shard of a split."""


def audit_sharded(
    loaded: LoadedModel,
    datasets: list[Dataset],
    data: DataSpec,
    config: AuditConfig,
    executor: ShardExecutor,
    *,
    shards: int,
    progress: Callable[[str, int], None] | None = None,
) -> Report:
    """Audit ``loaded`` on ``datasets`` as ``shards`` tasks per split; the report a local audit gives.

    ``datasets`` are the splits ``data`` names, opened once by the caller to learn their sizes;
    each task opens its own range again from ``data``. A task that fails stops the audit with
    its one-line reason, and no partial report is ever returned.
    """
    ranges = plan({d.split: d.count for d in datasets}, shards)
    model = executor.share(_source(loaded))
    partitions = max(1, min(shards, 64))
    work = [Shard(s, a, b, data, config, partitions) for s, a, b in ranges]
    outcomes, parts = executor.run_shards(model, work, progress)
    skipped = [
        skipped_warning(d.split, d.name, sorted({n for o in outcomes if o.shard.split == d.split for n in o.skipped}))
        for d in datasets
    ]
    report = _merged(executor, loaded, config, outcomes, parts, partitions, [s for s in skipped if s])
    return replace(report, sharding={"shards": shards, "partitions": partitions})


def audit_streamed(
    loaded: LoadedModel,
    batches: Iterable[tuple[str, Batch]],
    config: AuditConfig,
    executor: ShardExecutor,
    *,
    partitions: int,
    in_flight: int,
    chunk_bytes: int = CHUNK_BYTES,
    progress: Callable[[str, int], None] | None = None,
) -> Report:
    """Audit ``loaded`` on samples as they arrive (a client's stream); the report a local audit of
    the same batches gives.

    Each split's batches are gathered into chunks of about ``chunk_bytes``; a chunk becomes a
    shard task as soon as it is full, and no more than ``in_flight`` run unfinished at once, so
    this process holds one open chunk per split. Ray keeps a chunk while its task's results may
    be needed again (until the merge), spilling to disk past its object store.
    """
    model = executor.share(_source(loaded))
    partitions = max(1, min(partitions, 64))
    work = _chunks(batches, config, partitions, chunk_bytes)
    outcomes, parts = executor.run_shards(model, work, progress, in_flight=in_flight)
    if not outcomes:
        raise DataError("the dataset is empty: no samples reached the audit")
    report = _merged(executor, loaded, config, outcomes, parts, partitions, [])
    return replace(report, sharding={"shards": len(outcomes), "partitions": partitions})


def _source(loaded: LoadedModel) -> bytes | str:
    """What tasks read the model from: its bytes, or its path when it has external data."""
    return str(loaded.path) if external_tensors(loaded.proto) else loaded.proto.SerializeToString()


def _chunks(batches: Iterable[tuple[str, Batch]], config: AuditConfig, partitions: int, size: int) -> Iterator[Shard]:
    """Shards of streamed batches: per split, consecutive batches of about ``size`` bytes in all."""
    gathered: dict[str, list[Batch]] = {}
    held: dict[str, int] = {}
    starts: dict[str, int] = {}

    def cut(split: str) -> Shard:
        chunk = tuple(gathered.pop(split))
        del held[split]
        start = starts.get(split, 0)
        starts[split] = stop = start + sum(len(b.x) for b in chunk)
        return Shard(split, start, stop, None, config, partitions, chunk)

    for split, batch in batches:
        gathered.setdefault(split, []).append(batch)
        held[split] = held.get(split, 0) + np.asarray(batch.x).nbytes
        if held[split] >= size:
            yield cut(split)
    for split in list(gathered):
        yield cut(split)


def _merged(
    executor: ShardExecutor,
    loaded: LoadedModel,
    config: AuditConfig,
    outcomes: list[ShardOutcome],
    parts: list[list[Any]],
    partitions: int,
    warnings: list[str],
) -> Report:
    """The report of every shard's outcome and partitions: figures in shard order, states reduced,
    the weights' norms, and the warnings of the data (``warnings``), the GPU's math and the counting."""
    states = _reduce(executor, config, outcomes, parts, partitions)
    structure = structure_of(loaded)
    results = {}
    for name in dict.fromkeys(o.shard.split for o in outcomes):
        figures = SplitFigures()
        for outcome in sorted((o for o in outcomes if o.shard.split == name), key=lambda o: o.shard.start):
            figures.merge(outcome.figures)
        results[name] = SplitResult(figures, states[name])
    report = summarize_report(
        describe_model(loaded), outcomes[0].providers, structure.layers, results, config, warnings
    )
    options = outcomes[0].provider_options
    return replace(
        report,
        provider_options=options,
        weights=weight_norms(loaded.proto, structure.layers),
        warnings=[
            *report.warnings,
            *gpu_math_warnings(options, config.gpu_math),
            *dict.fromkeys(w for o in outcomes for w in o.counting_warnings),
        ],
    )


class RayExecutor:
    """Shard tasks on a Ray cluster (``raycluster.connected``): retried twice when a worker dies,
    cancelled when the audit stops (or ``cancelled()`` turns true), progress summed by a small actor."""

    def __init__(self, ray: ModuleType, cancelled: Callable[[], bool] | None = None) -> None:
        self.ray = ray
        self.cancelled = cancelled

    def share(self, model: bytes | str) -> Any:
        return model if isinstance(model, str) else self.ray.put(model)

    def run_shards(
        self,
        model: Any,
        work: Iterable[Shard],
        progress: Callable[[str, int], None] | None,
        in_flight: int | None = None,
    ) -> tuple[list[ShardOutcome], list[list[Any]]]:
        ray = self.ray
        counter = ray.remote(_Progress).options(num_cpus=0).remote()
        task = None
        refs: list[Any] = []
        reported: dict[str, int] = {}
        try:
            for shard in work:
                if task is None:
                    task = ray.remote(_audit_shard_task).options(num_returns=1 + shard.partitions, max_retries=2)
                refs.append(task.remote(model, shard, counter))
                if in_flight is not None:
                    self._wait(refs, in_flight, counter, progress, reported)
            self._wait(refs, 0, counter, progress, reported)
            outcomes = [self._get(r[0]) for r in refs]
            if progress is not None:  # the actor may not have heard every shard's last batch yet: the exact end
                ended: dict[str, int] = {}
                for outcome in outcomes:
                    ended[outcome.shard.split] = ended.get(outcome.shard.split, 0) + outcome.figures.samples
                for split, done in ended.items():
                    if done != reported.get(split):
                        progress(split, done)
        except BaseException:
            for r in refs:
                ray.cancel(r[0], force=True)
            raise
        return outcomes, [r[1:] for r in refs]

    def _wait(
        self,
        refs: list[Any],
        keep: int,
        counter: Any,
        progress: Callable[[str, int], None] | None,
        reported: dict[str, int],
    ) -> None:
        """Until at most ``keep`` shards run unfinished: poll, pass progress on, stop when cancelled."""
        ray = self.ray
        pending = [r[0] for r in refs]
        if not pending:
            return
        timeout = 0.0
        while True:
            if self.cancelled is not None and self.cancelled():
                raise CancelledError("audit cancelled while its shards ran on the Ray cluster")
            _, pending = ray.wait(pending, num_returns=len(pending), timeout=timeout)
            if progress is not None:
                for split, done in ray.get(counter.totals.remote()).items():
                    if done > reported.get(split, 0):  # a retried shard counts again from none: never go back
                        reported[split] = done
                        progress(split, done)
            if len(pending) <= keep:
                return
            timeout = _POLL_S

    def reduce(self, budget_bytes: int, parts: list[Any]) -> dict[str, CountOfCounts]:
        task = self.ray.remote(reduce_partition).options(max_retries=2)
        return self._get(task.remote(budget_bytes, *parts))

    def _get(self, ref: Any) -> Any:
        """``ray.get(ref)``, with a task's own refusal re-raised as itself and other failures as one line."""
        ray = self.ray
        try:
            return ray.get(ref)
        except ray.exceptions.RayTaskError as exc:
            cause = getattr(exc, "cause", None)
            if isinstance(cause, AuditError):
                raise cause from None
            raise AuditError(f"a Ray task of the audit failed: {first_line(cause or exc)}") from None
        except ray.exceptions.RayError as exc:
            raise AuditError(f"the Ray cluster lost part of the audit: {first_line(exc)}; run it again") from None


class InlineExecutor:
    """Shard and reducer tasks run one after another in this process: the same plan, audits and
    reduce as on Ray, for tests and for machines without Ray."""

    def share(self, model: bytes | str) -> Any:
        return model

    def run_shards(
        self,
        model: Any,
        work: Iterable[Shard],
        progress: Callable[[str, int], None] | None,
        in_flight: int | None = None,
    ) -> tuple[list[ShardOutcome], list[list[Any]]]:
        done: dict[str, int] = {}
        outcomes, parts = [], []
        for shard in work:
            outcome, *shard_parts = audit_shard(model, shard, _Inline(done, progress).add)
            outcomes.append(outcome)
            parts.append(shard_parts)
        return outcomes, parts

    def reduce(self, budget_bytes: int, parts: list[Any]) -> dict[str, CountOfCounts]:
        return reduce_partition(budget_bytes, *parts)


class _Inline:
    """``InlineExecutor``'s stand-in for the progress actor: adds a shard's samples to its split's."""

    def __init__(self, done: dict[str, int], progress: Callable[[str, int], None] | None) -> None:
        self.done, self.progress = done, progress

    def add(self, split: str, samples: int) -> None:
        self.done[split] = self.done.get(split, 0) + samples
        if self.progress is not None:
            self.progress(split, self.done[split])


def _reduce(
    executor: ShardExecutor,
    config: AuditConfig,
    outcomes: list[ShardOutcome],
    parts: list[list[Any]],
    partitions: int,
) -> dict[str, dict[str, StateSummary]]:
    """Each split's state summaries, from one reducer task per (split, partition)."""
    states: dict[str, dict[str, StateSummary]] = {}
    for split in dict.fromkeys(o.shard.split for o in outcomes):
        mine = [i for i, o in enumerate(outcomes) if o.shard.split == split]
        totals = {layer: sum(outcomes[i].totals[layer] for i in mine) for layer in outcomes[mine[0]].totals}
        reduced = [executor.reduce(config.memory_budget, [parts[i][p] for i in mine]) for p in range(partitions)]
        states[split] = {}
        for layer, total in totals.items():
            summary = CountOfCounts.sum(r[layer] for r in reduced if layer in r).summary(top_k=TOP_STATES)
            if summary.total != total:
                raise AuditError(f"layer {layer!r} lost states in the sharded merge ({summary.total} of {total})")
            states[split][layer] = summary
    return states


class _Progress:
    """A Ray actor that adds up the samples every shard has audited, per split. A shard whose task
    starts again (retried after its worker died) counts again from none, so nothing counts twice."""

    def __init__(self) -> None:
        self.done: dict[tuple[str, int], int] = {}

    def begin(self, split: str, start: int) -> None:
        self.done[split, start] = 0

    def add(self, split: str, start: int, samples: int) -> None:
        self.done[split, start] = self.done.get((split, start), 0) + samples

    def totals(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (split, _), samples in self.done.items():
            out[split] = out.get(split, 0) + samples
        return out


def audit_shard(model: Any, shard: Shard, added: Callable[[str, int], None] | None = None) -> tuple[Any, ...]:
    """Audit one shard (a task): its outcome, then one part of its distinct states per partition.

    ``model`` is the model's bytes, or a path readable on this node (models with external data).
    ``added(split, samples)`` hears of every batch's samples as they are audited.
    """
    settings = shard.config.session
    source = model if isinstance(model, str) else bytes(model)
    prepared = prepare(source, device=settings.device, states_at=settings.states_at, gpu_math=settings.gpu_math)
    if shard.batches is None:
        data = shard.data or _no_data()
        (dataset,) = open_splits(data.source, shard.split, limit=shard.stop, images=data.images)
        batches, skipped = _window(dataset, shard.start, shard.config.batch_size), dataset.skipped
    else:
        size = min(shard.config.batch_size, prepared.max_rows or shard.config.batch_size)
        batches, skipped = cut_batches(((shard.split, b) for b in shard.batches), size), ()
    last = [0]

    def report(split: str, done: int) -> None:
        if added is not None:
            added(split, done - last[0])
        last[0] = done

    with MemoryBudget(shard.config.memory_budget) as budget:
        tallies = tally(
            prepared,
            batches,
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
    outcome = ShardOutcome(
        replace(shard, batches=None),
        prepared.providers,
        prepared.provider_options,
        split.figures,
        totals,
        skipped,
        prepared.counting_warnings,
    )
    return (outcome, *parts)


def _no_data() -> DataSpec:
    raise AuditError("a shard names neither its data nor its batches")


def _audit_shard_task(model: Any, shard: Shard, counter: Any) -> tuple[Any, ...]:
    """``audit_shard`` as a Ray task, its samples added up by the progress actor ``counter``."""
    counter.begin.remote(shard.split, shard.start)
    return audit_shard(model, shard, lambda split, samples: counter.add.remote(split, shard.start, samples))


def reduce_partition(budget_bytes: int, *parts: dict[str, np.ndarray]) -> dict[str, CountOfCounts]:
    """Merge one partition's states from every shard (a Ray task): per layer, its count of counts."""
    out = {}
    with MemoryBudget(budget_bytes) as budget:
        for name in parts[0]:
            runs = [part[name] for part in parts]
            words = runs[0].dtype["words"].shape[0] if "words" in runs[0].dtype.names else 1
            store = RunStore(words, budget)
            store.merge(_Runs(runs))
            out[name] = CountOfCounts.of_runs(store.merged())
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
