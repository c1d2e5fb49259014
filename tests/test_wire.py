"""auditor.service.wire: every converter pair round-trips, and whatever arrives from the network is checked."""

from __future__ import annotations

import importlib.util
from dataclasses import fields
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from refusals import refused

from auditor import audit, prepare
from auditor._proto.auditor.v1 import auditor_pb2 as pb
from auditor.config import AuditConfig
from auditor.datasets.batches import Batch, tagged
from auditor.datasets.splits import open_splits
from auditor.errors import AuditError, DataError
from auditor.records import AuditSpec, DatasetRef, Job, StoredReport
from auditor.report import LayerInfo, ModelInfo
from auditor.service.wire import (
    DATATYPES,
    array_to_tensor,
    batch_from_proto,
    batch_to_proto,
    config_to_settings,
    job_from_proto,
    job_to_proto,
    model_info_to_proto,
    report_from_proto,
    report_to_proto,
    settings_to_config,
    start_from_proto,
    start_to_proto,
    summary_from_proto,
    summary_to_proto,
    tensor_to_array,
)


@pytest.mark.parametrize("name", sorted(DATATYPES))
def test_every_datatype_round_trips_as_little_endian_bytes(name: str) -> None:
    values = (np.arange(24) % 7).astype(DATATYPES[name]).reshape(2, 3, 4)
    tensor = array_to_tensor(values)
    assert tensor.datatype == name
    assert list(tensor.shape) == [2, 3, 4]
    assert tensor.raw_contents == values.astype(DATATYPES[name]).tobytes()
    back = tensor_to_array(tensor, "x")
    assert back.dtype == values.dtype and np.array_equal(back, values)


def test_big_endian_and_strided_arrays_go_out_little_endian_in_c_order() -> None:
    values = np.arange(12, dtype=">i4").reshape(3, 4).T  # big-endian and not contiguous
    tensor = array_to_tensor(values)
    assert tensor.raw_contents == np.ascontiguousarray(values, dtype="<i4").tobytes()
    assert np.array_equal(tensor_to_array(tensor, "x"), values)


@pytest.mark.parametrize("dtype", [object, np.complex64, "U3", "datetime64[s]"])
def test_non_numeric_arrays_are_refused(dtype: object) -> None:
    with pytest.raises(DataError, match="cannot be sent"):
        array_to_tensor(np.zeros(2, dtype=dtype))


@pytest.mark.parametrize(
    ("tensor", "message"),
    [
        (pb.Tensor(datatype="FP128", shape=[1], raw_contents=b"\0" * 16), "unknown datatype"),
        (pb.Tensor(datatype="FP32", shape=[], raw_contents=b"\0" * 4), "1 to 16 dims"),
        (pb.Tensor(datatype="FP32", shape=[2, -1], raw_contents=b""), "not valid"),
        (pb.Tensor(datatype="FP32", shape=[2, 3], raw_contents=b"\0" * 23), "needs 24 bytes but 23 arrived"),
        (pb.Tensor(datatype="UINT8", shape=[1 << 40, 1 << 40], raw_contents=b"\0"), "bytes but 1 arrived"),
        (pb.Tensor(datatype="UINT8", shape=[1] * 65, raw_contents=b"\0"), "1 to 16 dims"),
        (pb.Tensor(datatype="UINT8", shape=[1] * 17, raw_contents=b"\0"), "1 to 16 dims"),
        (pb.Tensor(datatype="UINT8", shape=[1 << 62, 0], raw_contents=b""), "not valid"),
    ],
)
def test_malformed_tensors_are_refused_naming_the_field(tensor: pb.Tensor, message: str) -> None:
    with pytest.raises(DataError, match=message) as caught:
        tensor_to_array(tensor, "test samples")
    assert str(caught.value).startswith("test samples")


def test_batches_round_trip_with_and_without_labels() -> None:
    x = np.arange(2 * 28 * 28, dtype=np.uint8).reshape(2, 28, 28)
    for y in (np.array([3, 7], dtype=np.int64), None):
        split, batch = batch_from_proto(batch_to_proto("train", Batch(x, y)))
        assert split == "train"
        assert np.array_equal(batch.x, x)
        assert (batch.y is None) if y is None else np.array_equal(batch.y, y)


def test_a_batch_of_an_unknown_split_is_refused() -> None:
    with pytest.raises(DataError, match="split 'validation'"):
        batch_from_proto(batch_to_proto("validation", Batch(np.zeros((1, 2), np.float32))))


@pytest.mark.parametrize(
    "config",
    [
        AuditConfig(),
        AuditConfig(
            beta=0.5, batch_size=7, include_output_layer=True, cna_include_output_layer=False, aggregate="mean",
            margin_fraction=0.25, margin_seed=11, target_efficiency=0.9, alpha_range=(-1.0, 3.5), scale=0.1,
            mean=0.1307, std=0.3081, device="cpu", states_at="block-output", memory_budget=512 << 20,
            gpu_math="tf32",
        ),
    ],
)  # fmt: skip
def test_settings_carry_every_config_field_exactly(config: AuditConfig) -> None:
    settings = config_to_settings(config)
    back = settings_to_config(pb.AuditSettings.FromString(settings.SerializeToString()))
    assert back == config
    assert back.to_dict() == config.to_dict()


def test_every_config_field_has_a_settings_field() -> None:
    """A setting the wire could not carry would be silently dropped on the way to a server."""
    config_fields = {f.name for f in fields(AuditConfig)}
    assert config_fields <= set(pb.AuditSettings.DESCRIPTOR.fields_by_name)


def test_audit_starts_and_jobs_round_trip() -> None:
    spec = AuditSpec("a" * 64, "net.onnx", AuditConfig(beta=3.0), DatasetRef("mnist", "both", 100))
    assert start_from_proto(pb.AuditStart.FromString(start_to_proto(spec).SerializeToString())) == spec
    created = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
    for job in (
        Job("b" * 32, spec, created=created, queue_position=3),
        Job("c" * 32, spec, "done", {"train": 100, "test": 100}, "", "d" * 32, created, created, created, 2),
        Job("e" * 32, spec, "failed", {"train": 7}, "the dataset is empty", created=created, finished=created),
    ):
        assert job_from_proto(pb.Job.FromString(job_to_proto(job).SerializeToString())) == job


@pytest.mark.parametrize(
    ("start", "message"),
    [
        (pb.AuditStart(model_sha256="../x"), "64 lowercase hex digits"),
        (pb.AuditStart(model_sha256="a" * 64, model_name="a\nb"), "no control characters"),
        (pb.AuditStart(model_sha256="a" * 64, model_name="m" * 256), "at most 255 bytes"),
        (pb.AuditStart(model_sha256="a" * 64, dataset=pb.DatasetRef(name="imagenet")), "resolves only"),
        (pb.AuditStart(model_sha256="a" * 64, dataset=pb.DatasetRef(name="mnist", split="x")), "split must be"),
        (pb.AuditStart(model_sha256="a" * 64, dataset=pb.DatasetRef(name="mnist", limit=0)), "at least 1"),
    ],
)
def test_ill_formed_audit_starts_are_refused_naming_the_field(start: pb.AuditStart, message: str) -> None:
    refused(AuditError, lambda: start_from_proto(start), message)


def test_unset_settings_take_the_defaults_and_bad_ones_are_refused() -> None:
    assert settings_to_config(pb.AuditSettings()) == AuditConfig()
    assert settings_to_config(pb.AuditSettings(beta=3.0)) == AuditConfig(beta=3.0)
    with pytest.raises(AuditError, match="beta must be > 0"):
        settings_to_config(pb.AuditSettings(beta=-1.0))
    with pytest.raises(AuditError, match="aggregate must be one of"):
        settings_to_config(pb.AuditSettings(aggregate="median"))


@pytest.fixture(scope="module")
def unlabelled_report(shared_models):
    """A real audit of mnist-8 where test has labels and train has none (so accuracy is null)."""
    (test,) = open_splits("mnist", "test", limit=64)
    batches = [("train", Batch(b.x)) for b in test.batches(32)] + list(tagged([test], 32))
    return audit(prepare(shared_models / "mnist-8_cntk_opset8.onnx"), batches)


def test_summaries_carry_the_headline_figures_and_nulls(unlabelled_report) -> None:
    created = datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    stored = StoredReport("abc", "f" * 64, created, unlabelled_report)  # id, content address, ...
    row = summary_from_proto(pb.ReportSummary.FromString(summary_to_proto(stored).SerializeToString()))
    assert row["id"] == "abc" and row["model_sha256"] == "f" * 64
    assert row["created"] == "2025-01-02T03:04:05.678901+00:00"
    for name, split in unlabelled_report.splits.items():
        expected = {k: getattr(split, k) for k in ("samples", "accuracy", "aiq", "network_efficiency", "cna")}
        assert row["summary"][name] == expected
    assert row["summary"]["train"]["accuracy"] is None and row["summary"]["test"]["accuracy"] is not None


def test_the_report_travels_whole_as_json(unlabelled_report) -> None:
    stored = StoredReport("abc", "f" * 64, datetime.now(UTC), unlabelled_report)
    message = pb.Report.FromString(report_to_proto(stored).SerializeToString())
    assert report_from_proto(message) == unlabelled_report
    assert message.summary.id == "abc"


def test_model_info_keeps_symbolic_and_unknown_dims_and_null_layer_fields() -> None:
    info = ModelInfo(
        sha256="a" * 64, name="m.onnx", producer="test", opset=17, input_name="x",
        input_shape=["batch", 1, None], input_dtype="float32",
        layers=[LayerInfo("h", "Gemm", "Relu", "hidden", 8, 1), LayerInfo("out", "Gemm", None, "output", None, None)],
    )  # fmt: skip
    message = model_info_to_proto(info)
    assert [d.WhichOneof("value") for d in message.input_shape] == ["param", "size", None]
    assert message.input_shape[0].param == "batch" and message.input_shape[1].size == 1
    hidden, output = message.layers
    assert (hidden.activation, hidden.neurons, hidden.positions) == ("Relu", 8, 1)
    assert not output.HasField("activation") and not output.HasField("neurons")


def test_the_committed_stubs_are_what_gen_protos_generates(tmp_path: Path) -> None:
    repo = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("gen_protos", repo / "scripts" / "gen_protos.py")
    gen_protos = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen_protos)
    assert gen_protos.generate(tmp_path) == 0
    fresh = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    assert fresh, "nothing generated"
    for path in fresh:
        assert (repo / path).read_bytes() == (tmp_path / path).read_bytes(), (
            f"{path} is stale: run scripts/gen_protos.py"
        )
