"""The whole ``auditor`` command, shell to exit, against a plain onnxruntime script: paired rounds.

    python bench/bench_command.py                   # 5 paired rounds, ratios, peak memory
    python bench/bench_command.py --rounds 9
    python bench/bench_command.py --breakdown       # where each command's wall time goes

A user runs a command, not a benchmark loop, so every figure here is a fresh process timed from
its start to its exit, with its imports and its data loading included:
- ``audit``: ``python -m auditor.cli audit lenet5-16.onnx --data mnist --split train --json r.json``
  on LeNet-5 (16,32,64) with Glorot-random weights (``bench_audit.lenet5``), all 60,000 images;
- ``plain``: ``bench/plain_mnist.py``, fifteen lines that read the same IDX files and run the
  same model with onnxruntime's defaults in batches of 512;
- ``help``: ``python -m auditor.cli --help``;
- ``small``: an audit of the first 100 MNIST test images with ``examples/lenet5_3_9_4.onnx``.

A round runs ``audit`` and ``plain`` back to back, in an order that rotates between rounds,
then ``help`` and ``small``. ``--against CHECKOUT`` runs the three auditor commands from another
checkout too (``audit@against`` joins the rotation): a before/after in the same rounds. The
figure printed for audit ÷ plain is the median over rounds of each round's ratio, because a
shared machine makes single timings meaningless; the load average is printed with every round.
Peak memory is each process's own maximum resident set (``wait4``). The children run with
bytecode caching on, as an installed package does, after one warm-up run of each command that
writes the caches and warms the page cache.

``--breakdown`` runs, in one fresh process per round, each stage of the two commands one after
another with two clocks around each, wall and CPU (all threads; steal time and waiting for a core
do not count, so the load moves it less): the imports, the data loading (checksums and decoding),
the session creation (for the audit: loading, exposing and the session), the audit or the
inference over images held in memory, and writing the report. In the real command the data is
opened while the model is prepared and read while it runs, so stages overlap; the breakdown
says what each costs alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
SMALL_MODEL = ROOT / "examples" / "lenet5_3_9_4.onnx"
PLAIN = Path(__file__).resolve().with_name("plain_mnist.py")
AUDITOR_COMMANDS = ("audit", "help", "small")
STAGES = {
    "audit": ("import", "data", "session", "audit", "report"),
    "plain": ("import", "data", "session", "inference"),
}


@dataclass(frozen=True)
class Command:
    """One whole process: its arguments, its environment and its working folder (``python -m``
    puts the working folder first on the path, so it decides which checkout runs)."""

    argv: list[str]
    env: dict[str, str]
    cwd: Path = ROOT


def commands(model: Path, folder: Path, data_dir: Path, against: Path | None) -> dict[str, Command]:
    """The four commands, each a whole process, and the auditor's three again from ``against``."""
    cli = [sys.executable, "-m", "auditor.cli"]
    small = ["audit", str(SMALL_MODEL), "--data", "mnist", "--limit", "100", "--json", str(folder / "s.json")]
    audit = ["audit", str(model), "--data", "mnist", "--split", "train", "--json", str(folder / "r.json")]
    ours = child_env(ROOT, data_dir)
    runs = {
        "audit": Command([*cli, *audit], ours),
        "plain": Command([sys.executable, str(PLAIN), str(model), str(data_dir / "mnist"), "train"], ours),
        "help": Command([*cli, "--help"], ours),
        "small": Command([*cli, *small], ours),
    }
    if against is not None:
        theirs = child_env(against, data_dir)
        for name in AUDITOR_COMMANDS:
            runs[f"{name}@against"] = Command(runs[name].argv, theirs, against)
    return runs


def child_env(checkout: Path, data_dir: Path) -> dict[str, str]:
    """The environment of a child: ``checkout`` first on the path, bytecode caching on."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(checkout), env.get("PYTHONPATH")) if p)
    env["AUDITOR_DATA_DIR"] = str(data_dir)
    return env


def measure(command: Command) -> dict[str, float]:
    """Wall seconds, CPU seconds and peak resident MiB of one process, start to exit."""
    start = time.perf_counter()
    process = subprocess.Popen(
        command.argv, env=command.env, cwd=command.cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - start
    stderr = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        sys.exit(f"{' '.join(command.argv)} failed ({process.returncode}):\n{stderr}")
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "peak_mib": usage.ru_maxrss / 1024}


def rounds(runs: dict[str, Command], count: int) -> dict[str, list[dict[str, float]]]:
    """``count`` paired rounds; prints each and returns every measurement by command."""
    for command in runs.values():
        measure(command)  # warm-up: bytecode caches written, files in the page cache
    results: dict[str, list[dict[str, float]]] = {name: [] for name in runs}
    paired = [name for name in runs if name.startswith(("audit", "plain"))]
    for r in range(count):
        load = os.getloadavg()[0]
        for name in paired[r % len(paired) :] + paired[: r % len(paired)]:
            results[name].append(measure(runs[name]))
        for name in runs:
            if name not in paired:
                results[name].append(measure(runs[name]))
        walls = {name: results[name][-1]["wall"] for name in runs}
        print(
            f"round {r + 1}: load {load:.1f}  "
            + "  ".join(f"{name} {wall:.3f}s" for name, wall in walls.items())
            + f"  → audit/plain {walls['audit'] / walls['plain']:.3f}×",
            flush=True,
        )
    return results


def report(results: dict[str, list[dict[str, float]]]) -> None:
    """Medians of the per-round ratios and of each command's wall time, and peak memory."""
    for audit in (name for name in results if name.startswith("audit")):
        pairs = list(zip(results[audit], results["plain"], strict=True))
        walls = [a["wall"] / p["wall"] for a, p in pairs]
        cpus = [a["cpu"] / p["cpu"] for a, p in pairs]
        print(
            f"{audit} ÷ plain, whole processes: wall {statistics.median(walls):.3f}× "
            f"(rounds {min(walls):.3f}–{max(walls):.3f}), CPU {statistics.median(cpus):.3f}×"
        )
    for name, runs in results.items():
        wall = [r["wall"] for r in runs]
        cpu = statistics.median(r["cpu"] for r in runs)
        peak = max(r["peak_mib"] for r in runs)
        print(
            f"{name:14s} median {statistics.median(wall):6.3f} s (range {min(wall):.3f}–{max(wall):.3f}), "
            f"CPU {cpu:6.3f} s, peak memory {peak:4.0f} MiB"
        )


# --- Where the wall time goes -------------------------------------------------------------------


def breakdown(model: Path, folder: Path, data_dir: Path, env: dict[str, str], count: int) -> None:
    """Per-stage wall and CPU seconds of both commands, each stage alone: medians of ``count``
    paired rounds, the two commands' processes alternating."""
    argv = {
        which: [sys.executable, __file__, "--stages", which, "--model", str(model), "--folder", str(folder)]
        for which in STAGES
    }
    seen: dict[str, list[dict[str, float]]] = {which: [] for which in STAGES}
    for command in argv.values():
        subprocess.run(command, env=env, check=True, capture_output=True)  # warm-up
    for r in range(count):
        for which in list(STAGES)[r % 2 :] + list(STAGES)[: r % 2]:
            done = subprocess.run(argv[which], env=env, check=True, capture_output=True, text=True)
            seen[which].append(json.loads(done.stdout.strip().splitlines()[-1]))
    for which, stages in STAGES.items():
        for clock in ("", " CPU"):
            medians = {stage: statistics.median(s[stage + clock] for s in seen[which]) for stage in stages}
            parts = ", ".join(f"{stage} {seconds:.3f}" for stage, seconds in medians.items())
            what = "wall" if not clock else "CPU "
            print(f"{which:6s} {what} seconds (medians of {count}): {parts}; sum {sum(medians.values()):.3f}")


def stages_of_audit(model: Path, folder: Path) -> dict[str, float]:
    """The audit command's stages, one after another, as ``auditor.cli`` runs them."""
    clock = _Clock()
    from auditor import cli
    from auditor.datasets.batches import Batch
    from auditor.datasets.splits import open_splits
    from auditor.engine.audit import audit
    from auditor.engine.prepare import prepare

    clock.lap("import")
    datasets = open_splits("mnist", "train")
    held = [("train", Batch(b.x, b.y)) for b in datasets[0].batches(256)]
    clock.lap("data")
    args = cli.build_parser().parse_args(["audit", str(model), "--data", "mnist", "--split", "train"])
    config = cli.config_from_args(args)
    prepared = prepare(model, device=config.device, states_at=config.states_at)
    clock.lap("session")
    result = audit(prepared, held, config)
    clock.lap("audit")
    (folder / "stages.json").write_text(result.to_json() + "\n")
    cli.render_table(result)
    clock.lap("report")
    return clock.laps


def stages_of_plain(model: Path, data_dir: Path) -> dict[str, float]:
    """The plain script's stages, one after another, as ``plain_mnist.py`` runs them."""
    clock = _Clock()
    import gzip

    import numpy as np
    import onnxruntime as ort

    clock.lap("import")
    with gzip.open(data_dir / "mnist" / "train-images-idx3-ubyte.gz") as f:
        x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(data_dir / "mnist" / "train-labels-idx1-ubyte.gz") as f:
        y = np.frombuffer(f.read(), np.uint8, offset=8)
    clock.lap("data")
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    clock.lap("session")
    correct = 0
    for i in range(0, len(x), 512):
        logits = session.run(None, {name: x[i : i + 512].astype(np.float32) / 255})[0]
        correct += int((logits.argmax(1) == y[i : i + 512]).sum())
    clock.lap("inference")
    return clock.laps


class _Clock:
    """Wall and CPU seconds (all threads) between laps; the first lap starts with the process."""

    def __init__(self) -> None:
        self.last = (_process_start(), 0.0)
        self.laps: dict[str, float] = {}

    def lap(self, name: str) -> None:
        now = (time.time(), time.process_time())
        self.laps[name] = now[0] - self.last[0]
        self.laps[f"{name} CPU"] = now[1] - self.last[1]
        self.last = now


def _process_start() -> float:
    """When this process started (epoch seconds), from /proc; now where /proc is missing."""
    try:
        ticks = int(Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[19])
        boot = next(
            float(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines() if line.startswith("btime")
        )
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, StopIteration, IndexError, ValueError):
        return time.time()


def lenet5_16(folder: Path) -> Path:
    """LeNet-5 (16,32,64) with Glorot-random weights, as bench_audit.py builds it, saved once."""
    path = folder / "lenet5-16.onnx"
    if not path.exists():
        import onnx
        from bench_audit import lenet5

        onnx.save(lenet5((16, 32, 64)), path)
    return path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5, help="paired rounds (default 5)")
    parser.add_argument("--breakdown", action="store_true", help="per-stage wall time instead of the rounds")
    parser.add_argument(
        "--against", type=Path, metavar="CHECKOUT", help="also run the auditor's commands from this checkout"
    )
    parser.add_argument("--stages", choices=STAGES, help=argparse.SUPPRESS)
    parser.add_argument("--model", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    data_dir = Path(os.environ.get("AUDITOR_DATA_DIR", SHARED / "data"))
    if args.stages:
        audit = args.stages == "audit"
        print(json.dumps(stages_of_audit(args.model, args.folder) if audit else stages_of_plain(args.model, data_dir)))
        return 0
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-command-"))
    folder.mkdir(parents=True, exist_ok=True)
    model, env = lenet5_16(folder), child_env(ROOT, data_dir)
    print(f"{os.cpu_count()} CPUs, {args.rounds} rounds; load is the 1-minute average; model {model}")
    if args.breakdown:
        breakdown(model, folder, data_dir, env, args.rounds)
    else:
        report(rounds(commands(model, folder, data_dir, args.against), args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
