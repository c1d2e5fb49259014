"""The records that both sides of the service share, and what names the data an audit reads.

Client, server, CLI and runners all hold these: what data an audit reads (``DataSpec``,
``ImageOptions``, ``DatasetRef``), what one audit runs (``AuditSpec``), a detached job
(``Job`` and its states) and a stored report's bookkeeping (``StoredReport``). They are plain
frozen dataclasses over the standard library, so that ``import auditor.service.client`` stays light:
this module imports no onnx, no onnxruntime, no numpy and no SQLite.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from auditor.config import AuditConfig
from auditor.errors import AuditError, DataError

if TYPE_CHECKING:
    from auditor.report import Report

KNOWN_DATASETS: tuple[str, ...] = ("mnist", "fashion-mnist")
SPLITS: tuple[str, ...] = ("train", "test")  # the splits a dataset has, in the order audits read them
SPLIT_CHOICES: tuple[str, ...] = (*SPLITS, "both")  # what --split and every split setting accept

QUEUED, RUNNING, DONE, FAILED, CANCELLED = "queued", "running", "done", "failed", "cancelled"
JOB_STATES = (QUEUED, RUNNING, DONE, FAILED, CANCELLED)
ENDED = (DONE, FAILED, CANCELLED)

_CONTENT_ADDRESS = re.compile(r"[0-9a-f]{64}")
_ID = re.compile(r"[0-9a-f]{32}")
MAX_IMAGE_SIDE = 1 << 15

MAX_PIXELS = 1 << 26  # 67M pixels (a 50-megapixel photo fits), under Pillow's own bomb warning
MAX_SIDE = math.isqrt(MAX_PIXELS)  # the largest --resize or --crop whose square fits MAX_PIXELS


@dataclass(frozen=True)
class ImageOptions:
    """How an image folder becomes samples. Other data ignores ``input_shape`` and refuses the rest.

    ``input_shape`` is the model input's shape, batch axis first, as ``prepare(...).structure.input
    .shape`` gives it (``(N, 3, 224, 224)``, ``("batch", 224, 224, 3)``, ``(N, 28, 28)``,
    ``(N, 784)``): it decides the channels, the layout and the crop. None leaves images at their
    own size, RGB, H×W×C. ``resize`` sets the shorter side before the crop, ``crop`` the side of a
    square centre crop (default: the model's H×W). ``skip_bad`` skips bad images instead of
    refusing them.
    """

    input_shape: tuple[int | str | None, ...] | None = None
    resize: int | None = None
    crop: int | None = None
    skip_bad: bool = False

    def __post_init__(self) -> None:
        for flag, value in (("resize", self.resize), ("crop", self.crop)):
            if value is not None and not 1 <= value <= MAX_IMAGE_SIDE:
                raise DataError(f"--{flag} must be between 1 and {MAX_IMAGE_SIDE} pixels, got {value}")

    @property
    def has_folder_settings(self) -> bool:
        """Whether a setting that only image folders use is set."""
        return self.resize is not None or self.crop is not None or self.skip_bad


@dataclass(frozen=True)
class DataSpec:
    """The data one audit reads, by name: what every runner (local, Ray, remote) is handed.

    ``source`` is a known dataset name (``mnist``, ``fashion-mnist``), a ``.npz``/``.npy`` file
    or a folder of images; ``split`` is ``train``, ``test`` or ``both``; ``limit`` keeps the
    first samples of each split. ``images`` says how an image folder becomes samples; its
    ``input_shape`` is left None here, since the runner reads it from the model it opens.
    """

    source: str
    split: str = "test"
    limit: int | None = None
    images: ImageOptions = field(default_factory=ImageOptions)

    def __post_init__(self) -> None:
        if self.split not in SPLIT_CHOICES:
            raise DataError(f"split must be one of {', '.join(SPLIT_CHOICES)}, got {self.split[:80]!r}")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"limit must be at least 1, got {self.limit}")

    @property
    def known(self) -> bool:
        """Whether the source is a dataset every node and server can read by name."""
        return self.source in KNOWN_DATASETS


@dataclass(frozen=True)
class DatasetRef:
    """A dataset the server reads itself: a known name, never a path on the server."""

    name: str
    split: str = "test"
    limit: int | None = None

    def __post_init__(self) -> None:
        if self.name not in KNOWN_DATASETS:
            raise DataError(
                f"the server resolves only the datasets {', '.join(KNOWN_DATASETS)}, not {self.name[:80]!r}; "
                "send other data as batches"
            )
        if self.split not in SPLIT_CHOICES:
            raise DataError(f"dataset split must be one of {SPLIT_CHOICES}, got {self.split[:80]!r}")
        if self.limit is not None and self.limit < 1:
            raise DataError(f"dataset limit must be at least 1, got {self.limit}")


@dataclass(frozen=True)
class AuditSpec:
    """What one audit runs: a stored model (by content address), its report name, its settings, and
    the server-side dataset (None when the client streams the samples)."""

    content_address: str
    model_name: str
    config: AuditConfig
    dataset: DatasetRef | None = None


def utc_now() -> datetime:
    """Now, in UTC: the one clock every job and report timestamp is read from."""
    return datetime.now(UTC)


@dataclass(frozen=True)
class Job:
    """A detached audit and how far it has got. ``queue_position`` is live, never stored."""

    id: str
    spec: AuditSpec
    state: str = QUEUED
    samples: Mapping[str, int] = field(default_factory=dict)
    error: str = ""
    report_id: str = ""
    created: datetime = field(default_factory=utc_now)
    started: datetime | None = None
    finished: datetime | None = None
    restarts: int = 0
    queue_position: int | None = None

    @property
    def ended(self) -> bool:
        return self.state in ENDED


@dataclass(frozen=True)
class StoredReport:
    """A finished report with the service's bookkeeping around it."""

    id: str
    content_address: str
    created: datetime
    report: Report


def check_content_address(value: str) -> str:
    """Refuse anything but 64 lowercase hex digits, without echoing a hostile value back."""
    if not _CONTENT_ADDRESS.fullmatch(value):
        raise AuditError(f"a model's content address is 64 lowercase hex digits; got {_described(value)}")
    return value


def is_content_address(value: str) -> bool:
    """Whether ``value`` has the form of a content address (64 lowercase hex digits)."""
    return bool(_CONTENT_ADDRESS.fullmatch(value))


def check_id(value: str, what: str) -> str:
    """Refuse an id that is not 32 lowercase hex digits (every report and job id is)."""
    if not _ID.fullmatch(value):
        raise AuditError(f"a {what} id is 32 lowercase hex digits; got {_described(value)}")
    return value


def _described(value: str) -> str:
    return repr(value) if len(value) <= 80 else f"{len(value)} characters"
