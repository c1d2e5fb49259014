"""Shared test setup: real data and real models from ../shared, never mocks."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("AUDITOR_SHARED_DIR", REPO.parent / "shared"))

# Tests read the real MNIST files from ../shared/data unless the caller points elsewhere; the path
# is made absolute because some tests change the working directory.
os.environ["AUDITOR_DATA_DIR"] = str(Path(os.environ.get("AUDITOR_DATA_DIR", SHARED / "data")).resolve())


@pytest.fixture(scope="session")
def shared_models() -> Path:
    """The folder of real third-party ONNX models (see its README)."""
    return SHARED / "models"


@pytest.fixture(scope="session")
def data_dir() -> Path:
    return Path(os.environ["AUDITOR_DATA_DIR"])
