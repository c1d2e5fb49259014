"""What ``auditor shrink`` buys in inference time: the shrunk model's latency over the original's.

    python bench/bench_shrink.py MODEL --data mnist --mean 0.1307 --std 0.3081 --max-accuracy-drop 0.5
    python bench/bench_shrink.py MODEL --data mnist --align 1 8 --rounds 15

For each ``--align`` value the model is shrunk once (``auditor.pruning.plan.shrink``: statistics on
``--limit`` training samples, the budget checked on the test split), then both models are run
with plain onnxruntime (default session options, one call per batch of ``--batch`` test images)
in ``--rounds`` paired rounds whose order alternates. The figure printed is the median over
rounds of shrunk ÷ original wall time, with the spread, because a shared machine makes single
timings meaningless; then the shrink's own wall time and the process's peak resident memory.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from auditor.config import AuditConfig
from auditor.datasets.splits import open_dataset
from auditor.engine.feed import to_model_input
from auditor.engine.find import describe
from auditor.pruning.plan import shrink


def timed(session: ort.InferenceSession, x: np.ndarray, batch: int) -> float:
    """Seconds to run every batch of ``x`` once, one call per batch (fixed-batch models in theirs)."""
    name = session.get_inputs()[0].name
    fixed = session.get_inputs()[0].shape[0]
    step = fixed if isinstance(fixed, int) and fixed > 0 else batch
    start = time.perf_counter()
    for i in range(0, len(x) - step + 1, step):
        session.run(None, {name: x[i : i + step]})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("--data", default="mnist")
    parser.add_argument("--limit", type=int, default=10000)
    parser.add_argument("--mean", type=float, default=0.0)
    parser.add_argument("--std", type=float, default=1.0)
    parser.add_argument("--max-accuracy-drop", type=float)
    parser.add_argument("--criterion", default="layer-share")
    parser.add_argument("--align", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--batch", type=int, default=256)
    args = parser.parse_args()
    config = AuditConfig(device="cpu", mean=args.mean, std=args.std)
    train = [open_dataset(args.data, "train", limit=args.limit)]
    test = [open_dataset(args.data, "test", limit=args.limit)]
    original = onnx.load(str(args.model))
    model_input = describe(original).input
    x = to_model_input(next(test[0].batches(test[0].count)).x, model_input, config.feeding)
    for align in args.align:
        start = time.perf_counter()
        report = shrink(
            args.model, train, test, config, max_accuracy_drop=args.max_accuracy_drop,
            criterion=args.criterion, align=align, latency_repeats=1,
        )  # fmt: skip
        seconds = time.perf_counter() - start
        sessions = [ort.InferenceSession(m.SerializeToString()) for m in (original, report.model)]
        ratios = []
        for round_ in range(args.rounds):
            order = [0, 1] if round_ % 2 == 0 else [1, 0]
            times = {i: timed(sessions[i], x, args.batch) for i in order}
            ratios.append(times[1] / times[0])
        widths = ", ".join(f"{row.neurons_before}→{row.neurons_after}" for row in report.layers)
        print(
            f"align {align}: widths {widths}; params ×{report.after.params / report.before.params:.3f}, "
            f"multiply-adds ×{report.after.multiply_adds / max(report.before.multiply_adds, 1):.3f}; "
            f"latency shrunk/original median ×{statistics.median(ratios):.3f} "
            f"(min ×{min(ratios):.3f}, max ×{max(ratios):.3f}, {args.rounds} rounds of {len(x)} images); "
            f"accuracy {report.before.accuracy:.4f} → {report.after.accuracy:.4f}; shrink took {seconds:.1f} s"
        )
    print(f"peak resident memory: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
