"""The settings of one audit, shared by the CLI, the gRPC service and the trainer's grid report.

``AuditConfig`` is the one validated record of every setting: what the CLI builds, what travels
to a server, and what a report's ``config`` block records. Each part of the engine reads only
its own view of it, by name: ``session`` (what the rewritten graph and its onnxruntime session
depend on), ``feeding`` (how raw samples become model input), and ``metrics`` (how tallies
become figures).
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from typing import Any

from auditor.errors import AuditError, require

DEVICES = ("auto", "cpu", "cuda")
AGGREGATES = ("sum", "mean")
STATE_POINTS = ("pre-activation", "block-output")  # where a layer's state is read (SPEC §1)
MIN_MEMORY_BUDGET = 64 << 20  # below this, sorting and spilling would dominate any real audit
MAX_MEMORY_BUDGET = 1 << 50
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}


@dataclass(frozen=True)
class SessionSettings:
    """What a prepared model depends on: the device it runs on and where its states are read."""

    device: str = "auto"
    states_at: str = "pre-activation"

    def satisfied_by(self, prepared: SessionSettings) -> bool:
        """Whether a model prepared with ``prepared`` serves these settings ("auto" takes any device)."""
        return self.states_at == prepared.states_at and self.device in ("auto", prepared.device)


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
    memory_budget: int = 1 << 30

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
                (
                    1 <= self.memory_budget <= 2**63 - 1,
                    f"memory budget must be a positive number of bytes, got {self.memory_budget}",
                ),
            ]
        )

    @property
    def session(self) -> SessionSettings:
        return SessionSettings(self.device, self.states_at)

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


def parse_size(text: str) -> int:
    """Bytes from a memory size such as ``512M``, ``4G``, ``1.5G`` or ``1073741824``.

    Units are binary (K = 1024 bytes) and may end in ``B`` or ``iB``. Refuses, with one line,
    anything that is not a size or lies outside ``MIN_MEMORY_BUDGET``..``MAX_MEMORY_BUDGET``.
    """
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]?)(?:I?B)?\s*", str(text).upper())
    if match is None:
        raise AuditError(f"memory budget must be a size such as 512M or 4G, got {text!r}")
    size = int(Fraction(match[1]) * _UNITS[match[2]])
    if size < MIN_MEMORY_BUDGET:
        raise AuditError(f"memory budget must be at least 64M, got {text!r}")
    if size > MAX_MEMORY_BUDGET:
        raise AuditError(f"memory budget must be at most 1P, got {text!r}")
    return size
