"""onnx-auditor: exact neural efficiency, aIQ, CNA and CNA-Margin for any ONNX model.

The public surface is small: ``prepare`` and ``audit`` run an audit, ``find_layers`` shows what
the auditor measures, ``Report`` is what comes back, ``shrink`` turns an audit's advice into a
smaller model, ``AuditError`` is every refusal.

The package is laid out by role (docs/ARCHITECTURE.md): ``engine`` (find, expose, run, count,
metrics), ``datasets``, ``service`` (the gRPC server and its client), ``reporting`` (page,
compare, gate) and ``pruning`` (``auditor shrink``). Names are imported on first use (PEP 562),
so ``import auditor.service.client`` or ``auditor --help`` never pays for onnx, onnxruntime or
the engine.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from auditor.config import AuditConfig
    from auditor.engine.audit import audit
    from auditor.engine.find import find_layers
    from auditor.engine.prepare import Prepared, prepare
    from auditor.errors import AuditError
    from auditor.pruning.plan import shrink
    from auditor.report import Report

_PUBLIC = {
    "AuditConfig": "auditor.config",
    "AuditError": "auditor.errors",
    "Prepared": "auditor.engine.prepare",
    "Report": "auditor.report",
    "audit": "auditor.engine.audit",
    "find_layers": "auditor.engine.find",
    "prepare": "auditor.engine.prepare",
    "shrink": "auditor.pruning.plan",
}
__all__ = ["AuditConfig", "AuditError", "Prepared", "Report", "audit", "find_layers", "prepare", "shrink"]
__version__ = "0.1.0"


def __getattr__(name: str) -> object:
    """Import a public name's module on first use, and keep the name for the next lookup."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'auditor' has no attribute {name!r}")
    value = getattr(importlib.import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_PUBLIC})
