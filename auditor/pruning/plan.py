"""``shrink``: turn a model's measured states into a smaller ONNX model, with no retraining.

Three passes, each over the audited data through the engine's own feed and runner
(``auditor.engine.feed``, ``auditor.engine.run``):

1. **Statistics** (``measure``): per neuron of every layer that can be cut (``surgery.find_sites``),
   whether its pre-activation was ever > 0, and the mean and variance of what it sends to each
   consumer (per feature of its block, after pooling and Flatten).
2. **Exact removals** (``exact_plan``): a ReLU-family neuron that never fired outputs exactly 0
   (or, after a BatchNorm that follows, one constant), so removing it and folding that constant
   into the consumers' biases changes no output on the audited data. Neurons whose pre-activations
   are positive multiples of another's (identical weight rows up to scale, and bias to match) are
   merged into it through positively homogeneous activations (ReLU, LeakyRelu; any activation
   when the multiple is 1).
3. **Budgeted removals** (``max_accuracy_drop``): the remaining neurons are ranked by a
   criterion (``CRITERIA``; docs/shrink.md measures all three). The mean-replacement error of a
   neuron is the variance of what it sends on times the squared norm of its outgoing weights:
   the mean squared change that replacing it by its mean makes to the next layer's
   pre-activations, neurons taken as uncorrelated. The default, "layer-share", divides that by
   its layer's total, so that layers whose consumers work at different scales compare fairly;
   it removed the most neurons and parameters within 0.5 pp on both MNIST CNNs measured. Mean
   replacement then removes them lowest first, and the longest prefix of the ranking whose
   held-out accuracy stays within the allowed drop is found by bisection (accuracy falls, in
   practice, as more neurons go).

The result is verified: it passes ``onnx.checker`` and runs in onnxruntime, and its outputs are
compared with the original's on the audited data.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
from onnx import external_data_helper

from auditor.config import AuditConfig
from auditor.datasets.batches import Dataset, tagged
from auditor.engine.audit import _numbered, audit
from auditor.engine.expose import with_outputs
from auditor.engine.feed import Feed, feed
from auditor.engine.find import ModelInput, describe
from auditor.engine.modelfile import LoadedModel, external_tensors, load_model
from auditor.engine.run import Session, ordered_map
from auditor.errors import AuditError, DataError, ModelError, first_line
from auditor.pruning import CRITERIA, MAX_ALIGN, MAX_DROP_PP
from auditor.pruning.report import LayerShrink, ModelFigures, ShrinkReport, model_cost
from auditor.pruning.surgery import Constants, Cut, Site, affine_rows, cut, find_sites
from auditor.report import Report

DEAD_ACTIVATIONS = frozenset({"Relu"})  # plus Clip with a lower bound of exactly 0 (ReLU6)
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu"})  # f(a·z) = a·f(z) for a > 0
DUPLICATE_TOLERANCE = 1e-6  # relative: rows equal up to float32 rounding of a scaled copy


@dataclass(frozen=True)
class NeuronStats:
    """What one site's neurons did on the audited data.

    ``fired[c]``: neuron c's pre-activation was > 0 on some sample and position. ``means`` and
    ``variances`` map each consumer's input tensor to (neurons, block) arrays: per feature of the
    neuron's block, over samples (and positions, for a Conv consumer).
    """

    fired: np.ndarray
    means: dict[str, np.ndarray]
    variances: dict[str, np.ndarray]


@dataclass
class _Accumulator:
    """Running count, sum and sum of squares per feature, in float64."""

    count: int = 0
    total: np.ndarray | None = None
    squares: np.ndarray | None = None

    def add(self, rows: np.ndarray) -> None:
        rows = rows.astype(np.float64, copy=False)
        total, squares = rows.sum(axis=0), np.square(rows).sum(axis=0)
        self.count += len(rows)
        self.total = total if self.total is None else self.total + total
        self.squares = squares if self.squares is None else self.squares + squares

    def mean_variance(self) -> tuple[np.ndarray, np.ndarray]:
        mean = self.total / self.count
        return mean, np.maximum(self.squares / self.count - mean**2, 0.0)


@dataclass(frozen=True)
class Plan:
    """Why each neuron of each site goes: "dead", "duplicate" or "budget", by site and neuron;
    ``merged`` gives a duplicate's (kept neuron, multiple)."""

    why: dict[str, dict[int, str]] = field(default_factory=dict)
    merged: dict[str, dict[int, tuple[int, float]]] = field(default_factory=dict)

    def with_budget(self, removals: Sequence[tuple[str, int]]) -> Plan:
        why = {site: dict(neurons) for site, neurons in self.why.items()}
        for site, neuron in removals:
            why.setdefault(site, {})[neuron] = "budget"
        return Plan(why, self.merged)

    def aligned(self, sites: Sequence[Site], multiple: int, order: Sequence[tuple[str, int]] = ()) -> Plan:
        """The plan with neurons given back so that every layer keeps a multiple of ``multiple``
        neurons (or all of them): the budget's last-ranked first, then dead ones, then duplicates.
        onnxruntime's blocked Conv kernels want channel counts in multiples of 8 (docs/shrink.md)."""
        if multiple <= 1:
            return self
        rank = {item: i for i, item in enumerate(order)}
        preference = {"budget": 0, "dead": 1, "duplicate": 2}
        why, merged = {}, {}
        for site in sites:
            gone = dict(self.why.get(site.name, {}))
            back = min((-(site.neurons - len(gone))) % multiple, len(gone))
            ranked = sorted(gone, key=lambda n: (preference[gone[n]], -rank.get((site.name, n), 0)))
            for n in ranked[:back]:
                del gone[n]
            if gone:
                why[site.name] = gone
                merged[site.name] = {j: m for j, m in self.merged.get(site.name, {}).items() if j in gone}
        return Plan(why, merged)

    def cuts(self, stats: dict[str, NeuronStats]) -> list[Cut]:
        cuts = []
        for site, why in self.why.items():
            merged = self.merged.get(site, {})
            removed = frozenset(n for n in why if n not in merged)
            cuts.append(Cut(site, removed, {j: merged[j] for j in why if j in merged}, stats[site].means))
        return cuts


def shrink(
    model: str | bytes | onnx.ModelProto | LoadedModel,
    data: Sequence[Dataset],
    holdout: Sequence[Dataset] | None = None,
    config: AuditConfig | None = None,
    *,
    max_accuracy_drop: float | None = None,
    criterion: str = "layer-share",
    align: int = 1,
    latency_repeats: int = 20,
    progress: Callable[[str], None] | None = None,
) -> ShrinkReport:
    """Shrink ``model`` on the audited ``data``: exact removals always, budgeted ones when
    ``max_accuracy_drop`` (percentage points of ``holdout`` accuracy) is given.

    ``holdout`` (default: ``data``) is where accuracy, η_N and aIQ are measured before and after
    and where the budget's stop is checked. ``config`` gives the preprocessing and the metric
    settings of those audits. ``criterion`` ranks neurons for the budget (``CRITERIA``);
    ``align`` keeps every layer's width a multiple of it (``Plan.aligned``). The report holds the
    shrunk model and both audit reports.
    """
    config = config or AuditConfig()
    if not 1 <= align <= MAX_ALIGN:
        raise AuditError(f"align must be in 1..{MAX_ALIGN}, got {align}")
    if criterion not in CRITERIA:
        raise AuditError(f"criterion must be one of {sorted(CRITERIA)}, got {criterion!r}")
    say = progress or (lambda message: None)
    if max_accuracy_drop is not None:
        check_drop(max_accuracy_drop)
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    original = loaded.proto
    holdout = list(holdout or data)
    structure = describe(original)
    sites = find_sites(original)
    cuttable = [site for site in sites if site.cuttable]
    say(f"{len(cuttable)} of {len(sites)} layers can be cut; measuring their neurons")
    stats = measure(original, cuttable, data, config)
    plan = exact_plan(original, cuttable, stats).aligned(cuttable, align)
    trace: list[tuple[int, float]] = []
    if max_accuracy_drop is not None:
        say("ranking neurons and searching the largest removal within the accuracy budget")
        plan, trace = budget_plan(original, cuttable, stats, plan, holdout, config, max_accuracy_drop, criterion, align)
    shrunk = cut(original, sites, plan.cuts(stats))
    _verify(shrunk)
    say("auditing the original and the shrunk model on the held-out data")
    before_report = audit(original, holdout, config)
    after_report = audit(shrunk, holdout, config)
    after_report = replace(after_report, model=replace(after_report.model, name=f"{loaded.name}, shrunk"))
    difference, output_scale = max_difference(original, shrunk, data, config)
    x = _sample_batch(holdout, structure.input, config)
    latencies = measure_latency([original, shrunk], structure.input, x, latency_repeats)
    split = holdout[0].split
    layers = _layer_rows(sites, plan, before_report, split)
    return ShrinkReport(
        model=shrunk,
        layers=layers,
        before=_figures(original, before_report, split, latencies[0]),
        after=_figures(shrunk, after_report, split, latencies[1]),
        criterion=CRITERIA[criterion],
        align=align,
        max_accuracy_drop=max_accuracy_drop,
        audited={"split": data[0].split, "samples": sum(d.count for d in data)},
        holdout={"split": split, "samples": sum(d.count for d in holdout)},
        max_abs_difference=difference,
        max_abs_output=output_scale,
        search=trace,
        latency_batch=len(x),
        before_report=before_report,
        after_report=after_report,
    )


def check_drop(value: float) -> None:
    """Refuse an accuracy budget that is not a finite number of percentage points in 0..100."""
    if not math.isfinite(value) or not 0 <= value <= MAX_DROP_PP:
        raise AuditError(
            f"--max-accuracy-drop is in percentage points of held-out accuracy and must be in 0..{MAX_DROP_PP:g}, "
            f"got {value:g}"
        )


def save_model(model: onnx.ModelProto, path: Path, *, like: Path | None = None) -> None:
    """Write ``model`` to ``path``; when the model at ``like`` keeps its weights in external data,
    so does this one, in ``<name>.data`` beside it (replaced, never appended to: onnx appends)."""
    tensors = external_tensors(onnx.load(str(like), load_external_data=False)) if like is not None else []
    if not tensors:
        onnx.save_model(model, str(path))
        return
    location = f"{path.name}.data"
    data = path.parent / location
    theirs = {(like.parent / external_data_helper.ExternalDataInfo(t).location).resolve() for t in tensors}
    if data.resolve() in theirs:
        raise AuditError(f"{location} holds the original model's weights; write the shrunk model under another name")
    data.unlink(missing_ok=True)
    onnx.save_model(model, str(path), save_as_external_data=True, location=location, size_threshold=0)


# --- Running the model over the data ----------------------------------------------------------


def stream(
    model: onnx.ModelProto, names: Sequence[str], datasets: Sequence[Dataset], config: AuditConfig
) -> Iterator[tuple[Feed, dict[str, np.ndarray]]]:
    """Each batch's ``Feed`` and the tensors ``names``, through the audit's own feed and runner."""
    model_input = describe(model).input
    runner = Session(with_outputs(model, names), model_input, config.device)
    feeding = config.feeding

    def run(item: tuple[str, int, object]) -> tuple[Feed, dict[str, np.ndarray]]:
        split, start, batch = item
        ready, x = feed(split, start, batch, model_input, feeding)  # type: ignore[arg-type]
        return ready, runner.run(x, names)

    yield from ordered_map(run, _numbered(tagged(datasets, feeding.batch_size), {}), runner.workers)


def measure(
    model: onnx.ModelProto, sites: Sequence[Site], data: Sequence[Dataset], config: AuditConfig
) -> dict[str, NeuronStats]:
    """Per site: which neurons ever fired, and per consumer input the mean and variance of each
    feature (``NeuronStats``), in one pass over ``data``; memory stays per feature, not per sample."""
    axes = {layer.name: layer.axis for layer in describe(model).layers}
    tensors = {c.tensor: c for site in sites for c in site.consumers}
    names = list(dict.fromkeys([*(site.name for site in sites), *tensors]))
    fired = {site.name: np.zeros(site.neurons, bool) for site in sites}
    sums = {tensor: _Accumulator() for tensor in tensors}
    for _, outputs in stream(model, names, data, config) if names else ():
        for site in sites:
            pre = np.moveaxis(outputs[site.name], axes[site.name], -1).reshape(-1, site.neurons)
            fired[site.name] |= (pre > 0).any(axis=0)
        for tensor, consumer in tensors.items():
            value = outputs[tensor]
            rows = np.moveaxis(value, 1, -1) if consumer.kind == "conv" else value
            sums[tensor].add(rows.reshape(-1, rows.shape[-1]))
    result = {}
    for site in sites:
        means, variances = {}, {}
        for consumer in site.consumers:
            mean, variance = sums[consumer.tensor].mean_variance()
            means[consumer.tensor] = mean.reshape(site.neurons, -1)
            variances[consumer.tensor] = variance.reshape(site.neurons, -1)
        result[site.name] = NeuronStats(fired[site.name], means, variances)
    return result


def accuracy(model: onnx.ModelProto, data: Sequence[Dataset], config: AuditConfig) -> float:
    """Top-1 accuracy of ``model``'s first output on labelled ``data``."""
    output = model.graph.output[0].name
    correct = total = 0
    for ready, outputs in stream(model, [output], data, config):
        if ready.labels is None:
            raise DataError("the held-out data has no labels, so its accuracy cannot be measured")
        scores = outputs[output].reshape(ready.samples, -1)
        correct += int(np.count_nonzero(scores.argmax(axis=1) == ready.labels))
        total += ready.samples
    return correct / total


def max_difference(
    original: onnx.ModelProto, shrunk: onnx.ModelProto, data: Sequence[Dataset], config: AuditConfig
) -> tuple[float, float]:
    """The largest absolute difference between the two models' outputs over ``data``, and the
    largest absolute output of the original there (the scale that float rounding is relative to)."""
    names = [o.name for o in original.graph.output]
    worst = scale = 0.0
    pairs = zip(stream(original, names, data, config), stream(shrunk, names, data, config), strict=True)
    for (_, before), (_, after) in pairs:
        for name in names:
            a, b = before[name].astype(np.float64), after[name].astype(np.float64)
            worst = max(worst, float(np.max(np.abs(a - b), initial=0.0)))
            scale = max(scale, float(np.max(np.abs(a), initial=0.0)))
    return worst, scale


def _sample_batch(data: Sequence[Dataset], model_input: ModelInput, config: AuditConfig) -> np.ndarray:
    """One batch of model input (the first batch of the held-out data) to time inference on."""
    dataset = data[0]
    batch = next(dataset.batches(config.batch_size))
    return feed(dataset.split, 0, batch, model_input, config.feeding)[1]


def measure_latency(
    models: Sequence[onnx.ModelProto], model_input: ModelInput, x: np.ndarray, repeats: int
) -> list[float]:
    """Median milliseconds of plain single-threaded CPU inference of ``x`` for each model, the
    models' runs interleaved so that a change in machine load hits them alike."""
    runners = [Session(model, model_input, "cpu") for model in models]
    names = [[model.graph.output[0].name] for model in models]
    times: list[list[float]] = [[] for _ in models]
    for runner, name in zip(runners, names, strict=True):
        runner.run(x, name)  # warm up
    for _ in range(max(1, repeats)):
        for i, (runner, name) in enumerate(zip(runners, names, strict=True)):
            start = time.perf_counter()
            runner.run(x, name)
            times[i].append((time.perf_counter() - start) * 1000)
    return [float(np.median(t)) for t in times]


# --- Deciding what goes -----------------------------------------------------------------------


def exact_plan(model: onnx.ModelProto, sites: Sequence[Site], stats: dict[str, NeuronStats]) -> Plan:
    """Dead neurons and positive-multiple duplicates: removals that change no output on the
    audited data. At least one neuron of every layer stays."""
    clip_zero = _clip_at_zero(model)
    why: dict[str, dict[int, str]] = {}
    merged: dict[str, dict[int, tuple[int, float]]] = {}
    for site in sites:
        gone: dict[int, str] = {}
        if site.activation in DEAD_ACTIVATIONS or (site.activation == "Clip" and site.name in clip_zero):
            for n in np.flatnonzero(~stats[site.name].fired):  # a constant meets a padded Conv's zeros: not exact
                if all(c.exact_fold or not np.any(stats[site.name].means[c.tensor][n]) for c in site.consumers):
                    gone[int(n)] = "dead"
        duplicates = _duplicates(model, site, set(gone))
        gone.update((j, "duplicate") for j in duplicates)
        if len(gone) >= site.neurons:  # keep one: the lowest-numbered neuron that went
            first = min(gone)
            gone.pop(first)
            duplicates.pop(first, None)
        if gone:
            why[site.name] = gone
            merged[site.name] = {j: duplicates[j] for j in gone if j in duplicates}
    return Plan(why, merged)


def _duplicates(model: onnx.ModelProto, site: Site, skip: set[int]) -> dict[int, tuple[int, float]]:
    """Neuron j → (i, a) where j's pre-activation is a·(i's), a > 0, and the activation lets the
    consumers take a·(i's output) in place of j's output: a homogeneous one with nothing
    per-neuron after it, or any activation when a is 1."""
    affine = affine_rows(model, site)
    if affine is None:
        return {}
    rows, bias = affine
    full = np.concatenate([rows, bias[:, None]], axis=1)
    norms = np.linalg.norm(full, axis=1)
    homogeneous = site.activation in HOMOGENEOUS and not site.post_slices
    usable = np.array([n not in skip and norms[n] > 0 for n in range(site.neurons)])
    unit = np.divide(full, norms[:, None], out=np.zeros_like(full), where=norms[:, None] > 0)
    found: dict[int, tuple[int, float]] = {}
    for j in np.flatnonzero(usable):
        earlier = np.flatnonzero(usable[:j])
        close = earlier[np.max(np.abs(unit[earlier] - unit[j]), axis=1, initial=0.0) <= DUPLICATE_TOLERANCE]
        for i in close:
            scale = float(norms[j] / norms[i])
            if homogeneous or (abs(scale - 1) <= DUPLICATE_TOLERANCE and not site.post_slices):
                found[int(j)] = (int(i), scale)
                usable[j] = False  # j goes; the earlier neuron it matches stays the one to merge into
                break
    return found


def _clip_at_zero(model: onnx.ModelProto) -> set[str]:
    """Inputs of Clip nodes whose lower bound is exactly 0 (ReLU6 and its kin)."""
    constants = Constants(model.graph)
    found = set()
    for node in model.graph.node:
        if node.op_type != "Clip":
            continue
        low = next((a.f for a in node.attribute if a.name == "min"), None)
        if low is None and len(node.input) > 1 and node.input[1]:
            value = constants.value(node.input[1])
            low = None if value is None or value.size != 1 else float(value.reshape(()))
        if low == 0.0:
            found.add(node.input[0])
    return found


def ranking(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    stats: dict[str, NeuronStats],
    plan: Plan,
    criterion: str = "layer-share",
) -> list[tuple[str, int]]:
    """The neurons the budget may remove, lowest score by ``criterion`` (a ``CRITERIA`` key) first;
    each layer's highest-scoring remaining neuron is left out, so that no layer loses every neuron."""
    constants = Constants(model.graph)
    scored: list[tuple[float, str, int]] = []
    for site in sites:
        variance, energy = np.zeros(site.neurons), np.zeros(site.neurons)
        error = np.zeros(site.neurons)
        for consumer in site.consumers:
            weight = constants.value(model.graph.node[consumer.node].input[1]).astype(np.float64)
            moved = np.moveaxis(weight, consumer.axis, 0)
            per_feature = np.square(moved).reshape(moved.shape[0], -1).sum(axis=1).reshape(site.neurons, -1)
            spread = stats[site.name].variances[consumer.tensor]
            error += (spread * per_feature).sum(axis=1)
            energy += per_feature.sum(axis=1)
            variance += spread.sum(axis=1)
        gone = plan.why.get(site.name, {})
        left = [n for n in range(site.neurons) if n not in gone]
        if len(left) < 2:
            continue
        score = {
            "mean-replacement": error,
            "layer-share": error / max(error[left].sum(), 1e-300),
            "weight-norm": energy,
        }[criterion]
        kept = max(left, key=lambda n: score[n])
        scored += [(float(score[n]), site.name, n) for n in left if n != kept]
    scored.sort(key=lambda item: item[0])
    return [(name, neuron) for _, name, neuron in scored]


def budget_plan(
    model: onnx.ModelProto,
    sites: Sequence[Site],
    stats: dict[str, NeuronStats],
    plan: Plan,
    holdout: Sequence[Dataset],
    config: AuditConfig,
    max_drop: float,
    criterion: str = "layer-share",
    align: int = 1,
) -> tuple[Plan, list[tuple[int, float]]]:
    """The exact plan plus the longest prefix of ``ranking`` whose held-out accuracy is within
    ``max_drop`` percentage points of the original's, each candidate aligned to ``align``
    neurons (``Plan.aligned``), and the (budget removals, accuracy) pairs tried."""
    order = ranking(model, sites, stats, plan, criterion)
    base = accuracy(model, holdout, config)
    tried: list[tuple[int, float]] = []

    def candidate(k: int) -> Plan:
        return plan.with_budget(order[:k]).aligned(sites, align, order)

    def holds(k: int) -> bool:
        chosen = candidate(k)
        value = accuracy(cut(model, sites, chosen.cuts(stats)), holdout, config)
        tried.append((sum(r == "budget" for why in chosen.why.values() for r in why.values()), value))
        return (base - value) * 100 <= max_drop + 1e-9

    low, high = 0, len(order)
    if order and holds(high):
        low = high
    while high - low > 1:
        middle = (low + high) // 2
        if holds(middle):
            low = middle
        else:
            high = middle
    return candidate(low), [(0, base), *tried]


# --- The result -------------------------------------------------------------------------------


def _verify(model: onnx.ModelProto) -> None:
    """The shrunk model passes the checker and loads in onnxruntime, or the shrink fails loudly."""
    try:
        onnx.checker.check_model(model)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"the shrunk model fails onnx.checker ({first_line(exc)}); please report it") from None
    Session(model, describe(model).input, "cpu")


def _layer_rows(sites: Sequence[Site], plan: Plan, before: Report, split: str) -> list[LayerShrink]:
    suggested = {layer.name: layer.suggested_neurons for layer in before.splits[split].layers}
    rows = []
    for site in sites:
        why = plan.why.get(site.name, {})
        counts = {reason: sum(1 for r in why.values() if r == reason) for reason in ("dead", "duplicate", "budget")}
        rows.append(
            LayerShrink(
                name=site.name,
                op=site.op,
                activation=site.activation,
                neurons_before=site.neurons,
                neurons_after=site.neurons - len(why),
                dead=counts["dead"],
                duplicate=counts["duplicate"],
                budget=counts["budget"],
                suggested=suggested.get(site.name),
                left_whole=site.refusal,
                removed=sorted(why),
            )
        )
    return rows


def _figures(model: onnx.ModelProto, report: Report, split: str, latency_ms: float) -> ModelFigures:
    params, macs = model_cost(model)
    figures = report.splits[split]
    return ModelFigures(
        params=params,
        multiply_adds=macs,
        latency_ms=latency_ms,
        accuracy=figures.accuracy,
        network_efficiency=figures.network_efficiency,
        aiq=figures.aiq,
    )
