"""Where an audit runs: here, on a Ray cluster, or on an auditor server, behind one interface.

Each runner answers ``run(model, data, config, progress) -> Report`` and differs from the others
only in where the loop runs; the report is the same, number for number. The CLI picks a runner
and nothing else. Each runner opens the model and the data once: the model for its layers and
input shape (an image folder is decoded to that shape), the data for its splits and sizes.

``progress`` hears how many samples there are in all (``started``) and, as the audit goes,
how many of each split are done (``advanced``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

from auditor.config import AuditConfig
from auditor.records import DataSpec

if TYPE_CHECKING:
    from auditor.datasets.batches import Dataset
    from auditor.report import Report
    from auditor.service.options import Connection

T = TypeVar("T")


class Progress(Protocol):
    """What a runner tells about an audit under way."""

    def started(self, total: int | None) -> None:
        """The samples the audit will read in all, or None when the runner cannot know."""

    def advanced(self, split: str, done: int) -> None:
        """``done`` samples of ``split`` are audited so far."""


class Runner(Protocol):
    """Runs one audit and returns its report."""

    def run(self, model: Path, data: DataSpec, config: AuditConfig, progress: Progress | None = None) -> Report:
        """Audit the model file ``model`` on ``data`` with ``config``."""


def for_model(data: DataSpec, input_shape: Callable[[], tuple[int | str | None, ...]]) -> DataSpec:
    """``data`` with its image options sized to the model's input (``input_shape()``, asked only
    for an image folder); other data is left as it is."""
    if not _sized_by_model(data):
        return data
    return replace(data, images=replace(data.images, input_shape=input_shape()))


def _sized_by_model(data: DataSpec) -> bool:
    """Whether ``data`` is an image folder, whose samples take the model's input size."""
    return not data.known and Path(data.source).expanduser().is_dir()


def _started(fn: Callable[[], T]) -> Future[T]:
    """``fn()`` running on a daemon thread: a refused model need not wait for it (a download)."""
    future: Future[T] = Future()

    def work() -> None:
        try:
            future.set_result(fn())
        except BaseException as exc:  # handed to whoever asks for the result
            future.set_exception(exc)

    threading.Thread(target=work, name="auditor-open-data", daemon=True).start()
    return future


def _input_shape(model: Path) -> Callable[[], tuple[int | str | None, ...]]:
    """The input shape of the model file ``model``, read when asked for."""

    def read() -> tuple[int | str | None, ...]:
        from auditor.engine.find import describe
        from auditor.engine.modelfile import load_model

        return describe(load_model(model).proto).input.shape

    return read


@dataclass(frozen=True)
class LocalRunner:
    """The audit in this process (``auditor.engine.audit``); spilled runs go under ``spill_dir``.

    The data is opened on a second thread while the model is prepared, unless it is an image
    folder, which is sized to the model's input."""

    spill_dir: Path | None = None

    def run(self, model: Path, data: DataSpec, config: AuditConfig, progress: Progress | None = None) -> Report:
        from auditor.datasets.splits import open_splits

        def open_data(spec: DataSpec) -> list[Dataset]:
            return open_splits(spec.source, spec.split, limit=spec.limit, images=spec.images)

        # Data that does not depend on the model (all but image folders) is opened, its files
        # checked, while the engine is imported and the model prepared on this thread.
        early = None if _sized_by_model(data) else _started(lambda: open_data(data))
        from auditor.engine.audit import audit
        from auditor.engine.prepare import prepare

        prepared = prepare(model, device=config.device, states_at=config.states_at, gpu_math=config.gpu_math)
        if early is not None:
            datasets = early.result()
        else:
            datasets = open_data(for_model(data, lambda: prepared.structure.input.shape))
        if progress is not None:
            progress.started(sum(d.count for d in datasets))
        return audit(prepared, datasets, config, progress=progress and progress.advanced, spill_dir=self.spill_dir)


@dataclass(frozen=True)
class RayRunner:
    """The audit cut into ``shards`` contiguous shards per split, run as tasks on the Ray cluster
    at ``address`` (``auditor.engine.shard``); merged exactly into the report a local audit gives."""

    address: str
    shards: int = 1

    def run(self, model: Path, data: DataSpec, config: AuditConfig, progress: Progress | None = None) -> Report:
        from auditor.datasets.splits import open_splits
        from auditor.engine.modelfile import load_model
        from auditor.engine.prepare import structure_of
        from auditor.engine.shard import RayExecutor, audit_sharded, plan
        from auditor.raycluster import connected

        loaded = load_model(model)
        data = for_model(data, lambda: structure_of(loaded).input.shape)
        datasets = open_splits(data.source, data.split, limit=data.limit, images=data.images)
        plan({d.split: d.count for d in datasets}, self.shards)  # a bad shard count is refused before Ray starts
        if progress is not None:
            progress.started(sum(d.count for d in datasets))
        with connected(self.address) as ray:
            report = audit_sharded(
                loaded, datasets, data, config, RayExecutor(ray),
                shards=self.shards, progress=progress and progress.advanced,
            )  # fmt: skip
        return replace(report, sharding={"address": self.address, **report.sharding})


@dataclass(frozen=True)
class RemoteRunner:
    """The audit on an auditor server (``auditor.service.client``): a known dataset is read there, other
    data is streamed from here in batches; ``queued(position)`` hears of the wait in its queue."""

    connection: Connection

    def run(self, model: Path, data: DataSpec, config: AuditConfig, progress: Progress | None = None) -> Report:
        from auditor.service import client

        data = for_model(data, _input_shape(model))
        if progress is not None:
            progress.started(None)
        return client.remote_audit(self.connection, model, data, config, progress=progress and progress.advanced)
