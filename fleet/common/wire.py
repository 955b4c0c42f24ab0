"""Numpy arrays to and from the wire's columnar Tensor message.

Arrays travel as raw little-endian bytes with dtype and shape (DESIGN: never per-value
repeated fields, never pickles). Decoding checks everything a hostile peer could get wrong.
"""

from __future__ import annotations

import numpy as np

from protos.fleetlearn.v1 import arrays_pb2

ALLOWED_DTYPES = frozenset(
    {"bool", "uint8", "int8", "uint16", "int16", "int32", "int64", "float16", "float32", "float64"}
)


class WireError(ValueError):
    """A message does not decode to what the contract says."""


def to_tensor(array: np.ndarray) -> arrays_pb2.Tensor:
    """Encode an array as little-endian bytes with its dtype and shape."""
    arr = np.asarray(array)
    name = arr.dtype.name
    if name not in ALLOWED_DTYPES:
        raise WireError(f"dtype {name} cannot travel on the wire")
    little = arr.astype(arr.dtype.newbyteorder("<"), copy=False)
    return arrays_pb2.Tensor(
        dtype=name, shape=list(arr.shape), data=np.ascontiguousarray(little).tobytes()
    )


def from_tensor(
    tensor: arrays_pb2.Tensor,
    field: str,
    dtype: str | None = None,
    shape: tuple[int | None, ...] | None = None,
) -> np.ndarray:
    """Decode a Tensor, checking dtype, shape and byte length; `None` in shape matches any."""
    if tensor.dtype not in ALLOWED_DTYPES:
        raise WireError(f"{field}: unknown dtype {tensor.dtype!r}")
    if dtype is not None and tensor.dtype != dtype:
        raise WireError(f"{field}: dtype {tensor.dtype}, expected {dtype}")
    dims = tuple(int(d) for d in tensor.shape)
    if any(d < 0 for d in dims):
        raise WireError(f"{field}: negative dimension in shape {dims}")
    if shape is not None and (
        len(dims) != len(shape)
        or any(want is not None and got != want for got, want in zip(dims, shape, strict=True))
    ):
        raise WireError(f"{field}: shape {dims}, expected {shape}")
    np_dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if len(tensor.data) != expected:
        raise WireError(f"{field}: {len(tensor.data)} bytes for shape {dims}, expected {expected}")
    arr = np.frombuffer(tensor.data, dtype=np_dtype).reshape(dims)
    return arr.astype(np_dtype.newbyteorder("="), copy=False)
