"""``expose``: the rewritten copy is valid, typed and leaves the model alone; how bits are grouped.

Every model is a real ONNX graph; where a test audits one, it runs in a real onnxruntime
session and the figures are checked against states counted from onnxruntime's own tensors.
Reading model files (external data included) is tested in ``test_modelfile``; sizes measured
when shape inference gives up, in ``test_prepare``.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import (
    FLOAT16,
    SHARED_MODELS,
    Net,
    mlp,
    run,
)

from auditor.engine.expose import byte_groups, expose, packing, word_groups
from auditor.engine.find import describe

# --- The rewritten copy --------------------------------------------------------------------


@pytest.mark.parametrize("name", SHARED_MODELS)
def test_expose_leaves_the_model_alone_and_builds_a_valid_one(shared_models: Path, name: str) -> None:
    model = onnx.load(shared_models / f"{name}.onnx")
    before = model.SerializeToString()
    structure = describe(model)
    exposed = expose(model, structure)
    assert model.SerializeToString() == before
    onnx.checker.check_model(exposed.model, full_check=True)
    original = [o.name for o in model.graph.output]
    outputs = [o.name for o in exposed.model.graph.output]
    assert outputs[: len(original)] == original
    assert set(exposed.output_names) == set(outputs[: len(original)]) | set(outputs)
    assert [out.layer for out in exposed.layers] == structure.layers
    integer = structure.opset >= 10  # integer packing needs MatMulInteger
    groups = byte_groups if integer else word_groups
    assert [out.groups for out in exposed.layers] == [groups(lay.neurons) for lay in structure.layers]
    assert [(out.groups, out.group_axis) for out in exposed.layers] == [
        packing(lay, integer=integer) for lay in structure.layers
    ]
    floats = expose(model, structure, integer_packing=False)
    assert [out.groups for out in floats.layers] == [word_groups(lay.neurons) for lay in structure.layers]


def old_ir_model() -> onnx.ModelProto:
    net = Net(("batch", 4), opset=8)
    logits = net.dense(net.op("Relu", net.dense(net.input, 4, 5)), 5, 3)
    return net.build(logits, ir_version=3, inits_as_inputs=True)


def fp16_conv_model() -> onnx.ModelProto:
    net = Net(("batch", 2, 4, 4), dtype=FLOAT16)
    return net.build(net.op("Relu", net.conv(net.input, 2, 30)))


@pytest.mark.parametrize(
    "build",
    [lambda: mlp([4, 70, 3], head="Softmax"), old_ir_model, fp16_conv_model],
    ids=["mlp-softmax", "ir3", "fp16-conv"],
)
def test_expose_of_hand_built_models_passes_the_checker(build) -> None:
    model = build()
    before = model.SerializeToString()
    exposed = expose(model, describe(model))
    assert model.SerializeToString() == before
    onnx.checker.check_model(exposed.model, full_check=True)
    assert exposed.model.graph.output[0].name == model.graph.output[0].name


def test_exposed_outputs_are_typed_for_onnxruntime() -> None:
    """Keys are int32 groups per position, sums one float32 per sample."""
    model = mlp([4, 30, 3])
    structure = describe(model)
    exposed = expose(model, structure)
    x = np.random.default_rng(15).standard_normal((9, 4)).astype(np.float32)
    layer = exposed.layers[0]
    keys, sums = run(exposed.model, x, [layer.keys, layer.sum])
    assert keys.dtype == np.int32 and keys.shape == (9, 4)  # 30 neurons: one byte per 8
    assert sums.dtype == np.float32 and sums.shape == (9,)
    (pre,) = run(model, x, ["pre1"])
    bits = (pre > 0).astype(np.int64)
    bytes_ = [bits[:, start:stop] @ (1 << np.arange(stop - start)) for start, stop in byte_groups(30)]
    np.testing.assert_array_equal(keys, np.stack(bytes_, axis=1))
    floats = expose(model, structure, integer_packing=False)
    (packed,) = run(floats.model, x, [floats.layers[0].keys])
    assert packed.dtype == np.int32 and packed.shape == (9, 2)  # float packing: groups of 24 and 6 bits
    np.testing.assert_allclose(sums, pre.sum(axis=1), rtol=1e-5, atol=1e-5)


# --- word_groups and byte_groups --------------------------------------------------------------


@pytest.mark.parametrize(
    ("neurons", "groups"),
    [
        (1, [(0, 1)]),
        (10, [(0, 10)]),
        (24, [(0, 24)]),
        (25, [(0, 24), (24, 25)]),
        (64, [(0, 24), (24, 48), (48, 64)]),
        (65, [(0, 24), (24, 48), (48, 64), (64, 65)]),
    ],
)
def test_word_groups_examples(neurons: int, groups: list[tuple[int, int]]) -> None:
    assert word_groups(neurons) == groups


@pytest.mark.parametrize("neurons", [*range(1, 200), 1000, 4096])
def test_word_groups_tile_the_neurons_without_crossing_words(neurons: int) -> None:
    groups = word_groups(neurons)
    assert groups[0][0] == 0 and groups[-1][1] == neurons
    assert all(a[1] == b[0] for a, b in itertools.pairwise(groups))
    for start, stop in groups:
        assert 0 < stop - start <= 24
        assert start // 64 == (stop - 1) // 64  # never crosses a multiple of 64


def test_word_groups_130() -> None:
    assert word_groups(130) == [(0, 24), (24, 48), (48, 64), (64, 88), (88, 112), (112, 128), (128, 130)]


@pytest.mark.parametrize(
    ("neurons", "groups"), [(1, [(0, 1)]), (8, [(0, 8)]), (9, [(0, 8), (8, 9)]), (20, [(0, 8), (8, 16), (16, 20)])]
)
def test_byte_groups_examples(neurons: int, groups: list[tuple[int, int]]) -> None:
    assert byte_groups(neurons) == groups


# --- Regressions found in review -------------------------------------------------------------
