"""auditor.runners.LocalRunner: the data opened while the model is prepared gives the report of
the library's own audit, and refusals come in the same order as before: the model's first."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from models import lenet_model, save
from refusals import refused

from auditor import AuditConfig, audit, prepare
from auditor.datasets.splits import open_splits
from auditor.errors import ModelError, NotFoundError
from auditor.records import DataSpec, ImageOptions
from auditor.runners import LocalRunner


def test_the_local_runner_reports_what_the_library_audit_reports(tmp_path: Path) -> None:
    model = save(lenet_model(), tmp_path / "lenet.onnx")
    config = AuditConfig(batch_size=64)
    report = LocalRunner().run(model, DataSpec("mnist", "both", 300, ImageOptions()), config)
    direct = audit(prepare(model), open_splits("mnist", "both", limit=300), config)
    assert report.to_json() == direct.to_json()


def test_an_array_file_is_opened_alongside_and_audited_whole(tmp_path: Path) -> None:
    model = save(lenet_model(), tmp_path / "lenet.onnx")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.integers(0, 256, (50, 1, 28, 28), dtype=np.uint8), y=rng.integers(0, 10, 50))
    report = LocalRunner().run(model, DataSpec(str(tmp_path / "d.npz"), "test", None, ImageOptions()), AuditConfig())
    assert report.splits["test"].samples == 50


def test_a_bad_model_is_refused_before_bad_data(tmp_path: Path) -> None:
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    missing = DataSpec(str(tmp_path / "missing.npz"), "test", None, ImageOptions())
    refused(ModelError, lambda: LocalRunner().run(tmp_path / "bad.onnx", missing, AuditConfig()))


def test_bad_data_is_refused_once_the_model_is_ready(tmp_path: Path) -> None:
    model = save(lenet_model(), tmp_path / "lenet.onnx")
    missing = DataSpec(str(tmp_path / "missing.npz"), "test", None, ImageOptions())
    refused(NotFoundError, lambda: LocalRunner().run(model, missing, AuditConfig()), "missing.npz")
