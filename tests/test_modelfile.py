"""auditor.engine.modelfile: models are untrusted files, read whole or refused in one line.

Every bad file here is a real one (truncated real models, random bytes, a graph that fails the
checker, external data pointing out of the model's folder); nothing outside that folder is read.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import onnx
import pytest
from models import dense_model, mlp, save
from onnx import external_data_helper, helper, numpy_helper
from refusals import refused

from auditor import AuditConfig, audit, find_layers, prepare
from auditor.datasets.batches import Batch
from auditor.engine.modelfile import external_tensors, load_model
from auditor.errors import ModelError

TWO_LAYERS = [(np.eye(2), np.zeros(2)), (np.eye(2), np.zeros(2))]


def external_model(folder: Path, location: str = "weights.bin") -> tuple[Path, onnx.ModelProto]:
    """A model saved with all its weights in one external file at ``folder/location``."""
    (folder / location).parent.mkdir(parents=True, exist_ok=True)
    model = mlp([4, 5, 3])
    path = folder / "model.onnx"
    copy = onnx.ModelProto.FromString(model.SerializeToString())  # saving rewrites the proto it is given
    onnx.save_model(
        copy, path, save_as_external_data=True, all_tensors_to_one_file=True, location=location, size_threshold=0
    )
    return path, model


def relocate(path: Path, location: str) -> None:
    """Rewrite the model file so every external tensor points at ``location`` (data not read)."""
    proto = onnx.load(path, load_external_data=False)
    for tensor in external_tensors(proto):
        for entry in tensor.external_data:
            if entry.key == "location":
                entry.value = location
    path.write_bytes(proto.SerializeToString())


def audited_states(path: Path) -> int:
    """States counted in the first layer by a CPU audit of ten random samples."""
    x = np.random.default_rng(12).standard_normal((10, 4)).astype(np.float32)
    return audit(path, [("test", Batch(x))], AuditConfig(device="cpu")).splits["test"].layers[0].states_total


# --- What a readable model gives ----------------------------------------------------------------


def test_a_model_is_named_and_hashed_by_its_file(tmp_path: Path) -> None:
    path = save(dense_model(TWO_LAYERS), tmp_path / "two.onnx")
    loaded = load_model(path)
    assert loaded.name == "two.onnx"
    assert loaded.sha256 == hashlib.sha256(path.read_bytes()).hexdigest()
    assert load_model(path.read_bytes()).sha256 == loaded.sha256  # the same bytes, the same hash
    assert load_model(path.read_bytes()).name == "model"
    assert load_model(loaded.proto).name == "dense"  # a proto is named after its graph


# --- Refusals: one line, the right kind ---------------------------------------------------------


def test_missing_model_path(tmp_path: Path) -> None:
    refused(ModelError, lambda: load_model(tmp_path / "nope.onnx"), "not found", "nope.onnx")
    refused(ModelError, lambda: prepare(tmp_path / "nope.onnx"), "not found", "nope.onnx")


def test_empty_model_file(tmp_path: Path) -> None:
    (tmp_path / "empty.onnx").write_bytes(b"")
    refused(ModelError, lambda: load_model(tmp_path / "empty.onnx"), "empty")


def test_truncated_real_model(tmp_path: Path, shared_models: Path) -> None:
    raw = (shared_models / "cnn_pytorch25_opset17.onnx").read_bytes()
    path = tmp_path / "half.onnx"
    path.write_bytes(raw[: len(raw) // 2])
    refused(ModelError, lambda: load_model(path), "half.onnx")


def test_random_bytes_model(tmp_path: Path) -> None:
    path = tmp_path / "noise.onnx"
    path.write_bytes(np.random.default_rng(7).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    refused(ModelError, lambda: load_model(path), "noise.onnx")
    refused(ModelError, lambda: prepare(path.read_bytes()))


def test_model_failing_the_checker(tmp_path: Path) -> None:
    model = dense_model(TWO_LAYERS)
    model.graph.node.insert(0, helper.make_node("Relu", ["undefined_tensor"], ["dangling"]))
    path = save(model, tmp_path / "broken.onnx")
    refused(ModelError, lambda: load_model(path), "onnx.checker", "broken.onnx")


def test_a_model_over_the_size_limit_is_refused_before_parsing(tmp_path: Path) -> None:
    path = save(dense_model(TWO_LAYERS), tmp_path / "two.onnx")
    size = path.stat().st_size
    refused(ModelError, lambda: load_model(path, max_bytes=size - 1), f"{size} bytes", f"{size - 1}-byte limit")
    refused(ModelError, lambda: load_model(path.read_bytes(), max_bytes=size - 1), f"{size - 1}-byte limit")
    assert load_model(path, max_bytes=size).name == "two.onnx"


# --- External data --------------------------------------------------------------------------------


def test_external_data_beside_the_model_loads(tmp_path: Path) -> None:
    path, original = external_model(tmp_path / "m")
    assert (tmp_path / "m" / "weights.bin").stat().st_size > 0
    loaded = load_model(path).proto
    assert not external_tensors(loaded)  # every tensor's bytes are in the proto now
    for mine, theirs in zip(original.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(mine), numpy_helper.to_array(theirs))
    assert [lay.name for lay in find_layers(loaded)] == ["pre1", "logits"]
    assert audited_states(path) == 10


def test_external_data_in_a_subfolder_of_the_model_folder_loads(tmp_path: Path) -> None:
    """``weights/w.bin`` stays inside the model's folder, so it is read like a file beside it."""
    path, original = external_model(tmp_path / "m", "weights/w.bin")
    assert len(external_tensors(onnx.load(path, load_external_data=False))) == len(original.graph.initializer)
    loaded = load_model(path).proto
    for mine, theirs in zip(original.graph.initializer, loaded.graph.initializer, strict=True):
        np.testing.assert_array_equal(numpy_helper.to_array(mine), numpy_helper.to_array(theirs))
    assert audited_states(path) == 10


def test_external_data_given_as_bytes_is_refused(tmp_path: Path) -> None:
    path, _ = external_model(tmp_path / "m")
    refused(ModelError, lambda: load_model(path.read_bytes()), "external data", "by path")


@pytest.mark.parametrize("where", ["parent", "absolute", "symlink"])
def test_external_data_outside_the_model_folder_is_refused(tmp_path: Path, where: str) -> None:
    """The outside file holds valid weights, so only a refusal before reading explains the error."""
    path, _ = external_model(tmp_path / "m")
    outside = tmp_path / "outside.bin"
    outside.write_bytes((tmp_path / "m" / "weights.bin").read_bytes())
    (tmp_path / "m" / "weights.bin").unlink()
    if where == "parent":
        location = "../outside.bin"
    elif where == "absolute":
        location = str(outside)
    else:
        os.symlink(outside, tmp_path / "m" / "link.bin")
        location = "link.bin"
    relocate(path, location)
    refused(ModelError, lambda: load_model(path), "outside")
    refused(ModelError, lambda: prepare(path), "outside")


def test_external_data_escaping_to_a_secret_names_the_location(tmp_path: Path) -> None:
    """One tensor of a hand-written model points at ``../secret.bin``: refused, by path or bytes."""
    (tmp_path / "secret.bin").write_bytes(np.ones(4, np.float32).tobytes())
    model = dense_model(TWO_LAYERS)
    tensor = model.graph.initializer[0]
    external_data_helper.set_external_data(tensor, location="../secret.bin", offset=0, length=16)
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    (tmp_path / "model").mkdir()
    path = save(model, tmp_path / "model" / "escape.onnx")
    refused(ModelError, lambda: load_model(path), "outside", "../secret.bin")
    # and from bytes there is no folder at all to resolve it against
    refused(ModelError, lambda: load_model(path.read_bytes()), "external data")


def test_relocated_external_data_inside_the_folder_still_loads(tmp_path: Path) -> None:
    """Control for the refusals above: the same rewrite with an inside location works."""
    path, _ = external_model(tmp_path / "m")
    (tmp_path / "m" / "weights.bin").rename(tmp_path / "m" / "inside.bin")
    relocate(path, "inside.bin")
    assert [lay.name for lay in find_layers(load_model(path).proto)] == ["pre1", "logits"]


def test_missing_or_truncated_external_data_is_refused(tmp_path: Path) -> None:
    path, _ = external_model(tmp_path / "m")
    data = tmp_path / "m" / "weights.bin"
    raw = data.read_bytes()
    data.write_bytes(raw[: len(raw) // 2])
    refused(ModelError, lambda: load_model(path), "runs past the end", "truncated")
    data.unlink()
    refused(ModelError, lambda: load_model(path), "'weights.bin'", "missing")
