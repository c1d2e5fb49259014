"""A study of trained networks: audit every network of a folder on both splits, then write the report.

The folder is any folder of networks exported by ``auditor-train``: a grid, or ``train`` outputs
gathered by hand. Each network says what it is in its ONNX ``metadata_props``
(``TrainedNetwork.from_metadata``), so no manifest is needed. Every network is audited in process
with the auditor's own pipeline (``audit``), on the training split with the labels
it was trained on (label noise re-drawn from its seed) and on the test split, so each figure is
what ``auditor audit`` would print and the train − test accuracy gap is the network's own.

``make_report`` is the one function with I/O: it reads the folder and writes the tables
(``trainers.tables``), the figures (``trainers.figures``) and ``index.html`` (``trainers.study_page``).
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
from auditor.data import Batch, load_arrays
from auditor.errors import AuditError
from auditor.modelfile import load_model
from auditor.report import SplitReport
from trainers import tables
from trainers.files import save_atomic
from trainers.label_noise import randomize_labels
from trainers.records import Architecture, Job, TrainedNetwork


@dataclass(frozen=True)
class SplitFigures:
    """What the audit measured on one split of one network."""

    samples: int
    accuracy: float | None
    aiq: float | None
    network_efficiency: float | None
    cna: float | None
    layer_efficiencies: tuple[float, ...]

    @classmethod
    def of(cls, split: SplitReport) -> SplitFigures:
        return cls(
            samples=split.samples,
            accuracy=split.accuracy,
            aiq=split.aiq,
            network_efficiency=split.network_efficiency,
            cna=split.cna,
            layer_efficiencies=tuple(layer.efficiency for layer in split.layers),
        )


@dataclass(frozen=True)
class AuditedNetwork:
    """One network of the study: where it was found, what it is, and its audit on both splits."""

    file: str  # relative to the study's folder
    network: TrainedNetwork
    train: SplitFigures
    test: SplitFigures
    cna_margin_max: float | None
    cna_margin_p5: float | None

    @property
    def gap(self) -> float | None:
        """The generalization gap: train accuracy (on the labels trained on) − test accuracy."""
        if self.train.accuracy is None or self.test.accuracy is None:
            return None
        return self.train.accuracy - self.test.accuracy


@dataclass(frozen=True)
class StudySettings:
    """How to audit and report a folder of networks (the ``auditor-train report`` options).

    ``dataset`` None means the data set the networks were trained on; ``references`` name the
    network each architecture's fold-decrease is measured against (default: its largest).
    """

    dataset: str | None = None
    limit: int | None = None
    config: AuditConfig = field(default_factory=AuditConfig)
    top_k: int = 5
    percent: bool = False
    references: tuple[Architecture, ...] = ()


def find_networks(folder: Path) -> tuple[list[tuple[str, TrainedNetwork]], list[str]]:
    """Every network exported by ``auditor-train`` under ``folder``, by relative path, and notes.

    Files that are not such networks, and copies of a network already found (same job), are
    left out and named in the notes.
    """
    if not folder.is_dir():
        raise AuditError(f"{folder} is not a folder; give a folder of networks made by 'auditor-train'")
    found: dict[Job, tuple[str, TrainedNetwork]] = {}
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
        if network.job in found:
            copies.append(relative)
        else:
            found[network.job] = (relative, network)
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
        self.test = load_arrays(dataset, "test", limit=limit)
        self._train: dict[int | None, tuple[np.ndarray, np.ndarray]] = {}

    def train(self, network: TrainedNetwork) -> tuple[np.ndarray, np.ndarray]:
        """The samples ``network`` was trained on, with its (possibly noisy) labels, cut to ``limit``."""
        job = network.job
        if job.limit not in self._train:
            self._train[job.limit] = load_arrays(self.dataset, "train", limit=job.limit)
        x, y = self._train[job.limit]
        labels, _ = randomize_labels(y, job.label_noise, job.seed)
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
    margin = report.cna_margin
    return AuditedNetwork(
        file=relative,
        network=network,
        train=SplitFigures.of(report.splits["train"]),
        test=SplitFigures.of(report.splits["test"]),
        cna_margin_max=margin.cna_margin_max if margin else None,
        cna_margin_p5=margin.cna_margin_p5 if margin else None,
    )


def audit_folder(folder: Path, settings: StudySettings) -> tuple[list[AuditedNetwork], str, list[str]]:
    """Audit every network of ``folder`` trained on the study's data set; returns them, the data set, notes."""
    found, notes = find_networks(folder)
    if not found:
        raise AuditError(f"no networks made by 'auditor-train' in {folder}; train some with 'auditor-train grid'")
    trained_on = sorted({network.job.dataset for _, network in found})
    dataset = settings.dataset
    if dataset is None:
        if len(trained_on) > 1:
            raise AuditError(f"the networks were trained on {', '.join(trained_on)}; choose one with --data")
        dataset = trained_on[0]
    others = [relative for relative, network in found if network.job.dataset != dataset]
    if len(others) == len(found):
        raise AuditError(f"no network in {folder} was trained on {dataset}; they used {', '.join(trained_on)}")
    if others:
        notes.append(f"left out {len(others)} network(s) trained on another data set than {dataset}: {_some(others)}")
    data = _Data(dataset, settings.limit)
    chosen = [(relative, network) for relative, network in found if network.job.dataset == dataset]
    audited = []
    for relative, network in tqdm(chosen, unit="net", disable=not sys.stderr.isatty()):
        try:
            audited.append(audit_network(folder / relative, relative, network, data, settings.config))
        except AuditError as error:
            raise type(error)(f"{relative}: {error}") from None
    return audited, dataset, notes


def make_report(folder: Path, out: Path, settings: StudySettings) -> str:
    """Audit ``folder``, write every table, figure and ``index.html`` to ``out``; returns a text summary.

    Files: ``table1``, ``table2``, ``table3`` (when the networks allow them), ``generalization``,
    ``cells`` (one row per architecture × variant × label noise) and ``networks`` (one row per
    network), each as ``.csv`` and ``.json``; ``heatmap_*.png``, ``scatter_*.png`` and a
    self-contained ``index.html``.
    """
    from trainers.figures import heatmaps, scatters
    from trainers.study_page import html_page

    audited, dataset, notes = audit_folder(folder, settings)
    study = tables.build(audited, dataset, settings)
    notes += study.notes
    for table in study.tables:
        save_atomic(out / f"{table.name}.csv", table.to_csv().encode("utf-8"))
        document = {**table.to_json(), "config": settings.config.to_dict()}  # the audit settings, as a report has
        save_atomic(out / f"{table.name}.json", json.dumps(document, indent=2).encode("utf-8"))
    figures = [*heatmaps(study.cells, study.scale), *scatters(audited, study.correlations, study.scale)]
    for figure in figures:
        save_atomic(out / figure.file, figure.png)
    title = f"{folder.name or folder.resolve().name}: {len(audited)} networks audited on {dataset}"
    page = html_page(title, study.caption, study.tables, figures, notes)
    save_atomic(out / "index.html", page.encode("utf-8"))
    lines = [title, study.caption, *study.summary, *notes]
    written = ", ".join(f"{table.name}.csv/.json" for table in study.tables)
    lines.append(f"wrote {written}, {len(figures)} figures and index.html to {out}")
    return "\n".join(lines)
