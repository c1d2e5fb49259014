"""A numpy-backed stand-in for CuPy, so the device path is tested on every push (no GPU in CI).

Arrays "on the device" are ``DeviceArray``s: numpy arrays underneath, but numpy's own functions
refuse them (``__array_function__``), so code under test must call this module's functions,
exactly as it must call CuPy's for CuPy arrays. ``keys.namespace`` finds this module from the
arrays' type, as it finds CuPy from a CuPy array. ``asnumpy`` is the one way to the host and
adds up what crosses (``HOST_BYTES``), so tests can check that only distinct pairs do.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

HOST_BYTES = [0]  # bytes copied to the host by asnumpy


class DeviceArray(np.ndarray):
    """An array on the stand-in device: ufuncs, methods and indexing work; numpy's functions refuse it."""

    def __array_function__(self, func: Any, types: Any, args: Any, kwargs: Any) -> Any:
        raise TypeError(f"numpy.{func.__name__} was called on a device array; call its namespace's function")


DeviceArray.__module__ = __name__


def _host(value: Any) -> Any:
    if isinstance(value, DeviceArray):
        return value.view(np.ndarray)
    if isinstance(value, list | tuple):
        return type(value)(_host(v) for v in value)
    return value


def _device(value: Any) -> Any:
    if isinstance(value, np.ndarray) and not isinstance(value, DeviceArray):
        return value.view(DeviceArray)
    if isinstance(value, tuple):
        return tuple(_device(v) for v in value)
    return value


def _on_device(fn: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        return _device(fn(*_host(args), **{k: _host(v) for k, v in kwargs.items()}))

    return call


def __getattr__(name: str) -> Any:
    value = getattr(np, name)
    return _on_device(value) if callable(value) and not isinstance(value, type) else value


def asarray(value: Any, dtype: Any = None) -> DeviceArray:
    """Host data copied to the device."""
    return np.array(_host(value), dtype=dtype).view(DeviceArray)


def asnumpy(value: DeviceArray) -> np.ndarray:
    """A device array copied to the host (counted in ``HOST_BYTES``)."""
    HOST_BYTES[0] += value.nbytes
    return np.array(value.view(np.ndarray))


def from_dlpack(value: Any) -> DeviceArray:
    """A tensor handed over by DLPack (an onnxruntime OrtValue), without a copy."""
    return np.from_dlpack(value).view(DeviceArray)


@contextlib.contextmanager
def stream() -> Iterator[None]:
    """A stream to count on: the stand-in runs everything in order, so there is nothing to set up."""
    yield
