"""onnxruntime at the edge: sessions on the best provider, runs keyed by name, overlapping work.

CUDA is used when onnxruntime can really start it; otherwise the session runs on the CPU.
Only ``session.get_providers()`` tells which providers run (FIELD-NOTES), so that is what the
report records, with the CUDA provider's options when CUDA runs. A CUDA session computes in
full fp32 unless ``gpu_math="tf32"`` asks otherwise (``cuda_provider_options``; see
docs/counting.md for why, and for the cuDNN settings that keep states repeatable). A ``Session``
owns one session and answers ``run(feed) -> {name: array}``, feeding models of a fixed batch
size in chunks of that size and, on the CPU, others in cache-sized calls; ``probe_shapes``
measures tensor shapes that shape inference could not give.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import ModuleType
from typing import TYPE_CHECKING, TypeVar

import numpy as np
import onnx
from onnx import helper

from auditor.engine.expose import with_outputs
from auditor.engine.find import ModelInput
from auditor.errors import AuditError, DataError, ModelError, first_line

if TYPE_CHECKING:
    import onnxruntime as ort

T = TypeVar("T")
R = TypeVar("R")
CUDA = "CUDAExecutionProvider"
GPU_PROVIDERS = [CUDA, "CPUExecutionProvider"]
CPU_ONLY = ["CPUExecutionProvider"]
_CUDA_DRIVER = {"linux": "libcuda.so.1", "win32": "nvcuda.dll"}  # what the CUDA provider loads first


@functools.cache
def onnxruntime() -> ModuleType:
    """onnxruntime, imported on first use: ``import auditor`` and the health probe never load it."""
    import onnxruntime as ort

    # onnxruntime-gpu on a machine without CUDA logs an error line per session before falling
    # back; the fallback is expected, and the report shows which provider ran.
    ort.set_default_logger_severity(4)
    return ort


@functools.cache
def cuda_usable() -> bool:
    """Whether onnxruntime can really run on CUDA here: a one-node probe session, run once.

    ``get_available_providers()`` lists CUDA whenever onnxruntime-gpu is installed, even on a
    machine without a GPU (FIELD-NOTES); only a session's ``get_providers()`` tells the truth.
    Where the CUDA driver library does not even load, no CUDA session can start, and the probe
    (about 60 ms: onnxruntime loads its CUDA provider to find that out) is skipped.
    """
    return cuda_driver_loads() and cuda_probe()


def cuda_driver_loads() -> bool:
    """Whether the CUDA driver library loads in this process; True where its name is unknown."""
    name = _CUDA_DRIVER.get(sys.platform)
    if name is None:
        return True
    try:
        ctypes.CDLL(name)
    except OSError:
        return False
    return True


def cuda_probe() -> bool:
    """Whether a one-node session asked to run on CUDA really runs there."""
    ort = onnxruntime()
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    node = helper.make_node("Identity", ["x"], ["y"])
    value = helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    graph = helper.make_graph([node], "probe", [value], [helper.make_tensor_value_info("y", 1, [1])])
    probe = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)
    session = ort.InferenceSession(probe.SerializeToString(), providers=GPU_PROVIDERS)
    return "CUDAExecutionProvider" in session.get_providers()


def requested_providers(device: str) -> list[str]:
    """Providers to ask for: CUDA first when wanted and able to run, the CPU always as fallback."""
    if device != "cpu" and cuda_usable():
        return GPU_PROVIDERS
    return CPU_ONLY


def cuda_provider_options(gpu_math: str) -> dict[str, str]:
    """The CUDA provider's options for ``gpu_math`` ("exact" or "tf32"); see docs/counting.md.

    - ``use_tf32``: the provider's default (1) lets cuBLAS and cuDNN round fp32 inputs to TF32's
      10-bit mantissa, which flips firing bits near zero (FIELD-NOTES). Off unless asked for.
    - ``cudnn_conv_algo_search=DEFAULT``: the provider's default (EXHAUSTIVE) times every cuDNN
      convolution algorithm when a shape is first seen and keeps the fastest, so two sessions can
      pick different algorithms, which round differently. DEFAULT always takes the same one.
    """
    return {"use_tf32": "1" if gpu_math == "tf32" else "0", "cudnn_conv_algo_search": "DEFAULT"}


def with_provider_options(providers: list[str], gpu_math: str) -> list[str | tuple[str, dict[str, str]]]:
    """``providers`` as onnxruntime takes them, the CUDA provider with ``cuda_provider_options(gpu_math)``."""
    return [(name, cuda_provider_options(gpu_math)) if name == CUDA else name for name in providers]


def gpu_math_warnings(provider_options: dict[str, dict[str, str]] | None, gpu_math: str) -> list[str]:
    """The report's warning when CUDA ran with TF32 math (``provider_options`` None: it did not run)."""
    if provider_options is None or gpu_math != "tf32":
        return []
    return [
        "state counts are approximate: CUDA ran with TF32 math (gpu_math tf32), which can flip firing bits "
        "near zero; audit with gpu_math exact for exact counts"
    ]


def create_session(
    model: onnx.ModelProto, device: str = "auto", threads: int | None = None, gpu_math: str = "exact"
) -> ort.InferenceSession:
    """An onnxruntime session for ``model``; refuses models onnxruntime cannot load.

    ``device="cuda"`` insists on CUDA and says so when it cannot start; ``"auto"`` falls back.
    ``threads`` is onnxruntime's intra-op thread count (0: one per core); by default 1 on the
    CPU, where the audit runs one call per core side by side (``workers_for``), else 0. A CUDA
    session gets ``cuda_provider_options(gpu_math)`` and deterministic kernels (onnxruntime's
    ``use_deterministic_compute``: no atomics-ordered reductions).
    """
    providers = requested_providers(device)
    if threads is None:
        threads = 1 if providers == CPU_ONLY else 0
    if device == "cuda" and not cuda_usable():
        raise AuditError(
            "CUDA was requested but onnxruntime cannot start it (no GPU, or CUDA/cuDNN libraries "
            "missing); use --device auto or --device cpu"
        )
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    if CUDA in providers:
        options.use_deterministic_compute = True
    try:
        session = ort.InferenceSession(
            model.SerializeToString(), options, providers=with_provider_options(providers, gpu_math)
        )
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise ModelError(
            f"onnxruntime cannot load the model: {first_line(exc)}; re-export it with a supported opset"
        ) from None
    return session


class Session:
    """One onnxruntime session over a model with one data input; outputs come back by name.

    Safe to share between threads (onnxruntime's ``run`` is). ``workers`` is how many runs to
    keep side by side (``workers_for``). ``call_rows`` caps the samples of one session call on
    the CPU, where calls whose activations stay in the core's cache run faster
    (docs/performance.md, "Cache-sized session calls"); a GPU session takes each batch whole.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        model_input: ModelInput,
        device: str = "auto",
        call_rows: int | None = None,
        gpu_math: str = "exact",
    ) -> None:
        if call_rows is not None and call_rows < 1:
            raise ValueError(f"call_rows must be at least 1, got {call_rows}")
        self.session = create_session(model, device, gpu_math=gpu_math)
        self.gpu_math = gpu_math
        self.input = model_input
        self.workers = workers_for(self.session)
        self.call_rows = call_rows if self.providers == CPU_ONLY else None

    @property
    def providers(self) -> list[str]:
        """The providers that really run this session, CUDA first when it does."""
        return list(self.session.get_providers())

    @property
    def provider_options(self) -> dict[str, dict[str, str]] | None:
        """The CUDA provider's options as onnxruntime reports them, when CUDA runs this session; else None."""
        if CUDA not in self.providers:
            return None
        return {CUDA: dict(self.session.get_provider_options().get(CUDA, {}))}

    def run(self, feed: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The outputs ``names`` for a batch, in calls of at most ``call_rows`` samples; a model of
        fixed batch size gets it in chunks of that size, the last one zero-padded and the padding
        cut off again."""
        dims = self.input.shape
        fixed = dims[0] if dims and isinstance(dims[0], int) and dims[0] > 0 else 0
        rows = fixed or self.call_rows or len(feed)
        if rows == len(feed) or (not fixed and rows > len(feed)):
            return self._run(feed, names)
        chunks = []
        for start in range(0, len(feed), rows):
            part = feed[start : start + rows]
            n = len(part)
            if fixed and n < fixed:
                part = np.concatenate([part, np.zeros((fixed - n, *part.shape[1:]), part.dtype)])
            outputs = self._run(part, names)
            for name, out in outputs.items():
                if out.ndim == 0 or out.shape[0] != len(part):
                    raise ModelError(
                        f"output {name!r} has shape {out.shape} for {len(part)} samples; the auditor needs "
                        "outputs with the batch on their first axis"
                    )
            chunks.append({name: out[:n] for name, out in outputs.items()} if n < len(part) else outputs)
        return {name: np.concatenate([chunk[name] for chunk in chunks]) for name in names}

    def _run(self, feed: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        try:
            outputs = self.session.run(list(names), {self.input.name: feed})
        except Exception as exc:  # onnxruntime's own exception types are not exported
            raise DataError(
                f"onnxruntime rejected a batch of shape {feed.shape}: {first_line(exc)}; "
                "check the data shape and --batch-size"
            ) from None
        return dict(zip(names, outputs, strict=True))


def probe_shapes(model: onnx.ModelProto, model_input: ModelInput, names: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """The shapes of tensors ``names`` on one zero sample, or {} when the sample shape is unknown.

    Shape inference "is not guaranteed to be complete" (custom ops, computed Reshapes); when the
    input's sample shape is static, one run on the CPU tells the real shapes.
    """
    dims = model_input.shape
    if not names or len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return {}
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1
    probe = Session(with_outputs(model, names), model_input, "cpu")
    outputs = probe.run(np.zeros((batch, *dims[1:]), model_input.dtype), names)
    return {name: value.shape for name, value in outputs.items()}


def workers_for(session: ort.InferenceSession) -> int:
    """How many batches to run at once: one per core on the CPU, one on a GPU.

    Small networks gain more from batches side by side on single-threaded runs than from one
    run split across threads (FIELD-NOTES), and counts merge by adding, so order is free.
    """
    if "CUDAExecutionProvider" in session.get_providers():
        return 1
    return max(1, min(os.cpu_count() or 1, 8))


def ordered_map(fn: Callable[[T], R], items: Iterable[T], workers: int) -> Iterator[R]:
    """``map(fn, items)`` on ``workers`` threads, results in input order, a bounded number ahead.

    onnxruntime and numpy release the GIL, so while the caller consumes one result the next
    ones are computed. At most ``2 * workers`` items are in flight; an exception reaches the
    caller, and closing the iterator cancels what has not started.
    """
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="auditor-run")
    pending: deque[Future[R]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
