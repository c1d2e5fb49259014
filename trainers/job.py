"""One network, start to finish: load data, train with the recipe, evaluate, export verified ONNX.

A ``TrainingJob`` (``trainers.records``) is plain picklable data, so the same ``run_job`` runs in this
process, in a spawned worker, or on a Ray node, and returns the ONNX bytes rather than writing
them: only the caller touches the output folder, which keeps writes atomic and the manifest
single-writer. With ``TrainingJob.checkpoint_every`` N, the network after every N-th epoch before the
last is exported too, each as its own file (``TrainedNetwork.final`` False).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import nn

from trainers.export import to_onnx
from trainers.label_noise import noisy_labels
from trainers.lenet import build, parameter_count
from trainers.records import TrainedNetwork, TrainingJob
from trainers.train import FitResult, accuracy, device, fit
from trainers.training_data import Split, load_split

EXPORT_SAMPLES = 256  # test images used to trace the export and check it in onnxruntime


@dataclass(frozen=True)
class JobResult:
    """A trained network's record and its verified ONNX bytes, with its checkpoints' (oldest first)."""

    network: TrainedNetwork
    onnx: bytes
    checkpoints: tuple[JobResult, ...] = ()

    @property
    def name(self) -> str:
        return self.network.name


@functools.lru_cache(maxsize=4)
def _split(dataset: str, split: str, limit: int | None, any_shape: bool) -> Split:
    """Splits are read once per process: a grid worker trains many networks on the same data."""
    return load_split(dataset, split, limit, any_shape=any_shape)


@dataclass(frozen=True)
class JobData:
    """What a job trains and is tested on: its training split with its own (noisy) labels, and the test split."""

    train: Split
    test: Split

    @property
    def inputs(self) -> int:
        """Values per sample: what the MLP's first layer takes."""
        return math.prod(self.train.x.shape[1:])


def job_data(job: TrainingJob, target: torch.device | None = None) -> JobData:
    """``job``'s training split with its label noise applied, and the test split, on ``target``."""
    any_shape = job.architecture.arch == "mlp-5x500"
    train = _split(job.dataset, "train", job.limit, any_shape)
    test = _split(job.dataset, "test", job.limit, any_shape)
    labels = noisy_labels(train.y.numpy(), job.label_noise_kind, job.label_noise, job.seed)
    target = target or torch.device("cpu")
    return JobData(
        train=Split(x=train.x.to(target), y=torch.from_numpy(labels).to(target)),
        test=Split(x=test.x.to(target), y=test.y.to(target)),
    )


def initial_model(job: TrainingJob, inputs: int) -> nn.Sequential:
    """The network ``job`` starts from: its architecture, initialised from its seed."""
    torch.manual_seed(job.seed)
    return build(job.architecture, inputs)


def export(job: TrainingJob, model: nn.Module, data: JobData, fitted: FitResult, *, final: bool) -> JobResult:
    """Evaluate ``model`` after ``fitted.epochs`` epochs and export it (the network, or a checkpoint)."""
    network = TrainedNetwork(
        job=job,
        epochs=fitted.epochs,
        best_epoch=fitted.best_epoch,
        stopped_early=fitted.stopped_early,
        train_accuracy=accuracy(model, data.train),
        test_accuracy=accuracy(model, data.test),
        params=parameter_count(model),
        train_history=tuple(fitted.history),
        device=data.train.x.device.type,
        final=final,
    )
    onnx = to_onnx(model, data.test.x[:EXPORT_SAMPLES], network.to_metadata(torch.__version__))
    return JobResult(network=network, onnx=onnx)


def checkpoint_due(job: TrainingJob, epoch: int) -> bool:
    """Whether the network after ``epoch`` is exported as a checkpoint (the last epoch is the network itself)."""
    every, last = job.checkpoint_every, job.recipe.max_epochs
    return every is not None and epoch % every == 0 and epoch != last


def run_job(
    job: TrainingJob, threads: int | None = None, on_epoch: Callable[[int, float], None] | None = None
) -> JobResult:
    """Train, evaluate and export ``job``'s network, and its checkpoints.

    ``threads`` sets this process's torch threads (a process-wide setting); ``on_epoch(epoch,
    accuracy)`` reports the monitored training accuracy after every epoch.
    """
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    data = job_data(job, device())
    model = initial_model(job, data.inputs).to(data.train.x.device)
    checkpoints: list[JobResult] = []
    history: list[float] = []

    def after_epoch(epoch: int, monitored: float) -> None:
        history.append(monitored)
        if on_epoch is not None:
            on_epoch(epoch, monitored)
        if checkpoint_due(job, epoch):
            best = max(range(len(history)), key=history.__getitem__) + 1
            fitted = FitResult(epochs=epoch, history=list(history), best_epoch=best, stopped_early=False)
            checkpoints.append(export(job, model, data, fitted, final=False))

    fitted = fit(model, data.train, job.recipe, job.seed, after_epoch)
    result = export(job, model, data, fitted, final=True)
    kept = tuple(c for c in checkpoints if c.network.epochs < fitted.epochs)
    seconds = round(time.perf_counter() - started, 3)
    return replace(result, network=replace(result.network, seconds=seconds), checkpoints=kept)
