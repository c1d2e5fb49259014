"""SPEC §1's state point: efficiency read at the block output after BatchNorm, Dropout and affine ops.

Hand-built graphs put those ops after the activation; the reference counts come from the tensors
onnxruntime itself produces, counted the slow, obvious way (SPEC §2).
"""

from __future__ import annotations

import numpy as np
import pytest
from models import Net, mlp, reference_counts, run

from auditor import AuditConfig, audit
from auditor.datasets.batches import Batch
from auditor.engine.find import describe

X = np.random.default_rng(3).standard_normal((400, 6)).astype(np.float32)


def normalised_mlp(after: str) -> tuple:
    """Dense(6→8) → Elu → ``after`` → Dense(8→5) → Elu → Dense(5→3); returns the model and the
    names of each hidden layer's pre-activation and expected block output."""
    net = Net(("batch", 6), seed=4)
    pre1 = net.dense(net.input, 6, 8, out="pre1")
    act1 = net.op("Elu", pre1, out="act1")
    if after == "batchnorm":
        scale, bias = net.const(net.random(8) + 2.0), net.const(net.random(8))
        mean, var = net.const(net.random(8) * 0.5 + 0.3), net.const(np.abs(net.random(8)) + 0.5)
        block1 = net.op("BatchNormalization", act1, scale, bias, mean, var, out="block1")
    elif after == "dropout-then-shift":
        dropped = net.op("Dropout", act1, out="dropped1")
        block1 = net.op("Sub", dropped, net.const(np.full(8, 0.4)), out="block1")
    else:  # a constant scale then a constant shift, constant first
        scaled = net.op("Mul", net.const(np.full(8, 1.5)), act1, out="scaled1")
        block1 = net.op("Add", scaled, net.const(net.random(8) * 0.5), out="block1")
    pre2 = net.dense(block1, 8, 5, out="pre2")
    logits = net.dense(net.op("Elu", pre2, out="act2"), 5, 3, out="logits")
    return net.build(logits), {"pre1": "block1", "pre2": "pre2"}


@pytest.mark.parametrize("after", ["batchnorm", "dropout-then-shift", "affine-constants"])
def test_block_output_is_found_after_the_activation(after: str) -> None:
    model, expected = normalised_mlp(after)
    layers = {layer.name: layer for layer in describe(model).layers}
    assert {name: layers[name].block_output for name in expected} == expected
    assert layers["logits"].block_output == "logits"


@pytest.mark.parametrize("after", ["batchnorm", "dropout-then-shift", "affine-constants"])
def test_each_state_point_counts_its_own_tensor(after: str) -> None:
    model, blocks = normalised_mlp(after)
    tensors = dict(zip(["pre1", "pre2", "block1"], run(model, X, ["pre1", "pre2", "block1"]), strict=True))
    for states_at, read in (("pre-activation", {"pre1": "pre1"}), ("block-output", blocks)):
        report = audit(model, [("test", Batch(X))], AuditConfig(device="cpu", states_at=states_at))
        assert report.config["states_at"] == states_at
        for stats in report.splits["test"].layers:
            counts = reference_counts(tensors[read.get(stats.name, stats.name)], axis=1)
            assert stats.states_distinct == len(counts)
            assert stats.states_total == counts.sum() == len(X)
            p = counts / counts.sum()
            assert stats.entropy_bits == pytest.approx(float(-(p * np.log2(p)).sum()), rel=1e-12, abs=1e-12)


def test_both_state_points_differ_where_batchnorm_shifts_the_sign() -> None:
    model, _ = normalised_mlp("batchnorm")
    (pre1, block1) = run(model, X, ["pre1", "block1"])
    assert not np.array_equal(pre1 > 0, block1 > 0)  # the test has teeth: the sign patterns differ
    reports = [
        audit(model, [("test", Batch(X))], AuditConfig(device="cpu", states_at=at)).splits["test"].layers[0]
        for at in ("pre-activation", "block-output")
    ]
    assert reports[0].entropy_bits != reports[1].entropy_bits


def test_cna_always_uses_pre_activation_sums() -> None:
    model, _ = normalised_mlp("batchnorm")
    cna = [
        audit(model, [("test", Batch(X))], AuditConfig(device="cpu", states_at=at)).splits["test"].cna
        for at in ("pre-activation", "block-output")
    ]
    assert cna[0] == cna[1]


@pytest.mark.parametrize("activation", ["Relu", "Elu", "Sigmoid"])
def test_both_settings_agree_without_ops_after_the_activation(activation: str) -> None:
    model = mlp([6, 9, 7, 3], activation=activation, seed=2)
    assert all(layer.block_output == layer.name for layer in describe(model).layers)
    reports = [
        audit(model, [("test", Batch(X))], AuditConfig(device="cpu", states_at=at)).to_dict()
        for at in ("pre-activation", "block-output")
    ]
    for report in reports:
        report.pop("config")
    assert reports[0] == reports[1]


def test_a_block_that_branches_stays_at_the_pre_activation() -> None:
    # the activation output feeds two consumers: no single chain to follow
    net = Net(("batch", 6), seed=5)
    act = net.op("Relu", net.dense(net.input, 6, 4, out="pre1"))
    both = net.op("Add", net.op("Identity", act), net.op("Mul", act, net.const(np.full(4, 2.0))))
    model = net.build(net.dense(both, 4, 3, out="logits"))
    assert describe(model).layers[0].block_output == "pre1"
