"""Export a trained network to ONNX and prove the file computes what PyTorch computes.

Like safetensors' ``convert_file``, nothing is returned until the converted model has been
reloaded (in onnxruntime, the engine the auditor uses) and its logits compared with PyTorch's on
real samples. The legacy TorchScript exporter (``dynamo=False``) is used: it needs no
``onnxscript``, writes no external-data file, and at opset 17 yields an IR version that
onnxruntime 1.31 accepts (≤ 13). The batch axis is dynamic; the output is the logits.
"""

from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from auditor.errors import AuditError

OPSET = 17
MAX_IR_VERSION = 13  # the newest IR version onnxruntime 1.31 loads
INPUT_NAME, OUTPUT_NAME = "input", "logits"
RTOL, ATOL = 1e-4, 1e-5


def to_onnx(model: nn.Module, sample: torch.Tensor, metadata: dict[str, str]) -> bytes:
    """The verified ONNX bytes of ``model`` in inference form, carrying ``metadata`` as metadata_props.

    ``sample`` is a batch of real inputs used to trace and to check the export; ``model`` is not
    modified (a CPU copy is exported). Raises ``AuditError`` if training diverged (weights not
    finite) or onnxruntime disagrees with PyTorch.
    """
    reference = copy.deepcopy(model).cpu().eval()
    if not all(torch.isfinite(tensor).all() for tensor in reference.state_dict().values()):
        raise AuditError("training diverged: the network's weights are NaN or infinite; lower --lr")
    sample = sample.cpu()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # dynamo=False is deprecated, still exact
        torch.onnx.export(
            reference,
            (sample,),
            buffer,
            dynamo=False,
            external_data=False,
            opset_version=OPSET,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
        )
    proto = onnx.load_from_string(buffer.getvalue())
    if proto.ir_version > MAX_IR_VERSION:
        raise AuditError(f"exported IR version {proto.ir_version} is newer than onnxruntime accepts")
    onnx.helper.set_model_props(proto, metadata)
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    verify(data, reference, sample)
    return data


def verify(data: bytes, model: nn.Module, sample: torch.Tensor) -> None:
    """Raise ``AuditError`` unless onnxruntime's logits for ``sample`` match ``model``'s.

    Two batch sizes are run (the whole sample and its first row) so a batch axis that the trace
    froze by mistake fails here rather than in the auditor.
    """
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    model = model.cpu().eval()
    for batch in (sample, sample[:1]):
        with torch.inference_mode():
            expected = model(batch).numpy()
        (actual,) = session.run([OUTPUT_NAME], {INPUT_NAME: batch.numpy()})
        if actual.shape != expected.shape or not np.allclose(actual, expected, rtol=RTOL, atol=ATOL):
            same_shape = actual.shape == expected.shape
            worst = float(np.max(np.abs(actual - expected))) if same_shape else float("nan")
            raise AuditError(
                f"ONNX export does not match PyTorch (batch {len(batch)}, max |diff| {worst:.3g}, "
                f"shapes {actual.shape} vs {expected.shape}); the file was not written"
            )
