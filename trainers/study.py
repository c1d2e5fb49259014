"""A study of trained networks: audit every network of a folder on both splits, then write the report.

The folder is any folder of networks exported by ``auditor-train``: a grid, or ``train`` outputs
gathered by hand, checkpoints included. Each network says what it is in its ONNX
``metadata_props`` (``TrainedNetwork.from_metadata``), so no manifest is needed. Every network is
audited in process with the auditor's own pipeline (``audit``), on the training split with the
labels it was trained on (label noise re-drawn from its kind and seed) and on the test split, so
each figure is what ``auditor audit`` would print and the train − test accuracy gap is the
network's own; the report's ``weights`` section gives the norm baselines.

``make_report`` is the one function with I/O: it reads the folder and writes, per data set, the
tables (``trainers.tables``), the figures (``trainers.figures``) and ``index.html``
(``trainers.study_page``) of the final networks, then the CNA study over every network and
checkpoint of every data set (``trainers.generalization``).
"""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from auditor import AuditConfig, audit
from auditor.datasets.batches import Batch
from auditor.engine.modelfile import load_model
from auditor.errors import AuditError
from auditor.report import Report, WeightNorms
from trainers import generalization, tables
from trainers.files import save_atomic
from trainers.label_noise import noisy_labels
from trainers.noise_data import dataset_arrays
from trainers.records import Architecture, TrainedNetwork, TrainingJob


@dataclass(frozen=True)
class SplitMetrics:
    """What the study keeps of one split's audit of one network: the headline figures and each
    layer's efficiency, not the report's per-layer counts and per-sample points (a study holds
    every network of a grid at once)."""

    samples: int
    accuracy: float | None
    aiq: float | None
    network_efficiency: float | None
    cna: float | None
    layer_efficiencies: tuple[float, ...]

    @classmethod
    def of(cls, report: Report, split: str) -> SplitMetrics:
        """The figures of ``split`` (which ``report`` audited), read by name with ``Report.metric``."""
        headline = ("samples", "accuracy", "aiq", "network_efficiency", "cna")
        return cls(
            **{name: report.metric(name, split) for name in headline},
            layer_efficiencies=tuple(layer.efficiency for layer in report.splits[split].layers),
        )


@dataclass(frozen=True)
class AuditedNetwork:
    """One network of the study: where it was found, what it is, and its audit on both splits."""

    file: str  # relative to the study's folder
    network: TrainedNetwork
    train: SplitMetrics
    test: SplitMetrics
    cna_margin_max: float | None
    cna_margin_p5: float | None
    weights: WeightNorms | None = None

    @property
    def gap(self) -> float | None:
        """The generalization gap: train accuracy (on the labels trained on) − test accuracy."""
        if self.train.accuracy is None or self.test.accuracy is None:
            return None
        return self.train.accuracy - self.test.accuracy


@dataclass(frozen=True)
class StudySettings:
    """How to audit and report a folder of networks (the ``auditor-train report`` options).

    ``dataset`` None means every data set the networks were trained on, each audited on its own;
    ``references`` name the network each architecture's fold-decrease is measured against
    (default: its largest); ``bootstrap`` resamples of networks give the CNA study's intervals.
    """

    dataset: str | None = None
    limit: int | None = None
    config: AuditConfig = field(default_factory=AuditConfig)
    top_k: int = 5
    percent: bool = False
    references: tuple[Architecture, ...] = ()
    bootstrap: int = 1000  # resamples of networks for the CNA study's 95% intervals
    bootstrap_seed: int = 0


def find_networks(folder: Path) -> tuple[list[tuple[str, TrainedNetwork]], list[str]]:
    """Every network exported by ``auditor-train`` under ``folder``, by relative path, and notes.

    Files that are not such networks, and copies of a network already found (same job, and the
    same epoch for a checkpoint), are left out and named in the notes.
    """
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder; give a folder of networks made by 'auditor-train'")
    found: dict[tuple[TrainingJob, bool, int], tuple[str, TrainedNetwork]] = {}
    foreign: list[str] = []
    copies: list[str] = []
    for path in sorted(p for p in folder.rglob("*.onnx") if p.is_file()):
        relative = path.relative_to(folder).as_posix()
        try:
            props = {p.key: p.value for p in load_model(path).proto.metadata_props}
            network = TrainedNetwork.from_metadata(props)
        except AuditError:
            foreign.append(relative)
            continue
        key = (network.job, network.final, 0 if network.final else network.epochs)
        if key in found:
            copies.append(relative)
        else:
            found[key] = (relative, network)
    notes = []
    if foreign:
        notes.append(f"left out {len(foreign)} file(s) not exported by auditor-train: {_some(foreign)}")
    if copies:
        notes.append(f"left out {len(copies)} copy(ies) of networks already found: {_some(copies)}")
    return list(found.values()), notes


def _some(names: Sequence[str], shown: int = 3) -> str:
    return ", ".join(names[:shown]) + (f" and {len(names) - shown} more" if len(names) > shown else "")


def _batches(split: str, x: np.ndarray, y: np.ndarray, size: int) -> Iterator[tuple[str, Batch]]:
    for start in range(0, len(x), size):
        yield split, Batch(x=x[start : start + size].copy(), y=y[start : start + size].copy())


class _Data:
    """The study's data, read once: the test split and each training set the networks used."""

    def __init__(self, dataset: str, limit: int | None) -> None:
        self.dataset, self.limit = dataset, limit
        self.test = dataset_arrays(dataset, "test", limit=limit)
        self._train: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}

    def train(self, network: TrainedNetwork) -> tuple[np.ndarray, np.ndarray]:
        """The samples ``network`` was trained on, with its (possibly noisy) labels, cut to ``limit``."""
        job = network.job
        if job.limit not in self._train:
            self._train[job.limit] = dataset_arrays(self.dataset, "train", limit=job.limit)
        x, y = self._train[job.limit]
        labels = noisy_labels(y, job.label_noise_kind, job.label_noise, job.seed)
        return x[: self.limit], labels[: self.limit]


def audit_network(
    path: Path, relative: str, network: TrainedNetwork, data: _Data, config: AuditConfig
) -> AuditedNetwork:
    """Audit one network on its training data (labels as trained) and on the test split."""
    x_train, y_train = data.train(network)
    x_test, y_test = data.test
    batches = itertools.chain(
        _batches("train", x_train, y_train, config.batch_size),
        _batches("test", x_test, y_test, config.batch_size),
    )
    report = audit(path, batches, config)
    return AuditedNetwork(
        file=relative,
        network=network,
        train=SplitMetrics.of(report, "train"),
        test=SplitMetrics.of(report, "test"),
        cna_margin_max=report.metric("cna_margin_max", "train+test"),  # CNA-Margin spans both splits
        cna_margin_p5=report.metric("cna_margin_p5", "train+test"),
        weights=report.weights,
    )


def audit_networks(
    folder: Path, chosen: Sequence[tuple[str, TrainedNetwork]], dataset: str, settings: StudySettings
) -> list[AuditedNetwork]:
    """Audit ``chosen`` networks of ``folder`` on ``dataset``; an error names the file."""
    data = _Data(dataset, settings.limit)
    audited = []
    for relative, network in tqdm(chosen, unit="net", disable=not sys.stderr.isatty()):
        try:
            audited.append(audit_network(folder / relative, relative, network, data, settings.config))
        except AuditError as error:
            raise type(error)(f"{relative}: {error}") from None
    return audited


def study_datasets(found: Sequence[tuple[str, TrainedNetwork]], settings: StudySettings) -> tuple[list[str], list[str]]:
    """The data sets the study audits on (``--data``, or every one the networks were trained on), and notes."""
    trained_on = sorted({network.job.dataset for _, network in found})
    if settings.dataset is None:
        return trained_on, []
    others = [relative for relative, network in found if network.job.dataset != settings.dataset]
    if len(others) == len(found):
        raise AuditError(f"no network was trained on {settings.dataset}; they used {', '.join(trained_on)}")
    notes = []
    if others:
        notes.append(
            f"left out {len(others)} network(s) trained on another data set than {settings.dataset}: {_some(others)}"
        )
    return [settings.dataset], notes


def _write_tables(
    audited: list[AuditedNetwork], dataset: str, out: Path, settings: StudySettings, title: str
) -> list[str]:
    """Tables 1–3, heatmaps, τ and ``index.html`` of the final networks of one data set; returns the summary lines."""
    from trainers.figures import heatmaps, scatters
    from trainers.study_page import html_page

    finals = [a for a in audited if a.network.final]
    notes = []
    if len(finals) < len(audited):
        notes.append(
            f"{len(audited) - len(finals)} checkpoint(s) are left out of these tables; the CNA study "
            "(cna_study.*) uses them"
        )
    study = tables.build(finals, dataset, settings)
    notes += study.notes
    for table in study.tables:
        save_atomic(out / f"{table.name}.csv", table.to_csv().encode("utf-8"))
        document = {**table.to_json(), "config": settings.config.to_dict()}  # the audit settings, as a report has
        save_atomic(out / f"{table.name}.json", json.dumps(document, indent=2).encode("utf-8"))
    figures = [*heatmaps(study.cells, study.scale), *scatters(finals, study.correlations, study.scale)]
    for figure in figures:
        save_atomic(out / figure.file, figure.png)
    page = html_page(title, study.caption, study.tables, figures, notes)
    save_atomic(out / "index.html", page.encode("utf-8"))
    lines = [title, study.caption, *study.summary, *notes]
    written = ", ".join(f"{table.name}.csv/.json" for table in study.tables)
    lines.append(f"wrote {written}, {len(figures)} figures and index.html to {out}")
    return lines


def make_report(folder: Path, out: Path, settings: StudySettings) -> str:
    """Audit ``folder``, write every table, figure and page to ``out``; returns a text summary.

    Per data set (in ``out`` itself when there is one, else in ``out/<data set>/``): ``table1``,
    ``table2``, ``table3`` (when the networks allow them), ``generalization``, ``cells`` (one row
    per architecture × variant × label noise) and ``networks`` (one row per network), each as
    ``.csv`` and ``.json``; ``heatmap_*.png``, ``scatter_*.png`` and a self-contained
    ``index.html``. These use the final networks; checkpoints go only to the CNA study, written to
    ``out``: ``cna_study.csv``/``.json`` (correlations with bootstrap intervals),
    ``cna_points.csv``/``.json`` (every network and checkpoint), ``cna_scatter_*.png`` and
    ``cna_study.html``.
    """
    found, notes = find_networks(folder)
    if not found:
        raise AuditError(f"no networks made by 'auditor-train' in {folder}; train some with 'auditor-train grid'")
    datasets, more_notes = study_datasets(found, settings)
    notes += more_notes
    name = folder.name or folder.resolve().name
    lines: list[str] = []
    everything: list[AuditedNetwork] = []
    for dataset in datasets:
        chosen = [(relative, network) for relative, network in found if network.job.dataset == dataset]
        audited = audit_networks(folder, chosen, dataset, settings)
        everything += audited
        where = out if len(datasets) == 1 else out / _safe(dataset)
        finals = sum(a.network.final for a in audited)
        title = f"{name}: {finals} networks audited on {dataset}"
        lines += _write_tables(audited, dataset, where, settings, title)
    lines += notes
    lines += write_cna_study(everything, out, f"{name}: the CNA study", settings)
    return "\n".join(lines)


def write_cna_study(audited: Sequence[AuditedNetwork], out: Path, title: str, settings: StudySettings) -> list[str]:
    """The CNA paper's generalization study over every network and checkpoint; returns summary lines."""
    return write_cna_points([generalization.point_of(a) for a in audited], out, title, settings)


def write_cna_points(
    points: Sequence[generalization.Point], out: Path, title: str, settings: StudySettings
) -> list[str]:
    """``write_cna_study`` from the study's points (as ``cna_points.json`` holds them); returns summary lines."""
    from trainers.figures import cna_scatters
    from trainers.study_page import html_page

    study = generalization.build(points, bootstrap=settings.bootstrap, seed=settings.bootstrap_seed)
    for table in study.tables:
        save_atomic(out / f"{table.name}.csv", table.to_csv().encode("utf-8"))
        document = {**table.to_json(), "config": settings.config.to_dict()}
        save_atomic(out / f"{table.name}.json", json.dumps(document, indent=2).encode("utf-8"))
    figures = cna_scatters(points, study.correlations)
    for figure in figures:
        save_atomic(out / figure.file, figure.png)
    page = html_page(title, study.caption, study.tables, figures, study.notes)
    save_atomic(out / "cna_study.html", page.encode("utf-8"))
    return [
        *study.summary,
        f"wrote cna_study.csv/.json, cna_points.csv/.json, {len(figures)} figures and cna_study.html to {out}",
    ]


def _safe(text: str) -> str:
    """A folder name for a data set: characters other than letters, digits, ``.`` and ``-`` become ``-``."""
    return "".join(c if c.isalnum() or c in ".-" else "-" for c in text)
