"""What an audit on a GPU costs over plain onnxruntime-gpu inference, and whether it counts what the CPU counts.

    python bench/bench_gpu.py                            # the three workloads on CUDA, 3 paired rounds
    python bench/bench_gpu.py --workload resnet50 --rounds 5
    python bench/bench_gpu.py --parity                   # CPU and CUDA reports of examples/*.onnx
    python bench/bench_gpu.py --dry-run                  # the harness on the CPU, tiny (no GPU figures)

Workloads (images held in memory before any clock starts):
- ``lenet5-16``: LeNet-5 (16,32,64), Glorot-uniform random weights (``bench_audit.lenet5``), on
  the 60,000 MNIST training images, batch 256;
- ``squeezenet``: ``../shared/models/squeezenet1.0_fp16_opset7.onnx`` (fp16, fixed batch 1) on
  1,500 random uint8 224² images, batch 256;
- ``resnet50``: torchvision's ResNet-50 with random weights, exported here (opset 17, dynamic
  batch; needs torch and torchvision), on 512 random uint8 224² images, batch 64.

A round runs two fresh processes in turn, in an order that alternates between rounds:
``plain``, onnxruntime-gpu with default session options, every output fetched to the host, one
call per batch (in chunks of a fixed batch size); and ``audit``, ``auditor.engine.audit`` of the same
batches with labels, on CUDA (``--gpu-math`` exact unless asked), report built. Each process
reports its throughput, its peak resident host memory and the GPU memory it holds at the end
(onnxruntime's arena and CuPy's pool keep their peak; read by ``nvidia-smi``). The ratio printed
is the median over rounds of audit ÷ plain wall time.

``--parity`` audits every ``examples/*.onnx`` model on MNIST (both splits) on the CPU and on
CUDA and compares, per split and layer, the states counted and distinct (must be equal) and the
entropies (must agree within 1e-6 bits); it exits 1 on any difference.

``--dry-run`` runs the same code on the CPU with a few hundred images, one round, and the
parity check CPU against CPU: it proves the harness, not the GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_audit import SHARED, Workload, child_report, preprocessor, workload

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
WORKLOADS = ("lenet5-16", "squeezenet", "resnet50")
MODES = ("plain", "audit")
ENTROPY_TOLERANCE = 1e-6  # bits; the bound for fp32 models


def gpu_workload(name: str, images: int | None, folder: Path) -> Workload:
    """The named workload; ResNet-50 is exported into ``folder`` the first time."""
    if name != "resnet50":
        return workload(name, images, folder)
    path = folder / "resnet50.onnx"
    if not path.exists():
        export_resnet50(path)
    count = images or 512
    rng = np.random.default_rng(0)
    return Workload(
        name, path, rng.integers(0, 256, (count, 3, 224, 224), dtype=np.uint8), rng.integers(0, 1000, count), 64
    )


def export_resnet50(path: Path) -> None:
    """torchvision's ResNet-50, random weights, as ONNX opset 17 with a dynamic batch axis."""
    import torch
    import torchvision

    model = torchvision.models.resnet50(weights=None).eval()
    torch.onnx.export(
        model,
        (torch.zeros(1, 3, 224, 224),),
        str(path),
        input_names=["x"],
        output_names=["logits"],
        dynamic_axes={"x": {0: "N"}, "logits": {0: "N"}},
        opset_version=17,
        dynamo=False,
    )


# --- One measured process -------------------------------------------------------------------


def child(mode: str, work: Workload, device: str, gpu_math: str) -> dict[str, float | None]:
    """Run ``mode`` over the workload in this process: wall seconds, images/s, peak host and GPU memory."""
    wall = time.perf_counter()
    if mode == "audit":
        from auditor import AuditConfig, audit
        from auditor.datasets.batches import Batch

        batches = (("train", Batch(x, y)) for x, y in work.batches())
        report = audit(
            str(work.model), batches, AuditConfig(device=device, batch_size=work.batch_size, gpu_math=gpu_math)
        )
        providers = report.providers
    else:
        providers = run_plain(work, device)
    wall = time.perf_counter() - wall
    return {
        "wall": wall,
        "images_per_s": len(work.images) / wall,
        "host_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device_mib": device_mib(os.getpid()),
        "cuda": "CUDAExecutionProvider" in providers,
    }


def run_plain(work: Workload, device: str) -> list[str]:
    """Plain inference: default session options, every output fetched to the host, one call per batch."""
    import onnxruntime as ort

    from auditor.engine.modelfile import load_model
    from auditor.engine.prepare import structure_of

    model_input = structure_of(load_model(work.model)).input
    prepare = preprocessor(model_input.dtype, model_input.shape)
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device != "cpu" else ["CPUExecutionProvider"]
    session = ort.InferenceSession(str(work.model), providers=providers)
    fixed = model_input.shape[0] if isinstance(model_input.shape[0], int) else 0
    for x, _ in work.batches():
        feed = prepare(x)
        for start in range(0, len(feed), fixed or len(feed)):
            session.run(None, {model_input.name: feed[start : start + (fixed or len(feed))]})
    return session.get_providers()


def device_mib(pid: int) -> float | None:
    """GPU memory this process holds now, by ``nvidia-smi``; None where there is none to ask."""
    if shutil.which("nvidia-smi") is None:
        return None
    query = ["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"]
    done = subprocess.run(query, capture_output=True, text=True, check=False)
    for line in done.stdout.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 2 and fields[0] == str(pid) and fields[1].isdigit():
            return float(fields[1])
    return None


# --- Paired rounds ----------------------------------------------------------------------------


def rounds(name: str, args: argparse.Namespace, folder: Path) -> list[dict]:
    """``args.rounds`` rounds of the two processes; prints each round and the medians, returns the results."""
    print(f"\n== {name}")
    results = []
    for r in range(args.rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        measured = {mode: measure(name, mode, args, folder) for mode in order}
        results.append(measured)
        plain, audited = measured["plain"], measured["audit"]
        print(
            f"round {r + 1}: plain {plain['images_per_s']:,.0f} img/s, audit {audited['images_per_s']:,.0f} img/s"
            f"  → audit/plain {audited['wall'] / plain['wall']:.2f}×"
        )
    print(summarize_rounds(results))
    return results


def summarize_rounds(results: list[dict]) -> str:
    """The medians over rounds: throughput, audit ÷ plain, and peak host and GPU memory of each mode."""
    ratios = [r["audit"]["wall"] / r["plain"]["wall"] for r in results]
    lines = [f"audit ÷ plain inference: {statistics.median(ratios):.2f}× (rounds {min(ratios):.2f}–{max(ratios):.2f})"]
    for mode in MODES:
        rate = statistics.median(r[mode]["images_per_s"] for r in results)
        host = max(r[mode]["host_mib"] for r in results)
        devices = [r[mode]["device_mib"] for r in results if r[mode]["device_mib"] is not None]
        gpu = f"{max(devices):,.0f} MiB" if devices else "n/a"
        where = "CUDA" if all(r[mode]["cuda"] for r in results) else "CPU"
        lines.append(f"{mode:5s} on {where}: {rate:,.0f} img/s, peak host {host:,.0f} MiB, GPU {gpu}")
    return "\n".join(lines)


def measure(name: str, mode: str, args: argparse.Namespace, folder: Path) -> dict:
    """One fresh process running ``mode``; its own report."""
    device = ["--device", args.device, "--gpu-math", args.gpu_math]
    return child_report(__file__, name, mode, args.images, folder, device)


# --- Parity -----------------------------------------------------------------------------------


def differences(cpu: dict, cuda: dict, tolerance: float = ENTROPY_TOLERANCE) -> list[str]:
    """Where two reports (JSON dicts) disagree on states counted, distinct states or entropy (beyond ``tolerance``)."""
    found = []
    for split, ours in cpu["splits"].items():
        theirs = {layer["name"]: layer for layer in cuda["splits"][split]["layers"]}
        for layer in ours["layers"]:
            other = theirs[layer["name"]]
            where = f"{split} {layer['name']}"
            for key in ("states_total", "states_distinct"):
                if layer[key] != other[key]:
                    found.append(f"{where}: {key} {layer[key]} on the CPU, {other[key]} on CUDA")
            gap = abs(layer["entropy_bits"] - other["entropy_bits"])
            if gap > tolerance:
                found.append(f"{where}: entropies differ by {gap:.2e} bits")
    return found


def parity(device: str, limit: int | None) -> int:
    """CPU and ``device`` reports of every example model on MNIST, both splits; 1 when any differ."""
    from auditor import AuditConfig, audit
    from auditor.datasets.splits import open_splits

    failed = False
    for model in sorted(EXAMPLES.glob("*.onnx")):
        reports = {
            where: audit(str(model), open_splits("mnist", "both", limit=limit), AuditConfig(device=where)).to_dict()
            for where in ("cpu", device)
        }
        found = differences(reports["cpu"], reports[device])
        ran = ", ".join(reports[device]["providers"])
        print(f"{model.name}: {'same counts' if not found else f'{len(found)} differences'} (CPU vs {ran})")
        for line in found:
            print(f"  {line}")
        failed |= bool(found)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", default="all", choices=[*WORKLOADS, "all"])
    parser.add_argument("--rounds", type=int, default=3, help="paired rounds per workload (default 3)")
    parser.add_argument("--images", type=int, help="images per run (default: the workload's)")
    parser.add_argument("--gpu-math", default="exact", choices=("exact", "tf32"), help="the audit's CUDA math")
    parser.add_argument("--parity", action="store_true", help="compare CPU and CUDA reports of examples/*.onnx")
    parser.add_argument("--dry-run", action="store_true", help="the harness on the CPU, tiny: no GPU figures")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help=argparse.SUPPRESS)
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    parser.add_argument("--folder", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    os.environ.setdefault("AUDITOR_DATA_DIR", str(SHARED / "data"))
    if args.dry_run:
        args.device, args.rounds, args.images = "cpu", 1, args.images or 256
    folder = args.folder or Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    if args.parity:
        return parity(args.device, 300 if args.dry_run else None)
    names = WORKLOADS if args.workload == "all" else (args.workload,)
    if args.dry_run and args.workload == "all":
        names = ("lenet5-16",)  # the harness once; SqueezeNet and ResNet-50 are GPU-sized
    if args.child:
        print(json.dumps(child(args.child, gpu_workload(names[0], args.images, folder), args.device, args.gpu_math)))
        return 0
    print(f"device {args.device}, gpu_math {args.gpu_math}; ratios are audit ÷ plain onnxruntime inference")
    for name in names:
        gpu_workload(name, 1, folder)  # builds or exports the model once, before the rounds
        rounds(name, args, folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
