"""The study's tables: cells of replicates, the paper's Tables 1–3, and the generalization test.

Pure functions from audited networks (``trainers.study.AuditedNetwork``) to ``Table`` records;
nothing here reads or writes files. A **cell** is every network that shares an architecture
(arch, widths, variant, and ``dropout_p`` for the dropout variant) and a label-noise level: its
replicate seeds. A cell's figures are the mean and the 95% Student-t half-width over them
(``trainers.stats.Estimate``); tables and heatmaps show the test split.

- **Table 1**: per architecture family, the top architectures by accuracy and by aIQ, among
  networks of variant ``none`` at the lowest label noise trained.
- **Table 2**: the best architectures by aIQ, each shown with every variant trained.
- **Table 3**: test (and train) accuracy per label-noise level for the best-aIQ and the
  best-accuracy architecture of each variant.
- **Generalization**: Kendall's τ-b, with its p-value, between the train − test accuracy gap and
  CNA, CNA-Margin (both margins), aIQ and η_N, over every network (PGDL-style).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from trainers.records import VARIANTS, Architecture, Recipe
from trainers.stats import Estimate, RankCorrelation, estimate, kendall_tau

if TYPE_CHECKING:
    from trainers.study import AuditedNetwork, StudySettings

# Metrics measured as fractions of 1, which ``--percent`` shows ×100 as the paper prints them.
FRACTIONS = ("accuracy", "train_accuracy", "gap", "aiq", "network_efficiency")
LABELS = {
    "accuracy": "accuracy",
    "train_accuracy": "train accuracy",
    "gap": "train − test gap",
    "aiq": "aIQ",
    "network_efficiency": "η_N",
    "cna": "CNA",
    "cna_margin_max": "CNA-Margin (margin_max)",
    "cna_margin_p5": "CNA-Margin (margin_p5)",
}
# (metric, split) pairs the generalization test ranks against the gap.
GENERALIZATION = (
    ("cna", "train"),
    ("cna", "test"),
    ("cna_margin_max", "train+test"),
    ("cna_margin_p5", "train+test"),
    ("aiq", "train"),
    ("aiq", "test"),
    ("network_efficiency", "train"),
    ("network_efficiency", "test"),
)


def label(metric: str) -> str:
    """How a metric is named on the page: ``aIQ``, ``η_N``, ``η_1``…"""
    if metric.startswith("layer"):
        return f"η_{metric[len('layer') : metric.index('_')]}"
    return LABELS.get(metric, metric)


@dataclass(frozen=True)
class Scale:
    """The unit of fraction metrics: the 0–1 scale, or ×100 (``--percent``)."""

    percent: bool = False

    def scales(self, metric: str) -> bool:
        return self.percent and (metric in FRACTIONS or metric.startswith("layer"))

    def value(self, metric: str, value: float | None) -> float | None:
        return value * 100 if value is not None and self.scales(metric) else value

    def estimate(self, metric: str, values: Estimate) -> Estimate:
        return Estimate(self.value(metric, values.mean), self.value(metric, values.ci95), values.n)

    def digits(self, metric: str) -> int:
        """Decimals a CSV cell keeps: 2 for percentages, 4 otherwise."""
        return 2 if self.scales(metric) else 4

    @property
    def unit(self) -> str:
        return "percent" if self.percent else "fraction"


def network_metrics(network: AuditedNetwork) -> dict[str, float | None]:
    """One network's figures by metric name: the test split, the gap, and CNA-Margin."""
    test = network.test
    values: dict[str, float | None] = {
        "accuracy": test.accuracy,
        "train_accuracy": network.train.accuracy,
        "gap": network.gap,
        "aiq": test.aiq,
        "network_efficiency": test.network_efficiency,
    }
    values.update({f"layer{i}_efficiency": e for i, e in enumerate(test.layer_efficiencies, 1)})
    values.update(cna=test.cna, cna_margin_max=network.cna_margin_max, cna_margin_p5=network.cna_margin_p5)
    return values


def split_metric(network: AuditedNetwork, metric: str, split: str) -> float | None:
    """``metric`` of ``network`` on ``split`` ("train", "test", or "train+test" for CNA-Margin)."""
    if split == "train+test":  # CNA-Margin compares the two splits
        return {"cna_margin_max": network.cna_margin_max, "cna_margin_p5": network.cna_margin_p5}[metric]
    return getattr(network.train if split == "train" else network.test, metric)


@dataclass(frozen=True)
class Cell:
    """The replicates of one architecture at one label-noise level, and their figures."""

    architecture: Architecture
    label_noise: float
    networks: tuple[AuditedNetwork, ...]
    params: int
    fold_decrease: float
    metrics: dict[str, Estimate]

    @property
    def replicates(self) -> int:
        return len(self.networks)

    @property
    def dropout_p(self) -> float | None:
        """The dropout rate, for the dropout variant only."""
        return self.architecture.dropout_p if self.architecture.variant == "dropout" else None

    def mean(self, metric: str) -> float | None:
        return self.metrics[metric].mean if metric in self.metrics else None


def _cell_key(network: AuditedNetwork) -> tuple:
    a = network.network.job.architecture
    dropout_p = a.dropout_p if a.variant == "dropout" else None
    return a.arch, a.widths, VARIANTS.index(a.variant), dropout_p or 0.0, network.network.job.label_noise


def references(networks: Sequence[AuditedNetwork], given: Sequence[Architecture]) -> dict[str, Architecture]:
    """The network each architecture family's fold-decrease is measured against.

    ``given`` wins; otherwise the family's largest network trained (by the parameters of its
    plain form, so the variant does not change the reference).
    """
    chosen: dict[str, Architecture] = {}
    for network in networks:
        a = network.network.job.architecture
        plain = Architecture(a.arch, a.widths)
        if a.arch not in chosen or plain.parameter_count > chosen[a.arch].parameter_count:
            chosen[a.arch] = plain
    chosen.update({r.arch: Architecture(r.arch, r.widths) for r in given})
    return chosen


def make_cells(networks: Sequence[AuditedNetwork], reference: dict[str, Architecture]) -> list[Cell]:
    """Group ``networks`` into cells, ordered by architecture, variant, noise, then widths."""
    groups: dict[tuple, list[AuditedNetwork]] = {}
    for network in networks:
        groups.setdefault(_cell_key(network), []).append(network)
    cells = []
    for key in sorted(groups, key=lambda k: (k[0], k[2], k[3], k[4], k[1])):
        members = sorted(groups[key], key=lambda n: n.network.job.seed)
        first = members[0].network
        per_network = [network_metrics(n) for n in members]
        names = list(dict.fromkeys(name for values in per_network for name in values))
        cells.append(
            Cell(
                architecture=first.job.architecture,
                label_noise=first.job.label_noise,
                networks=tuple(members),
                params=first.params,
                fold_decrease=reference[first.job.architecture.arch].parameter_count / first.params,
                metrics={name: estimate([values.get(name) for values in per_network]) for name in names},
            )
        )
    return cells


# --- tables ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    """One column: its key in the rows, its header on the page, and how its values are written.

    ``kind`` is "text", "int", "fold" (one decimal), "estimate" (an ``Estimate``: ``_mean`` and
    ``_ci95`` columns in CSV/JSON), "number" (``digits`` decimals) or "p" (3 significant digits).
    """

    key: str
    header: str
    kind: str = "text"
    digits: int = 4


@dataclass(frozen=True)
class Table:
    """A named table: ``name`` is its file stem, ``caption`` says what was done."""

    name: str
    title: str
    caption: str
    columns: tuple[Column, ...]
    rows: tuple[dict[str, Any], ...]
    unit: str

    def flat_rows(self, rounded: bool) -> list[dict[str, Any]]:
        """Rows as flat values: estimates split into ``_mean``/``_ci95``; CSV rounding when ``rounded``."""
        out = []
        for row in self.rows:
            flat: dict[str, Any] = {}
            for column in self.columns:
                value = row.get(column.key)
                if column.kind == "estimate":
                    mean, ci95 = (value.mean, value.ci95) if value is not None else (None, None)
                    flat[f"{column.key}_mean"] = _round(mean, column.digits) if rounded else mean
                    flat[f"{column.key}_ci95"] = _round(ci95, column.digits) if rounded else ci95
                elif rounded and column.kind in ("fold", "number", "p"):
                    flat[column.key] = _rounded(value, column)
                else:
                    flat[column.key] = value
            out.append(flat)
        return out

    def to_csv(self) -> str:
        """Readable CSV: rounded figures, blank cells for missing values."""
        rows = self.flat_rows(rounded=True)
        header = list(rows[0]) if rows else [c.key for c in self.columns]
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=header, lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
        return buffer.getvalue()

    def to_json(self) -> dict[str, Any]:
        """The table with full-precision values, its caption and unit."""
        return {
            "name": self.name,
            "title": self.title,
            "caption": self.caption,
            "unit": self.unit,
            "columns": [{"key": c.key, "header": c.header, "kind": c.kind} for c in self.columns],
            "rows": self.flat_rows(rounded=False),
        }


def _round(value: float | None, digits: int) -> float | None:
    return None if value is None else round(value, digits)


def _rounded(value: Any, column: Column) -> Any:
    if value is None:
        return None
    if column.kind == "fold":
        return round(value, 1)
    if column.kind == "p":
        return float(f"{value:.3g}")
    return round(value, column.digits)


def layer_metrics(cells: Sequence[Cell]) -> list[str]:
    """``layer1_efficiency``, ``layer2_efficiency``, … measured in ``cells``, in depth order."""
    names = {name for cell in cells for name in cell.metrics if name.startswith("layer")}
    return sorted(names, key=lambda name: int(name[len("layer") : name.index("_")]))


def _architecture_columns(with_variant: bool) -> list[Column]:
    columns = [Column("arch", "architecture"), Column("widths", "widths")]
    if with_variant:
        columns += [Column("variant", "variant"), Column("dropout_p", "dropout p", "number", 2)]
    return columns


def _metric_columns(metrics: Sequence[str], scale: Scale) -> list[Column]:
    return [Column(m, label(m), "estimate", scale.digits(m)) for m in metrics]


def _cell_row(cell: Cell, metrics: Sequence[str], scale: Scale) -> dict[str, Any]:
    a = cell.architecture
    row: dict[str, Any] = {
        "arch": a.arch,
        "widths": a.widths_text,
        "variant": a.variant,
        "dropout_p": cell.dropout_p,
        "label_noise": cell.label_noise,
        "replicates": cell.replicates,
        "params": cell.params,
        "fold_decrease": cell.fold_decrease,
    }
    row.update({m: scale.estimate(m, cell.metrics[m]) if m in cell.metrics else None for m in metrics})
    return row


def _best(cells: Sequence[Cell], metric: str, k: int) -> list[Cell]:
    """The ``k`` cells with the highest mean ``metric`` (cells without it last)."""
    return sorted(cells, key=lambda c: (c.mean(metric) is None, -(c.mean(metric) or 0.0)))[:k]


def _families(cells: Sequence[Cell]) -> dict[str, list[Cell]]:
    families: dict[str, list[Cell]] = {}
    for cell in cells:
        families.setdefault(cell.architecture.arch, []).append(cell)
    return families


def _clean(cells: Sequence[Cell]) -> list[Cell]:
    """The cells at the lowest label noise trained."""
    lowest = min(cell.label_noise for cell in cells)
    return [cell for cell in cells if cell.label_noise == lowest]


def table1(cells: Sequence[Cell], k: int, scale: Scale, caption: str) -> Table | None:
    """The top ``k`` architectures of each family by accuracy and by aIQ, variant ``none``."""
    metrics = ["accuracy", *layer_metrics(cells), "network_efficiency", "aiq"]
    rows = []
    for family in _families(cells).values():
        baseline = [c for c in _clean(family) if c.architecture.variant == "none"]
        for ranked_by in ("accuracy", "aiq"):
            for rank, cell in enumerate(_best(baseline, ranked_by, k), 1):
                rows.append({"ranked_by": label(ranked_by), "rank": rank, **_cell_row(cell, metrics, scale)})
    if not rows:
        return None
    columns = [
        Column("ranked_by", "ranked by"),
        Column("rank", "rank", "int"),
        *_architecture_columns(with_variant=False),
        Column("label_noise", "label noise", "number", 2),
        Column("params", "parameters", "int"),
        Column("fold_decrease", "fold decrease", "fold"),
        *_metric_columns(metrics, scale),
        Column("replicates", "replicates", "int"),
    ]
    title = f"Table 1: the top {k} architectures by accuracy and by aIQ (variant none)"
    return Table("table1", title, caption, tuple(columns), tuple(rows), scale.unit)


def table2(cells: Sequence[Cell], k: int, scale: Scale, caption: str) -> Table | None:
    """The best ``k`` architectures of each family by aIQ, each with every variant trained."""
    metrics = ["accuracy", *layer_metrics(cells), "network_efficiency", "aiq"]
    rows = []
    for family in _families(cells).values():
        clean = _clean(family)
        if len({c.architecture.variant for c in clean}) < 2:
            continue
        baseline = [c for c in clean if c.architecture.variant == "none"] or clean
        chosen = list(dict.fromkeys(c.architecture.widths for c in _best(baseline, "aiq", len(baseline))))[:k]
        for widths in chosen:
            rows += [_cell_row(c, metrics, scale) for c in clean if c.architecture.widths == widths]
    if not rows:
        return None
    columns = [
        *_architecture_columns(with_variant=True),
        Column("label_noise", "label noise", "number", 2),
        Column("params", "parameters", "int"),
        *_metric_columns(metrics, scale),
        Column("replicates", "replicates", "int"),
    ]
    title = f"Table 2: the best {k} architectures by aIQ, with every variant trained"
    return Table("table2", title, caption, tuple(columns), tuple(rows), scale.unit)


def table3(cells: Sequence[Cell], scale: Scale, caption: str) -> Table | None:
    """Test and train accuracy per label-noise level, for the best-aIQ and best-accuracy architectures.

    One block per family and variant trained at two or more noise levels; the architectures are
    chosen at the lowest noise level trained.
    """
    noises = sorted({cell.label_noise for cell in cells})
    groups: dict[tuple, list[Cell]] = {}
    for cell in cells:
        a = cell.architecture
        groups.setdefault((a.arch, VARIANTS.index(a.variant), cell.dropout_p or 0.0), []).append(cell)
    rows = []
    for key in sorted(groups):
        group = groups[key]
        if len({c.label_noise for c in group}) < 2:
            continue
        picks: dict[tuple[int, ...], list[str]] = {}
        for metric in ("aiq", "accuracy"):
            for cell in _best(_clean(group), metric, 1):
                picks.setdefault(cell.architecture.widths, []).append(f"best {label(metric)}")
        for widths, why in picks.items():
            same = [c for c in group if c.architecture.widths == widths]
            a = same[0].architecture
            row: dict[str, Any] = {
                "pick": " and ".join(why),
                "arch": a.arch,
                "widths": a.widths_text,
                "variant": a.variant,
                "dropout_p": same[0].dropout_p,
                "params": same[0].params,
            }
            for noise in noises:
                at = next((c for c in same if c.label_noise == noise), None)
                for metric in ("accuracy", "train_accuracy"):
                    value = at.metrics.get(metric) if at is not None else None
                    row[f"{metric}_n{noise:g}"] = None if value is None else scale.estimate(metric, value)
            rows.append(row)
    if not rows:
        return None
    digits = scale.digits("accuracy")
    columns = [
        Column("pick", "chosen as"),
        *_architecture_columns(with_variant=True),
        Column("params", "parameters", "int"),
        *[Column(f"accuracy_n{n:g}", f"test accuracy, noise {n:g}", "estimate", digits) for n in noises],
        *[Column(f"train_accuracy_n{n:g}", f"train accuracy, noise {n:g}", "estimate", digits) for n in noises],
    ]
    title = "Table 3: accuracy under label noise, for the best-aIQ and best-accuracy architectures"
    return Table("table3", title, caption, tuple(columns), tuple(rows), scale.unit)


@dataclass(frozen=True)
class GapCorrelation:
    """Kendall's τ-b between one metric on one split and the generalization gap."""

    metric: str
    split: str
    result: RankCorrelation


def correlations(networks: Sequence[AuditedNetwork]) -> list[GapCorrelation]:
    """τ-b between the gap and each ``GENERALIZATION`` metric, over every network."""
    gaps = [n.gap for n in networks]
    return [
        GapCorrelation(metric, split, kendall_tau([split_metric(n, metric, split) for n in networks], gaps))
        for metric, split in GENERALIZATION
    ]


def generalization_table(found: Sequence[GapCorrelation], caption: str) -> Table:
    rows = [
        {
            "metric": label(c.metric),
            "split": c.split,
            "networks": c.result.n,
            "tau": c.result.tau,
            "p_value": c.result.p_value,
        }
        for c in found
    ]
    columns = (
        Column("metric", "metric"),
        Column("split", "measured on"),
        Column("networks", "networks", "int"),
        Column("tau", "Kendall τ-b", "number", 3),
        Column("p_value", "p (two-sided)", "p"),
    )
    title = "Do the metrics predict generalization? Kendall's τ-b against the train − test accuracy gap"
    return Table("generalization", title, caption, columns, tuple(rows), "fraction")


def cells_table(cells: Sequence[Cell], scale: Scale, caption: str) -> Table:
    metrics = ["accuracy", "train_accuracy", "gap", *layer_metrics(cells), "network_efficiency", "aiq"]
    metrics += ["cna", "cna_margin_max", "cna_margin_p5"]
    columns = [
        *_architecture_columns(with_variant=True),
        Column("label_noise", "label noise", "number", 2),
        Column("replicates", "replicates", "int"),
        Column("params", "parameters", "int"),
        Column("fold_decrease", "fold decrease", "fold"),
        *_metric_columns(metrics, scale),
    ]
    title = "Every cell: architecture × variant × label noise, over its replicates"
    rows = tuple(_cell_row(cell, metrics, scale) for cell in cells)
    return Table("cells", title, caption, tuple(columns), rows, scale.unit)


def networks_table(networks: Sequence[AuditedNetwork], scale: Scale, caption: str) -> Table:
    layers = max((len(n.test.layer_efficiencies) for n in networks), default=0)
    metrics = ["accuracy", "train_accuracy", "gap", *(f"layer{i}_efficiency" for i in range(1, layers + 1))]
    metrics += ["network_efficiency", "aiq", "cna", "cna_margin_max", "cna_margin_p5"]
    train = ["aiq", "network_efficiency", "cna"]
    rows = []
    for n in networks:
        job = n.network.job
        a = job.architecture
        values = network_metrics(n)
        row: dict[str, Any] = {
            "file": n.file,
            "arch": a.arch,
            "widths": a.widths_text,
            "variant": a.variant,
            "dropout_p": a.dropout_p if a.variant == "dropout" else None,
            "label_noise": job.label_noise,
            "seed": job.seed,
            "params": n.network.params,
            "epochs": n.network.epochs,
        }
        row.update({m: scale.value(m, values.get(m)) for m in metrics})
        row.update({f"train_{m}": scale.value(m, getattr(n.train, m)) for m in train})
        rows.append(row)
    columns = [
        Column("file", "file"),
        *_architecture_columns(with_variant=True),
        Column("label_noise", "label noise", "number", 2),
        Column("seed", "seed", "int"),
        Column("params", "parameters", "int"),
        Column("epochs", "epochs", "int"),
        *[Column(m, label(m), "number", scale.digits(m)) for m in metrics],
        *[Column(f"train_{m}", f"{label(m)} (train split)", "number", scale.digits(m)) for m in train],
    ]
    return Table("networks", "Every network", caption, tuple(columns), tuple(rows), scale.unit)


# --- the whole study ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    """Everything the report shows, built from the audited networks."""

    cells: list[Cell]
    tables: list[Table]
    correlations: list[GapCorrelation]
    caption: str
    summary: list[str]
    notes: list[str]
    scale: Scale


def _span(values: Sequence[int]) -> str:
    low, high = min(values), max(values)
    return f"{low}" if low == high else f"{low}–{high}"


def _recipe_text(recipe: Recipe) -> str:
    default = Recipe()
    if recipe.max_epochs is None:
        text = f"the full recipe (early stopping on training accuracy, patience {recipe.patience})"
    else:
        text = f"at most {recipe.max_epochs} epoch{'s' if recipe.max_epochs > 1 else ''}"
    skip = ("max_epochs", "patience")
    changed = [
        f"{f.name} {getattr(recipe, f.name)}"
        for f in fields(Recipe)
        if f.name not in skip and getattr(recipe, f.name) != getattr(default, f.name)
    ]
    return text + (f", with {', '.join(changed)}" if changed else "")


def describe(networks: Sequence[AuditedNetwork], cells: Sequence[Cell], dataset: str, settings: StudySettings) -> str:
    """The caption every table and figure carries: what was trained, how, and what was audited."""
    jobs = [n.network.job for n in networks]
    recipes = "; ".join(dict.fromkeys(_recipe_text(job.recipe) for job in jobs))
    limits = sorted({job.limit for job in jobs}, key=lambda v: (v is not None, v or 0))
    training = (
        "all training samples"
        if limits == [None]
        else "the first " + " or ".join("all" if v is None else f"{v:,}" for v in limits) + " training samples"
    )
    epochs = _span([n.network.epochs for n in networks])
    replicates = _span([c.replicates for c in cells])
    train_samples = _span([n.train.samples for n in networks])
    test_samples = _span([n.test.samples for n in networks])
    config = settings.config
    unit = "×100" if settings.percent else "on the 0–1 scale"
    return (
        f"{len(networks)} networks trained on {dataset} ({training}) with {recipes}; epochs run: {epochs}; "
        f"{replicates} replicate seed(s) per cell. Audited on {dataset}: the training split ({train_samples} "
        f"samples, with the labels each network was trained on) and the test split ({test_samples} samples). "
        "Tables and heatmaps show the test split: the mean over replicates ± the half-width of the 95% Student-t "
        f"interval. States read at: {config.states_at} (SPEC §1); aIQ with β = {config.beta:g}; accuracies, aIQ "
        f"and efficiencies {unit}."
    )


def _fold_note(reference: dict[str, Architecture], given: Sequence[Architecture]) -> str:
    named = {r.arch for r in given}
    parts = [
        f"{arch} ({a.widths_text}, {a.parameter_count:,} parameters{', named by --reference' if arch in named else ''})"
        for arch, a in sorted(reference.items())
    ]
    return "Fold decrease is the reference network's parameter count over the cell's: " + "; ".join(parts) + "."


def build(networks: Sequence[AuditedNetwork], dataset: str, settings: StudySettings) -> Study:
    """Cells, tables and τ's of the audited ``networks``, with their captions and a text summary."""
    scale = Scale(settings.percent)
    families = {n.network.job.architecture.arch for n in networks}
    given = [r for r in settings.references if r.arch in families]
    notes = [
        f"--reference {r.arch} ignored: no {r.arch} network was audited"
        for r in settings.references
        if r.arch not in families
    ]
    reference = references(networks, given)
    cells = make_cells(networks, reference)
    caption = describe(networks, cells, dataset, settings)
    fold = _fold_note(reference, given)
    found = correlations(networks)
    optional = {
        "Table 1 needs networks of variant none": table1(cells, settings.top_k, scale, f"{caption} {fold}"),
        "Table 2 needs two or more variants of one family": table2(cells, settings.top_k, scale, caption),
        "Table 3 needs two or more label-noise levels of one variant": table3(cells, scale, caption),
    }
    tables = [table for table in optional.values() if table is not None]
    notes += [f"{missing}: not written" for missing, table in optional.items() if table is None]
    tau_caption = (
        f"{caption} Each network is one point; the gap is its train accuracy (on the labels it was trained on) minus "
        "its test accuracy. p is two-sided, from the normal approximation with ties corrected; τ is blank where "
        "a metric is missing or constant."
    )
    tables += [
        generalization_table(found, tau_caption),
        cells_table(cells, scale, f"{caption} {fold}"),
        networks_table(networks, scale, caption),
    ]
    return Study(cells, tables, found, caption, _summary(cells, found, settings.top_k, scale), notes, scale)


def _summary(cells: Sequence[Cell], found: Sequence[GapCorrelation], k: int, scale: Scale) -> list[str]:
    lines = []
    for metric in ("accuracy", "aiq"):
        lines.append(f"top {k} by {metric}:")
        for rank, cell in enumerate(_best(cells, metric, k), 1):
            a = cell.architecture
            noise = f" noise {cell.label_noise:g}" if cell.label_noise else ""
            lines.append(
                f"  {rank}. {a.arch} ({a.widths_text}) {a.variant}{noise}: accuracy {_pm(cell, 'accuracy', scale)}, "
                f"aIQ {_pm(cell, 'aiq', scale)}, {cell.params:,} params"
            )
    lines.append("Kendall's tau against the train - test accuracy gap:")
    for c in found:
        tau = "n/a" if c.result.tau is None else f"{c.result.tau:+.3f}"
        p = "" if c.result.p_value is None else f" (p = {c.result.p_value:.3g})"
        lines.append(f"  {label(c.metric)} [{c.split}]: {tau}{p}, {c.result.n} networks")
    return lines


def _pm(cell: Cell, metric: str, scale: Scale) -> str:
    if metric not in cell.metrics or cell.metrics[metric].mean is None:
        return "n/a"
    value, digits = scale.estimate(metric, cell.metrics[metric]), scale.digits(metric)
    return f"{value.mean:.{digits}f}" if value.ci95 is None else f"{value.mean:.{digits}f} ± {value.ci95:.{digits}f}"
