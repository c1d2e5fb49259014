"""A grid's summary: audit every network in process, then the paper's Table 1 and Figure 1.

Each finished network of the grid's manifest is audited on the test split with the auditor's own
pipeline (``prepare`` + ``audit``), so the figures are exactly what ``auditor audit`` would
print. Networks that differ only in their seed are one architecture: its row gives the mean and
95% t-interval over replicates of accuracy, aIQ, network efficiency and each layer's efficiency,
its parameter count, and the fold-decrease in parameters against the largest network of its
architecture.
"""

from __future__ import annotations

import csv
import io
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from auditor import AuditConfig, audit, prepare
from auditor.data import open_splits
from auditor.errors import AuditError
from trainers import manifest
from trainers.files import save_atomic
from trainers.render import heatmaps, html_page, layer_metrics
from trainers.stats import format_mean_ci, mean_ci

GROUP_KEYS = ("arch", "widths", "variant", "dropout_p", "label_noise")
NETWORK_KEYS = (*GROUP_KEYS, "seed", "name", "params", "epochs", "train_accuracy", "test_accuracy")
METRICS = ("accuracy", "aiq", "network_efficiency")


def audit_grid(grid: Path, dataset: str, limit: int | None, config: AuditConfig) -> list[dict[str, Any]]:
    """One row per finished network: its manifest facts and its audit figures on the test split."""
    records = manifest.finished(grid)
    if not records:
        raise AuditError(f"no finished networks in {grid}: run 'auditor-train grid --out {grid}' first")
    datasets = open_splits(dataset, "test", limit=limit)
    rows = []
    for record in tqdm(records.values(), unit="net", disable=not sys.stderr.isatty()):
        prepared = prepare(grid / record["file"], device=config.device, states_at=config.states_at)
        split = audit(prepared, datasets, config).splits["test"]
        row = {key: record[key] for key in NETWORK_KEYS}
        row.update(accuracy=split.accuracy, aiq=split.aiq, network_efficiency=split.network_efficiency)
        row.update({f"layer{i}_efficiency": layer.efficiency for i, layer in enumerate(split.layers, 1)})
        rows.append(row)
    return rows


def summarize(rows: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The Table 1 rows: one per architecture (all of ``GROUP_KEYS``), replicates pooled."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(tuple(_hashable(row[key]) for key in GROUP_KEYS), []).append(row)
    largest: dict[str, int] = {}
    for row in rows:
        largest[row["arch"]] = max(largest.get(row["arch"], 0), row["params"])
    table = []
    for key in sorted(groups, key=_order):
        members = groups[key]
        first = members[0]
        out: dict[str, Any] = {name: first[name] for name in GROUP_KEYS}
        out.update(
            replicates=len(members),
            params=first["params"],
            fold_decrease=largest[first["arch"]] / first["params"],
        )
        for metric in (*METRICS, *layer_metrics(members)):
            out[f"{metric}_mean"], out[f"{metric}_ci95"] = mean_ci([m.get(metric) for m in members])
        table.append(out)
    return table


def top(table: Sequence[dict[str, Any]], metric: str, k: int) -> list[dict[str, Any]]:
    """The ``k`` rows with the highest mean ``metric`` (rows without it last)."""
    column = f"{metric}_mean"
    return sorted(table, key=lambda row: (row[column] is None, -(row[column] or 0.0)))[:k]


def label(row: dict[str, Any]) -> str:
    """``lenet-300-100 (11,4) none`` plus the label noise when there is some."""
    noise = f" noise {row['label_noise']:g}" if row["label_noise"] else ""
    return f"{row['arch']} ({','.join(map(str, row['widths']))}) {row['variant']}{noise}"


def make_report(grid: Path, out: Path, *, dataset: str, limit: int | None, config: AuditConfig, top_k: int = 5) -> str:
    """Audit ``grid``, write the tables, heatmaps and ``index.html`` to ``out``; returns a text summary.

    Files: ``networks.csv``/``.json`` (one row per network), ``table.csv``/``.json`` (one row per
    architecture), ``heatmap_*.png`` and ``index.html`` (self-contained: images are inlined).
    """
    rows = audit_grid(grid, dataset, limit, config)
    table = summarize(rows)
    for name, data in (("networks", rows), ("table", table)):
        save_atomic(out / f"{name}.csv", _csv(data).encode("utf-8"))
        save_atomic(out / f"{name}.json", json.dumps(data, indent=2).encode("utf-8"))
    images, notes = heatmaps(table, out)
    title = f"{grid.name}: {len(rows)} networks audited on {dataset} test"
    save_atomic(out / "index.html", html_page(title, table, images, notes).encode("utf-8"))
    lines = [title]
    for metric in ("accuracy", "aiq"):
        lines.append(f"top {top_k} by {metric}:")
        for rank, row in enumerate(top(table, metric, top_k), 1):
            lines.append(
                f"  {rank}. {label(row)}: accuracy {_pm(row, 'accuracy')}, aIQ {_pm(row, 'aiq')}, "
                f"{row['params']:,} params"
            )
    lines += notes
    lines.append(
        f"wrote table.csv, table.json, networks.csv, networks.json, {len(images)} heatmaps, index.html to {out}"
    )
    return "\n".join(lines)


def _pm(row: dict[str, Any], metric: str) -> str:
    return format_mean_ci(row[f"{metric}_mean"], row[f"{metric}_ci95"])


def _hashable(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _order(key: tuple) -> tuple:
    """Table order: architecture, variant, noise, then widths."""
    arch, widths, variant, dropout_p, noise = key
    return arch, variant, noise, dropout_p, widths


def _csv(rows: Sequence[dict[str, Any]]) -> str:
    """Rows as CSV; lists become comma-joined text, missing values blank cells."""
    columns = list(dict.fromkeys(name for row in rows for name in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(
            {k: ",".join(map(str, v)) if isinstance(v, list) else ("" if v is None else v) for k, v in row.items()}
        )
    return buffer.getvalue()
