"""The device path: a batch's exposed outputs stay on the GPU and its states are counted there.

When CUDA runs the session and CuPy can reach the GPU, ``DeviceRun`` binds every exposed output
to the device with onnxruntime's IOBinding, hands them to CuPy through DLPack (no copy), counts
each counted layer's keys there (``devcount``: join, sort, run-length-encode) and brings back
only the distinct (key, count) pairs and the small per-sample outputs (sums, scores). The host
stores take those runs as they take their own, so spilling, sharding and exact counts are
unchanged (docs/counting.md).

The audit loop runs ``DeviceRun.run`` on two worker threads, each counting on a stream of its
own, so one batch's counting overlaps the next batch's inference. CuPy is imported on first
use; without it, or without a GPU it can see, a CUDA audit counts on the host as before and its
report says so in one warning. ``Device`` names what the path needs of an array module, so the
tests run the same orchestration, with real IOBinding on the CPU, through a numpy-backed stand-in.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from auditor.engine.devcount import CountedKeys, count_packed
from auditor.engine.expose import Exposed
from auditor.engine.find import ModelInput
from auditor.engine.run import CUDA
from auditor.errors import DataError, ModelError, first_line

DEVICE_WORKERS = 2  # batches in flight: one counting while the next one runs
NO_CUPY = (
    "states were counted on the host: CUDA ran the model, but CuPy is not installed or sees no GPU; "
    "install the gpu extra (pip install 'onnx-auditor[gpu]') to count them on the GPU"
)


@dataclass(frozen=True)
class Device:
    """An array module on a device, and how the device path reaches it.

    ``ort_device`` is where onnxruntime writes bound outputs ("cuda"; "cpu" for a stand-in),
    ``from_dlpack`` takes an onnxruntime ``OrtValue`` without a copy, ``to_host`` copies an
    array to a numpy one, and ``stream()`` opens a context whose work runs on a stream of its own.
    """

    xp: ModuleType
    ort_device: str
    from_dlpack: Callable[[Any], Any]
    to_host: Callable[[Any], np.ndarray]
    stream: Callable[[], AbstractContextManager[Any]]


@functools.cache
def cupy_device() -> Device | None:
    """CuPy on the current GPU, imported on first use; None when CuPy is missing or sees no GPU."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() < 1:
            return None
    except Exception:  # ImportError, or CUDA's own errors when the driver or the libraries are missing
        return None
    return Device(
        xp=cupy,
        ort_device="cuda",
        from_dlpack=cupy.from_dlpack,
        to_host=cupy.asnumpy,
        stream=lambda: cupy.cuda.Stream(non_blocking=True),
    )


def counting_device(providers: Sequence[str]) -> tuple[Device | None, list[str]]:
    """Where a session's states are counted: CuPy's GPU when CUDA runs and CuPy can reach it, else
    the host (None); with the report's warning when CUDA runs but the states cannot follow it."""
    if CUDA not in providers:
        return None, []
    device = cupy_device()
    return device, [] if device is not None else [NO_CUPY]


class DeviceRun:
    """Runs one batch with outputs on ``device`` and counts the ``counted`` layers' states there.

    ``run(feed)`` answers the runner's ``{name: array}``, except that each layer's keys come
    back as ``CountedKeys`` (a run of distinct keys with counts, or only how many states there
    were for a layer that is not counted). Batches are cut as ``run.Session`` cuts them: a model
    of fixed batch size runs in chunks of that size, the last one zero-padded and the padding cut
    off on the device; others in calls of ``call_rows`` samples when given (a GPU runner gives
    none), so both paths compute every number in the same session calls.
    """

    def __init__(
        self,
        session: Any,
        model_input: ModelInput,
        exposed: Exposed,
        counted: frozenset[str],
        device: Device,
        call_rows: int | None = None,
    ) -> None:
        self.session = session
        self.call_rows = call_rows
        self.input = model_input
        self.exposed = exposed
        self.counted = counted
        self.device = device
        self.names = exposed.output_names

    def run(self, feed: np.ndarray) -> dict[str, Any]:
        device = self.device
        with device.stream():
            outputs = self._outputs(feed)
            result: dict[str, Any] = {}
            for out in self.exposed.layers:
                packed = outputs.pop(out.keys)
                if out.layer.name in self.counted:
                    result[out.keys] = count_packed(packed, out.groups, out.group_axis, device.xp, device.to_host)
                else:
                    result[out.keys] = CountedKeys(int(packed.size) // len(out.groups), None)
            result.update({name: device.to_host(value) for name, value in outputs.items()})
        return result

    def _outputs(self, feed: np.ndarray) -> dict[str, Any]:
        """Every exposed output of the batch, on the device, the batch on the first axis."""
        dims = self.input.shape
        fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 0
        rows = fixed or self.call_rows or len(feed)
        if rows == len(feed) or (not fixed and rows > len(feed)):
            return self._bound_run(feed)
        xp, chunks = self.device.xp, []
        for start in range(0, len(feed), rows):
            part = feed[start : start + rows]
            n = len(part)
            if fixed and n < fixed:
                part = np.concatenate([part, np.zeros((fixed - n, *part.shape[1:]), part.dtype)])
            outputs = self._bound_run(part)
            for name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != len(part):
                    raise ModelError(
                        f"output {name!r} has shape {tuple(value.shape)} for {len(part)} samples; the auditor "
                        "needs outputs with the batch on their first axis"
                    )
            chunks.append({name: value[:n] for name, value in outputs.items()})
        return {name: xp.concatenate([chunk[name] for chunk in chunks]) for name in self.names}

    def _bound_run(self, feed: np.ndarray) -> dict[str, Any]:
        binding = self.session.io_binding()
        binding.bind_cpu_input(self.input.name, np.ascontiguousarray(feed))
        for name in self.names:
            binding.bind_output(name, self.device.ort_device)
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's own exception types are not exported
            raise DataError(
                f"onnxruntime rejected a batch of shape {feed.shape}: {first_line(exc)}; "
                "check the data shape and --batch-size"
            ) from None
        binding.synchronize_outputs()
        return {
            name: self.device.from_dlpack(value) for name, value in zip(self.names, binding.get_outputs(), strict=True)
        }
