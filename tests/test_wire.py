"""Arrays survive the wire exactly, and bad tensors are refused with a message naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from fleet.common.wire import WireError, from_tensor, to_tensor
from protos.fleetlearn.v1 import arrays_pb2

DTYPES = st.sampled_from(["bool", "uint8", "int16", "int32", "int64", "float32", "float64"])


@given(dtype=DTYPES, shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6), data=st.data())
def test_round_trip_is_exact(dtype: str, shape: tuple[int, ...], data: st.DataObject) -> None:
    arr = data.draw(hnp.arrays(np.dtype(dtype), shape))
    msg = to_tensor(arr)
    back = from_tensor(arrays_pb2.Tensor.FromString(msg.SerializeToString()), "x")
    assert back.dtype == arr.dtype and back.shape == arr.shape
    np.testing.assert_array_equal(back, arr)


def test_big_endian_input_travels_little_endian() -> None:
    arr = np.arange(4, dtype=">f4")
    msg = to_tensor(arr)
    assert msg.data == np.arange(4, dtype="<f4").tobytes()
    np.testing.assert_array_equal(from_tensor(msg, "x"), arr)


@pytest.mark.parametrize(
    ("tensor", "kwargs", "needle"),
    [
        (arrays_pb2.Tensor(dtype="object", shape=[1], data=b"x"), {}, "unknown dtype"),
        (to_tensor(np.zeros(3, np.float64)), {"dtype": "float32"}, "expected float32"),
        (to_tensor(np.zeros((3, 2), np.float32)), {"shape": (None, 14)}, "expected (None, 14)"),
        (arrays_pb2.Tensor(dtype="float32", shape=[4], data=b"\0" * 15), {}, "15 bytes"),
        (arrays_pb2.Tensor(dtype="float32", shape=[-1], data=b""), {}, "negative dimension"),
    ],
)
def test_bad_tensors_name_the_field(tensor: arrays_pb2.Tensor, kwargs: dict, needle: str) -> None:
    with pytest.raises(WireError, match="joint_pos") as err:
        from_tensor(tensor, "joint_pos", **kwargs)
    assert needle in str(err.value)
