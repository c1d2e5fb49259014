"""SplitTally: a batch's layers counted on a pool of threads give the counts of one thread."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from models import CASES, lenet_model

from auditor import AuditConfig, prepare
from auditor.datasets.batches import Batch
from auditor.engine.audit import counting_threads
from auditor.engine.feed import feed
from auditor.engine.stores import MemoryBudget
from auditor.engine.tally import SplitTally

FEEDING = AuditConfig().feeding


def tallied(model: object, x: np.ndarray, pool: ThreadPoolExecutor | None, budget_bytes: int) -> dict:
    prepared = prepare(model, device="cpu")
    counted = frozenset(out.layer.name for out in prepared.exposed.layers)
    with MemoryBudget(budget_bytes) as budget:
        split = SplitTally(prepared.exposed, counted, 0, False, budget, pool)
        for start in range(0, len(x), 40):
            ready, model_x = feed("test", start, Batch(x[start : start + 40]), prepared.structure.input, FEEDING)
            split.add(ready, prepared.runner.run(model_x, prepared.exposed.output_names))
        return {name: (c.total, c.counts().tolist()) for name, c in split.counters.items()}


def test_layers_counted_side_by_side_give_the_counts_of_one_thread() -> None:
    x = np.random.default_rng(0).integers(0, 256, (200, 28, 28), dtype=np.uint8)
    one = tallied(lenet_model(), x, None, 1 << 30)
    with ThreadPoolExecutor(4) as pool:
        assert tallied(lenet_model(), x, pool, 1 << 30) == one
    assert len(one) == 4 and all(total > 0 for total, _ in one.values())


def test_wide_layers_counted_side_by_side_while_the_budget_spills_give_the_counts_of_one_thread() -> None:
    model, x, _ = CASES["conv"](130)
    with ThreadPoolExecutor(2) as pool:
        assert tallied(model, x, pool, 1 << 12) == tallied(model, x, None, 1 << 12)


@pytest.mark.parametrize(
    ("cores", "layers", "threads"), [(1, 5, 1), (2, 5, 1), (4, 5, 2), (16, 5, 5), (16, 40, 8), (64, 40, 16)]
)
def test_half_the_cores_count_at_most_one_thread_per_layer(cores: int, layers: int, threads: int) -> None:
    assert counting_threads(cores, layers) == threads
