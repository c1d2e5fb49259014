"""The CNA paper's generalization study ([C], Figures 2 and 3): do CNA and CNA-Margin predict?

Pure functions from audited networks and checkpoints to ``trainers.tables.Table`` records. Every
network or checkpoint is one ``Point``. For each predictor and its target —

- CNA (train split, test split) against **test accuracy** (Figure 2: CNA tracks accuracy);
- CNA-Margin (``margin_max`` and ``margin_p5``) and the weight baselines of the report's ``weights``
  section — log10 Π‖W‖_F, log10 Π‖W‖₂, log10 of the ℓ2 path norm — against the **gap**, train
  accuracy on the labels trained on minus test accuracy (Figure 3) —

it gives Pearson's r and Kendall's τ-b over the points of a **subset**, each with a bootstrap 95%
interval: ``resamples`` times, networks are drawn with replacement (a network brings all its
checkpoints along, since they are not independent) and r and τ recomputed; the interval is the
2.5th and 97.5th percentiles (resamples where a side is constant are skipped and counted).

Subsets, per data set and for all data sets pooled:

- ``clean``: the networks trained on clean labels, every checkpoint (Figures 2 and 3A/B);
- ``3C``: the analogue of Figure 3C, the final networks trained with label noise pooled with the
  clean networks' checkpoints;
- ``all``: every network and checkpoint.

Networks trained on the Gaussian-noise set count as trained with label noise: its labels are
random by construction.

Products of norms are compared in log10: Pearson's r is then about their orders of magnitude,
and Kendall's τ is unchanged by the log.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from trainers.noise_data import is_noise
from trainers.stats import kendall_tau
from trainers.tables import Column, Table

if TYPE_CHECKING:
    from trainers.study import AuditedNetwork

# (key, label, target): what each predictor is ranked against.
PREDICTORS = (
    ("cna_train", "CNA (train)", "test_accuracy"),
    ("cna_test", "CNA (test)", "test_accuracy"),
    ("cna_margin_max", "CNA-Margin (margin_max)", "gap"),
    ("cna_margin_p5", "CNA-Margin (margin_p5)", "gap"),
    ("log_frobenius_product", "log10 Π‖W‖_F", "gap"),
    ("log_spectral_product", "log10 Π‖W‖₂", "gap"),
    ("log_path_norm", "log10 ℓ2 path norm", "gap"),
)
TARGETS = {"test_accuracy": "test accuracy", "gap": "train − test gap"}
SUBSETS = {
    "clean": "clean labels, every checkpoint",
    "3C": "label-noise networks (final) + clean checkpoints (Figure 3C)",
    "all": "every network and checkpoint",
}
POOLED = "all data sets"
BLOCK = 512  # rows of the pair matrix computed at once: memory O(BLOCK · n)


@dataclass(frozen=True)
class Point:
    """One network or checkpoint: what it is, its targets and its predictors."""

    network: str  # the job's name: a network's checkpoints share it (with the data set)
    dataset: str
    label_noise: float
    label_noise_kind: str
    epoch: int
    final: bool
    test_accuracy: float | None
    gap: float | None
    predictors: dict[str, float | None]

    @property
    def clean(self) -> bool:
        """Trained on true labels: no label noise, and not the Gaussian-noise set's random labels."""
        return self.label_noise == 0 and not is_noise(self.dataset)

    def value(self, key: str) -> float | None:
        if key in TARGETS:
            return getattr(self, key)
        return self.predictors.get(key)


def _log10(value: float | None) -> float | None:
    return math.log10(value) if value is not None and value > 0 else None


def point_of(audited: AuditedNetwork) -> Point:
    """The study's view of one audited network or checkpoint."""
    n, weights = audited.network, audited.weights
    return Point(
        network=n.job.name,
        dataset=n.job.dataset,
        label_noise=n.job.label_noise,
        label_noise_kind=n.job.label_noise_kind,
        epoch=n.epochs,
        final=n.final,
        test_accuracy=audited.test.accuracy,
        gap=audited.gap,
        predictors={
            "cna_train": audited.train.cna,
            "cna_test": audited.test.cna,
            "cna_margin_max": audited.cna_margin_max,
            "cna_margin_p5": audited.cna_margin_p5,
            "log_frobenius_product": _log10(weights.frobenius_product) if weights else None,
            "log_spectral_product": _log10(weights.spectral_product) if weights else None,
            "log_path_norm": _log10(weights.path_norm) if weights else None,
        },
    )


def point_of_row(row: dict[str, Any]) -> Point:
    """The point a row of ``cna_points.json`` holds (``points_table``'s inverse), to redo a study
    without auditing again."""
    return Point(
        network=row["network"],
        dataset=row["dataset"],
        label_noise=row["label_noise"],
        label_noise_kind=row["label_noise_kind"],
        epoch=row["epoch"],
        final=row["final"] == "final",
        test_accuracy=row["test_accuracy"],
        gap=row["gap"],
        predictors={key: row[key] for key, _, _ in PREDICTORS},
    )


def in_subset(point: Point, subset: str) -> bool:
    if subset == "clean":
        return point.clean
    if subset == "3C":
        return point.clean or point.final
    return True


# --- statistics ---------------------------------------------------------------------------------


def pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    """Pearson's r; None with fewer than three points or a constant side."""
    if len(x) < 3 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(dx @ dy) / denominator if denominator > 0 else None


def tau_b(x: np.ndarray, y: np.ndarray) -> float | None:
    """Kendall's τ-b, as ``trainers.stats.kendall_tau`` gives it, computed in row blocks of the pair matrix."""
    n = len(x)
    if n < 2:
        return None
    score = ties_x = ties_y = 0
    for start in range(0, n, BLOCK):
        rows = slice(start, min(n, start + BLOCK))
        sx = np.sign(x[rows, None] - x[None, :])
        sy = np.sign(y[rows, None] - y[None, :])
        upper = np.arange(n)[None, :] > np.arange(rows.start, rows.stop)[:, None]
        score += int(np.sum((sx * sy)[upper]))
        ties_x += int(np.sum((sx == 0)[upper]))
        ties_y += int(np.sum((sy == 0)[upper]))
    pairs = n * (n - 1) / 2
    denominator = math.sqrt((pairs - ties_x) * (pairs - ties_y))
    return score / denominator if denominator > 0 else None


@dataclass(frozen=True)
class Interval:
    """A statistic, its bootstrap 95% interval, and how many resamples defined it."""

    value: float | None
    low: float | None
    high: float | None
    resamples: int


def _interval(value: float | None, draws: list[float]) -> Interval:
    if value is None or not draws:
        return Interval(value, None, None, len(draws))
    low, high = np.percentile(draws, [2.5, 97.5])
    return Interval(value, float(low), float(high), len(draws))


@dataclass(frozen=True)
class CnaCorrelation:
    """One predictor against its target over one subset of one data set (or all pooled)."""

    dataset: str
    subset: str
    predictor: str
    target: str
    points: int
    networks: int
    pearson: Interval
    kendall: Interval
    p_value: float | None  # Kendall's, two-sided (normal approximation, ties corrected)


def correlate(
    points: Sequence[Point], predictor: str, target: str, resamples: int, rng: np.random.Generator
) -> tuple[int, int, Interval, Interval, float | None]:
    """(points, networks, r, τ, τ's p) of ``predictor`` against ``target`` over ``points``."""
    kept = [p for p in points if p.value(predictor) is not None and p.value(target) is not None]
    x = np.array([p.value(predictor) for p in kept], dtype=np.float64)
    y = np.array([p.value(target) for p in kept], dtype=np.float64)
    finite = np.isfinite(x) & np.isfinite(y)
    kept = [p for p, ok in zip(kept, finite, strict=True) if ok]
    x, y = x[finite], y[finite]
    names = sorted({(p.dataset, p.network) for p in kept})  # the same job on two data sets is two networks
    members = [np.array([i for i, p in enumerate(kept) if (p.dataset, p.network) == name]) for name in names]
    r, tau = pearson(x, y), tau_b(x, y)
    p_value = kendall_tau(list(x), list(y)).p_value if len(x) >= 2 else None
    r_draws: list[float] = []
    tau_draws: list[float] = []
    if len(names) >= 2 and (r is not None or tau is not None):
        for _ in range(resamples):
            chosen = rng.integers(0, len(names), size=len(names))
            index = np.concatenate([members[c] for c in chosen])
            if (drawn := pearson(x[index], y[index])) is not None:
                r_draws.append(drawn)
            if (drawn := tau_b(x[index], y[index])) is not None:
                tau_draws.append(drawn)
    return len(kept), len(names), _interval(r, r_draws), _interval(tau, tau_draws), p_value


# --- the study ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class CnaStudy:
    """The correlations, the tables that show them, and the page's caption, notes and summary."""

    correlations: list[CnaCorrelation]
    tables: list[Table]
    caption: str
    notes: list[str]
    summary: list[str]


def correlations(points: Sequence[Point], resamples: int = 1000, seed: int = 0) -> list[CnaCorrelation]:
    """Every predictor × subset × data set (and pooled) with at least two points."""
    rng = np.random.default_rng(seed)
    datasets = sorted({p.dataset for p in points})
    groups = [(d, [p for p in points if p.dataset == d]) for d in datasets]
    if len(datasets) > 1:
        groups.append((POOLED, list(points)))
    found = []
    for dataset, members in groups:
        for subset in SUBSETS:
            chosen = [p for p in members if in_subset(p, subset)]
            for key, _, target in PREDICTORS:
                n, networks, r, tau, p_value = correlate(chosen, key, target, resamples, rng)
                if n >= 2:
                    found.append(CnaCorrelation(dataset, subset, key, target, n, networks, r, tau, p_value))
    return found


def _label(key: str) -> str:
    return next(label for k, label, _ in PREDICTORS if k == key)


def correlation_table(found: Sequence[CnaCorrelation], caption: str) -> Table:
    rows = tuple(
        {
            "dataset": c.dataset,
            "subset": c.subset,
            "predictor": _label(c.predictor),
            "target": TARGETS[c.target],
            "points": c.points,
            "networks": c.networks,
            "r": c.pearson.value,
            "r_low": c.pearson.low,
            "r_high": c.pearson.high,
            "tau": c.kendall.value,
            "tau_low": c.kendall.low,
            "tau_high": c.kendall.high,
            "p_value": c.p_value,
            "resamples": c.kendall.resamples,
        }
        for c in found
    )
    columns = (
        Column("dataset", "data set"),
        Column("subset", "subset"),
        Column("predictor", "predictor"),
        Column("target", "against"),
        Column("points", "points", "int"),
        Column("networks", "networks", "int"),
        Column("r", "Pearson r", "number", 3),
        Column("r_low", "r 2.5%", "number", 3),
        Column("r_high", "r 97.5%", "number", 3),
        Column("tau", "Kendall τ-b", "number", 3),
        Column("tau_low", "τ 2.5%", "number", 3),
        Column("tau_high", "τ 97.5%", "number", 3),
        Column("p_value", "τ p (two-sided)", "p"),
        Column("resamples", "resamples", "int"),
    )
    title = "Does CNA track test accuracy, and CNA-Margin the gap, better than norm baselines?"
    return Table("cna_study", title, caption, columns, rows, "fraction")


def points_table(points: Sequence[Point], caption: str) -> Table:
    keys = [key for key, _, _ in PREDICTORS]
    rows = tuple(
        {
            "network": p.network,
            "dataset": p.dataset,
            "label_noise": p.label_noise,
            "label_noise_kind": p.label_noise_kind,
            "epoch": p.epoch,
            "final": "final" if p.final else "checkpoint",
            "test_accuracy": p.test_accuracy,
            "gap": p.gap,
            **{key: p.predictors.get(key) for key in keys},
        }
        for p in points
    )
    columns = (
        Column("network", "network"),
        Column("dataset", "data set"),
        Column("label_noise", "label noise", "number", 2),
        Column("label_noise_kind", "kind"),
        Column("epoch", "epoch", "int"),
        Column("final", "final or checkpoint"),
        Column("test_accuracy", "test accuracy", "number", 4),
        Column("gap", "gap", "number", 4),
        *(Column(key, _label(key), "number", 4) for key in keys),
    )
    return Table("cna_points", "Every network and checkpoint", caption, columns, rows, "fraction")


def _caption(points: Sequence[Point], resamples: int) -> str:
    datasets = ", ".join(sorted({p.dataset for p in points}))
    networks = len({(p.dataset, p.network) for p in points})
    checkpoints = sum(not p.final for p in points)
    levels = ", ".join(f"{v:g}" for v in sorted({p.label_noise for p in points}))
    kinds = ", ".join(sorted({p.label_noise_kind for p in points if p.label_noise > 0})) or "none"
    return (
        f"{networks} networks ({checkpoints} checkpoints besides the final networks) on {datasets}; label noise "
        f"{levels} ({kinds}). Gap: train accuracy on the labels trained on minus test accuracy. Intervals: "
        f"{resamples} bootstrap resamples of networks (a network's checkpoints stay together), 2.5th–97.5th "
        "percentiles. Norm products and the path norm in log10. Subsets: "
        + "; ".join(f"{k}: {v}" for k, v in SUBSETS.items())
        + "."
    )


def _summary(found: Sequence[CnaCorrelation]) -> list[str]:
    lines = ["CNA study (Pearson r and Kendall tau with bootstrap 95% intervals):"]
    for c in found:
        if c.subset == "all" and c.dataset != POOLED and any(o.dataset == POOLED for o in found):
            continue
        r, t = c.pearson, c.kendall
        lines.append(
            f"  {c.dataset} [{c.subset}] {_label(c.predictor)} vs {TARGETS[c.target]}: "
            f"r {_fmt(r.value)} [{_fmt(r.low)}, {_fmt(r.high)}], tau {_fmt(t.value)} [{_fmt(t.low)}, {_fmt(t.high)}], "
            f"{c.points} points, {c.networks} networks"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.2f}"


def build(points: Sequence[Point], bootstrap: int = 1000, seed: int = 0) -> CnaStudy:
    """The correlations over ``points`` and their tables."""
    found = correlations(points, bootstrap, seed)
    caption = _caption(points, bootstrap)
    notes = []
    if not any(not p.clean and p.final for p in points):
        notes.append("no network was trained with label noise, so subset 3C is the clean checkpoints alone")
    if not any(p.clean for p in points):
        notes.append("no network was trained on clean labels: subsets clean and 3C lack their clean part")
    if all(p.predictors.get("log_path_norm") is None for p in points):
        notes.append("the path norm is defined here for chains of dense layers only: it is missing for these networks")
    tables = [correlation_table(found, caption), points_table(points, caption)]
    return CnaStudy(found, tables, caption, notes, _summary(found))
