"""trainers.batched: many networks as one grouped-matmul model, each member still its own network.

Real training on real MNIST slices. A member of a batch starts from the weights its seed gives it
alone and sees the data in the order its seed gives it alone; trained together, members end where
they end alone (to float rounding), and a member that stops is frozen while the others train on.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the trainer needs the 'train' extra")

from trainers import manifest  # noqa: E402
from trainers.batched import _Member, _Stack, batchable, groups, run_batch  # noqa: E402
from trainers.grid import run_grid  # noqa: E402
from trainers.job import initial_model, job_data, run_job  # noqa: E402
from trainers.records import Architecture, Recipe, TrainingJob  # noqa: E402
from trainers.train import fit  # noqa: E402

LIMIT = 1000


def job(seed: int = 0, epochs: int | None = 2, patience: int | None = 5, **changes) -> TrainingJob:
    recipe = Recipe(max_epochs=epochs, lr=0.05, batch_size=64, patience=patience)
    return TrainingJob(Architecture("lenet-300-100", (16, 8)), seed=seed, recipe=recipe, limit=LIMIT, **changes)


def weights(model: torch.nn.Module) -> list[np.ndarray]:
    return [p.detach().numpy().copy() for p in model.parameters()]


def test_members_start_from_their_own_seeds_weights():
    jobs = [job(0), job(1), job(2)]
    alone = [initial_model(j, 784) for j in jobs]
    stack = _Stack([initial_model(j, 784) for j in jobs])
    for row, model in enumerate(alone):
        rebuilt = stack.load_into(initial_model(job(9), 784), row)
        for a, b in zip(weights(model), weights(rebuilt), strict=True):
            assert np.array_equal(a, b)
    assert not np.array_equal(weights(alone[0])[0], weights(alone[1])[0])


def test_members_see_the_data_in_their_own_seeds_order(monkeypatch):
    """``fit`` draws each epoch's order from a generator seeded by the job's seed; so does a member."""
    seen = []
    original = torch.randperm

    def spy(n, *args, generator=None, **kwargs):
        order = original(n, *args, generator=generator, **kwargs)
        seen.append((generator.initial_seed(), order.tolist()))
        return order

    monkeypatch.setattr(torch, "randperm", spy)
    run_batch([job(0, epochs=1), job(3, epochs=1)])
    batched = sorted(seen)
    seen.clear()
    for seed in (0, 3):
        alone = job(seed, epochs=1)
        fit(initial_model(alone, 784), job_data(alone).train, alone.recipe, alone.seed)
    assert sorted(seen) == batched and {s for s, _ in batched} == {0, 3}


def test_a_member_trained_in_a_batch_matches_its_seed_trained_alone():
    seeds = [0, 1, 2, 3]
    batched = run_batch([job(s) for s in seeds])
    alone = [run_job(job(s)) for s in seeds]
    accuracy_alone = [r.network.test_accuracy for r in alone]
    spread = max(accuracy_alone) - min(accuracy_alone)
    assert spread > 0.005  # the seeds differ by more than the batching does
    for together, single in zip(batched, alone, strict=True):
        assert together.name == single.name and together.network.epochs == single.network.epochs == 2
        assert abs(together.network.test_accuracy - single.network.test_accuracy) <= spread / 2
        assert together.network.train_history == pytest.approx(single.network.train_history, abs=0.01)
    assert np.mean(accuracy_alone) > 0.6  # they really trained (chance is 0.1)


def test_a_stopped_member_is_frozen_while_the_others_train_on():
    short, long = job(0, epochs=1), job(1, epochs=3, label_noise=0.5, label_noise_kind="shuffled")
    first, second = run_batch([short, long])
    assert first.network.epochs == 1 and second.network.epochs == 3
    assert not first.network.stopped_early  # it ran its own max_epochs
    assert first.network.test_accuracy == pytest.approx(run_job(short).network.test_accuracy, abs=0.01)
    assert first.network.seconds < second.network.seconds


def test_each_member_has_its_own_stopping_rule():
    member = _Member(job(0, epochs=None, patience=2), None, torch.Generator())  # type: ignore[arg-type]
    assert [member.record(a) for a in (0.5, 0.6, 0.6, 0.55)] == [False, False, False, True]
    assert member.best_epoch == 2
    capped = _Member(job(0, epochs=2), None, torch.Generator())  # type: ignore[arg-type]
    assert [capped.record(a) for a in (0.5, 0.6)] == [False, True]


def test_groups_batch_alike_jobs_and_leave_the_rest_alone():
    dropout = replace(job(5), architecture=Architecture("lenet-300-100", (16, 8), "dropout"))
    wide = replace(job(6), architecture=Architecture("lenet-300-100", (32, 8)))
    lenet5 = TrainingJob(Architecture("lenet-5", (2, 2, 2)))
    jobs = [job(0), job(1), dropout, job(2, epochs=5), wide, lenet5, job(3, label_noise=0.5)]
    assert not batchable(dropout) and not batchable(lenet5)
    planned = groups(jobs, members=3)
    assert [[j.seed for j in g] for g in planned] == [[0, 1, 2], [3], [6], [5], [0]]
    assert groups(jobs, members=1) == [[j] for j in jobs]


def test_a_batched_grid_writes_every_network_and_its_manifest_line(tmp_path):
    jobs = [job(s, epochs=1) for s in (0, 1, 2)]
    outcome = run_grid(jobs, tmp_path, members=3)
    assert sorted(outcome.trained) == sorted(j.name for j in jobs)
    records = manifest.read(tmp_path / manifest.MANIFEST)
    assert sorted(r.name for r in records) == sorted(j.name for j in jobs)
    assert all((tmp_path / r.file).is_file() for r in records)


def test_the_same_batch_gives_the_same_files():
    jobs = [job(0, epochs=1), job(1, epochs=1)]
    first, again = run_batch(jobs), run_batch(jobs)
    assert [r.onnx for r in first] == [r.onnx for r in again]
