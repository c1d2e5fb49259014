"""The paper's training recipe (SPEC §7, ``trainers.records.Recipe``) as one plain loop.

SGD with Nesterov momentum 0.9 and a constant learning rate of 0.001, batch 32, cross-entropy
plus Keras' ``l2(0.0005)`` on the Dense/Conv kernels only. The penalty 0.0005·Σw² has gradient
0.001·w, which is exactly what PyTorch's ``weight_decay=0.001`` adds, so it is applied that way
on a parameter group holding the kernels (biases and BatchNorm parameters get none).

The CNA recipe (``RECIPES["cna"]``) is the same loop with plain momentum, no penalty and no early
stopping (``patience`` None: exactly ``max_epochs`` epochs).

Stopping follows Keras ``EarlyStopping(monitor="accuracy", patience=5)``: the monitored value is
the running training accuracy of each epoch (computed as the batches go, like Keras), and
training stops once it has not risen above its maximum for ``patience`` epochs. The final
weights are kept unless ``restore_best`` asks for the best epoch's.

Batches are slices of a shuffled index tensor held on the device: a ``DataLoader`` costs
0.3–1.5 s more per epoch on these tiny networks (FIELD-NOTES).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from trainers.lenet import kernel_parameters
from trainers.records import Recipe
from trainers.training_data import Split

EVAL_BATCH = 1024


@dataclass(frozen=True)
class FitResult:
    """What training did: epochs run, the monitored accuracy per epoch, the best epoch, and
    whether early stopping (rather than ``max_epochs``) ended it."""

    epochs: int
    history: list[float]
    best_epoch: int
    stopped_early: bool


def device() -> torch.device:
    """The GPU when there is one, else the CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def make_optimizer(model: nn.Module, recipe: Recipe) -> torch.optim.Optimizer:
    """SGD (Nesterov unless the recipe says not) with the L2 penalty on kernels only (see the module docstring)."""
    kernels = kernel_parameters(model)
    kernel_ids = {id(p) for p in kernels}
    others = [p for p in model.parameters() if id(p) not in kernel_ids]
    groups = [{"params": kernels, "weight_decay": 2 * recipe.l2}, {"params": others, "weight_decay": 0.0}]
    return torch.optim.SGD(groups, lr=recipe.lr, momentum=recipe.momentum, nesterov=recipe.nesterov)


def _train_epoch(
    model: nn.Module,
    data: Split,
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    generator: torch.Generator,
) -> float:
    """One pass over shuffled data; returns the running training accuracy, as Keras reports it."""
    model.train()
    order = torch.randperm(len(data.y), generator=generator).to(data.x.device)
    correct = torch.zeros((), dtype=torch.int64, device=data.x.device)
    loss_fn = nn.CrossEntropyLoss()
    for start in range(0, len(order), batch_size):
        index = order[start : start + batch_size]
        x, y = data.x[index], data.y[index]
        logits = model(x)
        loss = loss_fn(logits, y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        correct += (logits.detach().argmax(1) == y).sum()
    return correct.item() / len(order)


def fit(
    model: nn.Module,
    data: Split,
    recipe: Recipe,
    seed: int,
    on_epoch: Callable[[int, float], None] | None = None,
) -> FitResult:
    """Train ``model`` in place on ``data`` (already on the model's device) with ``recipe``.

    ``seed`` drives the shuffling; seed torch before building the model for the initial weights
    and the dropout masks. ``on_epoch(epoch, accuracy)`` is called after every epoch.
    """
    optimizer = make_optimizer(model, recipe)
    generator = torch.Generator().manual_seed(seed)
    history: list[float] = []
    best_accuracy, best_epoch, best_state = -1.0, 0, None
    epoch, stopped_early = 0, False
    while recipe.max_epochs is None or epoch < recipe.max_epochs:
        epoch += 1
        accuracy = _train_epoch(model, data, optimizer, recipe.batch_size, generator)
        history.append(accuracy)
        if on_epoch is not None:
            on_epoch(epoch, accuracy)
        if accuracy > best_accuracy:
            best_accuracy, best_epoch = accuracy, epoch
            if recipe.restore_best:
                best_state = copy.deepcopy(model.state_dict())
        elif recipe.patience is not None and epoch - best_epoch >= recipe.patience:
            stopped_early = True
            break
    if best_state is not None:
        model.load_state_dict(best_state)
    return FitResult(epochs=epoch, history=history, best_epoch=best_epoch, stopped_early=stopped_early)


@torch.inference_mode()
def accuracy(model: nn.Module, data: Split) -> float:
    """Top-1 accuracy of ``model`` in inference form (Dropout off, BatchNorm running statistics)."""
    model.eval()
    correct = 0
    for start in range(0, len(data.y), EVAL_BATCH):
        logits = model(data.x[start : start + EVAL_BATCH])
        correct += int((logits.argmax(1) == data.y[start : start + EVAL_BATCH]).sum())
    return correct / len(data.y)
