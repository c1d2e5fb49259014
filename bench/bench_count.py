"""Counting engines compared: rows/s and peak memory for exact state counts under a memory budget.

    python bench/bench_count.py                     # both workloads; numpy, DuckDB on 1 and 2 threads; 256M
    python bench/bench_count.py --workload wide --budget 1G --engines numpy,duckdb:2 --repeat 1

Engines:
- ``numpy``: the auditor's own ``LayerCounter`` (sorted runs, spilled to files, merged range
  by range into a count of counts; see docs/scale.md).
- ``duckdb``: a table in DuckDB (``pip install -e ".[bench]"``), ``memory_limit`` set to the
  budget and its temp folder in the spill folder; raw keys are inserted batch by batch and one
  ``GROUP BY`` query gives the count of counts (DuckDB's out-of-core hash aggregate spills).

Workloads (keys made here, batch by batch, so the generator holds almost nothing):
- ``narrow64``: 30M 64-bit keys, 29M of them distinct (a ≤ 64-neuron layer of a big audit);
- ``wide``: 10M rows of 4 words (a 256-neuron layer), 9.5M distinct.

Times leave out making the keys. Each run is a fresh process; its peak is that process's maximum
resident memory, and the figure that matters is the growth over its resident memory before the
first key (the baseline: Python, numpy, the engine's library); the worst peak and growth of the
runs are shown. Engines take turns, and the fastest of each engine's runs is shown, so that other jobs on
the machine disturb the comparison less. Every run must give the same count of counts.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from auditor.engine.count import LayerCounter
from auditor.engine.keys import hash_rows
from auditor.engine.stores import MemoryBudget
from auditor.usage import parse_size

WORKLOADS = {  # keys, distinct, words, keys per batch
    "narrow64": (30_000_000, 29_000_000, 1, 1_000_000),
    "wide": (10_000_000, 9_500_000, 4, 500_000),
}
KB = 1024
GENERATED = [0.0]  # seconds spent making keys, not counting them


def key_batches(workload: str, seed: int = 0) -> Iterator[np.ndarray]:
    """Batches of keys with a known number of distinct ones: distinct indices map to distinct keys.

    Each batch has fresh indices plus repeats of earlier ones, in the proportion the workload
    asks for; a key is a bijective 64-bit mix of its index (plus three more mixed words when wide).
    The time spent here is added to ``GENERATED[0]`` so that it can be left out of the engine's.
    """
    total, distinct, words, batch = WORKLOADS[workload]
    rng = np.random.default_rng(seed)
    fresh_per_batch = -(-distinct // -(-total // batch))
    fresh = 0
    for start in range(0, total, batch):
        began = time.perf_counter()
        size = min(batch, total - start)
        new = min(fresh_per_batch, distinct - fresh, size)
        repeats = rng.integers(0, max(fresh, 1), size - new, dtype=np.uint64)
        index = np.concatenate([np.arange(fresh, fresh + new, dtype=np.uint64), repeats])
        fresh += new
        first = hash_rows(index[:, None])
        if words == 1:
            keys = first
        else:
            rest = [hash_rows(np.stack([index, np.full_like(index, j)], axis=1)) for j in range(1, words)]
            keys = np.stack([first, *rest], axis=1)
        GENERATED[0] += time.perf_counter() - began
        yield keys


def resident_kib() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() // KB


def run_numpy(workload: str, budget_bytes: int, spill: Path, threads: int) -> tuple[dict[int, int], dict]:
    words = WORKLOADS[workload][2]
    neurons = 64 if words == 1 else 64 * words
    with MemoryBudget(budget_bytes, spill) as budget:
        counter = LayerCounter(neurons, [(0, neurons)], -1, budget)
        for keys in key_batches(workload):
            counter.store.add(keys)  # the keys themselves: packing is the graph's job, not the engine's
            counter.total += len(keys)
        ingested = time.perf_counter()
        histogram = counter.count_of_counts()
        return dict(zip(histogram.values.tolist(), histogram.states.tolist(), strict=True)), {
            "ingested": ingested,
            "spilled_mib": budget.spilled_bytes / 2**20,
        }


def run_duckdb(workload: str, budget_bytes: int, spill: Path, threads: int) -> tuple[dict[int, int], dict]:
    import duckdb

    words = WORKLOADS[workload][2]
    columns = [f"k{j}" for j in range(words)]
    con = duckdb.connect(":memory:")
    con.execute(f"SET threads={threads}")
    con.execute(f"SET memory_limit='{budget_bytes // 2**20}MiB'")
    con.execute(f"SET temp_directory='{spill}'")
    con.execute("SET preserve_insertion_order=false")
    con.execute(f"CREATE TABLE states ({', '.join(f'{c} UBIGINT' for c in columns)})")
    for keys in key_batches(workload):
        batch = {c: (keys if words == 1 else np.ascontiguousarray(keys[:, j])) for j, c in enumerate(columns)}
        con.register("batch", batch)
        con.execute("INSERT INTO states SELECT * FROM batch")
        con.unregister("batch")
    ingested = time.perf_counter()
    rows = con.execute(
        f"SELECT c, count(*) FROM (SELECT count(*) AS c FROM states GROUP BY {', '.join(columns)}) GROUP BY c"
    ).fetchall()
    spilled = sum(f.stat().st_size for f in spill.rglob("*") if f.is_file())
    con.close()
    return {int(c): int(n) for c, n in rows}, {"ingested": ingested, "spilled_mib": spilled / 2**20}


ENGINES = {"numpy": run_numpy, "duckdb": run_duckdb}


def child(engine: str, workload: str, budget_bytes: int, threads: int) -> None:
    """One measurement, in this fresh process; prints one JSON line."""
    if engine == "duckdb":
        import duckdb  # noqa: F401  (its import belongs to the baseline)
    next(key_batches(workload))  # warm the generator's code paths into the baseline
    baseline = resident_kib()
    with tempfile.TemporaryDirectory(prefix="bench-count-") as spill:
        GENERATED[0] = 0.0
        start = time.perf_counter()
        histogram, info = ENGINES[engine](workload, budget_bytes, Path(spill), threads)
        end = time.perf_counter()
    total = WORKLOADS[workload][0]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    result = {
        "engine": engine,
        "workload": workload,
        "rows_per_s": total / (end - start - GENERATED[0]),
        "ingest_s": info["ingested"] - start - GENERATED[0],
        "merge_s": end - info["ingested"],
        "baseline_mib": baseline / KB,
        "peak_mib": peak / KB,
        "growth_mib": (peak - baseline) / KB,
        "spilled_mib": info["spilled_mib"],
        "distinct": sum(histogram.values()),
        "histogram": sorted(histogram.items()),
    }
    print(json.dumps(result))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=[*WORKLOADS, "all"], default="all")
    parser.add_argument(
        "--engines", default="numpy,duckdb:1,duckdb:2", help="comma-separated: numpy, duckdb:THREADS (default: all)"
    )
    parser.add_argument("--budget", default="256M", help="memory budget of each engine (default 256M)")
    parser.add_argument("--repeat", type=int, default=3, help="runs of each engine, taken in turns; the best is shown")
    parser.add_argument("--child", nargs=3, metavar=("ENGINE", "WORKLOAD", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    budget = parse_size(args.budget)
    if args.child:
        engine, workload, threads = args.child
        child(engine, workload, budget, int(threads))
        return 0
    workloads = list(WORKLOADS) if args.workload == "all" else [args.workload]
    engines = args.engines.split(",")
    print(f"budget {args.budget}; best of {args.repeat} runs taken in turns; numpy is single-threaded")
    print(
        f"{'workload':9s} {'engine':9s} {'Mrows/s':>8s} {'ingest s':>9s} {'merge s':>8s} "
        f"{'peak MiB':>9s} {'growth MiB':>11s} {'spilled MiB':>12s} {'distinct':>10s}"
    )
    for workload in workloads:
        runs: dict[str, list[dict]] = {engine: [] for engine in engines}
        for _ in range(args.repeat):
            for engine in engines:
                name, _, threads = engine.partition(":")
                command = [sys.executable, __file__, "--budget", args.budget]
                out = subprocess.run(
                    [*command, "--child", name, workload, threads or "1"], capture_output=True, text=True, check=True
                )
                runs[engine].append(json.loads(out.stdout.strip().splitlines()[-1]))
        for engine, results in runs.items():
            r = max(results, key=lambda result: result["rows_per_s"])
            peak, growth = (max(result[key] for result in results) for key in ("peak_mib", "growth_mib"))
            print(
                f"{workload:9s} {engine:9s} {r['rows_per_s'] / 1e6:8.2f} {r['ingest_s']:9.1f} {r['merge_s']:8.1f} "
                f"{peak:9.0f} {growth:11.0f} {r['spilled_mib']:12.0f} {r['distinct']:10d}"
            )
        if len({json.dumps(result["histogram"]) for results in runs.values() for result in results}) > 1:
            print(f"{workload}: the engines' counts of counts DIFFER")
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
