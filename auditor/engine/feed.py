"""One batch made ready for the model: checked, its CNA input entropy taken, scaled to the input.

Runs on the worker threads, before inference. The raw samples are checked here (numbers,
finite, one integer label each), α is computed from the raw values (SPEC §4: uint8 over
0–255, anything else over ``alpha_range``), and the samples are scaled, normalised, reshaped
and cast to what the model's input expects. Preprocessed values are checked again, so settings
that turn finite data into inf or NaN are refused by name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from auditor.config import Feeding
from auditor.datasets.batches import Batch
from auditor.engine import metrics
from auditor.engine.find import ModelInput
from auditor.errors import DataError
from auditor.sinks import shape_text


@dataclass(frozen=True)
class Feed:
    """What the tally needs of a batch besides the model's outputs: where it sits in its split,
    its labels and α. The model input is returned beside it, so nothing holds it after the run."""

    split: str
    start: int
    labels: np.ndarray | None
    alpha: np.ndarray
    clipped: int

    @property
    def samples(self) -> int:
        return len(self.alpha)


def feed(split: str, start: int, batch: Batch, model_input: ModelInput, feeding: Feeding) -> tuple[Feed, np.ndarray]:
    """Check a batch (samples ``start``… of ``split``), take its α, and preprocess it for the model:
    the batch's ``Feed``, and the array to run."""
    x, labels = check_batch(batch, split, start)
    alpha, clipped = input_entropy(x, feeding.alpha_range)
    return Feed(split, start, labels, alpha, clipped), to_model_input(x, model_input, feeding)


def check_batch(batch: Batch, split: str, start: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The samples and int64 labels of a batch, refused in one line unless they are usable."""
    x = np.asarray(batch.x)
    where = f"{split} samples {start}–{start + len(x)}"
    if x.ndim < 1 or len(x) == 0:
        raise DataError(f"an empty batch arrived in {split}; send at least one sample per batch")
    if x[0].size == 0:
        raise DataError(f"{where}: samples of shape {x.shape[1:]} hold no values; give samples with data")
    if not (np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_):
        raise DataError(f"{where}: samples have dtype {x.dtype}, not numbers; send numeric arrays")
    if np.issubdtype(x.dtype, np.floating):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        if bad:
            raise DataError(f"{where}: data contains {bad} NaN/inf values; clean or impute them before auditing")
    if batch.y is None:
        return x, None
    y = np.asarray(batch.y)
    if y.shape != (len(x),):
        raise DataError(f"{where}: {y.shape} labels for {len(x)} samples; give one integer label per sample")
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{where}: labels have dtype {y.dtype}; labels must be integer class indices")
    return x, y.astype(np.int64, copy=False)


def input_entropy(x: np.ndarray, alpha_range: tuple[float, float]) -> tuple[np.ndarray, int]:
    """CNA's α per sample (SPEC §4) and how many values were clipped to ``alpha_range``."""
    flat = x.reshape(len(x), -1)
    if x.dtype == np.uint8:
        return metrics.input_entropy_uint8(flat), 0
    scaled, clipped = metrics.alpha_scale(flat, alpha_range)
    return metrics.input_entropy(scaled), clipped


def to_model_input(x: np.ndarray, model_input: ModelInput, feeding: Feeding) -> np.ndarray:
    """Scale, normalise, reshape and cast raw samples to what the model's input expects.

    A model with an integer input (one that scales inside the graph) gets the raw values.
    """
    if not np.issubdtype(model_input.dtype, np.floating):
        return _fit_shape(_as_integers(x, model_input, feeding), model_input)
    with np.errstate(all="ignore"):  # overflow and division by a tiny --std are refused below, by name, not warned
        if feeding.scale is not None:
            values = x.astype(np.float32) * np.float32(feeding.scale)
        elif x.dtype == np.uint8:
            values = x.astype(np.float32) / np.float32(255)
        else:
            values = x.astype(np.float32, copy=False)
        if feeding.mean != 0.0 or feeding.std != 1.0:
            values = (values - np.float32(feeding.mean)) / np.float32(feeding.std)
        cast = _fit_shape(values, model_input).astype(model_input.dtype, copy=False)
    if feeding.scale is not None or feeding.mean != 0.0 or feeding.std != 1.0 or cast.dtype != values.dtype:
        _check_preprocessed(cast, feeding)
    return cast


def _check_preprocessed(values: np.ndarray, feeding: Feeding) -> None:
    """Refuse settings that turned finite samples into inf or NaN (an overflow, a tiny --std)."""
    bad = int(np.count_nonzero(~np.isfinite(values)))
    if bad:
        raise DataError(
            f"preprocessing (--scale {feeding.scale}, --mean {feeding.mean}, --std {feeding.std}) turned "
            f"{bad} finite values into inf/NaN in the model's {values.dtype} input; choose settings that keep "
            "values in range"
        )


def _as_integers(x: np.ndarray, model_input: ModelInput, feeding: Feeding) -> np.ndarray:
    """Raw samples cast to an integer model input, refused where the cast would change a value."""
    name, dtype = model_input.name, model_input.dtype
    if feeding.scale is not None or feeding.mean != 0.0 or feeding.std != 1.0:
        raise DataError(f"model input {name!r} takes {dtype} values, so --scale, --mean and --std cannot apply")
    cast = x.astype(dtype)
    if not np.array_equal(cast, x):
        raise DataError(f"model input {name!r} takes {dtype} values and the data has values that {dtype} cannot hold")
    return cast


def _fit_shape(x: np.ndarray, model_input: ModelInput) -> np.ndarray:
    """Reshape samples to the input's shape when the element counts match (28×28 → 1×28×28 or 784)."""
    dims = model_input.shape[1:]
    if not model_input.shape:
        return x
    known = all(isinstance(d, int) and d > 0 for d in dims)
    per_sample = math.prod(x.shape[1:])
    if known and per_sample == math.prod(dims):  # type: ignore[arg-type]
        return x.reshape((len(x), *dims))  # type: ignore[arg-type]
    fits = len(dims) == x.ndim - 1 and all(
        not isinstance(d, int) or d <= 0 or d == s for d, s in zip(dims, x.shape[1:], strict=True)
    )
    if not known and fits:
        return x
    raise DataError(
        f"data samples have shape {shape_text(x.shape[1:])} ({per_sample} values) but model input "
        f"{model_input.name!r} expects {shape_text(dims)} per sample (its shape: {shape_text(model_input.shape)}); "
        "give data of that shape"
    )
