"""The audit loop: one prepared model, a stream of tagged batches, one report.

Read top to bottom, an audit is: prepare the model once (``auditor.engine.prepare``), feed each batch
(``auditor.engine.feed``) and run it (``auditor.engine.run``) on worker threads while the previous one is
tallied (``auditor.engine.tally``, its layers counted side by side on a pool of threads), then
summarise the tallies into a report (``auditor.engine.summary``). When the states can be counted on
the GPU that runs the model, the worker threads count them there too (``auditor.engine.devrun``).
Nothing grows with the data except the distinct states of each layer and a few floats per
sample for CNA.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from functools import partial

import numpy as np

from auditor.config import AuditConfig, Feeding
from auditor.datasets.batches import Batch, Dataset, skipped_warnings, tagged
from auditor.engine.allocator import keep_freed_memory
from auditor.engine.devrun import DEVICE_WORKERS, DeviceRun
from auditor.engine.feed import Feed, feed
from auditor.engine.prepare import ModelSource, Prepared, prepare
from auditor.engine.run import gpu_math_warnings, ordered_map
from auditor.engine.stores import MemoryBudget
from auditor.engine.summary import TOP_STATES, summarize
from auditor.engine.tally import SplitTally
from auditor.engine.weights import weight_norms
from auditor.errors import CancelledError, DataError
from auditor.report import Report

Data = Sequence[Dataset] | Iterable[tuple[str, Batch]]
MAX_COUNTING_THREADS = 16  # layers counted side by side on the host


def audit(
    model: ModelSource | Prepared,
    data: Data,
    config: AuditConfig | None = None,
    *,
    progress: Callable[[str, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
    spill_dir: str | os.PathLike[str] | None = None,
) -> Report:
    """Audit a model on ``data`` with every setting of ``config`` applied.

    ``data`` is a list of ``Dataset`` splits, read in batches of ``config.batch_size``, or any
    iterable of ``(split, Batch)`` pairs (splits may interleave; a batch larger than the batch
    size is run in pieces). A ``Prepared`` model is used as it is when its session settings
    serve the config's (``device="auto"`` takes any device), and prepared again otherwise.
    ``progress(split, samples_done)`` is called after each batch; when ``cancelled()`` turns
    true the audit stops with ``CancelledError``. State counts past ``config.memory_budget`` spill
    to a private folder under ``spill_dir`` (default: the system's temp folder), removed however
    the audit ends. On glibc the first audit sets the process's malloc thresholds so that memory
    freed by one batch serves the next (``auditor.engine.allocator``; thresholds set through
    ``MALLOC_*_`` variables are left alone).
    """
    config = config or AuditConfig()
    prepared = prepared_for(model, config)
    datasets = _datasets(data)
    size = min(config.batch_size, prepared.max_rows or config.batch_size)
    batches = tagged(datasets, size) if datasets is not None else cut_batches(data, size)
    with MemoryBudget(config.memory_budget, spill_dir) as budget:
        tallies = tally(prepared, batches, config, budget, progress=progress, cancelled=cancelled)
        if not tallies:
            raise DataError("the dataset is empty: no samples reached the audit; check --data, --split and --limit")
        results = {split: tally.finish(TOP_STATES) for split, tally in tallies.items()}
        data_warnings = skipped_warnings(datasets) if datasets is not None else []
        report = summarize(
            prepared.model_info, prepared.providers, prepared.structure.layers, results, config, data_warnings
        )
    options = prepared.provider_options
    return replace(
        report,
        spilled_bytes=budget.spilled_bytes,
        provider_options=options,
        weights=weight_norms(prepared.model.proto, prepared.structure.layers),
        warnings=[
            *report.warnings,
            *gpu_math_warnings(options, prepared.settings.gpu_math),
            *prepared.counting_warnings,
        ],
    )


def prepared_for(model: ModelSource | Prepared, config: AuditConfig) -> Prepared:
    """The prepared model an audit with ``config`` runs: ``model`` itself when it is a ``Prepared``
    whose session settings serve the config, else ``model`` prepared for them."""
    session = config.session
    if isinstance(model, Prepared):
        if session.satisfied_by(model.settings):
            return model
        model = model.model
    return prepare(model, device=session.device, states_at=session.states_at, gpu_math=session.gpu_math)


def _datasets(data: Data) -> Sequence[Dataset] | None:
    """``data`` as Dataset splits, or None when it is a stream of tagged batches."""
    if isinstance(data, Sequence) and data and all(isinstance(d, Dataset) for d in data):
        return data
    return None


def cut_batches(batches: Iterable[tuple[str, Batch]], batch_size: int) -> Iterator[tuple[str, Batch]]:
    """Tagged batches, each cut to at most ``batch_size`` samples."""
    for split, batch in batches:
        x = np.asarray(batch.x)
        if x.ndim == 0 or len(x) <= batch_size:
            yield split, batch
            continue
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            yield split, Batch(x[part], None if batch.y is None else np.asarray(batch.y)[part])


def tally(
    prepared: Prepared,
    batches: Iterable[tuple[str, Batch]],
    config: AuditConfig,
    budget: MemoryBudget,
    *,
    first: dict[str, int] | None = None,
    progress: Callable[[str, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> dict[str, SplitTally]:
    """Run every batch and tally it into its split; inference runs ahead on worker threads.

    ``first`` gives the index in its split of each split's first sample (0 unless the batches
    are a shard that starts further in), so per-sample draws follow the sample, not the shard.
    The process keeps the memory each batch frees for the next one (``allocator``).
    """
    keep_freed_memory()
    counted = frozenset(
        out.layer.name
        for out in prepared.exposed.layers
        if out.layer.role == "hidden" or (config.include_output_layer and out.layer.role == "output")
    )
    tallies: dict[str, SplitTally] = {}
    if prepared.device is not None:
        runner, model_input = prepared.runner, prepared.structure.input
        device = DeviceRun(runner.session, model_input, prepared.exposed, counted, prepared.device, runner.call_rows)
        run, workers = device.run, DEVICE_WORKERS
    else:
        run, workers = partial(prepared.runner.run, names=prepared.exposed.output_names), prepared.runner.workers
    numbered = _numbered(batches, first or {})
    steps = ordered_map(lambda item: _run(prepared, run, config.feeding, *item), numbered, workers)
    threads = counting_threads(os.cpu_count() or 1, len(counted))
    pool = ThreadPoolExecutor(threads, thread_name_prefix="auditor-count") if threads > 1 else None
    try:
        for batch, outputs in steps:
            if cancelled is not None and cancelled():
                done = sum(t.figures.samples for t in tallies.values())
                raise CancelledError(f"audit cancelled after {done} samples")
            split = tallies.get(batch.split)
            if split is None:
                split = tallies[batch.split] = SplitTally(
                    prepared.exposed,
                    counted,
                    config.margin_seed,
                    prepared.structure.output_is_probability,
                    budget,
                    pool,
                )
            split.add(batch, outputs)
            if progress is not None:
                progress(batch.split, split.figures.samples)
    finally:
        steps.close()
        if pool is not None:
            pool.shutdown(wait=True)
    return tallies


def counting_threads(cores: int, layers: int) -> int:
    """Threads that count a batch's layers side by side: half the cores (the other half runs the
    next batches' inference), at most one per layer. On 2 cores that is one thread: a pool of two
    measured slower there, the inference workers already taking both cores (docs/performance.md)."""
    return max(1, min(cores // 2, layers, MAX_COUNTING_THREADS))


def _numbered(batches: Iterable[tuple[str, Batch]], first: dict[str, int]) -> Iterator[tuple[str, int, Batch]]:
    """Tag each batch with the position of its first sample in its split."""
    seen = dict(first)
    for split, batch in batches:
        start = seen.get(split, 0)
        seen[split] = start + len(batch.x)
        yield split, start, batch


def _run(
    prepared: Prepared, run: Callable[[np.ndarray], dict], feeding: Feeding, split: str, start: int, batch: Batch
) -> tuple[Feed, dict]:
    """Feed and run one batch (and count it, on the device path); runs on a worker thread."""
    ready, model_x = feed(split, start, batch, prepared.structure.input, feeding)
    return ready, run(model_x)
