"""Plain onnxruntime inference over one MNIST split: bench_command.py's baseline, as a user would write it."""

import gzip
import sys

import numpy as np
import onnxruntime as ort

model, folder, split = sys.argv[1], sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else "train"
prefix = "train" if split == "train" else "t10k"
with gzip.open(f"{folder}/{prefix}-images-idx3-ubyte.gz") as f:
    x = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
with gzip.open(f"{folder}/{prefix}-labels-idx1-ubyte.gz") as f:
    y = np.frombuffer(f.read(), np.uint8, offset=8)
session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
name = session.get_inputs()[0].name
correct = sum(
    int((session.run(None, {name: x[i : i + 512].astype(np.float32) / 255})[0].argmax(1) == y[i : i + 512]).sum())
    for i in range(0, len(x), 512)
)
print(f"accuracy {correct / len(x):.4f}")
