"""Many networks of one dense architecture trained at once: one batched model of grouped matmuls.

Replicate seeds and label-noise levels of one architecture are stacked into one model whose
layer k holds every member's weight in a tensor (members, outputs, inputs); a step multiplies all
members' batches by their own weights with ``torch.baddbmm``. One process then trains M networks
for little more than the cost of one on a small network, where M processes would each pay
PyTorch's per-op overhead (FIELD-NOTES: one process per network is launch-bound on a GPU, and
wastes the CPU on small networks).

Each member is still its own network:

- **seed and initialisation**: its weights are those ``trainers.job.initial_model`` gives its job
  alone (``torch.manual_seed(seed)``, then the architecture's init);
- **data order**: its own ``torch.Generator`` seeded by its seed draws its permutation each
  epoch, exactly as ``trainers.train.fit`` does;
- **labels**: its own label noise (kind, level and seed);
- **loss and optimiser**: the loss is the sum of the members' mean cross-entropies, so each
  member's gradient is its own; SGD with momentum (Nesterov or not) and the kernel-only L2 term
  is applied per element, as ``torch.optim.SGD`` does;
- **stopping**: its own rule (``patience`` on its running training accuracy, or its own
  ``max_epochs``: 100 clean, 200 shuffled in the CNA recipe). A stopped member is frozen: it is
  exported and dropped from the stacked tensors, so the others train on without it.

Batchable: ``mlp-5x500`` and ``lenet-300-100`` of variant ``none`` (Linear → activation chains),
without ``restore_best``; ``batch_key`` groups the jobs that may share a batch. Other jobs run
alone through ``trainers.job.run_job``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from trainers.job import JobData, JobResult, checkpoint_due, export, initial_model, job_data, run_job
from trainers.records import Recipe, TrainingJob
from trainers.train import FitResult, device

BATCHABLE_ARCHS = ("mlp-5x500", "lenet-300-100")


def batchable(job: TrainingJob) -> bool:
    """Whether ``job`` can be a member of a batched model."""
    a = job.architecture
    return a.arch in BATCHABLE_ARCHS and a.variant == "none" and not job.recipe.restore_best


def batch_key(job: TrainingJob) -> tuple | None:
    """Jobs with equal keys may train in one batch: same network shape, data and optimiser (not
    the same seed, labels, epochs or stopping); None for a job that must run alone."""
    if not batchable(job):
        return None
    r = job.recipe
    optimiser = (r.lr, r.momentum, r.l2, r.batch_size, r.nesterov)
    return (job.architecture, job.dataset, job.limit, optimiser, job.checkpoint_every)


def groups(jobs: Sequence[TrainingJob], members: int) -> list[list[TrainingJob]]:
    """``jobs`` cut into groups trained together: up to ``members`` batchable jobs of one key, in
    plan order; every other job alone."""
    by_key: dict[tuple, list[TrainingJob]] = {}
    alone: list[list[TrainingJob]] = []
    for job in jobs:
        key = batch_key(job) if members > 1 else None
        if key is None:
            alone.append([job])
        else:
            by_key.setdefault(key, []).append(job)
    batched = [same[i : i + members] for same in by_key.values() for i in range(0, len(same), members)]
    return batched + alone


def run_group(jobs: Sequence[TrainingJob], threads: int | None = None) -> list[JobResult]:
    """Train a group from ``groups``: one job alone, several as one batched model."""
    if len(jobs) == 1:
        return [run_job(jobs[0], threads)]
    return run_batch(jobs, threads)


@dataclass
class _Member:
    """The bookkeeping of one member: its job, data, data-order generator and stopping state."""

    job: TrainingJob
    data: JobData
    generator: torch.Generator
    history: list[float] = field(default_factory=list)
    best: float = -1.0
    best_epoch: int = 0
    checkpoints: list[JobResult] = field(default_factory=list)

    def fitted(self, stopped_early: bool = False) -> FitResult:
        return FitResult(len(self.history), list(self.history), self.best_epoch, stopped_early)

    def record(self, accuracy: float) -> bool:
        """Add an epoch's monitored accuracy; True when the member's stopping rule says stop."""
        self.history.append(accuracy)
        epoch, recipe = len(self.history), self.job.recipe
        if accuracy > self.best:
            self.best, self.best_epoch = accuracy, epoch
        elif recipe.patience is not None and epoch - self.best_epoch >= recipe.patience:
            return True
        return recipe.max_epochs is not None and epoch >= recipe.max_epochs


class _Stack:
    """The members' weights stacked per layer, (members, outputs, inputs) and (members, outputs),
    with their momentum buffers, as leaf tensors."""

    def __init__(self, models: Sequence[nn.Sequential]) -> None:
        layers = [[m for m in model if isinstance(m, nn.Linear)] for model in models]
        self.weights = [torch.stack([ls[k].weight.detach() for ls in layers]) for k in range(len(layers[0]))]
        self.biases = [torch.stack([ls[k].bias.detach() for ls in layers]) for k in range(len(layers[0]))]
        for tensor in self.params:
            tensor.requires_grad_(True)
        self.buffers: list[torch.Tensor | None] = [None] * len(self.params)
        self.elu = any(isinstance(m, nn.ELU) for m in models[0])

    @property
    def params(self) -> list[torch.Tensor]:
        return [*self.weights, *self.biases]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (members, batch, classes) of inputs (members, batch, features)."""
        last = len(self.weights) - 1
        for k, (w, b) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.baddbmm(b.unsqueeze(1), x, w.transpose(1, 2))
            if k < last:
                x = F.elu(x) if self.elu else F.relu(x)
        return x

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], recipe: Recipe) -> None:
        """One SGD step per element, as ``torch.optim.SGD`` takes it (dampening 0; L2 on kernels only)."""
        kernels = len(self.weights)
        for i, (param, grad) in enumerate(zip(self.params, grads, strict=True)):
            if i < kernels and recipe.l2:
                grad = grad.add(param, alpha=2 * recipe.l2)
            if recipe.momentum:
                buffer = self.buffers[i]
                if buffer is None:
                    buffer = self.buffers[i] = grad.clone()
                else:
                    buffer.mul_(recipe.momentum).add_(grad)
                grad = grad.add(buffer, alpha=recipe.momentum) if recipe.nesterov else buffer
            param.add_(grad, alpha=-recipe.lr)

    def keep(self, rows: list[int]) -> None:
        """Drop every member not in ``rows`` (stopped members are frozen by leaving the stack)."""
        index = torch.tensor(rows, dtype=torch.long, device=self.weights[0].device)
        self.weights = [w.detach()[index].requires_grad_(True) for w in self.weights]
        self.biases = [b.detach()[index].requires_grad_(True) for b in self.biases]
        self.buffers = [None if buf is None else buf[index] for buf in self.buffers]

    def load_into(self, model: nn.Sequential, row: int) -> nn.Sequential:
        """``model`` (the member's architecture) holding member ``row``'s current weights."""
        layers = [m for m in model if isinstance(m, nn.Linear)]
        with torch.no_grad():
            for layer, w, b in zip(layers, self.weights, self.biases, strict=True):
                layer.weight.copy_(w[row])
                layer.bias.copy_(b[row])
        return model


def _check_batch(jobs: Sequence[TrainingJob]) -> None:
    keys = {batch_key(job) for job in jobs}
    if None in keys or len(keys) != 1:
        raise ValueError("a batch needs batchable jobs of one architecture, data set and optimiser")


def run_batch(
    jobs: Sequence[TrainingJob], threads: int | None = None, on_epoch: Callable[[int, list[float]], None] | None = None
) -> list[JobResult]:
    """Train ``jobs`` as one batched model; returns each member's result (with its checkpoints) in order.

    ``on_epoch(epoch, accuracies)`` reports the running training accuracy of the members still
    training, in their order. A member's ``seconds`` is the batch's wall time until it stopped.
    """
    _check_batch(jobs)
    if threads is not None:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    target = device()
    members = [_Member(job, job_data(job, target), torch.Generator().manual_seed(job.seed)) for job in jobs]
    inputs = members[0].data.inputs
    stack = _Stack([initial_model(m.job, inputs).to(target) for m in members])
    x = members[0].data.train.x.reshape(len(members[0].data.train.y), -1)  # every member's images are the same
    labels = torch.stack([m.data.train.y for m in members])
    active = list(range(len(members)))
    results: dict[int, JobResult] = {}
    recipe, samples = jobs[0].recipe, len(x)
    epoch = 0
    while active:
        epoch += 1
        orders = torch.stack([torch.randperm(samples, generator=members[i].generator) for i in active]).to(target)
        correct = torch.zeros(len(active), dtype=torch.int64, device=target)
        for start in range(0, samples, recipe.batch_size):
            index = orders[:, start : start + recipe.batch_size]
            y = labels.gather(1, index)
            logits = stack.forward(x[index])
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="none")
            loss = losses.view(len(active), -1).mean(1).sum()
            stack.step(torch.autograd.grad(loss, stack.params), recipe)
            correct += (logits.detach().argmax(2) == y).sum(1)
        accuracies = (correct.double() / samples).tolist()
        if on_epoch is not None:
            on_epoch(epoch, accuracies)
        stopped = []
        for row, (i, accuracy) in enumerate(zip(active, accuracies, strict=True)):
            member = members[i]
            stop = member.record(accuracy)
            if stop or checkpoint_due(member.job, epoch):
                model = stack.load_into(initial_model(member.job, inputs).to(target), row)
                early = stop and (member.job.recipe.max_epochs is None or epoch < member.job.recipe.max_epochs)
                result = export(member.job, model, member.data, member.fitted(early), final=stop)
                if stop:
                    seconds = round(time.perf_counter() - started, 3)
                    network = replace(result.network, seconds=seconds)
                    results[i] = replace(result, network=network, checkpoints=tuple(member.checkpoints))
                    stopped.append(row)
                else:
                    member.checkpoints.append(result)
        if stopped:
            rows = [row for row in range(len(active)) if row not in stopped]
            active = [active[row] for row in rows]
            labels = labels[rows]
            stack.keep(rows)
    return [results[i] for i in range(len(members))]
