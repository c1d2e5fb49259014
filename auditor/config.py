"""The settings of one audit, shared by the CLI, the gRPC service and the trainer's grid report.

``AuditConfig`` is the one validated record of every setting: what the CLI builds, what travels
to a server, and what a report's ``config`` block records. Each part of the engine reads only
its own view of it, by name: ``session`` (what the rewritten graph and its onnxruntime session
depend on), ``feeding`` (how raw samples become model input), and ``metrics`` (how tallies
become figures).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from enum import StrEnum
from typing import Any

from auditor.errors import AuditError, require

DEVICES = ("auto", "cpu", "cuda")
AGGREGATES = ("sum", "mean")


class StatePoint(StrEnum):
    """Where a layer's state is read (SPEC §1): at the pre-activation, or at the block's output."""

    PRE_ACTIVATION = "pre-activation"
    BLOCK_OUTPUT = "block-output"


STATE_POINTS = tuple(point.value for point in StatePoint)
GPU_MATHS = ("exact", "tf32")  # CUDA float math: full fp32 (exact counts), or TF32 (faster, approximate)
# What one audit may hold for counting states (``stores.MemoryBudget``), defined here once: this
# module is the settings record, imports nothing heavy, and the CLI, the server and the stores
# all read it.
DEFAULT_MEMORY_BUDGET = 1 << 30
MIN_MEMORY_BUDGET = 64 << 20  # below this, sorting and spilling would dominate any real audit
MAX_MEMORY_BUDGET = 1 << 50


@dataclass(frozen=True)
class SessionSettings:
    """What a prepared model depends on: the device it runs on, where its states are read, and
    the float math its CUDA session may use."""

    device: str = "auto"
    states_at: str = "pre-activation"
    gpu_math: str = "exact"

    def satisfied_by(self, prepared: SessionSettings) -> bool:
        """Whether a model prepared with ``prepared`` serves these settings ("auto" takes any device)."""
        return (
            self.states_at == prepared.states_at
            and self.gpu_math == prepared.gpu_math
            and self.device in ("auto", prepared.device)
        )


@dataclass(frozen=True)
class Feeding:
    """How raw samples become model input (SPEC §4's α reads the raw values, with ``alpha_range``)."""

    batch_size: int
    scale: float | None
    mean: float
    std: float
    alpha_range: tuple[float, float]


@dataclass(frozen=True)
class MetricSettings:
    """How a split's tallies become figures (SPEC §2–§6)."""

    beta: float
    include_output_layer: bool
    cna_include_output_layer: bool
    aggregate: str
    margin_fraction: float
    margin_seed: int
    target_efficiency: float


@dataclass(frozen=True)
class AuditConfig:
    """Every knob of an audit, with the defaults SPEC.md prescribes.

    Preprocessing: uint8 samples are divided by 255 unless ``scale`` is given; then
    ``(x * scale - mean) / std`` is applied. ``alpha_range`` is the declared value range of
    non-uint8 data for CNA's input entropy (SPEC §4); uint8 data always uses 0–255.
    ``memory_budget`` caps, in bytes, what the audit holds for counting states before it spills
    sorted runs to disk (the command line refuses less than 64M; tests go lower to force spills).
    ``gpu_math`` is the float math of CUDA sessions: ``exact`` (full fp32, TF32 off; a CUDA audit
    counts the CPU's states) or ``tf32`` (faster matmuls and convolutions that can flip firing bits
    near zero, so the report calls its counts approximate). CPU sessions ignore it.
    """

    beta: float = 2.0
    batch_size: int = 256
    include_output_layer: bool = False
    cna_include_output_layer: bool = True
    aggregate: str = "sum"
    margin_fraction: float = 0.1
    margin_seed: int = 0
    target_efficiency: float = 0.75
    alpha_range: tuple[float, float] = (0.0, 1.0)
    scale: float | None = None
    mean: float = 0.0
    std: float = 1.0
    device: str = "auto"
    states_at: str = "pre-activation"
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    gpu_math: str = "exact"

    def __post_init__(self) -> None:
        finite = [
            ("beta", self.beta),
            ("mean", self.mean),
            ("std", self.std),
            ("alpha range", self.alpha_range[0]),
            ("alpha range", self.alpha_range[1]),
            ("scale", 0.0 if self.scale is None else self.scale),
        ]
        for name, value in finite:  # nan and inf pass the comparisons below but make every figure meaningless
            if not math.isfinite(value):
                raise AuditError(f"{name} must be a finite number, got {value}")
        require(
            [
                (self.beta > 0, f"beta must be > 0, got {self.beta}"),
                (1 <= self.batch_size <= 2**31 - 1, f"batch size must be in 1..2**31-1, got {self.batch_size}"),
                (0 <= self.margin_seed < 2**63, f"margin seed must be in 0..2**63-1, got {self.margin_seed}"),
                (self.aggregate in AGGREGATES, f"aggregate must be one of {AGGREGATES}, got {self.aggregate!r}"),
                (0 < self.margin_fraction <= 1, f"margin fraction must be in (0, 1], got {self.margin_fraction}"),
                (0 < self.target_efficiency <= 1, f"target efficiency must be in (0, 1], got {self.target_efficiency}"),
                (self.alpha_range[0] < self.alpha_range[1], f"alpha range must be increasing, got {self.alpha_range}"),
                (self.std != 0, "std must not be 0"),
                (self.device in DEVICES, f"device must be one of {DEVICES}, got {self.device!r}"),
                (self.states_at in STATE_POINTS, f"states_at must be one of {STATE_POINTS}, got {self.states_at!r}"),
                (self.gpu_math in GPU_MATHS, f"gpu_math must be one of {GPU_MATHS}, got {self.gpu_math!r}"),
                (
                    1 <= self.memory_budget <= 2**63 - 1,
                    f"memory budget must be a positive number of bytes, got {self.memory_budget}",
                ),
            ]
        )

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(self.device, self.states_at, self.gpu_math)

    @property
    def feeding(self) -> Feeding:
        return Feeding(self.batch_size, self.scale, self.mean, self.std, self.alpha_range)

    @property
    def metrics(self) -> MetricSettings:
        return MetricSettings(
            self.beta,
            self.include_output_layer,
            self.cna_include_output_layer,
            self.aggregate,
            self.margin_fraction,
            self.margin_seed,
            self.target_efficiency,
        )

    def to_dict(self) -> dict[str, Any]:
        """The settings as JSON-ready values (the report's ``config`` block)."""
        out = asdict(self)
        out["alpha_range"] = list(self.alpha_range)
        return out

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AuditConfig:
        """Settings from a ``to_dict`` result; unknown keys are refused, missing keys take defaults."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise AuditError(f"unknown audit setting(s) {unknown}; known settings are {sorted(known)}")
        values = dict(values)
        if "alpha_range" in values:
            values["alpha_range"] = tuple(float(v) for v in values["alpha_range"])
        return cls(**values)


