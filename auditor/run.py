"""onnxruntime at the edge: building sessions on the best provider, and overlapping work.

CUDA is used when onnxruntime can really start it; otherwise the session runs on the CPU.
Only ``session.get_providers()`` tells which providers run (FIELD-NOTES), so that is what the
report records.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections.abc import Iterable, Iterator
from typing import TypeVar

import onnx
import onnxruntime as ort

from auditor.errors import AuditError, ModelError

T = TypeVar("T")

# onnxruntime-gpu on a machine without CUDA logs an error line per session before falling back;
# the fallback is expected, and the report shows which provider ran.
ort.set_default_logger_severity(4)


def requested_providers(device: str) -> list[str]:
    """Providers to ask for: CUDA first when wanted and built in, the CPU always as fallback."""
    if device != "cpu" and "CUDAExecutionProvider" in ort.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


def create_session(model: onnx.ModelProto, device: str = "auto", threads: int = 0) -> ort.InferenceSession:
    """An onnxruntime session for ``model``; refuses models onnxruntime cannot load.

    ``device="cuda"`` insists on CUDA and says so when it cannot start; ``"auto"`` falls back.
    """
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=requested_providers(device))
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"onnxruntime cannot load the model: {first}; re-export it with a supported opset") from None
    if device == "cuda" and "CUDAExecutionProvider" not in session.get_providers():
        raise AuditError(
            "CUDA was requested but onnxruntime could not start it (no GPU, or CUDA/cuDNN libraries "
            "missing); use --device auto or --device cpu"
        )
    return session


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, ``depth`` ahead, so producing overlaps consuming.

    onnxruntime and numpy release the GIL, so inference of the next batch runs while the
    caller counts the current one. Exceptions reach the caller; closing the iterator stops
    the producer.
    """
    box: queue.Queue[tuple[str, object]] = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def produce() -> None:
        try:
            for item in items:
                if stop.is_set():
                    return
                box.put(("item", item))
            box.put(("done", None))
        except BaseException as exc:
            box.put(("error", exc))

    worker = threading.Thread(target=produce, name="auditor-prefetch", daemon=True)
    worker.start()
    try:
        while True:
            kind, value = box.get()
            if kind == "done":
                return
            if kind == "error":
                raise value  # type: ignore[misc]
            yield value  # type: ignore[misc]
    finally:
        stop.set()
        while worker.is_alive():
            with contextlib.suppress(queue.Empty):
                box.get(timeout=0.05)
