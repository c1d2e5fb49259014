"""onnx-auditor: exact neural efficiency, aIQ, CNA and CNA-Margin for any ONNX model.

The public surface is small: ``prepare`` and ``audit`` run an audit, ``find_layers`` shows what
the auditor measures, ``Report`` is what comes back, ``AuditError`` is every refusal.
onnxruntime is imported only when a session is first built (``auditor.run``), so ``import
auditor`` stays cheap for the health probe and the trainer's command line.
"""

from auditor.audit import audit
from auditor.config import AuditConfig
from auditor.errors import AuditError
from auditor.find import find_layers
from auditor.prepare import Prepared, prepare
from auditor.report import Report

__all__ = ["AuditConfig", "AuditError", "Prepared", "Report", "audit", "find_layers", "prepare"]
__version__ = "0.1.0"
