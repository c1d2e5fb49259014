"""What one split accumulates over its batches: state counts, φ sums, α, accuracy and margins.

A ``SplitTally`` reads the runner's outputs by the names ``expose.expose`` gave them. It keeps two
things apart: the state counters of the counted layers, held within the audit's
``MemoryBudget`` (past it they spill sorted runs to disk), and ``SplitFigures``, everything
else: counts of samples and a few floats per sample for CNA and CNA-Margin. Both merge by
adding (SPEC §2), so batching, interleaved splits and shards never change the counts. A layer's
keys arrive as packed groups, counted here (a layer per thread of the audit's counting pool, so
a many-core machine counts on all its cores), or already counted on a device
(``devcount.CountedKeys``), whose runs join the same stores.
``finish`` turns a tally into a ``SplitResult``, which is what the summary reads, whether the
split was counted here or by shards on a cluster.
"""

from __future__ import annotations

from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from auditor.engine import metrics
from auditor.engine.count import LayerCounter, StateSummary
from auditor.engine.devcount import CountedKeys
from auditor.engine.expose import Exposed
from auditor.engine.feed import Feed
from auditor.engine.stores import MemoryBudget
from auditor.errors import DataError


@dataclass
class SplitFigures:
    """A split's figures other than its state counts: plain data that pickles and merges.

    Per-sample arrays are kept in sample order, one array per batch; ``merge`` appends another
    part of the same split that comes after this one (a later shard).
    """

    samples: int = 0
    labelled: int = 0
    correct: int = 0
    clipped: int = 0
    nonfinite_outputs: int = 0
    units: dict[str, int] = field(default_factory=dict)  # neurons × positions of each layer
    nonfinite_sums: dict[str, int] = field(default_factory=dict)
    alpha: list[np.ndarray] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)  # (samples, layers) float64 φ per batch
    probability_margins: list[np.ndarray] = field(default_factory=list)
    uniforms: list[np.ndarray] = field(default_factory=list)
    logit_margins: list[np.ndarray] = field(default_factory=list)

    def merge(self, later: SplitFigures) -> None:
        """Add the figures of the samples that follow these in the same split."""
        for name in ("samples", "labelled", "correct", "clipped", "nonfinite_outputs"):
            setattr(self, name, getattr(self, name) + getattr(later, name))
        self.units = {**later.units, **self.units}
        for layer, bad in later.nonfinite_sums.items():
            self.nonfinite_sums[layer] = self.nonfinite_sums.get(layer, 0) + bad
        for name in ("alpha", "sums", "probability_margins", "uniforms", "logit_margins"):
            getattr(self, name).extend(getattr(later, name))


@dataclass(frozen=True)
class SplitResult:
    """A finished split: its figures, and the state summary of each counted layer by name."""

    figures: SplitFigures
    states: dict[str, StateSummary]


@dataclass
class SplitTally:
    """Everything one split accumulates while its batches run.

    ``counted`` names the layers whose states are counted (the efficiency layers); every
    layer's φ is kept, in ``exposed.layers`` order, for CNA.
    """

    exposed: Exposed
    counted: frozenset[str]
    margin_seed: int
    output_is_probability: bool
    budget: MemoryBudget
    pool: Executor | None = None  # counts layers side by side; None counts them one after another
    figures: SplitFigures = field(default_factory=SplitFigures)
    counters: dict[str, LayerCounter] = field(default_factory=dict)

    def add(self, batch: Feed, outputs: dict[str, Any]) -> None:
        """Tally one batch from its ``Feed`` and the runner's outputs, read by name; a layer's keys
        are packed groups (an array) or already counted (``CountedKeys``)."""
        figures, n = self.figures, batch.samples
        taken: list[tuple[LayerCounter, Any]] = []
        for out in self.exposed.layers:
            name, keys = out.layer.name, outputs[out.keys]
            if name not in figures.units:
                states = keys.states if isinstance(keys, CountedKeys) else keys.size // len(out.groups)
                figures.units[name] = out.layer.neurons * (states // n)
                figures.nonfinite_sums[name] = 0
                if name in self.counted:
                    self.counters[name] = LayerCounter(out.layer.neurons, out.groups, out.group_axis, self.budget)
            if name in self.counters:
                taken.append((self.counters[name], keys))
        self._count(taken)
        sums = np.stack([outputs[out.sum] for out in self.exposed.layers], axis=1).astype(np.float64)
        for out, bad in zip(self.exposed.layers, np.count_nonzero(~np.isfinite(sums), axis=0), strict=True):
            figures.nonfinite_sums[out.layer.name] += int(bad)
        figures.sums.append(sums)
        figures.alpha.append(batch.alpha)
        figures.clipped += batch.clipped
        figures.samples += n
        scores = outputs[self.exposed.prediction].reshape(n, -1).astype(np.float32, copy=False)
        figures.nonfinite_outputs += int(np.count_nonzero(~np.isfinite(scores)))
        if batch.labels is not None:
            logits = outputs[self.exposed.logits] if self.exposed.logits is not None else None
            self._score(batch, scores, logits)

    def _count(self, taken: list[tuple[LayerCounter, Any]]) -> None:
        """Count each layer's keys into its own counter (on the pool's threads), then settle the budget once."""
        if self.pool is None or len(taken) < 2:
            for counter, keys in taken:
                _absorb(counter, keys)
        else:
            for done in [self.pool.submit(_absorb, counter, keys) for counter, keys in taken]:
                done.result()
        self.budget.settle()

    def finish(self, top_k: int) -> SplitResult:
        """The split's figures and each counted layer's state summary (one streaming merge each)."""
        return SplitResult(self.figures, {name: counter.summary(top_k) for name, counter in self.counters.items()})

    def _score(self, batch: Feed, scores: np.ndarray, logits: np.ndarray | None) -> None:
        figures, labels, classes = self.figures, batch.labels, scores.shape[1]
        if classes < 2:
            raise DataError(
                f"the model gives {classes} score per sample, so labels cannot be scored; "
                "audit without labels, or a model with one output per class"
            )
        if labels.min() < 0 or labels.max() >= classes:
            raise DataError(
                f"{batch.split} labels run from {labels.min()} to {labels.max()} but the model has {classes} "
                f"classes (0–{classes - 1}); fix the labels or the model"
            )
        figures.labelled += len(labels)
        figures.correct += int(np.count_nonzero(scores.argmax(axis=1) == labels))
        index = np.arange(batch.start, batch.start + len(labels), dtype=np.int64)
        figures.uniforms.append(metrics.sample_uniforms(index, self.margin_seed))
        figures.probability_margins.append(metrics.probability_margins(scores, labels, self.output_is_probability))
        if logits is not None:
            figures.logit_margins.append(
                metrics.logit_margins(logits.reshape(len(labels), -1).astype(np.float32, copy=False), labels)
            )


def _absorb(counter: LayerCounter, keys: Any) -> None:
    """One layer's keys into its counter: packed groups counted here, or a device's run taken as it is."""
    if isinstance(keys, CountedKeys):
        counter.absorb_run(keys.run)
    else:
        counter.absorb(keys)
