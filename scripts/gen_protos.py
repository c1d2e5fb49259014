"""Regenerate the gRPC stubs in ``auditor/_proto`` from ``protos/`` (never edit the output by hand).

Our Python package is called ``auditor`` and so is the proto package (``auditor.v1``), so plain
generation would emit ``from auditor.v1 import auditor_pb2`` and break. Mapping the include path
``auditor/_proto=protos`` makes protoc see the file as ``auditor/_proto/auditor/v1/auditor.proto``:
the modules land in ``auditor/_proto/auditor/v1/`` and import as
``auditor._proto.auditor.v1.auditor_pb2``.

Usage: ``python scripts/gen_protos.py`` (needs grpcio-tools; commit the result).
"""

from __future__ import annotations

import sys
from importlib import resources
from pathlib import Path

from grpc_tools import protoc

REPO = Path(__file__).resolve().parents[1]
PROTOS = ["protos/auditor/v1/auditor.proto"]


def generate(root: Path = REPO) -> int:
    """Write the stubs under ``root`` (the repository; a test compares a fresh copy with the committed one)."""
    well_known = resources.files("grpc_tools") / "_proto"  # google/protobuf/*.proto
    args = [
        "grpc_tools.protoc",
        f"-I{well_known}",
        f"-Iauditor/_proto={REPO / 'protos'}",
        f"--python_out={root}",
        f"--pyi_out={root}",
        f"--grpc_python_out={root}",
        *(str(REPO / p) for p in PROTOS),
    ]
    code = protoc.main(args)
    if code != 0:
        return code
    out = root / "auditor" / "_proto"
    for folder in [out, *(p for p in out.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        (folder / "__init__.py").touch()
    return 0


if __name__ == "__main__":
    sys.exit(generate())
