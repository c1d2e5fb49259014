"""``auditor shrink``: a smaller ONNX model from what an audit measured, checked against the original.

The bounds and names the command line checks its flags against live here, where building the
parser imports neither numpy nor onnx.
"""

CRITERIA = {
    "mean-replacement": "mean-replacement error: Var(output) × ‖outgoing weights‖²",
    "layer-share": "mean-replacement error as a share of its layer's total",
    "weight-norm": "‖outgoing weights‖² (data-free magnitude baseline)",
}
MAX_DROP_PP = 100.0  # --max-accuracy-drop: percentage points of held-out accuracy
MAX_ALIGN = 1024  # --align: wider multiples than any layer we have seen
