"""Data-free baselines from a model's weights: the norm-based predictors the CNA paper compares with.

Pure functions over an ``onnx.ModelProto`` and the layers ``auditor.engine.find`` found; nothing here
runs a model. For each layer the weight tensor of its linear op (Gemm, MatMul, Conv) is read as a
matrix W of shape (outputs, inputs) — a Conv's kernel (C_out, C_in/g, kH, kW) as
(C_out, C_in/g·kH·kW), as the generalization literature does — and gives:

- ``frobenius``: ‖W‖_F, the square root of the sum of the squared weights;
- ``spectral``: ‖W‖₂, the largest singular value (exact SVD in float64; past
  ``EXACT_SPECTRAL_ELEMENTS`` elements, power iteration on the stored float32 values, to a
  relative change below 1e-6 or 300 steps, so that a large layer is never copied to float64);
- across layers, ``frobenius_product`` Π‖W‖_F and ``spectral_product`` Π‖W‖₂;
- ``path_norm``: the ℓ2 path norm of Neyshabur et al. (2015), √(Σ over input→output paths of
  Π w²) = √(1ᵀ (W_L∘W_L)⋯(W_1∘W_1) 1), biases excluded. It is defined here for a chain of
  dense layers only (each layer's inputs are the previous layer's outputs); for anything else it
  is None and ``path_norm_note`` says why.

Biases are not weights here. Gemm's ``alpha`` scales its matrix. A layer whose weight is not a
stored tensor (an initializer, or a ``Constant`` node) — for example a QDQ model's weight behind a
``DequantizeLinear`` — has no figures: it is listed in ``without_weights`` with the reason, and
the products and path norm cover only the layers named in ``covers``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

from auditor.engine.find import Layer, _constant_tensors, _walk_to_linear
from auditor.report import LayerNorms, MissingWeights, WeightNorms

EXACT_SPECTRAL_ELEMENTS = 1 << 22  # above 4 Mi weights, ‖W‖₂ by power iteration
POWER_TOLERANCE = 1e-6
POWER_STEPS = 300
DENSE_OPS = frozenset({"Gemm", "MatMul"})


def weight_norms(model: onnx.ModelProto, layers: Sequence[Layer]) -> WeightNorms:
    """The weight baselines of ``model`` over ``layers`` (depth order, output layer included)."""
    graph = model.graph
    producers = {out: (i, node) for i, node in enumerate(graph.node) for out in node.output}
    constants = _constant_tensors(graph)
    found: list[tuple[LayerNorms, np.ndarray]] = []
    missing: list[MissingWeights] = []
    for layer in layers:
        read = _layer_matrix(layer, graph, producers, constants)
        if isinstance(read, str):
            missing.append(MissingWeights(layer.name, read))
            continue
        linear, name, stored, matrix = read
        norms = LayerNorms(
            layer=layer.name,
            op=linear.op_type,
            weight=name,
            shape=[int(d) for d in stored.shape],
            matrix=[int(d) for d in matrix.shape],
            frobenius=frobenius_norm(matrix),
            spectral=spectral_norm(matrix),
        )
        found.append((norms, matrix))
    records = [norms for norms, _ in found]
    path, note = path_norm([m for _, m in found], [n.op for n in records], bool(missing))
    return WeightNorms(
        layers=records,
        without_weights=missing,
        covers=[n.layer for n in records],
        frobenius_product=_product([n.frobenius for n in records]),
        spectral_product=_product([n.spectral for n in records]),
        path_norm=path,
        path_norm_note=note,
    )


def frobenius_norm(matrix: np.ndarray) -> float:
    """‖W‖_F, summed in float64 a row block at a time (no float64 copy of a large layer)."""
    rows = max(1, EXACT_SPECTRAL_ELEMENTS // max(1, matrix.shape[1]))
    total = math.fsum(
        float(np.einsum("ij,ij->", block, block, dtype=np.float64))
        for block in (matrix[i : i + rows] for i in range(0, len(matrix), rows))
    )
    return math.sqrt(total)


def spectral_norm(matrix: np.ndarray) -> float:
    """‖W‖₂: exact from the singular values, or by power iteration on WᵀW for very large W."""
    if matrix.size == 0:
        return 0.0
    if matrix.size <= EXACT_SPECTRAL_ELEMENTS:
        return float(np.linalg.svd(matrix.astype(np.float64), compute_uv=False)[0])
    vector = np.full(matrix.shape[1], 1 / math.sqrt(matrix.shape[1]), dtype=matrix.dtype)
    value = 0.0
    for _ in range(POWER_STEPS):
        image = matrix.T @ (matrix @ vector)
        size = float(np.linalg.norm(image))
        if size == 0:
            return 0.0
        vector = image / size
        if abs(size - value) <= POWER_TOLERANCE * size:
            value = size
            break
        value = size
    return math.sqrt(value)


def path_norm(matrices: Sequence[np.ndarray], ops: Sequence[str], incomplete: bool) -> tuple[float | None, str | None]:
    """The ℓ2 path norm of a chain of dense (outputs, inputs) matrices, or None and the reason."""
    if not matrices:
        return None, "no layer has weights"
    if incomplete:
        return None, "some layers have no weights, so the paths through them are unknown"
    if any(op not in DENSE_OPS for op in ops):
        return None, "defined here for chains of dense layers (Gemm, MatMul) only; this model has other linear ops"
    flow = np.ones(matrices[0].shape[1])
    for index, matrix in enumerate(matrices):
        if matrix.shape[1] != len(flow):
            return None, f"layer {index + 1} takes {matrix.shape[1]} inputs, not the {len(flow)} outputs before it"
        flow = np.square(matrix.astype(np.float64)) @ flow
    total = math.sqrt(float(flow.sum()))
    return (total, None) if math.isfinite(total) else (None, "it overflows a double")


def _product(values: Sequence[float]) -> float | None:
    if not values:
        return None
    product = math.prod(values)
    return product if math.isfinite(product) else None


def _layer_matrix(
    layer: Layer,
    graph: onnx.GraphProto,
    producers: dict[str, tuple[int, onnx.NodeProto]],
    constants: set[str],
) -> tuple[onnx.NodeProto, str, np.ndarray, np.ndarray] | str:
    """(linear op, weight name, stored weight, its (outputs, inputs) matrix), or why there is none."""
    walked = _walk_to_linear(layer.name, producers, constants)
    if walked is None:
        return "no linear op found above the layer"
    linear = walked[0]
    if linear.op_type not in ("Gemm", "MatMul", "Conv"):
        return f"its linear op is {linear.op_type}, whose weights are not read"
    stored_inputs = [i for i, name in enumerate(linear.input[:2]) if name in constants]
    if len(stored_inputs) != 1:
        return "its weight depends on the data, so it is not a weight the file stores"
    position = stored_inputs[0]
    name = linear.input[position]
    stored = _stored(name, graph, producers)
    if stored is None:
        made_by = producers[name][1].op_type if name in producers else "?"
        return f"its weight {name!r} is computed in the graph by {made_by} (as in QDQ models), not stored"
    weight = np.asarray(stored)
    weight = (
        weight if weight.dtype == np.float32 and weight.size > EXACT_SPECTRAL_ELEMENTS else weight.astype(np.float64)
    )
    attrs = {a.name: helper.get_attribute_value(a) for a in linear.attribute}
    if linear.op_type == "Conv":
        if position != 1 or weight.ndim < 3:
            return "its Conv weight is not a kernel bank"
        return linear, name, stored, weight.reshape(weight.shape[0], -1)
    if weight.ndim != 2:
        return f"its weight has {weight.ndim} dimensions, not 2"
    if linear.op_type == "Gemm":
        transposed = attrs.get("transB", 0) if position == 1 else not attrs.get("transA", 0)
        matrix = weight if transposed else weight.T
        return linear, name, stored, matrix * float(attrs.get("alpha", 1.0))
    return linear, name, stored, weight.T if position == 1 else weight


def _stored(name: str, graph: onnx.GraphProto, producers: dict[str, tuple[int, onnx.NodeProto]]) -> np.ndarray | None:
    """An initializer's or a ``Constant`` node's value as an array; None for other constants."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    producer = producers.get(name)
    if producer is not None and producer[1].op_type == "Constant":
        for attribute in producer[1].attribute:
            if attribute.name == "value":
                return numpy_helper.to_array(attribute.t)
    return None
