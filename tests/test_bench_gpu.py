"""bench/bench_gpu.py's CPU side: it imports, parses, compares reports, and its harness runs dry.

The GPU figures themselves need a GPU; these tests make sure that when one is lent, the script
runs as written.
"""

from __future__ import annotations

import copy
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from auditor import AuditConfig, audit
from auditor.datasets.splits import open_splits

BENCH = Path(__file__).resolve().parents[1] / "bench" / "bench_gpu.py"


def bench_gpu():
    spec = importlib.util.spec_from_file_location("bench_gpu", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_help_names_the_workloads_and_the_parity_mode() -> None:
    done = subprocess.run([sys.executable, str(BENCH), "--help"], capture_output=True, text=True, check=False)
    assert done.returncode == 0
    assert all(word in done.stdout for word in ("--parity", "--dry-run", "resnet50", "squeezenet", "lenet5-16"))


def test_parity_finds_every_difference_in_counts_and_only_entropies_past_the_tolerance() -> None:
    bench = bench_gpu()
    model = Path(__file__).resolve().parents[1] / "examples" / "lenet300_11_4.onnx"
    report = audit(str(model), open_splits("mnist", "test", limit=200), AuditConfig(device="cpu")).to_dict()
    assert bench.differences(report, copy.deepcopy(report)) == []
    other = copy.deepcopy(report)
    first, second = other["splits"]["test"]["layers"][:2]
    first["states_distinct"] += 1
    second["entropy_bits"] += 2e-6
    found = bench.differences(report, other)
    assert len(found) == 2 and "states_distinct" in found[0] and "entropies differ" in found[1]
    second["entropy_bits"] -= 1.5e-6  # 5e-7 bits apart: within the bound
    assert len(bench.differences(report, other)) == 1


def test_rounds_are_summarized_with_medians_and_memory() -> None:
    bench = bench_gpu()
    plain = {"wall": 1.0, "images_per_s": 1000.0, "host_mib": 300.0, "device_mib": None, "cuda": False}
    audited = {"wall": 2.5, "images_per_s": 400.0, "host_mib": 500.0, "device_mib": None, "cuda": False}
    text = bench.summarize_rounds([{"plain": plain, "audit": audited}])
    assert "audit ÷ plain inference: 2.50×" in text and "GPU n/a" in text and "peak host 500 MiB" in text


@pytest.mark.slow
def test_a_dry_run_measures_the_harness_on_the_cpu() -> None:
    done = subprocess.run(
        [sys.executable, str(BENCH), "--dry-run"], capture_output=True, text=True, check=False, timeout=300
    )
    assert done.returncode == 0, done.stderr
    assert "== lenet5-16" in done.stdout and "audit ÷ plain inference" in done.stdout
