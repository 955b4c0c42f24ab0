"""SafetyGate: no command ever leaves the joint limits or the per-tick step bound."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.safety import SafetyGate
from protos.joint_layout import JOINT_DIM, JOINT_LOWER, JOINT_UPPER

ANY_FLOAT = st.floats(allow_nan=True, allow_infinity=True, width=64)
BIG_OR_WILD = st.one_of(
    ANY_FLOAT,
    st.sampled_from([np.nan, np.inf, -np.inf, 1e308, -1e308, 1e38, -1e38, 0.0, -0.0, 5e-324]),
    st.floats(-4.0, 4.0),
)
TARGET = st.lists(BIG_OR_WILD, min_size=JOINT_DIM, max_size=JOINT_DIM).map(np.array)
FINITE_CURRENT = st.lists(st.floats(-10.0, 10.0), min_size=JOINT_DIM, max_size=JOINT_DIM).map(
    np.array
)
STEP = st.one_of(
    st.floats(1e-6, 10.0),
    st.lists(st.floats(1e-6, 10.0), min_size=JOINT_DIM, max_size=JOINT_DIM).map(np.array),
)


def _check(out: np.ndarray, ref: np.ndarray, gate_lo, gate_hi, step) -> None:
    assert out.dtype == np.float32 and out.shape == (JOINT_DIM,)
    assert np.all(np.isfinite(out))
    o = out.astype(np.float64)
    assert np.all(o >= np.asarray(gate_lo, dtype=np.float64))
    assert np.all(o <= np.asarray(gate_hi, dtype=np.float64))
    assert np.all(np.abs(o - ref.astype(np.float64)) <= np.asarray(step, dtype=np.float64))


@settings(max_examples=300, deadline=None)
@given(current=FINITE_CURRENT, targets=st.lists(TARGET, min_size=1, max_size=12), step=STEP)
def test_outputs_stay_within_limits_and_step(current, targets, step):
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, step)
    ref = np.clip(current, JOINT_LOWER, JOINT_UPPER).astype(np.float32)
    holds = 0
    for target in targets:
        out = gate.filter(target, current)
        _check(out, ref, JOINT_LOWER, JOINT_UPPER, step)
        if not np.all(np.isfinite(target)):
            holds += 1
            np.testing.assert_array_equal(out, ref)  # non-finite anywhere: hold
        ref = out
    assert gate.held == holds


@st.composite
def _limits(draw):
    f32 = st.floats(-1e6, 1e6, width=32)
    a = np.array(draw(st.lists(f32, min_size=JOINT_DIM, max_size=JOINT_DIM)))
    b = np.array(draw(st.lists(f32, min_size=JOINT_DIM, max_size=JOINT_DIM)))
    return np.minimum(a, b), np.maximum(a, b)  # zero width allowed


@settings(max_examples=300, deadline=None)
@given(limits=_limits(), current=FINITE_CURRENT, targets=st.lists(TARGET, max_size=8), step=STEP)
def test_arbitrary_limits_are_never_left(limits, current, targets, step):
    lower, upper = limits
    gate = SafetyGate(lower, upper, step)
    ref = None
    for target in targets:
        out = gate.filter(target, current)
        # Within the limits as given (float64), not only as the gate stores them.
        assert np.all(out.astype(np.float64) >= lower) and np.all(out.astype(np.float64) <= upper)
        if ref is not None:
            assert np.all(np.abs(out.astype(np.float64) - ref) <= np.asarray(step))
        ref = out.astype(np.float64)


@settings(max_examples=200, deadline=None)
@given(
    current=FINITE_CURRENT,
    target=st.lists(st.floats(-1.5, 1.5), min_size=JOINT_DIM, max_size=JOINT_DIM).map(np.array),
)
def test_reachable_target_passes_unchanged(current, target):
    """A finite target inside the limits and within one step is sent as it is."""
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, 10.0)
    target = np.clip(target, JOINT_LOWER, JOINT_UPPER)
    out = gate.filter(target, np.clip(current, JOINT_LOWER, JOINT_UPPER))
    np.testing.assert_array_equal(out, target.astype(np.float32))


def test_hold_on_nan_repeats_last_command():
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.1)
    current = np.zeros(JOINT_DIM)
    first = gate.filter(np.full(JOINT_DIM, 0.05), current)
    bad = np.full(JOINT_DIM, 0.5)
    bad[3] = np.nan
    np.testing.assert_array_equal(gate.filter(bad, current + 1.0), first)
    bad[3] = np.inf
    np.testing.assert_array_equal(gate.filter(bad, current), first)
    assert gate.held == 2


def test_hold_without_last_command_is_current_clamped():
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.1)
    current = np.linspace(-5, 5, JOINT_DIM)
    out = gate.filter(np.full(JOINT_DIM, np.nan), current)
    expected = np.clip(current, JOINT_LOWER, JOINT_UPPER).astype(np.float32)
    np.testing.assert_array_equal(out, expected)
    assert gate.held == 1


def test_step_is_relative_to_last_command_then_current_after_reset():
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.1)
    zero = np.zeros(JOINT_DIM)
    a = gate.filter(np.ones(JOINT_DIM), zero)
    np.testing.assert_allclose(a, np.minimum(0.1, JOINT_UPPER), rtol=0, atol=1e-7)
    b = gate.filter(np.ones(JOINT_DIM), zero)  # current ignored: steps from the last command
    np.testing.assert_allclose(b, np.minimum(0.2, JOINT_UPPER), rtol=0, atol=1e-7)
    np.testing.assert_array_equal(gate.last_command, b)
    gate.reset()
    assert gate.last_command is None
    c = gate.filter(np.ones(JOINT_DIM), zero)
    np.testing.assert_array_equal(c, a)


def test_per_joint_step():
    step = np.full(JOINT_DIM, 0.1)
    step[6] = step[13] = 0.5  # grippers
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, step)
    out = gate.filter(np.ones(JOINT_DIM), np.zeros(JOINT_DIM))
    assert out[0] == pytest.approx(0.1) and out[6] == pytest.approx(0.5)


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        SafetyGate(JOINT_UPPER, JOINT_LOWER, 0.1)
    with pytest.raises(ValueError):
        SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.0)
    with pytest.raises(ValueError):  # [0.1, 0.1] holds no float32 value (0.1 is not one)
        SafetyGate(np.full(JOINT_DIM, 0.1), np.full(JOINT_DIM, 0.1), 0.1)
    with pytest.raises(ValueError):
        SafetyGate(JOINT_LOWER, JOINT_UPPER, np.nan)
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, 0.1)
    with pytest.raises(ValueError):
        gate.filter(np.zeros(7), np.zeros(JOINT_DIM))
    with pytest.raises(ValueError):  # nothing sent yet and the arm's position is unknown
        gate.filter(np.zeros(JOINT_DIM), np.full(JOINT_DIM, np.nan))
    with pytest.raises(ValueError):
        gate.filter(np.zeros(JOINT_DIM), None)


def test_step_bound_survives_float64_rounding():
    """15 + (2 - 1 ulp) rounds to 17 in float64; the gate must still not step by 2."""
    lower = np.zeros(JOINT_DIM)
    upper = np.zeros(JOINT_DIM)
    lower[10], upper[10] = 15.0, 17.0
    step = np.ones(JOINT_DIM)
    step[10] = np.nextafter(2.0, 0.0)
    gate = SafetyGate(lower, upper, step)
    first = gate.filter(np.zeros(JOINT_DIM), np.zeros(JOINT_DIM))
    assert first[10] == 15.0
    second = gate.filter(np.full(JOINT_DIM, 1e308), np.zeros(JOINT_DIM))
    assert 15.0 < second[10] < 17.0
    assert abs(float(second[10]) - 15.0) <= step[10]
