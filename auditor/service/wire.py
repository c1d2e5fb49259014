"""Conversions between the auditor's Python values and the ``auditor.v1`` protobuf messages.

Each converter comes in a pair, one per end of the wire, so the client and the server cannot
drift apart. Everything that arrives from the network is checked here and refused with a
``DataError`` or ``AuditError`` naming the field, before any of it reaches the engine.
"""

from __future__ import annotations

import math
from dataclasses import fields
from datetime import UTC, datetime
from typing import Any

import numpy as np

from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.config import AuditConfig
from auditor.datasets.batches import Batch
from auditor.errors import AuditError, DataError
from auditor.records import SPLITS, AuditSpec, DatasetRef, Job, StoredReport, check_content_address
from auditor.report import ModelInfo, Report, ReportError

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
MAX_RANK = 16  # samples first; image data has 4 dims, numpy allows 64
MAX_DIM = 2**40
MAX_NAME_BYTES = 255  # a model's name in its report
JOB_STATES = {
    "queued": pb.JOB_STATE_QUEUED,
    "running": pb.JOB_STATE_RUNNING,
    "done": pb.JOB_STATE_DONE,
    "failed": pb.JOB_STATE_FAILED,
    "cancelled": pb.JOB_STATE_CANCELLED,
}


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
    if not 1 <= len(shape) <= MAX_RANK:
        raise DataError(f"{what}: a tensor has 1 to {MAX_RANK} dims (samples first), not {len(shape)}")
    if any(not 0 <= d <= MAX_DIM for d in shape):
        raise DataError(f"{what}: shape {list(shape)} is not valid: every dim in 0..2**40")
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
        if f.name != "alpha_range" and f.name in _SETTINGS and settings.HasField(f.name)
    }
    if settings.HasField("alpha_range"):
        values["alpha_range"] = (settings.alpha_range.low, settings.alpha_range.high)
    return AuditConfig.from_dict(values)


_SETTINGS = frozenset(pb.AuditSettings.DESCRIPTOR.fields_by_name)


def dataset_to_proto(ref: DatasetRef) -> pb.DatasetRef:
    return pb.DatasetRef(name=ref.name, split=ref.split, limit=ref.limit)


def dataset_from_proto(message: pb.DatasetRef) -> DatasetRef:
    """The dataset a DatasetRef names; an empty split means "test", as on the command line."""
    limit = message.limit if message.HasField("limit") else None
    return DatasetRef(message.name, message.split or "test", limit)


def start_to_proto(spec: AuditSpec) -> pb.AuditStart:
    start = pb.AuditStart(
        model_sha256=spec.content_address, settings=config_to_settings(spec.config), model_name=spec.model_name
    )
    if spec.dataset is not None:
        start.dataset.CopyFrom(dataset_to_proto(spec.dataset))
    return start


def start_from_proto(start: pb.AuditStart) -> AuditSpec:
    """What an AuditStart asks for, every part checked: the address's form, the name, the settings."""
    return AuditSpec(
        content_address=check_content_address(start.model_sha256),
        model_name=check_model_name(start.model_name),
        config=settings_to_config(start.settings),
        dataset=dataset_from_proto(start.dataset) if start.HasField("dataset") else None,
    )


def check_model_name(name: str) -> str:
    """A model's name for its report: at most 255 bytes, no control characters ("" = keep the stored name)."""
    if len(name.encode()) > MAX_NAME_BYTES or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
        raise AuditError(f"model_name must be at most {MAX_NAME_BYTES} bytes with no control characters")
    return name


def job_to_proto(job: Job) -> pb.Job:
    start = start_to_proto(job.spec)
    message = pb.Job(
        id=job.id,
        content_address=job.spec.content_address,
        model_name=job.spec.model_name,
        dataset=start.dataset,
        settings=start.settings,
        state=JOB_STATES[job.state],
        samples_done=dict(job.samples),
        queue_position=job.queue_position,
        error=job.error,
        report_id=job.report_id,
        restarts=job.restarts,
    )
    for name in ("created", "started", "finished"):
        if getattr(job, name) is not None:
            getattr(message, name).FromDatetime(getattr(job, name))
    return message


def job_from_proto(message: pb.Job) -> Job:
    states = {number: name for name, number in JOB_STATES.items()}
    spec = AuditSpec(
        message.content_address,
        message.model_name,
        settings_to_config(message.settings),
        dataset_from_proto(message.dataset) if message.HasField("dataset") else None,
    )
    return Job(
        id=message.id,
        spec=spec,
        state=states.get(message.state, "unknown"),
        samples=dict(message.samples_done),
        error=message.error,
        report_id=message.report_id,
        created=message.created.ToDatetime(tzinfo=UTC),
        started=_time(message, "started"),
        finished=_time(message, "finished"),
        restarts=message.restarts,
        queue_position=message.queue_position if message.HasField("queue_position") else None,
    )


def _time(message: pb.Job, name: str) -> datetime | None:
    return getattr(message, name).ToDatetime(tzinfo=UTC) if message.HasField(name) else None


def summary_to_proto(stored: StoredReport) -> pb.ReportSummary:
    """The typed headline figures of a stored report."""
    summary = pb.ReportSummary(id=stored.id, model_sha256=stored.content_address)
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
    """The report a server sent, checked as strictly as any report from outside (``Report.load``)."""
    try:
        return Report.load(message.report_json)
    except ReportError as exc:
        raise AuditError(f"the server sent a report this client cannot read ({exc})") from None


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
                block_output=layer.block_output,
            )
            for layer in info.layers
        ],
    )


def _dim(value: int | str | None) -> pb.Dim:
    if isinstance(value, int):
        return pb.Dim(size=value)
    return pb.Dim(param=value) if value else pb.Dim()
