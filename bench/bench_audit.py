"""Audit throughput against plain onnxruntime inference, on the same model, data and threads.

    python bench/bench_audit.py                     # LeNet-5 (16,32,64), all 60,000 MNIST train images
    python bench/bench_audit.py --model m.onnx --limit 10000 --repeat 3

Both read the same images from memory, so the ratio is the audit's own cost. Prints images/s
for both, their ratio (audit time ÷ inference time; the bar is ≤ 1.5), and the peak resident
memory of the process. Without ``--model`` the network is a LeNet-5 built here with
Glorot-uniform random weights: random weights give more distinct states than trained ones, so
counting is at its most expensive.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from auditor import AuditConfig, audit, prepare
from auditor.data import Batch, load_arrays
from auditor.run import create_session, ordered_map, workers_for


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


def plain_inference_seconds(model: onnx.ModelProto, images: np.ndarray, batch_size: int, parallel: bool) -> float:
    """Wall time of onnxruntime alone over all images: the model's own outputs, nothing else.

    ``parallel=False`` is onnxruntime as users run it (one session call at a time, all cores);
    ``parallel=True`` copies the audit's own CPU strategy (single-threaded calls side by side),
    so the ratio against it isolates what auditing adds.
    """
    session = create_session(model, "auto", threads=None if parallel else 0)
    name = session.get_inputs()[0].name
    workers = workers_for(session) if parallel else 1

    def run(start: int) -> None:
        batch = images[start : start + batch_size].reshape(-1, 1, 28, 28).astype(np.float32) / 255
        session.run(None, {name: batch})

    begin = time.perf_counter()
    for _ in ordered_map(run, range(0, len(images), batch_size), workers):
        pass
    return time.perf_counter() - begin


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, help="an ONNX model taking (N,1,28,28); default: LeNet-5")
    parser.add_argument("--widths", default="16,32,64", help="LeNet-5 widths when no --model (default 16,32,64)")
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--limit", type=int, help="images to use (default: the whole train split)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each; the best is reported")
    args = parser.parse_args()

    if args.model:
        model = onnx.load(args.model)
        path = args.model
    else:
        model = lenet5(tuple(int(w) for w in args.widths.split(",")))
        path = Path(tempfile.mkdtemp()) / "lenet5.onnx"
        onnx.save(model, path)
    images, labels = load_arrays(args.data, "train", limit=args.limit)
    config = AuditConfig(batch_size=args.batch_size)
    prepared = prepare(path, device=config.device)

    default, parallel, audited = [], [], []
    for _ in range(args.repeat):
        default.append(plain_inference_seconds(model, images, args.batch_size, parallel=False))
        parallel.append(plain_inference_seconds(model, images, args.batch_size, parallel=True))
        batches = (
            ("train", Batch(images[i : i + args.batch_size], labels[i : i + args.batch_size]))
            for i in range(0, len(images), args.batch_size)
        )
        start = time.perf_counter()
        audit(prepared, batches, config)
        audited.append(time.perf_counter() - start)
    n = len(images)
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model        {path.name}  ({', '.join(prepared.providers)})")
    print(f"images       {n} ({args.data} train), batch {args.batch_size}, best of {args.repeat}")
    for label, times in [
        ("inference, onnxruntime defaults", default),
        ("inference, the audit's parallel calls", parallel),
        ("audit", audited),
    ]:
        print(f"{label:38s} {n / min(times):8.0f} images/s  ({min(times):.2f} s)")
    print(
        f"ratio vs default inference   {min(audited) / min(default):6.2f} x  (audit time / inference time; bar <= 1.5)"
    )
    print(f"ratio vs parallel inference  {min(audited) / min(parallel):6.2f} x  (what auditing itself adds)")
    print(f"peak memory                  {peak_mib:6.0f} MiB (whole process, data included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
