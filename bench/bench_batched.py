"""Batched training (``trainers.batched``) against one process per network, as whole processes.

    python bench/bench_batched.py                        # 8 MLPs 5x500, 2,000 MNIST images, 2 epochs
    python bench/bench_batched.py --members 4 --limit 1000 --epochs 3 --threads 1

The same M jobs (seeds 0..M/2-1, clean and 50% shuffled labels, the CNA recipe cut to
``--epochs``) are trained two ways, each in fresh processes started one after another:

- ``one per network``: M processes, each running ``trainers.job.run_job`` on one job, as
  ``auditor-train grid --members 1`` does;
- ``batched``: one process running ``trainers.batched.run_batch`` on all M jobs, as
  ``auditor-train grid --members M`` does.

Each process is timed from its start to its exit (Python and torch start-up, data loading,
training, evaluation and the verified ONNX export included), with its CPU time and peak resident
memory. Printed: the summed wall and CPU time of each way, their ratio (one per network ÷
batched), and the load average, because a shared machine makes single timings noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def jobs(members: int, limit: int, epochs: int) -> list:
    from trainers.records import RECIPES, Architecture, TrainingJob

    recipe = replace(RECIPES["cna"], max_epochs=epochs)
    noises = [0.0, 0.5]
    return [
        TrainingJob(
            Architecture("mlp-5x500", (500,) * 5),
            seed=i // 2,
            label_noise=noises[i % 2],
            label_noise_kind="shuffled",
            recipe=recipe,
            limit=limit,
        )
        for i in range(members)
    ]


def child(way: str, members: int, limit: int, epochs: int, threads: int, index: int) -> None:
    """Run one way's share in this process and print its figures as JSON."""
    from trainers.batched import run_batch
    from trainers.job import run_job

    planned = jobs(members, limit, epochs)
    results = run_batch(planned, threads) if way == "batched" else [run_job(planned[index], threads)]
    usage = resource.getrusage(resource.RUSAGE_SELF)
    accuracy = [round(r.network.test_accuracy, 4) for r in results]
    print(json.dumps({"cpu": usage.ru_utime + usage.ru_stime, "rss_mb": usage.ru_maxrss / 1024, "test": accuracy}))


def run(way: str, args: argparse.Namespace, index: int = 0) -> dict:
    argv = [sys.executable, __file__, "--child", way, "--index", str(index)]
    argv += ["--members", str(args.members), "--limit", str(args.limit), "--epochs", str(args.epochs)]
    argv += ["--threads", str(args.threads)]
    started = time.perf_counter()
    done = subprocess.run(argv, capture_output=True, text=True, check=True, cwd=REPO, env={**os.environ})
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    return {**figures, "wall": time.perf_counter() - started}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, default=8)
    parser.add_argument("--limit", type=int, default=2000)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", choices=["alone", "batched"])
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.members, args.limit, args.epochs, args.threads, args.index)
        return
    load = os.getloadavg()[0]
    alone = [run("alone", args, i) for i in range(args.members)]
    batched = run("batched", args)
    wall_alone, cpu_alone = sum(r["wall"] for r in alone), sum(r["cpu"] for r in alone)
    print(
        f"{args.members} x mlp-5x500, {args.limit} MNIST images, {args.epochs} epochs, {args.threads} thread(s); "
        f"load average {load:.1f} -> {os.getloadavg()[0]:.1f}"
    )
    print(
        f"one per network: {wall_alone:.1f} s wall, {cpu_alone:.1f} s CPU, "
        f"peak RSS {max(r['rss_mb'] for r in alone):.0f} MB per process"
    )
    print(
        f"batched:         {batched['wall']:.1f} s wall, {batched['cpu']:.1f} s CPU, "
        f"peak RSS {batched['rss_mb']:.0f} MB"
    )
    ratio_wall, ratio_cpu = wall_alone / batched["wall"], cpu_alone / batched["cpu"]
    print(f"ratio (one per network / batched): wall {ratio_wall:.2f}x, CPU {ratio_cpu:.2f}x")
    print(f"test accuracy alone:   {[a for r in alone for a in r['test']]}")
    print(f"test accuracy batched: {batched['test']}")


if __name__ == "__main__":
    main()
