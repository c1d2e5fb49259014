"""Grids: every combination of variant × label noise × widths × replicate seed, trained in parallel
and resumable.

The driver (this process) is the only writer of the output folder: workers — spawned local
processes or Ray tasks — run ``trainers.batched.run_group`` on a group of jobs (up to ``members``
networks of one architecture as one batched model, or one job alone) and send back verified ONNX
bytes; the driver renames each file into place (checkpoints first), then appends its manifest
line. A rerun skips networks already listed in the manifest whose file exists, and redoes any
that were interrupted.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import sys
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import dataclass, replace
from itertools import product
from pathlib import Path

from tqdm import tqdm

from auditor.errors import AuditError
from auditor.raycluster import connected
from trainers import manifest
from trainers.batched import groups, run_group
from trainers.files import save_atomic
from trainers.job import JobResult
from trainers.records import ARCHS, TrainedNetwork, TrainingJob


@dataclass(frozen=True)
class GridOutcome:
    """Names trained by this run, names skipped because they were already done, and the manifest."""

    trained: list[str]
    skipped: list[str]
    manifest: Path


def width_combinations(
    arch: str, widths: Sequence[int] | None = None, layer_widths: Sequence[Sequence[int]] | None = None
) -> list[tuple[int, ...]]:
    """Every width tuple of the grid: ``widths`` for each layer, or one list per layer."""
    if arch not in ARCHS:
        raise AuditError(f"unknown architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    layers = ARCHS[arch]
    if layer_widths is not None:
        if len(layer_widths) != layers:
            raise AuditError(f"{arch} has {layers} hidden layers but --layer-widths gives {len(layer_widths)} lists")
        return list(dict.fromkeys(product(*layer_widths)))
    if not widths:
        raise AuditError("give --widths or --layer-widths")
    return list(dict.fromkeys(product(widths, repeat=layers)))


def plan(
    template: TrainingJob,
    combinations: Sequence[tuple[int, ...]],
    replicates: int,
    variants: Sequence[str] | None = None,
    label_noises: Sequence[float] | None = None,
) -> list[TrainingJob]:
    """``template`` at every variant × label noise × width combination, with seeds ``0..replicates-1``.

    ``variants`` and ``label_noises`` default to the template's own; the order is variant, noise,
    widths, seed (the seed varies fastest). Repeated values are planned once.
    """
    variants = list(dict.fromkeys(variants or [template.architecture.variant]))
    label_noises = list(dict.fromkeys([template.label_noise] if label_noises is None else label_noises))
    return [
        replace(
            template,
            architecture=replace(template.architecture, widths=widths, variant=variant),
            label_noise=noise,
            seed=seed,
        )
        for variant in variants
        for noise in label_noises
        for widths in combinations
        for seed in range(replicates)
    ]


def _check_same_settings(job: TrainingJob, network: TrainedNetwork) -> None:
    """Refuse to mix networks trained with other settings under one name."""
    found = network.job.to_dict()
    differing = sorted(key for key, value in job.to_dict().items() if found.get(key) != value)
    if differing:
        raise AuditError(
            f"{job.name} in the manifest was trained with other settings ({', '.join(differing)}); "
            "use another --out folder or the same settings"
        )


def _local_results(todo: list[list[TrainingJob]], workers: int, threads: int | None) -> Iterator[list[JobResult]]:
    """Each group's results as they finish, from this process (one worker) or from spawned processes."""
    if workers == 1:
        for group in todo:
            yield run_group(group, threads)
        return
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    try:
        futures = [pool.submit(run_group, group, threads) for group in todo]
        for future in as_completed(futures):
            yield future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _ray_results(todo: list[list[TrainingJob]], address: str, threads: int | None) -> Iterator[list[JobResult]]:
    """Each group's results as they finish from Ray tasks, on the cluster ``raycluster.connected`` joins."""
    if not todo:
        return
    with connected(address) as ray:
        task = ray.remote(num_cpus=threads or 1)(run_group)
        pending = [task.remote(group, threads) for group in todo]
        try:
            while pending:
                ready, pending = ray.wait(pending, num_returns=1)
                yield ray.get(ready[0])
        finally:
            for ref in pending:
                ray.cancel(ref)


def run_grid(
    jobs: Sequence[TrainingJob],
    out: Path,
    workers: int = 1,
    threads: int | None = 1,
    ray_address: str | None = None,
    members: int = 1,
) -> GridOutcome:
    """Train every job not already done in ``out``; returns what was trained and skipped.

    ``workers`` parallel processes (spawn context) run locally, or Ray tasks on the cluster at
    ``ray_address``. ``threads`` torch threads per process: one is fastest for these small
    networks when processes run side by side, and equal thread counts keep results bit-identical
    between a local run and a Ray run on the same kind of CPU. ``members`` > 1 trains up to that
    many batchable networks at once as one batched model (``trainers.batched``).
    """
    jobs = list({job.name: job for job in jobs}.values())
    done = manifest.reconcile(out)
    for job in jobs:
        if job.name in done:
            _check_same_settings(job, done[job.name])
    todo = [job for job in jobs if job.name not in done]
    skipped = [job.name for job in jobs if job.name in done]
    planned = groups(todo, members)
    results = _ray_results(planned, ray_address, threads) if ray_address else _local_results(planned, workers, threads)
    trained: list[str] = []
    interactive = sys.stderr.isatty()
    with contextlib.closing(results), tqdm(total=len(todo), unit="net", disable=not interactive) as bar:
        for result in (one for group in results for one in group):
            for checkpoint in result.checkpoints:
                save_atomic(out / checkpoint.network.file, checkpoint.onnx)
                manifest.append(out / manifest.MANIFEST, checkpoint.network)
            network = result.network
            save_atomic(out / network.file, result.onnx)
            manifest.append(out / manifest.MANIFEST, network)
            trained.append(network.name)
            bar.update()
            if not interactive:
                print(
                    f"[{len(trained)}/{len(todo)}] {network.name}: {network.epochs} epochs, "
                    f"test accuracy {network.test_accuracy:.4f}, {network.seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return GridOutcome(trained=trained, skipped=skipped, manifest=out / manifest.MANIFEST)
