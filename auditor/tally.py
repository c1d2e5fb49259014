"""What one split accumulates over its batches: state counts, φ sums, α, accuracy and margins.

A ``SplitTally`` reads the runner's outputs by the names ``graph.expose`` gave them. Everything
in it merges by adding (SPEC §2), so batching, interleaved splits and shards never change the
counts. It holds the distinct states of each counted layer (bounded by the counting store) and
a few floats per sample for CNA and CNA-Margin.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from auditor import metrics
from auditor.count import LayerCounter
from auditor.errors import DataError
from auditor.feed import Feed
from auditor.graph import Exposed


@dataclass
class SplitTally:
    """Everything one split accumulates, keyed by layer name where it is per layer.

    ``counted`` names the layers whose states are counted (the efficiency layers); every
    layer's φ is kept, in ``exposed.layers`` order, for CNA.
    """

    exposed: Exposed
    counted: frozenset[str]
    margin_seed: int
    output_is_probability: bool
    samples: int = 0
    labelled: int = 0
    correct: int = 0
    clipped: int = 0
    nonfinite_outputs: int = 0
    counters: dict[str, LayerCounter] = field(default_factory=dict)
    units: dict[str, int] = field(default_factory=dict)  # neurons × positions of each layer
    nonfinite_sums: dict[str, int] = field(default_factory=dict)
    alpha: list[np.ndarray] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)  # (samples, layers) float64 φ per batch
    probability_margins: list[np.ndarray] = field(default_factory=list)
    uniforms: list[np.ndarray] = field(default_factory=list)
    logit_margins: list[np.ndarray] = field(default_factory=list)

    def add(self, batch: Feed, outputs: dict[str, np.ndarray]) -> None:
        """Tally one batch from its ``Feed`` and the runner's outputs, read by name."""
        n = batch.samples
        for out in self.exposed.layers:
            name, keys = out.layer.name, outputs[out.keys]
            if name not in self.units:
                self.units[name] = out.layer.neurons * (keys.size // (n * len(out.groups)))
                self.nonfinite_sums[name] = 0
                if name in self.counted:
                    self.counters[name] = LayerCounter(out.layer.neurons, out.groups, out.group_axis)
            if name in self.counters:
                self.counters[name].add(keys)
        sums = np.stack([outputs[out.sum] for out in self.exposed.layers], axis=1).astype(np.float64)
        for out, bad in zip(self.exposed.layers, np.count_nonzero(~np.isfinite(sums), axis=0), strict=True):
            self.nonfinite_sums[out.layer.name] += int(bad)
        self.sums.append(sums)
        self.alpha.append(batch.alpha)
        self.clipped += batch.clipped
        self.samples += n
        scores = outputs[self.exposed.prediction].reshape(n, -1).astype(np.float32, copy=False)
        self.nonfinite_outputs += int(np.count_nonzero(~np.isfinite(scores)))
        if batch.labels is not None:
            logits = outputs[self.exposed.logits] if self.exposed.logits is not None else None
            self._score(batch, scores, logits)

    def _score(self, batch: Feed, scores: np.ndarray, logits: np.ndarray | None) -> None:
        labels, classes = batch.labels, scores.shape[1]
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
        self.labelled += len(labels)
        self.correct += int(np.count_nonzero(scores.argmax(axis=1) == labels))
        index = np.arange(batch.start, batch.start + len(labels), dtype=np.int64)
        self.uniforms.append(metrics.sample_uniforms(index, self.margin_seed))
        self.probability_margins.append(metrics.probability_margins(scores, labels, self.output_is_probability))
        if logits is not None:
            self.logit_margins.append(
                metrics.logit_margins(logits.reshape(len(labels), -1).astype(np.float32, copy=False), labels)
            )
