"""One network, start to finish: load data, train with the recipe, evaluate, export verified ONNX.

A ``Job`` is plain picklable data, so the same ``run_job`` runs in this process, in a spawned
worker, or on a Ray node, and returns the ONNX bytes rather than writing them: only the caller
touches the output folder, which keeps writes atomic and the manifest single-writer.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from auditor.errors import AuditError
from trainers.data import Split, load_split, randomize_labels
from trainers.export import to_onnx
from trainers.models import Architecture, build, parameter_count
from trainers.train import Recipe, accuracy, device, fit

EXPORT_SAMPLES = 256  # test images used to trace the export and check it in onnxruntime


@dataclass(frozen=True)
class Job:
    """Everything that determines one trained network; equal jobs give equal weights on one machine."""

    architecture: Architecture
    seed: int = 0
    label_noise: float = 0.0
    recipe: Recipe = field(default_factory=Recipe)
    dataset: str = "mnist"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise AuditError(f"seed must be >= 0, got {self.seed}")
        if self.limit is not None and self.limit < 1:
            raise AuditError(f"limit must be >= 1, got {self.limit}")

    @property
    def name(self) -> str:
        """A predictable file stem, e.g. ``lenet-300-100_w11-4_none_n0_s0``."""
        a = self.architecture
        widths = "-".join(str(w) for w in a.widths)
        return f"{a.arch}_w{widths}_{a.variant}_n{self.label_noise:g}_s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        """The job as flat JSON-ready values (manifest lines compare these on resume)."""
        a = self.architecture
        return {
            "arch": a.arch,
            "widths": list(a.widths),
            "variant": a.variant,
            "dropout_p": a.dropout_p,
            "seed": self.seed,
            "label_noise": self.label_noise,
            "dataset": self.dataset,
            "limit": self.limit,
            **self.recipe.to_dict(),
        }


@dataclass(frozen=True)
class JobResult:
    """The verified ONNX bytes of a trained network and its manifest record."""

    name: str
    onnx: bytes
    record: dict[str, Any]


@functools.lru_cache(maxsize=4)
def _split(dataset: str, split: str, limit: int | None) -> Split:
    """Splits are read once per process: a grid worker trains many networks on the same data."""
    return load_split(dataset, split, limit)


def _metadata(job: Job, values: dict[str, Any]) -> dict[str, str]:
    """The ONNX ``metadata_props``: the job, its results and the fixed parts of the recipe, as strings.

    Only values that are the same on every run of the job go here, so re-running a job on the same
    machine reproduces the file byte for byte.
    """
    fixed = {
        "optimizer": "sgd-nesterov",
        "init": "glorot-uniform",
        "activation": "elu",
        "trainer": "auditor-train",
    }
    merged = {**job.to_dict(), **values, **fixed, "torch_version": torch.__version__}
    return {key: _text(value) for key, value in merged.items()}


def _text(value: Any) -> str:
    """A metadata value: strings as they are, widths as ``11,4``, the rest as JSON (``null``, ``true``)."""
    if isinstance(value, str):
        return value
    return ",".join(map(str, value)) if isinstance(value, list) else json.dumps(value)


def run_job(job: Job, threads: int | None = None, on_epoch: Callable[[int, float], None] | None = None) -> JobResult:
    """Train, evaluate and export ``job``'s network.

    ``threads`` sets this process's torch threads (a process-wide setting); ``on_epoch(epoch,
    accuracy)`` reports the monitored training accuracy after every epoch.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    train, test = _split(job.dataset, "train", job.limit), _split(job.dataset, "test", job.limit)
    noisy, _ = randomize_labels(train.y.numpy(), job.label_noise, job.seed)
    target = device()
    train = Split(x=train.x.to(target), y=torch.from_numpy(noisy).to(target))
    test_on_device = Split(x=test.x.to(target), y=test.y.to(target))

    torch.manual_seed(job.seed)
    model = build(job.architecture).to(target)
    result = fit(model, train, job.recipe, job.seed, on_epoch)
    values = {
        "epochs": result.epochs,
        "best_epoch": result.best_epoch,
        "stopped_early": result.stopped_early,
        "train_accuracy": accuracy(model, train),
        "test_accuracy": accuracy(model, test_on_device),
        "params": parameter_count(model),
    }
    data = to_onnx(model, test.x[:EXPORT_SAMPLES], _metadata(job, values))
    record = {
        "name": job.name,
        **job.to_dict(),
        **values,
        "train_history": result.history,
        "seconds": round(time.perf_counter() - started, 3),
        "device": target.type,
    }
    return JobResult(name=job.name, onnx=data, record=record)
