"""The device path's orchestration, on the CPU: real IOBinding, a numpy-backed stand-in for CuPy.

onnxruntime's IOBinding binds the exposed outputs to the CPU here (to CUDA on a GPU), DLPack
hands them to ``fakedevice`` without a copy, and the states are counted by the same code that
counts them in CuPy. A whole audit through that path must give the host audit's report, field
for field, and only distinct (key, count) pairs may cross to the host.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import fakedevice
import numpy as np
import pytest
from models import CASES, lenet_model, mlp

from auditor import AuditConfig, audit, prepare
from auditor.datasets.batches import Batch
from auditor.datasets.splits import open_splits
from auditor.engine.devrun import NO_CUPY, Device, DeviceRun, counting_device
from auditor.engine.prepare import Prepared
from auditor.engine.run import CPU_ONLY, GPU_PROVIDERS

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
CPU = AuditConfig(device="cpu")
STAND_IN = Device(
    xp=fakedevice,
    ort_device="cpu",
    from_dlpack=fakedevice.from_dlpack,
    to_host=fakedevice.asnumpy,
    stream=fakedevice.stream,
)


def on_stand_in(prepared: Prepared) -> Prepared:
    return replace(prepared, device=STAND_IN)


def same_reports(model: object, data: object, config: AuditConfig = CPU) -> None:
    prepared = prepare(model, device="cpu")
    host = audit(prepared, data, config)
    device = audit(on_stand_in(prepared), data, config)
    assert device.to_dict() == host.to_dict()


def test_the_trained_example_audited_through_the_device_path_gives_the_host_report() -> None:
    same_reports(str(EXAMPLES / "lenet5_3_9_4.onnx"), open_splits("mnist", "both", limit=1500))


@pytest.mark.parametrize("neurons", [20, 65, 130])
def test_wide_layers_through_the_device_path_give_the_host_report(neurons: int) -> None:
    model, x, _ = CASES["conv"](neurons)
    batches = [("test", Batch(x[:25])), ("test", Batch(x[25:]))]
    same_reports(model, batches, replace(CPU, include_output_layer=True))


def test_a_fixed_batch_model_runs_in_padded_chunks_on_the_device() -> None:
    """A batch of 10 through a model of batch 4: chunks of 4, 4 and 2 (padded), the padding cut off."""
    x = np.random.default_rng(0).integers(0, 256, (10, 28, 28), dtype=np.uint8)
    same_reports(lenet_model(batch=4), [("test", Batch(x, np.arange(10) % 10))])


def test_a_budget_that_spills_gives_the_same_report_on_the_device_path(tmp_path: Path) -> None:
    model, x, _ = CASES["dense"](130)
    spilling = replace(CPU, memory_budget=1 << 12, batch_size=50)
    prepared = prepare(model, device="cpu")
    host = audit(prepared, [("test", Batch(x))], CPU)
    device = audit(on_stand_in(prepared), [("test", Batch(x))], spilling, spill_dir=tmp_path)
    assert device.spilled_bytes > 0
    assert replace(device, config=host.config, spilled_bytes=0).to_dict() == replace(host, spilled_bytes=0).to_dict()


def test_only_distinct_pairs_and_per_sample_outputs_cross_to_the_host() -> None:
    prepared = prepare(lenet_model(), device="cpu")
    x = np.zeros((256, 28, 28), np.uint8)  # one state per layer and position: the runs are tiny
    names = prepared.exposed.output_names
    whole = sum(a.nbytes for a in prepared.runner.run(x.astype(np.float32)[:, None] / 255, names).values())
    counted = frozenset(out.layer.name for out in prepared.exposed.layers)
    run = DeviceRun(prepared.runner.session, prepared.structure.input, prepared.exposed, counted, STAND_IN)
    before = fakedevice.HOST_BYTES[0]
    outputs = run.run(x.astype(np.float32)[:, None] / 255)
    crossed = fakedevice.HOST_BYTES[0] - before
    assert all(outputs[out.keys].run is not None for out in prepared.exposed.layers)
    assert crossed < whole / 4  # the keys of 256 × 641 states stayed on the device


def test_counting_follows_cuda_to_the_gpu_or_says_in_one_line_that_it_could_not() -> None:
    assert counting_device(CPU_ONLY) == (None, [])
    device, warnings = counting_device(GPU_PROVIDERS)  # CI has no CuPy and no GPU
    assert device is None and warnings == [NO_CUPY] and "\n" not in NO_CUPY


def test_the_fallback_warning_reaches_the_report_once() -> None:
    prepared = replace(prepare(mlp([4, 5, 3]), device="cpu"), counting_warnings=(NO_CUPY,))
    x = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    report = audit(prepared, [("test", Batch(x[:10])), ("test", Batch(x[10:]))], CPU)
    assert report.warnings.count(NO_CUPY) == 1
