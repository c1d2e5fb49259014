"""The audit loop: one prepared model, a stream of tagged batches, one report.

Read top to bottom, an audit is: prepare the model once (``auditor.prepare``), feed each batch
(``auditor.feed``) and run it (``auditor.run``) on worker threads while the previous one is
tallied (``auditor.tally``), then summarise the tallies into a report (``auditor.summary``).
Nothing grows with the data except the distinct states of each layer and a few floats per
sample for CNA.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from auditor.config import AuditConfig, Feeding
from auditor.data import Batch, Dataset, tagged
from auditor.errors import CancelledError, DataError
from auditor.feed import Feed, feed
from auditor.prepare import ModelSource, Prepared, prepare
from auditor.report import Report
from auditor.run import ordered_map
from auditor.summary import summarize
from auditor.tally import SplitTally

Data = Sequence[Dataset] | Iterable[tuple[str, Batch]]


def audit(
    model: ModelSource | Prepared,
    data: Data,
    config: AuditConfig | None = None,
    *,
    progress: Callable[[str, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Report:
    """Audit a model on ``data`` with every setting of ``config`` applied.

    ``data`` is a list of ``Dataset`` splits, read in batches of ``config.batch_size``, or any
    iterable of ``(split, Batch)`` pairs (splits may interleave; a batch larger than the batch
    size is run in pieces). A ``Prepared`` model is used as it is when its session settings
    serve the config's (``device="auto"`` takes any device), and prepared again otherwise.
    ``progress(split, samples_done)`` is called after each batch; when ``cancelled()`` turns
    true the audit stops with ``CancelledError``.
    """
    config = config or AuditConfig()
    prepared = _prepared_for(model, config)
    tallies = _tally(prepared, _batches(data, config.batch_size), config, progress, cancelled)
    if not tallies:
        raise DataError("the dataset is empty: no samples reached the audit; check --data, --split and --limit")
    return summarize(prepared.model_info, prepared.providers, tallies, config)


def _prepared_for(model: ModelSource | Prepared, config: AuditConfig) -> Prepared:
    session = config.session
    if isinstance(model, Prepared):
        if session.satisfied_by(model.settings):
            return model
        model = model.model
    return prepare(model, device=session.device, states_at=session.states_at)


def _batches(data: Data, batch_size: int) -> Iterator[tuple[str, Batch]]:
    """Tagged batches of at most ``batch_size`` samples."""
    if isinstance(data, Sequence) and all(isinstance(d, Dataset) for d in data):
        yield from tagged(data, batch_size)
        return
    for split, batch in data:
        x = np.asarray(batch.x)
        if x.ndim == 0 or len(x) <= batch_size:
            yield split, batch
            continue
        for start in range(0, len(x), batch_size):
            part = slice(start, start + batch_size)
            yield split, Batch(x[part], None if batch.y is None else np.asarray(batch.y)[part])


def _tally(
    prepared: Prepared,
    batches: Iterable[tuple[str, Batch]],
    config: AuditConfig,
    progress: Callable[[str, int], None] | None,
    cancelled: Callable[[], bool] | None,
) -> dict[str, SplitTally]:
    """Run every batch and tally it into its split; inference runs ahead on worker threads."""
    counted = frozenset(
        out.layer.name
        for out in prepared.exposed.layers
        if out.layer.role == "hidden" or (config.include_output_layer and out.layer.role == "output")
    )
    tallies: dict[str, SplitTally] = {}
    steps = ordered_map(
        lambda item: _run(prepared, config.feeding, *item), _numbered(batches), prepared.runner.workers
    )
    try:
        for batch, outputs in steps:
            if cancelled is not None and cancelled():
                done = sum(t.samples for t in tallies.values())
                raise CancelledError(f"audit cancelled after {done} samples")
            tally = tallies.get(batch.split)
            if tally is None:
                tally = tallies[batch.split] = SplitTally(
                    prepared.exposed, counted, config.margin_seed, prepared.structure.output_is_probability
                )
            tally.add(batch, outputs)
            if progress is not None:
                progress(batch.split, tally.samples)
    finally:
        steps.close()
    return tallies


def _numbered(batches: Iterable[tuple[str, Batch]]) -> Iterator[tuple[str, int, Batch]]:
    """Tag each batch with the position of its first sample in its split."""
    seen: dict[str, int] = {}
    for split, batch in batches:
        start = seen.get(split, 0)
        seen[split] = start + len(batch.x)
        yield split, start, batch


def _run(prepared: Prepared, feeding: Feeding, split: str, start: int, batch: Batch) -> tuple[Feed, dict]:
    """Feed and run one batch; runs on a worker thread."""
    ready = feed(split, start, batch, prepared.structure.input, feeding)
    return ready, prepared.runner.run(ready.input, prepared.exposed.output_names)
