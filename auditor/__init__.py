"""onnx-auditor: exact neural efficiency, aIQ, CNA and CNA-Margin for any ONNX model.

The public surface is small: ``prepare`` and ``audit`` run an audit, ``find_layers`` shows what
the auditor measures, ``Report`` is what comes back, ``AuditError`` is every refusal.
Each is imported when first used (PEP 562), so ``import auditor.client`` (the health probe) and
``auditor --help`` load neither onnx nor onnxruntime.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from auditor.audit import audit
    from auditor.config import AuditConfig
    from auditor.errors import AuditError
    from auditor.graph import find_layers
    from auditor.prepare import Prepared, prepare
    from auditor.report import Report

# Where each public name lives: the one table the lazy lookup below reads.
_PUBLIC = {
    "AuditConfig": "auditor.config",
    "AuditError": "auditor.errors",
    "Prepared": "auditor.prepare",
    "Report": "auditor.report",
    "audit": "auditor.audit",
    "find_layers": "auditor.graph",
    "prepare": "auditor.prepare",
}

__all__ = ["AuditConfig", "AuditError", "Prepared", "Report", "audit", "find_layers", "prepare"]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    """Import a public name from its module the first time it is asked for."""
    if name not in _PUBLIC:
        raise AttributeError(f"module 'auditor' has no attribute {name!r}")
    value = getattr(import_module(_PUBLIC[name]), name)
    globals()[name] = value
    return value
