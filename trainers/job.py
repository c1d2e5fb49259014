"""One network, start to finish: load data, train with the recipe, evaluate, export verified ONNX.

A ``Job`` (``trainers.records``) is plain picklable data, so the same ``run_job`` runs in this
process, in a spawned worker, or on a Ray node, and returns the ONNX bytes rather than writing
them: only the caller touches the output folder, which keeps writes atomic and the manifest
single-writer.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from trainers.export import to_onnx
from trainers.label_noise import randomize_labels
from trainers.lenet import build, parameter_count
from trainers.records import Job, TrainedNetwork
from trainers.train import accuracy, device, fit
from trainers.training_data import Split, load_split

EXPORT_SAMPLES = 256  # test images used to trace the export and check it in onnxruntime


@dataclass(frozen=True)
class JobResult:
    """A trained network's record and its verified ONNX bytes."""

    network: TrainedNetwork
    onnx: bytes

    @property
    def name(self) -> str:
        return self.network.name


@functools.lru_cache(maxsize=4)
def _split(dataset: str, split: str, limit: int | None) -> Split:
    """Splits are read once per process: a grid worker trains many networks on the same data."""
    return load_split(dataset, split, limit)


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
    network = TrainedNetwork(
        job=job,
        epochs=result.epochs,
        best_epoch=result.best_epoch,
        stopped_early=result.stopped_early,
        train_accuracy=accuracy(model, train),
        test_accuracy=accuracy(model, test_on_device),
        params=parameter_count(model),
        train_history=tuple(result.history),
        device=target.type,
    )
    data = to_onnx(model, test.x[:EXPORT_SAMPLES], network.to_metadata(torch.__version__))
    seconds = round(time.perf_counter() - started, 3)
    return JobResult(network=replace(network, seconds=seconds), onnx=data)
