"""From tallies to a ``Report``: the figures of SPEC §2–§6, and the warnings that explain nulls.

Pure functions: each takes tallies and settings and returns its figures together with the
warnings it has to give, so no list is handed down to be appended to. A metric that cannot be
computed is None, and a warning says why.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from auditor.config import AuditConfig, MetricSettings
from auditor.engine import metrics
from auditor.engine.count import QUANTILES, StateSummary
from auditor.engine.find import Layer
from auditor.engine.tally import SplitFigures, SplitResult
from auditor.report import CnaMargin, LayerStats, ModelInfo, Report, SplitReport

CNA_WINDOW = 25
CNA_POINTS = 100
TOP_STATES = 100  # state probabilities a report keeps per layer, most frequent first
CNA_SCATTER = 1000  # per-sample (α, β) points a report keeps per split


@dataclass(frozen=True)
class _SplitFigures:
    """A split's report, and the per-sample α and β its CNA was computed from (None without CNA)."""

    report: SplitReport
    alpha: np.ndarray
    beta: np.ndarray | None
    warnings: list[str]


def summarize(
    model: ModelInfo,
    providers: list[str],
    layers: list[Layer],
    results: dict[str, SplitResult],
    config: AuditConfig,
    data_warnings: list[str] | None = None,
) -> Report:
    """The report of an audit: every split's figures (train first), then CNA-Margin when both ran.

    ``layers`` are the model's layers in depth order (``Structure.layers``). ``data_warnings``
    come from reading the data (images skipped as bad) and lead the warnings.
    """
    settings = config.metrics
    order = sorted(results, key=lambda split: (split != "train", split))
    figures = {name: _split(name, layers, results[name], config) for name in order}
    warnings = [*(data_warnings or []), *(w for split in figures.values() for w in split.warnings)]
    margin = None
    if "train" in results and "test" in results:
        margin, margin_warnings = cna_margin(results["train"].figures, figures["train"], figures["test"], settings)
        warnings += margin_warnings
    else:
        warnings.append("CNA-Margin is null: it compares a train and a test split; audit with --split both")
    return Report(
        model=model,
        providers=providers,
        splits={name: split.report for name, split in figures.items()},
        cna_margin=margin,
        config=config.to_dict(),
        warnings=warnings,
    )


def layer_stats(layer: Layer, states: StateSummary, units: int, settings: MetricSettings) -> LayerStats:
    """State-space figures of one counted layer (SPEC §2, §6), with a bounded view of its
    state distribution: the top probabilities and the per-state probability quantiles."""
    neurons, total, entropy = layer.neurons, states.total, states.entropy_bits
    return LayerStats(
        name=layer.name,
        neurons=neurons,
        positions=units // neurons,
        states_total=total,
        states_distinct=states.distinct,
        entropy_bits=entropy,
        efficiency=metrics.efficiency(entropy, neurons),
        max_entropy_bits=metrics.max_entropy_bits(total),
        suggested_neurons=metrics.suggested_neurons(entropy, neurons, settings.target_efficiency),
        wider_than_data=metrics.wider_than_data(neurons, total),
        top_probabilities=[int(c) / total for c in states.top_counts],
        probability_quantiles={
            f"{q:g}": float(c) / total for q, c in zip(QUANTILES, states.count_quantiles, strict=True)
        },
    )


def _split(name: str, layers: list[Layer], result: SplitResult, config: AuditConfig) -> _SplitFigures:
    """The figures of one split (SPEC §2–§4) and the warnings they come with."""
    settings, warnings, tally = config.metrics, [], result.figures
    stats = [
        layer_stats(layer, result.states[layer.name], tally.units[layer.name], settings)
        for layer in layers
        if layer.name in result.states
    ]
    efficiency = metrics.network_efficiency([s.efficiency for s in stats])
    accuracy = tally.correct / tally.labelled if tally.labelled == tally.samples else None
    if accuracy is None:
        warnings.append(f"{name}: no labels, so accuracy and aIQ are null")
    for layer, bad in tally.nonfinite_sums.items():
        if bad:
            warnings.append(
                f"{name}: layer {layer!r} had NaN/inf pre-activations in {bad} samples "
                "(those units count as not firing)"
            )
    if tally.nonfinite_outputs:
        warnings.append(f"{name}: the model output held {tally.nonfinite_outputs} NaN/inf values")
    if tally.clipped:
        warnings.append(
            f"{name}: {tally.clipped} input values fell outside alpha_range "
            f"{list(config.alpha_range)} and were clipped for CNA's input entropy"
        )
    alpha = np.concatenate(tally.alpha)
    cna, beta, cna_warnings = split_cna(name, layers, tally, alpha, settings)
    report = SplitReport(
        samples=tally.samples,
        accuracy=accuracy,
        layers=stats,
        network_efficiency=efficiency,
        aiq=metrics.aiq(accuracy, efficiency, settings.beta),
        beta=settings.beta,
        cna=cna,
        cna_points=None if beta is None else thinned_points(alpha, beta, CNA_SCATTER),
    )
    return _SplitFigures(report, alpha, beta, warnings + cna_warnings)


def thinned_points(alpha: np.ndarray, beta: np.ndarray, most: int) -> dict[str, list[float]]:
    """At most ``most`` per-sample (α, β) pairs, evenly spaced in sample order, for the report's scatter."""
    keep = np.unique(np.linspace(0, len(alpha) - 1, min(len(alpha), most)).round().astype(np.int64))
    return {"alpha": alpha[keep].tolist(), "beta": beta[keep].tolist()}


def split_cna(
    name: str, layers: list[Layer], tally: SplitFigures, alpha: np.ndarray, settings: MetricSettings
) -> tuple[float | None, np.ndarray | None, list[str]]:
    """CNA of a split (SPEC §4), the per-sample slopes β it came from, and its warnings.

    ``tally.sums`` holds φ of every layer, in the order of ``layers``.
    """
    roles = {"hidden", "output"} if settings.cna_include_output_layer else {"hidden"}
    columns = [i for i, layer in enumerate(layers) if layer.role in roles]
    if len(columns) < 2:
        return None, None, [f"{name}: CNA needs at least 2 layers, found {len(columns)}; CNA is null"]
    phi = np.concatenate(tally.sums)[:, columns]
    if settings.aggregate == "mean":
        phi = phi / np.array([tally.units[layers[i].name] for i in columns], np.float64)
    beta = metrics.slopes(phi)
    cna, reason = metrics.pearson(alpha, beta)
    return cna, beta, [] if cna is not None else [f"{name}: CNA is null: {reason}"]


def cna_margin(
    tally: SplitFigures, train: _SplitFigures, test: _SplitFigures, settings: MetricSettings
) -> tuple[CnaMargin | None, list[str]]:
    """CNA-Margin from the train and test slope–entropy curves (SPEC §5), and its warnings."""
    if train.beta is None or test.beta is None:
        return None, ["CNA-Margin is null because CNA is null on a split"]
    if tally.labelled != tally.samples:
        return None, ["CNA-Margin is null: it needs labels for every training sample"]
    try:
        grid, beta_train, beta_test = metrics.slope_entropy_curves(
            (train.alpha, train.beta), (test.alpha, test.beta), window=CNA_WINDOW, points=CNA_POINTS
        )
    except ValueError as exc:
        return None, [f"CNA-Margin is null: {exc}"]
    area = metrics.curve_area(grid, beta_train, beta_test)
    margins = np.concatenate(tally.probability_margins)
    logit_margins = np.concatenate(tally.logit_margins) if tally.logit_margins else None
    bad = int(np.count_nonzero(~np.isfinite(margins)))
    bad += 0 if logit_margins is None else int(np.count_nonzero(~np.isfinite(logit_margins)))
    if bad:  # NaN/inf outputs give NaN margins, which are not numbers a report (or JSON) can carry
        return None, [f"CNA-Margin is null: {bad} training margins are NaN/inf, from NaN/inf model outputs"]
    margin_max = metrics.margin_max(margins, np.concatenate(tally.uniforms), settings.margin_fraction)
    margin_p5 = metrics.margin_p5(logit_margins) if logit_margins is not None else None
    warnings = []
    if margin_p5 is None:
        warnings.append("margin_p5 is null: the model has no output layer whose logits the auditor can read")
    margin = CnaMargin(
        area=area,
        margin_max=margin_max,
        margin_p5=margin_p5,
        cna_margin_max=margin_max * area,
        cna_margin_p5=None if margin_p5 is None else margin_p5 * area,
        window=CNA_WINDOW,
        points=CNA_POINTS,
        curves={"alpha": grid.tolist(), "train": beta_train.tolist(), "test": beta_test.tolist()},
    )
    return margin, warnings
