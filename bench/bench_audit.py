"""What an audit costs over plain onnxruntime inference, as whole processes, in paired rounds.

    python bench/bench_audit.py --workload all               # every workload, 3 paired rounds
    python bench/bench_audit.py --workload lenet5-16 --rounds 7
    python bench/bench_audit.py --workload squeezenet --images 300
    python bench/bench_audit.py --workload all --profile     # where the time goes, no rounds

Workloads (the images are held in memory before any clock starts):
- ``lenet5-16``: LeNet-5 (16,32,64) with Glorot-uniform random weights on all 60,000 MNIST
  training images, batch 256. Random weights give more distinct states than trained ones, so
  counting is at its most expensive.
- ``lenet5-32``: LeNet-5 (32,64,128), the same way.
- ``squeezenet``: ``../shared/models/squeezenet1.0_fp16_opset7.onnx`` (fp16, fixed batch 1) on
  1,500 random uint8 3×224×224 images with random labels.

A round runs three fresh processes, one after another, in an order that rotates between rounds:
- ``default``: plain inference with onnxruntime's default session options, one call per batch;
- ``own-way``: plain inference run the audit's own way: ``auditor.engine.run.Session`` over the plain
  model, its batches spread over ``Session.workers`` calls side by side by ``ordered_map``, each
  batch run in calls of ``prepare.call_rows`` samples;
- ``audit``: ``auditor.engine.audit`` of the same batches (labels included), report built.
Each process times itself from after loading the images to the end (session creation included),
and reports its wall time, CPU time and peak resident memory. A round's ratio is audit ÷
inference of that round; the figure printed is the median over rounds, with the load average
at each round, because a shared machine makes single timings meaningless.

``--profile`` prints, per workload, onnxruntime's own profile of the plain and the exposed graph
(per op type, model nodes and auditor nodes apart) and per-stage CPU timers measured one after
another on one thread: α, preprocessing, inference of the plain, exposed and oracle graphs
(``expose(..., fast=False)``), counting, and the summary.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor.datasets.batches import Batch
from auditor.datasets.splits import load_arrays

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
SQUEEZENET = SHARED / "models" / "squeezenet1.0_fp16_opset7.onnx"
MODES = ("default", "own-way", "audit")


@dataclass(frozen=True)
class Workload:
    """A model file, its images and labels in memory, and the batch size of every run."""

    name: str
    model: Path
    images: np.ndarray
    labels: np.ndarray
    batch_size: int

    def batches(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        for start in range(0, len(self.images), self.batch_size):
            yield self.images[start : start + self.batch_size], self.labels[start : start + self.batch_size]


WORKLOADS = ("lenet5-16", "lenet5-32", "squeezenet")


def workload(name: str, images: int | None, folder: Path) -> Workload:
    """The named workload, its model written to ``folder`` when it is built here."""
    if name == "squeezenet":
        count = images or 1500
        rng = np.random.default_rng(0)
        x = rng.integers(0, 256, (count, 3, 224, 224), dtype=np.uint8)
        return Workload(name, SQUEEZENET, x, rng.integers(0, 1000, count), 256)
    widths = (16, 32, 64) if name == "lenet5-16" else (32, 64, 128)
    path = folder / f"{name}.onnx"
    if not path.exists():
        onnx.save(lenet5(widths), path)
    x, y = load_arrays("mnist", "train", limit=images)
    return Workload(name, path, x, y, 256)


def lenet5(widths: tuple[int, int, int], seed: int = 0) -> onnx.ModelProto:
    """LeNet-5 as SPEC §7 describes it, with Glorot-uniform random weights."""
    n1, n2, n3 = widths
    rng = np.random.default_rng(seed)

    def glorot(shape: tuple[int, ...], fan_in: int, fan_out: int) -> np.ndarray:
        limit = np.sqrt(6 / (fan_in + fan_out))
        return rng.uniform(-limit, limit, shape).astype(np.float32)

    weights = {
        "w1": glorot((n1, 1, 5, 5), 25, n1 * 25),
        "b1": np.zeros(n1, np.float32),
        "w2": glorot((n2, n1, 5, 5), n1 * 25, n2 * 25),
        "b2": np.zeros(n2, np.float32),
        "w3": glorot((n2 * 16, n3), n2 * 16, n3),
        "b3": np.zeros(n3, np.float32),
        "w4": glorot((n3, 10), n3, 10),
        "b4": np.zeros(10, np.float32),
    }
    nodes = [
        helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]),
        helper.make_node("Elu", ["c1"], ["a1"]),
        helper.make_node("MaxPool", ["a1"], ["p1"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Conv", ["p1", "w2", "b2"], ["c2"]),
        helper.make_node("Elu", ["c2"], ["a2"]),
        helper.make_node("MaxPool", ["a2"], ["p2"], kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Flatten", ["p2"], ["f"]),
        helper.make_node("Gemm", ["f", "w3", "b3"], ["d3"]),
        helper.make_node("Elu", ["d3"], ["a3"]),
        helper.make_node("Gemm", ["a3", "w4", "b4"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "lenet5",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 10])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


# --- One measured process -------------------------------------------------------------------


def child(mode: str, work: Workload) -> dict[str, float]:
    """Run ``mode`` over the workload in this process; its wall and CPU seconds and peak memory."""
    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "audit":
        from auditor import AuditConfig, audit

        batches = (("train", Batch(x, y)) for x, y in work.batches())
        audit(str(work.model), batches, AuditConfig(device="cpu", batch_size=work.batch_size))
    else:
        run_plain(mode, work)
    return {
        "wall": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def run_plain(mode: str, work: Workload) -> None:
    """Plain inference of every batch: onnxruntime defaults, or the audit's own Session and workers."""
    import onnxruntime as ort

    from auditor.engine.modelfile import load_model
    from auditor.engine.prepare import call_rows, structure_of
    from auditor.engine.run import Session, ordered_map

    loaded = load_model(work.model)
    model, structure = loaded.proto, structure_of(loaded)
    model_input = structure.input
    prepare = preprocessor(model_input.dtype, model_input.shape)
    if mode == "default":
        session = ort.InferenceSession(str(work.model), providers=["CPUExecutionProvider"])
        fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) else 0
        for x, _ in work.batches():
            feed = prepare(x)
            for start in range(0, len(feed), fixed or len(feed)):
                session.run(None, {model_input.name: feed[start : start + (fixed or len(feed))]})
        return
    runner = Session(model, model_input, "cpu", call_rows(structure))
    outputs = [o.name for o in model.graph.output]
    for _ in ordered_map(lambda x: runner.run(prepare(x), outputs), (x for x, _ in work.batches()), runner.workers):
        pass


def preprocessor(dtype: np.dtype, shape: tuple) -> Callable[[np.ndarray], np.ndarray]:
    """uint8 images to the model input, as the audit's feed does it: ÷ 255, reshaped, cast."""
    sample = tuple(int(d) for d in shape[1:])
    return lambda x: (x.astype(np.float32) / np.float32(255)).reshape((len(x), *sample)).astype(dtype, copy=False)


# --- Paired rounds ----------------------------------------------------------------------------


def rounds(name: str, args: argparse.Namespace, folder: Path) -> None:
    """``args.rounds`` rounds of the three processes; prints every round and the medians."""
    print(f"\n== {name}")
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    for r in range(args.rounds):
        order = MODES[r % 3 :] + MODES[: r % 3]
        load = os.getloadavg()[0]
        line = []
        for mode in order:
            results[mode].append(measure(name, mode, args, folder))
            line.append(f"{mode} {results[mode][-1]['wall']:.2f}s")
        audit, default, own = (results[m][-1]["wall"] for m in ("audit", "default", "own-way"))
        print(
            f"round {r + 1}: load {load:.1f}  "
            + ", ".join(line)
            + f"  → audit/default {audit / default:.3f}, audit/own-way {audit / own:.3f}"
        )
    n = len(results["audit"])
    for base in ("default", "own-way"):
        walls = [results["audit"][i]["wall"] / results[base][i]["wall"] for i in range(n)]
        cpus = [results["audit"][i]["cpu"] / results[base][i]["cpu"] for i in range(n)]
        print(
            f"audit ÷ {base:8s} inference: wall {statistics.median(walls):.3f}× "
            f"(rounds {min(walls):.3f}–{max(walls):.3f}), CPU {statistics.median(cpus):.3f}×"
        )
    for mode in MODES:
        wall = statistics.median(r["wall"] for r in results[mode])
        peak = max(r["peak_mib"] for r in results[mode])
        print(f"{mode:8s} median {wall:7.2f} s, peak memory {peak:5.0f} MiB (whole process, images included)")


def measure(name: str, mode: str, args: argparse.Namespace, folder: Path) -> dict[str, float]:
    """One fresh process running ``mode``; its own report of time and memory."""
    return child_report(__file__, name, mode, args.images, folder)


def child_report(
    script: str, name: str, mode: str, images: int | None, folder: Path, extra: Sequence[str] = ()
) -> dict:
    """Run ``script --child mode`` on workload ``name`` in a fresh process; the JSON report it prints last.

    A bench runs each mode in its own process so that its peak memory is its own; ``extra`` are
    further flags of that bench's child (``bench_gpu.py``'s device and GPU math)."""
    command = [sys.executable, script, "--child", mode, "--workload", name, "--folder", str(folder), *extra]
    if images:
        command += ["--images", str(images)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{mode} on {name} failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# --- Where the time goes ----------------------------------------------------------------------


def profile(work: Workload, images: int) -> None:
    """onnxruntime's per-node profile and per-stage CPU timers, on ``images`` images."""
    import onnxruntime as ort

    from auditor import AuditConfig
    from auditor.engine.expose import expose
    from auditor.engine.feed import feed, input_entropy, to_model_input
    from auditor.engine.prepare import prepare
    from auditor.engine.run import create_session
    from auditor.engine.stores import MemoryBudget
    from auditor.engine.summary import TOP_STATES, summarize
    from auditor.engine.tally import SplitTally

    work = Workload(work.name, work.model, work.images[:images], work.labels[:images], work.batch_size)
    config = AuditConfig(device="cpu", batch_size=work.batch_size)
    prepared = prepare(str(work.model), device="cpu")
    model, structure = prepared.model.proto, prepared.structure
    name = structure.input.name
    fed = [feed("train", 0, Batch(x, y), structure.input, config.feeding) for x, y in work.batches()]
    graphs = {
        "plain": (model, [o.name for o in model.graph.output]),
        "exposed": (prepared.exposed.model, prepared.exposed.output_names),
        "oracle": (expose(model, structure, fast=False).model, prepared.exposed.output_names),
    }
    print(f"\n== {work.name}: {len(work.images)} images, one thread, CPU seconds per stage")
    stages = {
        "α (input entropy)": lambda: [input_entropy(x, config.alpha_range) for x, _ in work.batches()],
        "preprocessing": lambda: [to_model_input(x, structure.input, config.feeding) for x, _ in work.batches()],
    }
    for label, (graph, names) in graphs.items():
        session = create_session(graph, "cpu", threads=1)
        stages[f"inference, {label} graph"] = lambda s=session, n=names: [
            _chunked(s, n, name, x, structure.input.shape) for _, x in fed
        ]
    session = create_session(prepared.exposed.model, "cpu", threads=1)
    outputs = [_chunked(session, prepared.exposed.output_names, name, x, structure.input.shape) for _, x in fed]
    counted = frozenset(out.layer.name for out in prepared.exposed.layers if out.layer.role == "hidden")
    with MemoryBudget(config.memory_budget) as budget:
        tally = SplitTally(prepared.exposed, counted, config.margin_seed, structure.output_is_probability, budget)
        stages["counting and tallying"] = lambda: [tally.add(f, o) for (f, _), o in zip(fed, outputs, strict=True)]
        stages["summary"] = lambda: summarize(
            prepared.model_info,
            ["CPUExecutionProvider"],
            structure.layers,
            {"train": tally.finish(TOP_STATES)},
            config,
        )
        times = {label: _cpu_seconds(stage) for label, stage in stages.items()}
    plain = times["inference, plain graph"]
    for label, seconds in times.items():
        print(f"  {label:32s} {seconds:7.3f} s  ({seconds / plain:6.1%} of plain inference)")
    if not isinstance(structure.input.shape[0], int):
        call_sizes(graphs, name, [x for _, x in fed])
    print("  onnxruntime's profile (one thread), ms per image:")
    for label, (graph, names) in graphs.items():
        inputs = [x for _, x in fed[: max(1, 2048 // work.batch_size)]]
        nodes = _ort_profile(ort, graph, names, name, inputs, structure.input.shape)
        total = sum(nodes.values())
        added = sum(v for (op, mine), v in nodes.items() if mine)
        top = ", ".join(f"{op}{' (auditor)' if mine else ''} {v / total:.0%}" for (op, mine), v in nodes.most_common(6))
        print(f"    {label:8s} {total:7.3f} ms, auditor nodes {added / total:5.1%}: {top}")


def call_sizes(graphs: dict, input_name: str, inputs: list[np.ndarray], rounds: int = 5) -> None:
    """CPU per batch of the plain and exposed graphs run in calls of 256, 64, 32, 16 and 8 samples:
    interleaved rounds, median of each against one call per batch of the plain graph."""
    from auditor.engine.run import create_session

    sessions = {}
    for label in ("plain", "exposed"):
        graph, names = graphs[label]
        sessions[label] = (create_session(graph, "cpu", threads=1), names)
    variants = [(label, rows) for rows in (256, 64, 32, 16, 8) for label in ("plain", "exposed")]
    times: dict[tuple[str, int], list[float]] = {variant: [] for variant in variants}
    for _ in range(rounds):
        for label, rows in variants:
            session, names = sessions[label]
            start = time.thread_time()
            for x in inputs:
                for i in range(0, len(x), rows):
                    session.run(names, {input_name: x[i : i + rows]})
            times[label, rows].append(time.thread_time() - start)
    base = times["plain", 256]
    print("  call size (one thread), CPU per batch against one call of the plain graph:")
    for label, rows in variants:
        ratio = statistics.median(t / b for t, b in zip(times[label, rows], base, strict=True))
        print(f"    {label:8s} calls of {rows:3d}: {ratio:.3f}×")


def _chunked(session, names: list[str], input_name: str, x: np.ndarray, shape: tuple) -> dict[str, np.ndarray]:
    """One batch through a session, in chunks of a fixed batch size when the input has one."""
    fixed = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else len(x)
    parts = [session.run(names, {input_name: x[i : i + fixed]}) for i in range(0, len(x), fixed)]
    return {n: np.concatenate([p[k] for p in parts]) for k, n in enumerate(names)}


def _cpu_seconds(stage: Callable[[], object]) -> float:
    start = time.thread_time()
    stage()
    return time.thread_time() - start


def _ort_profile(ort, graph, names, input_name, inputs, shape) -> collections.Counter:
    """Microseconds per image by (op type, whether the node is the auditor's), from onnxruntime's profiler."""
    copy = onnx.ModelProto()
    copy.CopyFrom(graph)
    for node in copy.graph.node:
        node.name = node.output[0]
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.enable_profiling = True
    options.profile_file_prefix = str(Path(tempfile.mkdtemp()) / "ort")
    session = ort.InferenceSession(copy.SerializeToString(), options, providers=["CPUExecutionProvider"])
    images = 0
    for x in inputs:
        _chunked(session, names, input_name, x, shape)
        images += len(x)
    events = json.loads(Path(session.end_profiling()).read_text())
    nodes: collections.Counter = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            mine = event["name"].startswith("auditor/")
            nodes[event["args"]["op_name"], mine] += event["dur"] / 1000 / images
    return nodes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per workload (default 3)")
    parser.add_argument("--images", type=int, help="images per run (default: 60,000 MNIST, 1,500 SqueezeNet)")
    parser.add_argument("--profile", action="store_true", help="where the time goes, instead of the rounds")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("AUDITOR_DATA_DIR", str(SHARED / "data"))
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-audit-"))
    names = WORKLOADS if args.workload == "all" else (args.workload,)
    if args.child:
        print(json.dumps(child(args.child, workload(names[0], args.images, folder))))
        return 0
    print(f"{os.cpu_count()} CPUs; onnxruntime threads: defaults, or the audit's own; load is the 1-minute average")
    for name in names:
        if args.profile:
            profile(workload(name, args.images, folder), args.images or (256 * 40 if name != "squeezenet" else 64))
        else:
            workload(name, 1, folder)  # writes the model once, before the rounds
            rounds(name, args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
