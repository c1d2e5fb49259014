"""Reading model files safely: size checks, hashing, parsing, external data kept in its folder.

Model files are untrusted input. Every failure here is a ``ModelError`` with one line that says
what is wrong and what to do; nothing outside the model's own folder is ever read.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from auditor.errors import ModelError, first_line

DEFAULT_MAX_BYTES = 2 * 1024**3  # protobuf's own ceiling for one serialized model


@dataclass(frozen=True)
class LoadedModel:
    """A parsed, checked model with its external data loaded, and the hash that names it."""

    proto: onnx.ModelProto
    sha256: str
    name: str


def load_model(
    source: str | os.PathLike[str] | bytes | onnx.ModelProto, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> LoadedModel:
    """Read a model from a path, bytes or proto; refuse anything malformed or unsafe.

    External data is resolved only for models given by path, relative to the model's folder,
    and every location is checked to stay inside that folder before any file is opened
    (CVE-2022-25882, CVE-2024-27318).
    """
    if isinstance(source, onnx.ModelProto):
        raw, folder, name = source.SerializeToString(), None, source.graph.name or "model"
    elif isinstance(source, bytes):
        raw, folder, name = source, None, "model"
    else:
        path = Path(source)
        raw, folder, name = _read_file(path, max_bytes), path.resolve().parent, path.name
    if len(raw) > max_bytes:
        raise ModelError(f"model is {len(raw)} bytes, over the {max_bytes}-byte limit; raise the limit or shrink it")
    proto = _parse(raw, name)
    _load_external_data(proto, folder, name)
    _check(proto, name)
    return LoadedModel(proto=proto, sha256=hashlib.sha256(raw).hexdigest(), name=name)


def _read_file(path: Path, max_bytes: int) -> bytes:
    if not path.is_file():
        raise ModelError(f"model file not found: {path}; check the path")
    size = path.stat().st_size
    if size > max_bytes:
        raise ModelError(f"model file {path} is {size} bytes, over the {max_bytes}-byte limit")
    if size == 0:
        raise ModelError(f"model file {path} is empty; re-export the model")
    return path.read_bytes()


def _parse(raw: bytes, name: str) -> onnx.ModelProto:
    try:
        proto = onnx.load_model_from_string(raw)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise ModelError(
            f"{name} is not a readable ONNX model ({type(exc).__name__}); the file is truncated or not "
            "ONNX: re-export or re-download it"
        ) from None
    if not proto.graph.node:
        raise ModelError(f"{name} has no graph nodes; it is not an ONNX model or it is empty: re-export it")
    return proto


def _tensors(graph: onnx.GraphProto) -> list[onnx.TensorProto]:
    """Every tensor stored in a graph: initializers and tensor attributes, subgraphs included."""
    found = list(graph.initializer)
    for node in graph.node:
        for attr in node.attribute:
            found.extend([attr.t] if attr.HasField("t") else attr.tensors)
            for sub in [attr.g] if attr.HasField("g") else attr.graphs:
                found.extend(_tensors(sub))
    return found


def external_tensors(proto: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The tensors whose bytes live in external data files (the client uploads those files)."""
    return [t for t in _tensors(proto.graph) if external_data_helper.uses_external_data(t)]


def _load_external_data(proto: onnx.ModelProto, folder: Path | None, name: str) -> None:
    tensors = external_tensors(proto)
    if not tensors:
        return
    if folder is None:
        raise ModelError(
            f"{name} keeps weights in external data files; give the model by path with its data files beside it"
        )
    for tensor in tensors:
        info = external_data_helper.ExternalDataInfo(tensor)
        target = (folder / info.location).resolve()
        if os.path.isabs(info.location) or not target.is_relative_to(folder):
            raise ModelError(
                f"{name}: external data of tensor {tensor.name!r} points outside the model's folder "
                f"({info.location!r}); refusing to read it — keep data files beside the model"
            )
        if not target.is_file():
            raise ModelError(
                f"{name}: external data file {info.location!r} for tensor {tensor.name!r} is missing; "
                "copy it next to the model"
            )
        end = (info.offset or 0) + (info.length or 0)
        if end > target.stat().st_size:
            raise ModelError(
                f"{name}: external data for tensor {tensor.name!r} runs past the end of {info.location!r}; "
                "the data file is truncated"
            )
    external_data_helper.load_external_data_for_model(proto, str(folder))


def _check(proto: onnx.ModelProto, name: str) -> None:
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{name} fails onnx.checker: {first_line(exc)}; fix or re-export the model") from None
