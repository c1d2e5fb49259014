"""Conversions between the auditor's Python values and the ``auditor.v1`` protobuf messages.

Each converter comes in a pair, one per end of the wire, so the client and the server cannot
drift apart. Everything that arrives from the network is checked here and refused with a
``DataError`` or ``AuditError`` naming the field, before any of it reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import fields
from datetime import UTC
from typing import Any

import numpy as np

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.config import AuditConfig
from auditor.data import SPLITS, Batch
from auditor.errors import DataError
from auditor.persist import StoredReport
from auditor.report import ModelInfo, Report

# KServe v2 datatype names and the numpy types they carry (always little-endian on the wire).
DATATYPES: dict[str, np.dtype] = {
    name: np.dtype(kind).newbyteorder("<")
    for name, kind in [
        ("BOOL", np.bool_), ("UINT8", np.uint8), ("UINT16", np.uint16), ("UINT32", np.uint32),
        ("UINT64", np.uint64), ("INT8", np.int8), ("INT16", np.int16), ("INT32", np.int32),
        ("INT64", np.int64), ("FP16", np.float16), ("FP32", np.float32), ("FP64", np.float64),
    ]
}  # fmt: skip
_NAMES = {dtype.newbyteorder("="): name for name, dtype in DATATYPES.items()}
SUMMARY_FIELDS = ("accuracy", "aiq", "network_efficiency", "cna")


def array_to_tensor(array: np.ndarray) -> pb.Tensor:
    """An array as a tensor message: C order, little-endian bytes."""
    array = np.asarray(array)
    name = _NAMES.get(array.dtype.newbyteorder("="))
    if name is None:
        raise DataError(f"arrays of dtype {array.dtype} cannot be sent; use one of {sorted(DATATYPES)}")
    raw = np.ascontiguousarray(array, dtype=DATATYPES[name]).tobytes()
    return pb.Tensor(datatype=name, shape=array.shape, raw_contents=raw)


def tensor_to_array(tensor: pb.Tensor, what: str) -> np.ndarray:
    """The array a tensor message holds (read-only, no copy); ``what`` names it in errors."""
    dtype = DATATYPES.get(tensor.datatype)
    if dtype is None:
        raise DataError(f"{what}: unknown datatype {tensor.datatype!r}; use one of {sorted(DATATYPES)}")
    shape = tuple(tensor.shape)
    if not shape or any(d < 0 for d in shape):
        raise DataError(f"{what}: shape {list(shape)} is not valid: samples first, no negative dims")
    expected = math.prod(shape) * dtype.itemsize
    if expected != len(tensor.raw_contents):
        raise DataError(
            f"{what}: shape {list(shape)} of {tensor.datatype} needs {expected} bytes but "
            f"{len(tensor.raw_contents)} arrived; send C-order little-endian bytes"
        )
    return np.frombuffer(tensor.raw_contents, dtype=dtype).reshape(shape)


def batch_to_proto(split: str, batch: Batch) -> pb.SampleBatch:
    labels = None if batch.y is None else array_to_tensor(batch.y)
    return pb.SampleBatch(split=split, samples=array_to_tensor(batch.x), labels=labels)


def batch_from_proto(message: pb.SampleBatch) -> tuple[str, Batch]:
    """A ``(split, Batch)`` pair as ``audit`` takes it; the engine checks labels against samples."""
    if message.split not in SPLITS:
        raise DataError(f"batch split {message.split!r} is not one of {SPLITS}")
    x = tensor_to_array(message.samples, f"{message.split} samples")
    y = tensor_to_array(message.labels, f"{message.split} labels") if message.HasField("labels") else None
    return message.split, Batch(x, y)


def config_to_settings(config: AuditConfig) -> pb.AuditSettings:
    """Every field of ``config``, set explicitly, so the server audits with exactly these settings."""
    values = config.to_dict()
    low, high = values.pop("alpha_range")
    settings = pb.AuditSettings(alpha_range=pb.Range(low=low, high=high))
    for name, value in values.items():
        if value is not None:
            setattr(settings, name, value)
    return settings


def settings_to_config(settings: pb.AuditSettings) -> AuditConfig:
    """The ``AuditConfig`` the settings describe; unset fields take its defaults."""
    values: dict[str, Any] = {
        f.name: getattr(settings, f.name)
        for f in fields(AuditConfig)
        if f.name != "alpha_range" and settings.HasField(f.name)
    }
    if settings.HasField("alpha_range"):
        values["alpha_range"] = (settings.alpha_range.low, settings.alpha_range.high)
    return AuditConfig.from_dict(values)


def summary_to_proto(stored: StoredReport) -> pb.ReportSummary:
    """The typed headline figures of a stored report."""
    summary = pb.ReportSummary(id=stored.id, model_sha256=stored.model_sha256)
    summary.created.FromDatetime(stored.created)
    for name, split in stored.report.splits.items():
        figures = summary.splits[name]
        figures.samples = split.samples
        for key in SUMMARY_FIELDS:
            if getattr(split, key) is not None:
                setattr(figures, key, getattr(split, key))
    return summary


def summary_from_proto(summary: pb.ReportSummary) -> dict[str, Any]:
    """A summary as JSON-ready values: id, model_sha256, created (ISO 8601) and figures per split."""
    return {
        "id": summary.id,
        "model_sha256": summary.model_sha256,
        "created": summary.created.ToDatetime(tzinfo=UTC).isoformat(),
        "summary": {
            name: {
                "samples": split.samples,
                **{key: getattr(split, key) if split.HasField(key) else None for key in SUMMARY_FIELDS},
            }
            for name, split in summary.splits.items()
        },
    }


def report_to_proto(stored: StoredReport) -> pb.Report:
    return pb.Report(summary=summary_to_proto(stored), report_json=stored.report.to_json(indent=None))


def report_from_proto(message: pb.Report) -> Report:
    return Report.from_json(message.report_json)


def model_info_to_proto(info: ModelInfo) -> pb.DescribeModelResponse:
    """What the auditor found in a model: its input and its layers."""
    return pb.DescribeModelResponse(
        sha256=info.sha256,
        name=info.name,
        producer=info.producer,
        opset=info.opset,
        input_name=info.input_name,
        input_shape=[_dim(d) for d in info.input_shape],
        input_dtype=info.input_dtype,
        layers=[
            pb.Layer(
                name=layer.name,
                op=layer.op,
                activation=layer.activation,
                role=layer.role,
                neurons=layer.neurons,
                positions=layer.positions,
            )
            for layer in info.layers
        ],
    )


def _dim(value: int | str | None) -> pb.Dim:
    if isinstance(value, int):
        return pb.Dim(size=value)
    return pb.Dim(param=value) if value else pb.Dim()
