"""The LeNet trainer behind ``auditor-train`` (SPEC §7).

It trains the LeNet-300-100 and LeNet-5 grids of Schaub & Hotaling with the paper's recipe,
exports each network to ONNX (checked against PyTorch in onnxruntime before it is kept), and turns
a grid into the paper's summary table and heatmaps by auditing every network in process.

PyTorch is imported only inside this package (the ``train`` extra); ``auditor`` never imports it.
Errors are ``auditor.errors.AuditError``: one line, and the CLI exits with code 2.
"""
