"""``auditor shrink``: a smaller ONNX model from what an audit measured, checked against the original."""
