"""auditor.engine.summary: tallies in, a ``Report`` and the warnings that explain its nulls out.

The tallies come from real runs of hand-built models (fed by ``auditor.engine.feed``, run by the
prepared model's runner); the figures are checked against numbers worked out here.
"""

from __future__ import annotations

import numpy as np
import pytest
from models import dense_model, run

from auditor import AuditConfig, Prepared, Report, prepare
from auditor.datasets.batches import Batch
from auditor.engine.feed import feed
from auditor.engine.stores import MemoryBudget
from auditor.engine.summary import TOP_STATES, layer_stats, split_cna, summarize
from auditor.engine.tally import SplitTally

CPU = AuditConfig(device="cpu")
# h1 = x, h2 = relu(x), logits = (s − 1, 1 − s) with s = h2₁ + h2₂
LAYERS = [(np.eye(2), np.zeros(2)), (np.eye(2), np.zeros(2)), (np.array([[1.0, -1.0], [1.0, -1.0]]), [-1.0, 1.0])]
X = np.array([[0.5, 0.25], [0.5, 0.75], [0.25, 0.25], [0.75, 0.5], [0.125, 0.875], [0.5, 0.5]], np.float32)
Y = np.array([1, 0, 1, 0, 0, 1])


def tallied(splits: dict[str, Batch], config: AuditConfig = CPU, layers=LAYERS) -> tuple[Prepared, dict]:
    """Each split fed and run in one batch and tallied, as the audit loop does: the prepared
    model and each split's ``SplitResult``."""
    prepared = prepare(dense_model(layers), device="cpu")
    counted = frozenset(out.layer.name for out in prepared.exposed.layers if out.layer.role == "hidden")
    results = {}
    with MemoryBudget(config.memory_budget) as budget:
        for split, batch in splits.items():
            ready, model_x = feed(split, 0, batch, prepared.structure.input, config.feeding)
            tally = SplitTally(
                prepared.exposed, counted, config.margin_seed, prepared.structure.output_is_probability, budget
            )
            tally.add(ready, prepared.runner.run(model_x, prepared.exposed.output_names))
            results[split] = tally.finish(TOP_STATES)
    return prepared, results


def summary_of(splits: dict[str, Batch], config: AuditConfig = CPU) -> Report:
    prepared, results = tallied(splits, config)
    return summarize(prepared.model_info, prepared.providers, prepared.structure.layers, results, config)


def test_layer_stats_are_the_states_of_the_run() -> None:
    signs = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1], [1, 1], [1, 1]], np.float32)
    prepared, results = tallied({"test": Batch(signs)})
    h1 = prepared.structure.layers[0]
    stats = layer_stats(h1, results["test"].states["h1"], results["test"].figures.units["h1"], CPU.metrics)
    # h1 = x: states 11 three times, 10, 01 and 00 once each
    entropy = 0.5 + 0.5 * np.log2(6)
    assert (stats.name, stats.neurons, stats.positions) == ("h1", 2, 1)
    assert (stats.states_total, stats.states_distinct) == (6, 4)
    assert stats.entropy_bits == pytest.approx(entropy, abs=1e-12)
    assert stats.efficiency == pytest.approx(entropy / 2, abs=1e-12)
    assert stats.max_entropy_bits == pytest.approx(np.log2(6))
    assert stats.suggested_neurons == 2  # ceil(1.79 / 0.75) = 3, clamped to N
    assert stats.wider_than_data is False  # N = 2 < ceil(log2 6) = 3
    assert stats.top_probabilities == pytest.approx([0.5, 1 / 6, 1 / 6, 1 / 6])
    assert stats.probability_quantiles == pytest.approx(
        {"0": 1 / 6, "0.25": 1 / 6, "0.5": 1 / 6, "0.75": 1 / 4, "1": 0.5}
    )


def test_splits_are_reported_train_first_with_their_own_warnings() -> None:
    report = summary_of({"validation": Batch(X), "test": Batch(X, Y), "train": Batch(X, Y)})
    assert list(report.splits) == ["train", "test", "validation"]
    assert report.splits["train"].accuracy == report.splits["test"].accuracy
    assert report.splits["validation"].accuracy is None
    assert "validation: no labels, so accuracy and aIQ are null" in report.warnings
    assert report.config == CPU.to_dict() and report.providers == ["CPUExecutionProvider"]


def test_one_split_says_why_cna_margin_is_null() -> None:
    report = summary_of({"test": Batch(X, Y)})
    assert report.cna_margin is None
    assert report.warnings[-1] == "CNA-Margin is null: it compares a train and a test split; audit with --split both"


def test_cna_margin_needs_labels_for_every_training_sample() -> None:
    report = summary_of({"train": Batch(X), "test": Batch(X, Y)})
    assert report.cna_margin is None
    assert any("CNA-Margin is null" in w for w in report.warnings), report.warnings


@pytest.mark.parametrize("aggregate", ["sum", "mean"])
def test_cna_slopes_come_from_the_per_layer_sums_or_means(aggregate: str) -> None:
    config = AuditConfig(device="cpu", aggregate=aggregate)
    prepared, results = tallied({"test": Batch(X, Y)}, config)
    figures = results["test"].figures
    alpha = np.concatenate(figures.alpha)
    cna, beta, warnings = split_cna("test", prepared.structure.layers, figures, alpha, config.metrics)
    phi = np.stack([t.sum(axis=1) for t in run(dense_model(LAYERS), X, ["h1", "h2", "logits"])], axis=1)
    if aggregate == "mean":
        phi = phi / 2  # every layer has 2 units
    expected = np.polyfit(np.arange(1, 4), phi.T.astype(np.float64), 1)[0]
    np.testing.assert_allclose(beta, expected, rtol=1e-5, atol=1e-6)
    assert cna == pytest.approx(np.corrcoef(alpha, expected)[0, 1], abs=1e-5)
    assert warnings == []


def test_cna_without_two_layers_is_null_with_its_reason() -> None:
    config = AuditConfig(device="cpu", cna_include_output_layer=False)
    prepared, results = tallied({"test": Batch(X)}, config, LAYERS[:1] + LAYERS[2:])  # one hidden layer, then logits
    figures = results["test"].figures
    cna, beta, warnings = split_cna("test", prepared.structure.layers, figures, figures.alpha[0], config.metrics)
    assert (cna, beta) == (None, None)
    assert warnings == ["test: CNA needs at least 2 layers, found 1; CNA is null"]
