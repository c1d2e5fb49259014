"""The audit pipeline: one model, a stream of tagged batches, one report.

``prepare`` does the per-model work once (load, find layers, expose them, start a session);
``audit`` streams batches through it. Inference of the next batch runs in a background thread
while the current one is counted, and nothing grows with the data except one float per sample
for CNA and the distinct states of each layer.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnxruntime as ort

from auditor import metrics
from auditor.config import AuditConfig
from auditor.count import LayerCounter
from auditor.data import Batch
from auditor.errors import AuditError, CancelledError, DataError, first_line
from auditor.graph import Exposed, Layer, ModelInput, Structure, describe, expose, packing, with_outputs, with_shape
from auditor.modelfile import LoadedModel, load_model
from auditor.report import CnaMargin, LayerInfo, LayerStats, ModelInfo, Report, SplitReport
from auditor.run import create_session, ordered_map, workers_for

CNA_WINDOW = 25
CNA_POINTS = 100

ModelSource = str | os.PathLike[str] | bytes | onnx.ModelProto


@dataclass(frozen=True)
class Prepared:
    """A model made ready to audit: its layers found and exposed, its session started.

    Reusable across audits and safe to share between threads (onnxruntime's ``run`` is).
    """

    model: LoadedModel
    structure: Structure
    exposed: Exposed
    session: ort.InferenceSession
    aggregate: str

    @property
    def providers(self) -> list[str]:
        return list(self.session.get_providers())

    @property
    def model_info(self) -> ModelInfo:
        proto, structure = self.model.proto, self.structure
        return ModelInfo(
            sha256=self.model.sha256,
            name=self.model.name,
            producer=f"{proto.producer_name} {proto.producer_version}".strip(),
            opset=structure.opset,
            input_name=structure.input.name,
            input_shape=list(structure.input.shape),
            input_dtype=str(structure.input.dtype),
            layers=[
                LayerInfo(layer.name, layer.op, layer.activation, layer.role, layer.neurons, layer.positions)
                for layer in structure.layers
            ],
        )


def prepare(model: ModelSource | LoadedModel, *, device: str = "auto", aggregate: str = "sum") -> Prepared:
    """Load ``model``, find its layers (SPEC §1), expose them and start an onnxruntime session."""
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    structure = _observe_missing_shapes(loaded.proto, describe(loaded.proto))
    exposed = expose(loaded.proto, structure, aggregate)
    session = create_session(exposed.model, device)
    return Prepared(loaded, structure, exposed, session, aggregate)


def _observe_missing_shapes(model: onnx.ModelProto, structure: Structure) -> Structure:
    """Layers whose sizes shape inference left unknown, measured on one zero sample.

    Shape inference "is not guaranteed to be complete" (custom ops, computed Reshapes); when
    the input's sample shape is known, running the model once tells the layers' real shapes.
    """
    unknown = [layer.name for layer in structure.layers if layer.axis is not None and layer.neurons is None]
    dims = structure.input.shape
    if not unknown or len(dims) < 2 or not all(isinstance(d, int) and d > 0 for d in dims[1:]):
        return structure
    batch = dims[0] if isinstance(dims[0], int) and dims[0] > 0 else 1
    probe = create_session(with_outputs(model, unknown), "cpu")
    sample = np.zeros((batch, *dims[1:]), structure.input.dtype)
    seen = dict(
        zip(unknown, (out.shape for out in _session_run(probe, unknown, structure.input.name, sample)), strict=True)
    )
    return replace(structure, layers=[with_shape(layer, seen.get(layer.name)) for layer in structure.layers])


def audit(
    model: ModelSource | Prepared,
    batches: Iterable[tuple[str, Batch]],
    config: AuditConfig | None = None,
    *,
    progress: Callable[[str, int], None] | None = None,
    cancelled: Callable[[], bool] | None = None,
) -> Report:
    """Audit a model on tagged batches ``(split, Batch)``; splits may interleave.

    ``progress(split, samples_done)`` is called after each batch; when ``cancelled()`` turns
    true the audit stops with ``CancelledError``.
    """
    config = config or AuditConfig()
    prepared = (
        model if isinstance(model, Prepared) else prepare(model, device=config.device, aggregate=config.aggregate)
    )
    if prepared.aggregate != config.aggregate:
        raise AuditError(
            f"the model was prepared with aggregate={prepared.aggregate!r} but the audit asks for "
            f"{config.aggregate!r}; prepare it again with the same setting"
        )
    splits: dict[str, _SplitTally] = {}
    names = _output_names(prepared)
    steps = ordered_map(
        lambda item: _infer(prepared, names, config, *item), _numbered(batches), workers_for(prepared.session)
    )
    try:
        for step in steps:
            if cancelled is not None and cancelled():
                done = sum(t.samples for t in splits.values())
                raise CancelledError(f"audit cancelled after {done} samples")
            tally = splits.setdefault(step.split, _SplitTally(prepared, config))
            tally.add(step)
            if progress is not None:
                progress(step.split, tally.samples)
    finally:
        steps.close()
    if not splits:
        raise DataError("the dataset is empty: no samples reached the audit; check --data, --split and --limit")
    return _report(prepared, splits, config)


@dataclass
class _Step:
    """One batch after inference: what the counting side needs."""

    split: str
    start: int
    labels: np.ndarray | None
    alpha: np.ndarray
    clipped: int
    outputs: list[np.ndarray]


def _numbered(batches: Iterable[tuple[str, Batch]]) -> Iterator[tuple[str, int, Batch]]:
    """Tag each batch with the position of its first sample in its split."""
    seen: dict[str, int] = {}
    for split, batch in batches:
        start = seen.get(split, 0)
        seen[split] = start + len(batch.x)
        yield split, start, batch


def _infer(prepared: Prepared, names: list[str], config: AuditConfig, split: str, start: int, batch: Batch) -> _Step:
    """Check, preprocess and run one batch; runs on a worker thread."""
    x, labels = _check_batch(batch, split, start)
    alpha, clipped = _input_entropy(x, config)
    feed = _to_model_input(x, prepared.structure.input, config)
    outputs = _run(prepared.session, names, prepared.structure.input, feed)
    return _Step(split, start, labels, alpha, clipped, outputs)


def _output_names(prepared: Prepared) -> list[str]:
    """Prediction output, then packed keys and sums per layer, then the logits if separate."""
    names = [prepared.structure.output, *prepared.exposed.keys, *prepared.exposed.sums]
    logits = prepared.structure.output_layer
    if logits is not None and logits.name != prepared.structure.output:
        names.append(logits.name)
    return names


def _check_batch(batch: Batch, split: str, start: int) -> tuple[np.ndarray, np.ndarray | None]:
    x = np.asarray(batch.x)
    where = f"{split} samples {start}–{start + len(x)}"
    if x.ndim < 1 or len(x) == 0:
        raise DataError(f"an empty batch arrived in {split}; send at least one sample per batch")
    if x[0].size == 0:
        raise DataError(f"{where}: samples of shape {x.shape[1:]} hold no values; give samples with data")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: samples have dtype {x.dtype}, not numbers; send numeric arrays")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{where}: data contains {bad} NaN/inf values; clean or impute them before auditing")
    if batch.y is None:
        return x, None
    y = np.asarray(batch.y)
    if y.shape != (len(x),):
        raise DataError(f"{where}: {y.shape} labels for {len(x)} samples; give one integer label per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {y.dtype}; labels must be integer class indices")
    return x, y.astype(np.int64, copy=False)


def _input_entropy(x: np.ndarray, config: AuditConfig) -> tuple[np.ndarray, int]:
    """CNA's α per sample (SPEC §4): uint8 over 0–255, anything else over ``alpha_range``."""
    flat = x.reshape(len(x), -1)
    if x.dtype == np.uint8:
        return metrics.input_entropy_uint8(flat), 0
    scaled, clipped = metrics.alpha_scale(flat, config.alpha_range)
    return metrics.input_entropy(scaled), clipped


def _to_model_input(x: np.ndarray, model_input: ModelInput, config: AuditConfig) -> np.ndarray:
    """Scale, normalise, reshape and cast raw samples to what the model's input expects.

    A model with an integer input (one that scales inside the graph) gets the raw values.
    """
    if not np.issubdtype(model_input.dtype, np.floating):
        return _fit_shape(_as_integers(x, model_input, config), model_input)
    if config.scale is not None:
        feed = x.astype(np.float32) * np.float32(config.scale)
    elif x.dtype == np.uint8:
        feed = x.astype(np.float32) / np.float32(255)
    else:
        feed = x.astype(np.float32, copy=False)
    if config.mean != 0.0 or config.std != 1.0:
        feed = (feed - np.float32(config.mean)) / np.float32(config.std)
    return _fit_shape(feed, model_input).astype(model_input.dtype, copy=False)


def _as_integers(x: np.ndarray, model_input: ModelInput, config: AuditConfig) -> np.ndarray:
    """Raw samples cast to an integer model input, refused where the cast would change a value."""
    name, dtype = model_input.name, model_input.dtype
    if config.scale is not None or config.mean != 0.0 or config.std != 1.0:
        raise DataError(f"model input {name!r} takes {dtype} values, so --scale, --mean and --std cannot apply")
    cast = x.astype(dtype)
    if not np.array_equal(cast, x):
        raise DataError(f"model input {name!r} takes {dtype} values and the data has values that {dtype} cannot hold")
    return cast


def _fit_shape(x: np.ndarray, model_input: ModelInput) -> np.ndarray:
    """Reshape samples to the input's shape when the element counts match (28×28 → 1×28×28 or 784)."""
    dims = model_input.shape[1:]
    if not model_input.shape:
        return x
    known = all(isinstance(d, int) and d > 0 for d in dims)
    per_sample = math.prod(x.shape[1:])
    if known and per_sample == math.prod(dims):  # type: ignore[arg-type]
        return x.reshape((len(x), *dims))  # type: ignore[arg-type]
    fits = len(dims) == x.ndim - 1 and all(
        not isinstance(d, int) or d <= 0 or d == s for d, s in zip(dims, x.shape[1:], strict=True)
    )
    if not known and fits:
        return x
    want = "×".join(str(d) if isinstance(d, int) and d > 0 else "?" for d in dims)
    raise DataError(
        f"data samples have shape {'×'.join(map(str, x.shape[1:]))} ({per_sample} values) but model input "
        f"{model_input.name!r} expects {want}; give data of that shape"
    )


def _run(
    session: ort.InferenceSession, names: list[str], model_input: ModelInput, feed: np.ndarray
) -> list[np.ndarray]:
    """Run a batch; a model with a fixed batch size gets it in chunks of that size, zero-padded."""
    fixed = model_input.shape[0] if model_input.shape and isinstance(model_input.shape[0], int) else 0
    if fixed <= 0 or fixed == len(feed):
        return _session_run(session, names, model_input.name, feed)
    chunks = []
    for start in range(0, len(feed), fixed):
        part = feed[start : start + fixed]
        n = len(part)
        if n < fixed:
            part = np.concatenate([part, np.zeros((fixed - n, *part.shape[1:]), part.dtype)])
        chunks.append([out[:n] for out in _session_run(session, names, model_input.name, part)])
    return [np.concatenate(parts) for parts in zip(*chunks, strict=True)]


def _session_run(
    session: ort.InferenceSession, names: list[str], input_name: str, feed: np.ndarray
) -> list[np.ndarray]:
    try:
        return session.run(names, {input_name: feed})
    except Exception as exc:  # onnxruntime's own exception types are not exported
        raise DataError(
            f"onnxruntime rejected a batch of shape {feed.shape}: {first_line(exc)}; "
            "check the data shape and --batch-size"
        ) from None


@dataclass
class _SplitTally:
    """Everything one split accumulates; merges by adding, so batching never changes the counts."""

    prepared: Prepared
    config: AuditConfig
    samples: int = 0
    labelled: int = 0
    correct: int = 0
    clipped: int = 0
    nonfinite_outputs: int = 0
    counters: dict[int, LayerCounter] = field(default_factory=dict)
    positions: dict[int, int] = field(default_factory=dict)
    nonfinite_sums: np.ndarray | None = None
    alpha: list[np.ndarray] = field(default_factory=list)
    sums: list[np.ndarray] = field(default_factory=list)
    probability_margins: list[np.ndarray] = field(default_factory=list)
    uniforms: list[np.ndarray] = field(default_factory=list)
    logit_margins: list[np.ndarray] = field(default_factory=list)

    def add(self, step: _Step) -> None:
        n_layers = len(self.prepared.structure.layers)
        prediction = step.outputs[0]
        packed = step.outputs[1 : 1 + n_layers]
        sums = np.stack(step.outputs[1 + n_layers : 1 + 2 * n_layers], axis=1).astype(np.float64)
        logits = step.outputs[1 + 2 * n_layers] if len(step.outputs) > 1 + 2 * n_layers else prediction
        n = len(prediction)
        if self.nonfinite_sums is None:
            self._start(packed, n)
        for index, counter in self.counters.items():
            counter.add(packed[index])
        self.nonfinite_sums += np.count_nonzero(~np.isfinite(sums), axis=0)
        self.sums.append(sums)
        self.alpha.append(step.alpha)
        self.clipped += step.clipped
        self.samples += n
        scores = prediction.reshape(n, -1).astype(np.float32, copy=False)
        self.nonfinite_outputs += int(np.count_nonzero(~np.isfinite(scores)))
        if step.labels is not None:
            self._score(step, scores, logits.reshape(n, -1).astype(np.float32, copy=False))

    def _start(self, packed: list[np.ndarray], n: int) -> None:
        """Counters for the efficiency layers only, sized from the first batch."""
        roles = _efficiency_roles(self.config)
        for index, layer in enumerate(self.prepared.structure.layers):
            if layer.role in roles:
                groups, group_axis = packing(layer)
                self.counters[index] = LayerCounter(layer.neurons, groups, group_axis)
                self.positions[index] = packed[index].size // (n * len(groups))
        self.nonfinite_sums = np.zeros(len(packed), np.int64)

    def _score(self, step: _Step, scores: np.ndarray, logits: np.ndarray) -> None:
        labels, classes = step.labels, scores.shape[1]
        if classes < 2:
            raise DataError(
                f"the model gives {classes} score per sample, so labels cannot be scored; "
                "audit without labels, or a model with one output per class"
            )
        if labels.min() < 0 or labels.max() >= classes:
            raise DataError(
                f"{step.split} labels run from {labels.min()} to {labels.max()} but the model has {classes} "
                f"classes (0–{classes - 1}); fix the labels or the model"
            )
        self.labelled += len(labels)
        self.correct += int(np.count_nonzero(scores.argmax(axis=1) == labels))
        index = np.arange(step.start, step.start + len(labels), dtype=np.int64)
        self.uniforms.append(metrics.sample_uniforms(index, self.config.margin_seed))
        self.probability_margins.append(
            metrics.probability_margins(scores, labels, self.prepared.structure.output_is_probability)
        )
        if self.prepared.structure.output_layer is not None:
            self.logit_margins.append(metrics.logit_margins(logits, labels))


def _efficiency_roles(config: AuditConfig) -> set[str]:
    return {"hidden", "output"} if config.include_output_layer else {"hidden"}


def _layer_stats(layer: Layer, counter: LayerCounter, positions: int, config: AuditConfig) -> LayerStats:
    counts = counter.counts()
    entropy = metrics.entropy_bits(counts)
    return LayerStats(
        name=layer.name,
        neurons=counter.neurons,
        positions=positions,
        states_total=counter.total,
        states_distinct=len(counts),
        entropy_bits=entropy,
        efficiency=metrics.efficiency(entropy, counter.neurons),
        max_entropy_bits=metrics.max_entropy_bits(counter.total),
        suggested_neurons=metrics.suggested_neurons(entropy, counter.neurons, config.target_efficiency),
        wider_than_data=metrics.wider_than_data(counter.neurons, counter.total),
    )


def _split_report(name: str, tally: _SplitTally, warnings: list[str]) -> tuple[SplitReport, np.ndarray | None]:
    """The split's figures, and its per-sample CNA slopes β (None when CNA is absent)."""
    config, structure = tally.config, tally.prepared.structure
    stats = [
        _layer_stats(structure.layers[index], counter, tally.positions[index], config)
        for index, counter in tally.counters.items()
    ]
    efficiency = metrics.network_efficiency([s.efficiency for s in stats])
    accuracy = tally.correct / tally.labelled if tally.labelled == tally.samples else None
    if accuracy is None:
        warnings.append(f"{name}: no labels, so accuracy and aIQ are null")
    for layer, bad in zip(structure.layers, tally.nonfinite_sums, strict=True):
        if bad:
            warnings.append(
                f"{name}: layer {layer.name!r} had NaN/inf pre-activations in {bad} samples "
                "(those units count as not firing)"
            )
    if tally.nonfinite_outputs:
        warnings.append(f"{name}: the model output held {tally.nonfinite_outputs} NaN/inf values")
    if tally.clipped:
        warnings.append(
            f"{name}: {tally.clipped} input values fell outside alpha_range {list(config.alpha_range)} "
            "and were clipped for CNA's input entropy"
        )
    cna, beta = _cna(name, tally, warnings)
    report = SplitReport(
        samples=tally.samples,
        accuracy=accuracy,
        layers=stats,
        network_efficiency=efficiency,
        aiq=metrics.aiq(accuracy, efficiency, config.beta),
        beta=config.beta,
        cna=cna,
    )
    return report, beta


def _cna(name: str, tally: _SplitTally, warnings: list[str]) -> tuple[float | None, np.ndarray | None]:
    """CNA of a split (SPEC §4) and the slopes it was computed from."""
    roles = {"hidden", "output"} if tally.config.cna_include_output_layer else {"hidden"}
    columns = [i for i, layer in enumerate(tally.prepared.structure.layers) if layer.role in roles]
    if len(columns) < 2:
        warnings.append(f"{name}: CNA needs at least 2 layers, found {len(columns)}; CNA is null")
        return None, None
    beta = metrics.slopes(np.concatenate(tally.sums)[:, columns])
    alpha = np.concatenate(tally.alpha)
    cna, reason = metrics.pearson(alpha, beta)
    if cna is None:
        warnings.append(f"{name}: CNA is null: {reason}")
    return cna, beta


def _cna_margin(
    train: _SplitTally, test: _SplitTally, betas: dict[str, np.ndarray | None], warnings: list[str]
) -> CnaMargin | None:
    """CNA-Margin from the train and test slope–entropy curves (SPEC §5)."""
    if betas["train"] is None or betas["test"] is None:
        warnings.append("CNA-Margin is null because CNA is null on a split")
        return None
    if train.labelled != train.samples:
        warnings.append("CNA-Margin is null: it needs labels for every training sample")
        return None
    curves = ((np.concatenate(train.alpha), betas["train"]), (np.concatenate(test.alpha), betas["test"]))
    try:
        area = metrics.cna_area(*curves, window=CNA_WINDOW, points=CNA_POINTS)
    except ValueError as exc:
        warnings.append(f"CNA-Margin is null: {exc}")
        return None
    margins = np.concatenate(train.probability_margins)
    logit_margins = np.concatenate(train.logit_margins) if train.logit_margins else None
    bad = int(np.count_nonzero(~np.isfinite(margins)))
    bad += 0 if logit_margins is None else int(np.count_nonzero(~np.isfinite(logit_margins)))
    if bad:  # NaN/inf outputs give NaN margins, which are not numbers a report (or JSON) can carry
        warnings.append(f"CNA-Margin is null: {bad} training margins are NaN/inf, from NaN/inf model outputs")
        return None
    margin_max = metrics.margin_max(margins, np.concatenate(train.uniforms), train.config.margin_fraction)
    margin_p5 = metrics.margin_p5(logit_margins) if logit_margins is not None else None
    if margin_p5 is None:
        warnings.append("margin_p5 is null: the model has no output layer whose logits the auditor can read")
    return CnaMargin(
        area=area,
        margin_max=margin_max,
        margin_p5=margin_p5,
        cna_margin_max=margin_max * area,
        cna_margin_p5=None if margin_p5 is None else margin_p5 * area,
        window=CNA_WINDOW,
        points=CNA_POINTS,
    )


def _report(prepared: Prepared, tallies: dict[str, _SplitTally], config: AuditConfig) -> Report:
    warnings: list[str] = []
    splits, betas = {}, {}
    for name in sorted(tallies, key=lambda s: (s != "train", s)):
        splits[name], betas[name] = _split_report(name, tallies[name], warnings)
    margin = None
    if "train" in tallies and "test" in tallies:
        margin = _cna_margin(tallies["train"], tallies["test"], betas, warnings)
    else:
        warnings.append("CNA-Margin is null: it compares a train and a test split; audit with --split both")
    return Report(
        model=prepared.model_info,
        providers=prepared.providers,
        splits=splits,
        cna_margin=margin,
        config=config.to_dict(),
        warnings=warnings,
    )
