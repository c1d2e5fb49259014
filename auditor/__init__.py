"""onnx-auditor: exact neural efficiency, aIQ, CNA and CNA-Margin for any ONNX model.

The public surface is small: ``prepare`` and ``audit`` run an audit, ``find_layers`` shows what
the auditor measures, ``Report`` is what comes back, ``AuditError`` is every refusal.
"""

from auditor.audit import Prepared, audit, prepare
from auditor.config import AuditConfig
from auditor.errors import AuditError
from auditor.graph import find_layers
from auditor.report import Report

__all__ = ["AuditConfig", "AuditError", "Prepared", "Report", "audit", "find_layers", "prepare"]
__version__ = "0.1.0"
