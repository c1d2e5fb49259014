import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_QUEUED: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_DONE: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_QUEUED: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_DONE: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState

class HasModelRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class HasModelResponse(_message.Message):
    __slots__ = ("present",)
    PRESENT_FIELD_NUMBER: _ClassVar[int]
    present: bool
    def __init__(self, present: _Optional[bool] = ...) -> None: ...

class UploadModelRequest(_message.Message):
    __slots__ = ("file", "content")
    FILE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    file: str
    content: bytes
    def __init__(self, file: _Optional[str] = ..., content: _Optional[bytes] = ...) -> None: ...

class UploadModelResponse(_message.Message):
    __slots__ = ("sha256", "created")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    created: bool
    def __init__(self, sha256: _Optional[str] = ..., created: _Optional[bool] = ...) -> None: ...

class DescribeModelRequest(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    def __init__(self, sha256: _Optional[str] = ...) -> None: ...

class Dim(_message.Message):
    __slots__ = ("size", "param")
    SIZE_FIELD_NUMBER: _ClassVar[int]
    PARAM_FIELD_NUMBER: _ClassVar[int]
    size: int
    param: str
    def __init__(self, size: _Optional[int] = ..., param: _Optional[str] = ...) -> None: ...

class Layer(_message.Message):
    __slots__ = ("name", "op", "activation", "role", "neurons", "positions", "block_output")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_FIELD_NUMBER: _ClassVar[int]
    ROLE_FIELD_NUMBER: _ClassVar[int]
    NEURONS_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    BLOCK_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    name: str
    op: str
    activation: str
    role: str
    neurons: int
    positions: int
    block_output: str
    def __init__(self, name: _Optional[str] = ..., op: _Optional[str] = ..., activation: _Optional[str] = ..., role: _Optional[str] = ..., neurons: _Optional[int] = ..., positions: _Optional[int] = ..., block_output: _Optional[str] = ...) -> None: ...

class DescribeModelResponse(_message.Message):
    __slots__ = ("sha256", "name", "producer", "opset", "input_name", "input_shape", "input_dtype", "layers")
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    PRODUCER_FIELD_NUMBER: _ClassVar[int]
    OPSET_FIELD_NUMBER: _ClassVar[int]
    INPUT_NAME_FIELD_NUMBER: _ClassVar[int]
    INPUT_SHAPE_FIELD_NUMBER: _ClassVar[int]
    INPUT_DTYPE_FIELD_NUMBER: _ClassVar[int]
    LAYERS_FIELD_NUMBER: _ClassVar[int]
    sha256: str
    name: str
    producer: str
    opset: int
    input_name: str
    input_shape: _containers.RepeatedCompositeFieldContainer[Dim]
    input_dtype: str
    layers: _containers.RepeatedCompositeFieldContainer[Layer]
    def __init__(self, sha256: _Optional[str] = ..., name: _Optional[str] = ..., producer: _Optional[str] = ..., opset: _Optional[int] = ..., input_name: _Optional[str] = ..., input_shape: _Optional[_Iterable[_Union[Dim, _Mapping]]] = ..., input_dtype: _Optional[str] = ..., layers: _Optional[_Iterable[_Union[Layer, _Mapping]]] = ...) -> None: ...

class Tensor(_message.Message):
    __slots__ = ("datatype", "shape", "raw_contents")
    DATATYPE_FIELD_NUMBER: _ClassVar[int]
    SHAPE_FIELD_NUMBER: _ClassVar[int]
    RAW_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    datatype: str
    shape: _containers.RepeatedScalarFieldContainer[int]
    raw_contents: bytes
    def __init__(self, datatype: _Optional[str] = ..., shape: _Optional[_Iterable[int]] = ..., raw_contents: _Optional[bytes] = ...) -> None: ...

class Range(_message.Message):
    __slots__ = ("low", "high")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ...) -> None: ...

class AuditSettings(_message.Message):
    __slots__ = ("beta", "batch_size", "include_output_layer", "cna_include_output_layer", "aggregate", "margin_fraction", "margin_seed", "target_efficiency", "alpha_range", "scale", "mean", "std", "device", "states_at", "memory_budget", "gpu_math")
    BETA_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_OUTPUT_LAYER_FIELD_NUMBER: _ClassVar[int]
    CNA_INCLUDE_OUTPUT_LAYER_FIELD_NUMBER: _ClassVar[int]
    AGGREGATE_FIELD_NUMBER: _ClassVar[int]
    MARGIN_FRACTION_FIELD_NUMBER: _ClassVar[int]
    MARGIN_SEED_FIELD_NUMBER: _ClassVar[int]
    TARGET_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    ALPHA_RANGE_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    STD_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    STATES_AT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_BUDGET_FIELD_NUMBER: _ClassVar[int]
    GPU_MATH_FIELD_NUMBER: _ClassVar[int]
    beta: float
    batch_size: int
    include_output_layer: bool
    cna_include_output_layer: bool
    aggregate: str
    margin_fraction: float
    margin_seed: int
    target_efficiency: float
    alpha_range: Range
    scale: float
    mean: float
    std: float
    device: str
    states_at: str
    memory_budget: int
    gpu_math: str
    def __init__(self, beta: _Optional[float] = ..., batch_size: _Optional[int] = ..., include_output_layer: _Optional[bool] = ..., cna_include_output_layer: _Optional[bool] = ..., aggregate: _Optional[str] = ..., margin_fraction: _Optional[float] = ..., margin_seed: _Optional[int] = ..., target_efficiency: _Optional[float] = ..., alpha_range: _Optional[_Union[Range, _Mapping]] = ..., scale: _Optional[float] = ..., mean: _Optional[float] = ..., std: _Optional[float] = ..., device: _Optional[str] = ..., states_at: _Optional[str] = ..., memory_budget: _Optional[int] = ..., gpu_math: _Optional[str] = ...) -> None: ...

class DatasetRef(_message.Message):
    __slots__ = ("name", "split", "limit")
    NAME_FIELD_NUMBER: _ClassVar[int]
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    name: str
    split: str
    limit: int
    def __init__(self, name: _Optional[str] = ..., split: _Optional[str] = ..., limit: _Optional[int] = ...) -> None: ...

class AuditStart(_message.Message):
    __slots__ = ("model_sha256", "settings", "dataset", "model_name")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    settings: AuditSettings
    dataset: DatasetRef
    model_name: str
    def __init__(self, model_sha256: _Optional[str] = ..., settings: _Optional[_Union[AuditSettings, _Mapping]] = ..., dataset: _Optional[_Union[DatasetRef, _Mapping]] = ..., model_name: _Optional[str] = ...) -> None: ...

class SampleBatch(_message.Message):
    __slots__ = ("split", "samples", "labels")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    LABELS_FIELD_NUMBER: _ClassVar[int]
    split: str
    samples: Tensor
    labels: Tensor
    def __init__(self, split: _Optional[str] = ..., samples: _Optional[_Union[Tensor, _Mapping]] = ..., labels: _Optional[_Union[Tensor, _Mapping]] = ...) -> None: ...

class AuditRequest(_message.Message):
    __slots__ = ("start", "batch")
    START_FIELD_NUMBER: _ClassVar[int]
    BATCH_FIELD_NUMBER: _ClassVar[int]
    start: AuditStart
    batch: SampleBatch
    def __init__(self, start: _Optional[_Union[AuditStart, _Mapping]] = ..., batch: _Optional[_Union[SampleBatch, _Mapping]] = ...) -> None: ...

class AuditProgress(_message.Message):
    __slots__ = ("split", "samples_done", "queue_position")
    SPLIT_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    split: str
    samples_done: int
    queue_position: int
    def __init__(self, split: _Optional[str] = ..., samples_done: _Optional[int] = ..., queue_position: _Optional[int] = ...) -> None: ...

class AuditResponse(_message.Message):
    __slots__ = ("progress", "report")
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    progress: AuditProgress
    report: Report
    def __init__(self, progress: _Optional[_Union[AuditProgress, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class SplitSummary(_message.Message):
    __slots__ = ("samples", "accuracy", "aiq", "network_efficiency", "cna")
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    ACCURACY_FIELD_NUMBER: _ClassVar[int]
    AIQ_FIELD_NUMBER: _ClassVar[int]
    NETWORK_EFFICIENCY_FIELD_NUMBER: _ClassVar[int]
    CNA_FIELD_NUMBER: _ClassVar[int]
    samples: int
    accuracy: float
    aiq: float
    network_efficiency: float
    cna: float
    def __init__(self, samples: _Optional[int] = ..., accuracy: _Optional[float] = ..., aiq: _Optional[float] = ..., network_efficiency: _Optional[float] = ..., cna: _Optional[float] = ...) -> None: ...

class ReportSummary(_message.Message):
    __slots__ = ("id", "model_sha256", "created", "splits")
    class SplitsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: SplitSummary
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[SplitSummary, _Mapping]] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    SPLITS_FIELD_NUMBER: _ClassVar[int]
    id: str
    model_sha256: str
    created: _timestamp_pb2.Timestamp
    splits: _containers.MessageMap[str, SplitSummary]
    def __init__(self, id: _Optional[str] = ..., model_sha256: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., splits: _Optional[_Mapping[str, SplitSummary]] = ...) -> None: ...

class Report(_message.Message):
    __slots__ = ("summary", "report_json")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    REPORT_JSON_FIELD_NUMBER: _ClassVar[int]
    summary: ReportSummary
    report_json: str
    def __init__(self, summary: _Optional[_Union[ReportSummary, _Mapping]] = ..., report_json: _Optional[str] = ...) -> None: ...

class GetReportRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class ListReportsRequest(_message.Message):
    __slots__ = ("model_sha256", "page_size", "page_token")
    MODEL_SHA256_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    model_sha256: str
    page_size: int
    page_token: str
    def __init__(self, model_sha256: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListReportsResponse(_message.Message):
    __slots__ = ("reports", "next_page_token")
    REPORTS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    reports: _containers.RepeatedCompositeFieldContainer[ReportSummary]
    next_page_token: str
    def __init__(self, reports: _Optional[_Iterable[_Union[ReportSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class SubmitJobRequest(_message.Message):
    __slots__ = ("audit",)
    AUDIT_FIELD_NUMBER: _ClassVar[int]
    audit: AuditStart
    def __init__(self, audit: _Optional[_Union[AuditStart, _Mapping]] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("id", "content_address", "model_name", "dataset", "settings", "state", "samples_done", "queue_position", "error", "report_id", "created", "started", "finished", "restarts")
    class SamplesDoneEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ID_FIELD_NUMBER: _ClassVar[int]
    CONTENT_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DATASET_FIELD_NUMBER: _ClassVar[int]
    SETTINGS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_DONE_FIELD_NUMBER: _ClassVar[int]
    QUEUE_POSITION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    REPORT_ID_FIELD_NUMBER: _ClassVar[int]
    CREATED_FIELD_NUMBER: _ClassVar[int]
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FINISHED_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    id: str
    content_address: str
    model_name: str
    dataset: DatasetRef
    settings: AuditSettings
    state: JobState
    samples_done: _containers.ScalarMap[str, int]
    queue_position: int
    error: str
    report_id: str
    created: _timestamp_pb2.Timestamp
    started: _timestamp_pb2.Timestamp
    finished: _timestamp_pb2.Timestamp
    restarts: int
    def __init__(self, id: _Optional[str] = ..., content_address: _Optional[str] = ..., model_name: _Optional[str] = ..., dataset: _Optional[_Union[DatasetRef, _Mapping]] = ..., settings: _Optional[_Union[AuditSettings, _Mapping]] = ..., state: _Optional[_Union[JobState, str]] = ..., samples_done: _Optional[_Mapping[str, int]] = ..., queue_position: _Optional[int] = ..., error: _Optional[str] = ..., report_id: _Optional[str] = ..., created: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., started: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., finished: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., restarts: _Optional[int] = ...) -> None: ...

class GetJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class CancelJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class WatchJobRequest(_message.Message):
    __slots__ = ("id",)
    ID_FIELD_NUMBER: _ClassVar[int]
    id: str
    def __init__(self, id: _Optional[str] = ...) -> None: ...

class JobEvent(_message.Message):
    __slots__ = ("job", "report")
    JOB_FIELD_NUMBER: _ClassVar[int]
    REPORT_FIELD_NUMBER: _ClassVar[int]
    job: Job
    report: Report
    def __init__(self, job: _Optional[_Union[Job, _Mapping]] = ..., report: _Optional[_Union[Report, _Mapping]] = ...) -> None: ...

class ListJobsRequest(_message.Message):
    __slots__ = ("page_size", "page_token")
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    page_size: int
    page_token: str
    def __init__(self, page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListJobsResponse(_message.Message):
    __slots__ = ("jobs", "next_page_token")
    JOBS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    jobs: _containers.RepeatedCompositeFieldContainer[Job]
    next_page_token: str
    def __init__(self, jobs: _Optional[_Iterable[_Union[Job, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class ServerMetadataRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ServerLimits(_message.Message):
    __slots__ = ("max_concurrent", "max_queued", "max_model_bytes", "max_message_bytes", "max_data_files", "idle_timeout_seconds", "audit_memory_bytes", "page_size")
    MAX_CONCURRENT_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_DATA_FILES_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    AUDIT_MEMORY_BYTES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    max_concurrent: int
    max_queued: int
    max_model_bytes: int
    max_message_bytes: int
    max_data_files: int
    idle_timeout_seconds: float
    audit_memory_bytes: int
    page_size: int
    def __init__(self, max_concurrent: _Optional[int] = ..., max_queued: _Optional[int] = ..., max_model_bytes: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., max_data_files: _Optional[int] = ..., idle_timeout_seconds: _Optional[float] = ..., audit_memory_bytes: _Optional[int] = ..., page_size: _Optional[int] = ...) -> None: ...

class ServerMetadataResponse(_message.Message):
    __slots__ = ("name", "version", "extensions", "limits", "datasets", "device", "cluster")
    NAME_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTENSIONS_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    DATASETS_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    CLUSTER_FIELD_NUMBER: _ClassVar[int]
    name: str
    version: str
    extensions: _containers.RepeatedScalarFieldContainer[str]
    limits: ServerLimits
    datasets: _containers.RepeatedScalarFieldContainer[str]
    device: str
    cluster: RayCluster
    def __init__(self, name: _Optional[str] = ..., version: _Optional[str] = ..., extensions: _Optional[_Iterable[str]] = ..., limits: _Optional[_Union[ServerLimits, _Mapping]] = ..., datasets: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., cluster: _Optional[_Union[RayCluster, _Mapping]] = ...) -> None: ...

class RayCluster(_message.Message):
    __slots__ = ("cpus", "gpus", "reachable")
    CPUS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    REACHABLE_FIELD_NUMBER: _ClassVar[int]
    cpus: float
    gpus: float
    reachable: bool
    def __init__(self, cpus: _Optional[float] = ..., gpus: _Optional[float] = ..., reachable: _Optional[bool] = ...) -> None: ...
