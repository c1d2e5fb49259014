"""Reading model files safely: size checks, hashing, parsing, external data kept in its folder.

Model files are untrusted input. Every failure here is a ``ModelError`` with one line that says
what is wrong and what to do; nothing outside the model's own folder is ever read.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from onnx import external_data_helper

from auditor.errors import ModelError, first_line

DEFAULT_MAX_BYTES = 2 * 1024**3  # protobuf's own ceiling for one serialized model
MODEL_FILE = "model.onnx"  # the name a server stores every model under; no data file may take it
MAX_DATA_NAME_BYTES = 1024  # an external data file's location, folders included


@dataclass(frozen=True)
class LoadedModel:
    """A parsed, checked model with its external data loaded, and the hash that names it."""

    proto: onnx.ModelProto
    sha256: str
    name: str
    path: Path | None = None  # the file it was read from; None for bytes and protos


def load_model(
    source: str | os.PathLike[str] | bytes | onnx.ModelProto, *, max_bytes: int = DEFAULT_MAX_BYTES
) -> LoadedModel:
    """Read a model from a path, bytes or proto; refuse anything malformed or unsafe.

    External data is resolved only for models given by path, relative to the model's folder,
    and every location is checked to stay inside that folder before any file is opened
    (CVE-2022-25882, CVE-2024-27318).
    """
    path = None
    if isinstance(source, onnx.ModelProto):
        raw, folder, name = source.SerializeToString(), None, source.graph.name or "model"
    elif isinstance(source, bytes):
        raw, folder, name = source, None, "model"
    else:
        path = Path(source).resolve()
        raw, folder, name = _read_file(Path(source), max_bytes), path.parent, Path(source).name
    if len(raw) > max_bytes:
        raise ModelError(f"model is {len(raw)} bytes, over the {max_bytes}-byte limit; raise the limit or shrink it")
    proto = _parse(raw, name)
    _load_external_data(proto, folder, name)
    _check(proto, name)
    return LoadedModel(proto=proto, sha256=hashlib.sha256(raw).hexdigest(), name=name, path=path)


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


def content_address(file_sha256: str, data_sha256: Mapping[str, str]) -> str:
    """A model's content address from the SHA-256 of its file and of each external data file.

    Without external data it is the file's own SHA-256 (what ``sha256sum model.onnx`` prints).
    With it, it is the SHA-256 of the ``sha256sum``-style manifest, model first, then data files
    by location, so that new weights under an unchanged graph get a new address.
    """
    if not data_sha256:
        return file_sha256
    lines = [f"{file_sha256}  {MODEL_FILE}\n", *(f"{data_sha256[n]}  {n}\n" for n in sorted(data_sha256))]
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def check_data_file_name(name: str, model_name: str = MODEL_FILE) -> str:
    """Refuse an external-data location that could leave the model's folder or stand for the model.

    The one rule for data file names, held by local loading, the client's upload and the
    server's store alike, so that a model audits locally exactly when it audits on a server. A
    location is a path relative to the model's folder with ``/`` between parts (``w.bin``,
    ``weights/w.bin``): no absolute paths, no empty, ``.`` or ``..`` parts, no backslashes or
    control characters, parts of at most 255 bytes and 1024 bytes in all, and neither the model's
    own file name nor ``model.onnx`` (the name a server stores the model itself under).
    """
    size = len(name.encode("utf-8", "replace"))
    parts = name.split("/")
    if (
        size == 0
        or size > MAX_DATA_NAME_BYTES
        or "\\" in name
        or any(ord(c) < 0x20 or ord(c) == 0x7F for c in name)
        or any(part in ("", ".", "..") or len(part.encode("utf-8", "replace")) > 255 for part in parts)
        or name in (MODEL_FILE, model_name)
    ):
        shown = repr(name[:80]) + ("..." if len(name) > 80 else "")
        raise ModelError(
            f"external data file name {shown} is not allowed: it could point outside the model's folder or "
            f"stand for the model; use a path inside the folder ('w.bin' or 'weights/w.bin': no '..', no "
            f"leading '/', no backslashes or control characters, at most {MAX_DATA_NAME_BYTES} bytes, not "
            f"{model_name!r})"
        )
    return name


def external_data_files(proto: onnx.ModelProto, folder: Path, model_name: str = MODEL_FILE) -> dict[str, Path]:
    """Every external data file the model names, by location, each a plain file inside ``folder``.

    Locations pass ``check_data_file_name``; no part of a path may be a symbolic link; each
    tensor's offset and length must be >= 0 and end within its file. Nothing is read but the
    files' sizes, so the client can hash and upload exactly the files a local audit would load.
    """
    files: dict[str, Path] = {}
    for tensor in external_tensors(proto):
        try:
            info = external_data_helper.ExternalDataInfo(tensor)
        except (ValueError, TypeError) as exc:
            raise ModelError(
                f"{model_name}: the external data entry of tensor {tensor.name!r} is malformed ({first_line(exc)}); "
                "re-export the model"
            ) from None
        name = check_data_file_name(info.location, model_name)
        path = folder / name
        steps = [folder.joinpath(*name.split("/")[: i + 1]) for i in range(name.count("/") + 1)]
        if any(step.is_symlink() for step in steps):
            raise ModelError(
                f"{model_name}: external data file {name!r} is or lies under a symbolic link, which could point "
                "outside the model's folder; copy the file itself into the folder"
            )
        if not path.is_file():
            raise ModelError(
                f"{model_name}: external data file {name!r} for tensor {tensor.name!r} is missing; "
                "copy it into the model's folder"
            )
        offset, length = info.offset or 0, info.length or 0
        if offset < 0 or length < 0:
            raise ModelError(
                f"{model_name}: external data of tensor {tensor.name!r} has a negative offset or length "
                f"({offset}, {length}); the model is corrupt: re-export it"
            )
        if offset + length > path.stat().st_size:
            raise ModelError(
                f"{model_name}: external data for tensor {tensor.name!r} runs past the end of {name!r}; "
                "the data file is truncated"
            )
        files[name] = path
    return files


def _load_external_data(proto: onnx.ModelProto, folder: Path | None, name: str) -> None:
    if not external_tensors(proto):
        return
    if folder is None:
        raise ModelError(
            f"{name} keeps weights in external data files; give the model by path with its data files beside it"
        )
    external_data_files(proto, folder, name)
    external_data_helper.load_external_data_for_model(proto, str(folder))


def _check(proto: onnx.ModelProto, name: str) -> None:
    if not proto.graph.output:
        raise ModelError(f"{name} has no graph outputs; the auditor reads the model's output: re-export it with one")
    try:
        onnx.checker.check_model(proto)
    except (onnx.checker.ValidationError, ValueError) as exc:
        raise ModelError(f"{name} fails onnx.checker: {first_line(exc)}; fix or re-export the model") from None
