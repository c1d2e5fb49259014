"""auditor.engine.feed: a batch checked, its α taken from the raw values, and scaled to the model's input.

Pure numpy: no session runs here. Every refusal is one line that names what is wrong, and a
setting that turns finite data into inf or NaN is refused rather than audited.
"""

from __future__ import annotations

import numpy as np
import pytest
from refusals import refused

from auditor import AuditConfig
from auditor.datasets.batches import Batch
from auditor.engine.feed import check_batch, feed, input_entropy, to_model_input
from auditor.engine.find import ModelInput
from auditor.errors import DataError

FLOAT_784 = ModelInput("x", np.dtype(np.float32), ("N", 784))
IMAGE = ModelInput("input", np.dtype(np.float32), ("batch", 1, 28, 28))
DEFAULT = AuditConfig().feeding


def feeding(**settings: object):
    return AuditConfig(**settings).feeding  # type: ignore[arg-type]


# --- Checking a batch -----------------------------------------------------------------------------


def test_a_good_batch_comes_back_with_int64_labels() -> None:
    x, y = check_batch(Batch(np.zeros((3, 2), np.float32), np.array([0, 1, 2], np.int32)), "test", 0)
    assert x.shape == (3, 2) and y.dtype == np.int64 and y.tolist() == [0, 1, 2]
    assert check_batch(Batch(np.zeros((3, 2), np.uint8)), "test", 0)[1] is None


@pytest.mark.parametrize(
    ("x", "y", "fragments"),
    [
        (np.zeros((0, 2), np.float32), None, ("empty batch arrived in test",)),
        (np.zeros((3, 0), np.float32), None, ("test samples 6–9", "hold no values")),
        (np.array([["a", "b"]] * 3), None, ("not numbers",)),
        (np.array([[1.0, np.nan], [np.inf, 0.0], [0.0, 0.0]], np.float32), None, ("2 NaN/inf values",)),
        (np.zeros((3, 2), np.float32), np.array([0, 1]), ("(2,) labels for 3 samples",)),
        (np.zeros((3, 2), np.float32), np.array([0.0, 1.0, 2.0]), ("float64", "integer class indices")),
    ],
    ids=["empty", "no-values", "strings", "nan", "label-count", "float-labels"],
)
def test_unusable_batches_are_refused_in_one_line(x: np.ndarray, y: np.ndarray | None, fragments: tuple) -> None:
    refused(DataError, lambda: check_batch(Batch(x, y), "test", 6), *fragments)


# --- α from the raw values (SPEC §4) --------------------------------------------------------------


def test_alpha_of_uint8_samples_uses_every_byte_value_and_clips_nothing() -> None:
    x = np.array([[0, 0, 255, 255], [1, 2, 3, 4], [7, 7, 7, 7]], np.uint8)
    alpha, clipped = input_entropy(x, (0.0, 1.0))
    np.testing.assert_allclose(alpha, [1.0, 2.0, 0.0], atol=1e-12)
    assert clipped == 0


def test_alpha_of_float_samples_clips_to_the_alpha_range_and_counts() -> None:
    x = np.array([[-1.0, -1.0, 0.25, 0.75], [0.5, 0.5, 2.0, 2.0]], np.float32)
    alpha, clipped = input_entropy(x, (0.0, 1.0))
    np.testing.assert_allclose(alpha, [1.5, 1.0], atol=1e-12)  # −1 → 0 twice; 2 → 1 twice
    assert clipped == 4
    alpha, clipped = input_entropy(x, (-1.0, 2.0))
    assert clipped == 0


# --- Scaling to the model's input ---------------------------------------------------------------


def test_uint8_samples_are_divided_by_255_and_reshaped_to_the_input() -> None:
    x = np.arange(2 * 28 * 28, dtype=np.int64).reshape(2, 28, 28).astype(np.uint8)
    out = to_model_input(x, IMAGE, DEFAULT)
    assert out.shape == (2, 1, 28, 28) and out.dtype == np.float32
    np.testing.assert_array_equal(out.reshape(2, 28, 28), x.astype(np.float32) / np.float32(255))
    assert to_model_input(x, FLOAT_784, DEFAULT).shape == (2, 784)


def test_scale_mean_and_std_apply_in_that_order() -> None:
    x = np.array([[0, 100, 200, 255]], np.uint8)
    out = to_model_input(x, ModelInput("x", np.dtype(np.float32), ("N", 4)), feeding(scale=0.01, mean=1.0, std=0.5))
    np.testing.assert_allclose(out, [[-2.0, 0.0, 2.0, 3.1]], rtol=1e-6)
    floats = np.array([[0.5, 1.5]], np.float32)  # float data is taken as it is unless scaled
    model_input = ModelInput("x", np.dtype(np.float32), ("N", 2))
    np.testing.assert_array_equal(to_model_input(floats, model_input, DEFAULT), floats)


def test_data_of_another_shape_is_refused_naming_both_shapes() -> None:
    refused(DataError, lambda: to_model_input(np.zeros((3, 5), np.float32), FLOAT_784, DEFAULT), "5 values", "784")
    refused(DataError, lambda: to_model_input(np.zeros((3, 28, 27), np.uint8), IMAGE, DEFAULT), "28×27", "1×28×28")


def test_an_integer_input_gets_the_raw_values_or_a_refusal() -> None:
    uint8 = ModelInput("x", np.dtype(np.uint8), ("N", 2))
    x = np.array([[3, 250]], np.uint8)
    assert to_model_input(x, uint8, DEFAULT).tolist() == [[3, 250]]
    refused(DataError, lambda: to_model_input(x, uint8, feeding(mean=0.5)), "'x' takes uint8", "cannot apply")
    refused(DataError, lambda: to_model_input(x + np.float32(0.5), uint8, DEFAULT), "cannot hold")


@pytest.mark.parametrize(
    ("shape", "data", "fragments"),
    [
        (("N",), (3, 28, 28), ["expects a scalar (no dimensions) per sample", "(its shape: N)"]),
        (("N", "C", "height", "width"), (3, 5), ["expects C×height×width per sample", "N×C×height×width"]),
        ((None, 3, None, None), (3, 5), ["expects 3×?×? per sample", "(its shape: ?×3×?×?)"]),
        (("N", 0, 7), (3, 5), ["expects ?×7 per sample"]),
        (("batch", "\x1b[2Jdim"), (3, 5, 5), ["expects \\x1b[2Jdim per sample"]),
        (("N", "d" * 300), (3, 5, 5), ["expects ddddd", "…", "ddd per sample"]),
        (("N", 3, 4), (3,), ["data samples have shape a scalar (no dimensions) (1 values)", "expects 3×4"]),
    ],
)
def test_every_shape_in_a_refusal_is_readable_with_symbolic_dimensions_named(
    shape: tuple, data: tuple, fragments: list[str]
) -> None:
    model_input = ModelInput("x", np.dtype(np.float32), shape)
    message = refused(DataError, lambda: to_model_input(np.zeros(data, np.float32), model_input, DEFAULT), *fragments)
    assert "expects ;" not in message and "expects  " not in message and "\x1b" not in message


@pytest.mark.filterwarnings("error")  # the refusal is the whole answer: no numpy warning before it
@pytest.mark.parametrize(
    "settings",
    [{"std": 1e-300}, {"std": 5e-324}, {"scale": 1e300}, {"mean": -1e300}, {"scale": 1e38, "std": 1e-38}],
    ids=str,
)
def test_preprocessing_that_overflows_warns_nothing_before_its_refusal(settings: dict) -> None:
    x = np.full((3, 784), 128, np.uint8)
    refused(DataError, lambda: to_model_input(x, FLOAT_784, feeding(**settings)), "inf/NaN")


# --- Settings that turn finite data into inf or NaN -----------------------------------------------


@pytest.mark.filterwarnings("error")  # the refusal is the whole answer: no numpy warning before it
def test_a_tiny_std_that_overflows_float32_is_refused() -> None:
    x = np.full((3, 784), 128, np.uint8)
    message = refused(DataError, lambda: to_model_input(x, FLOAT_784, feeding(std=1e-45)), "--std 1e-45", "inf/NaN")
    assert "2352 finite values" in message and "float32" in message
    assert np.isfinite(to_model_input(x, FLOAT_784, feeding(std=1e-3))).all()  # a small std that fits is fine


@pytest.mark.filterwarnings("error")
def test_values_beyond_a_float16_input_are_refused() -> None:
    """float16 holds at most 65504: 1e5 in float32 data would reach the model as inf."""
    half = ModelInput("x", np.dtype(np.float16), ("N", 2))
    refused(DataError, lambda: to_model_input(np.array([[1e5, 1.0]], np.float32), half, DEFAULT), "float16", "inf/NaN")
    out = to_model_input(np.array([[6e4, 1.0]], np.float32), half, DEFAULT)
    assert out.dtype == np.float16 and np.isfinite(out).all()


# --- The whole of feeding one batch ---------------------------------------------------------------


def test_feed_gives_the_batch_its_place_labels_alpha_and_input() -> None:
    x = np.array([[0, 255], [9, 9]], np.uint8)
    ready, model_x = feed(
        "train", 40, Batch(x, np.array([1, 0])), ModelInput("x", np.dtype(np.float32), ("N", 2)), DEFAULT
    )
    assert (ready.split, ready.start, ready.samples, ready.clipped) == ("train", 40, 2, 0)
    assert ready.labels.tolist() == [1, 0]
    np.testing.assert_allclose(ready.alpha, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(model_x, x / np.float32(255), rtol=1e-7)
