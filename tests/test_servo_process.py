"""A real cell's follower arms in a servo process of their own (actors/servo_process.py),
over simulated Protocol 2.0 chains on ptys.

What a cell relies on: the servo process commands every tick from the actor's plan, by
tick, through the safety gate, whatever the plan says; it goes on without the actor (a plan
runs out into a hold, an actor holding its interpreter stops nothing); a servo fault, a
dead servo process and an actor that goes away each end safe; and the control loop that
follows its ticks records exactly what was commanded, tick for tick, operator takeovers
flagged."""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.servo_client import ServoProcess
from actors.servo_wire import (
    PLAN,
    FrameReader,
    Plan,
    Step,
    WireError,
    decode_plan,
    decode_step,
    encode_plan,
    encode_step,
    frame,
)
from drivers.calibration import default_calibration
from drivers.cell import CellFault
from drivers.clock import WallClock
from drivers.dynamixel import control_table as ct
from drivers.safety import SafetyGate, step_bound
from drivers.sim.servo_peer import ServoPeer
from fleet.common.wire import from_tensor
from protos.joint_layout import GRIPPER_INDICES, JOINT_LOWER, JOINT_UPPER
from tests.test_async_inference import Scene, SlowRunner, Watcher
from tests.waiting import wait_for, wait_until

HZ = 20.0
BOUND = np.asarray(step_bound(HZ, 2), np.float32)


# -- the byte format ---------------------------------------------------------------------


def test_steps_and_plans_round_trip_and_bad_frames_are_refused() -> None:
    q = np.linspace(-1, 1, 14, dtype=np.float32)
    step = Step(7, 12.5, 0.0003, 0.002, q, q + 0.1, True, "v0003")
    kind, payload = FrameReader().feed(encode_step(step))[0]
    back = decode_step(payload)
    assert kind != PLAN and back.tick == 7 and back.intervention and back.version == "v0003"
    assert back.busy == 0.002
    assert np.array_equal(back.joints, q) and np.array_equal(back.sent, q + 0.1)
    plan = Plan(40, np.stack([q, q + 1]), False, "v9")
    data = encode_plan(plan)
    reader = FrameReader()
    assert reader.feed(data[:9]) == []  # a partial frame waits for the rest
    ((kind, payload),) = reader.feed(data[9:])
    got = decode_plan(payload)
    assert kind == PLAN and got.first_tick == 40 and np.array_equal(got.targets, plan.targets)
    bad = np.stack([q, q])
    bad[1, 3] = np.nan
    with pytest.raises(WireError, match="non-finite"):
        decode_plan(FrameReader().feed(encode_plan(Plan(0, bad, False, "")))[0][1])
    with pytest.raises(WireError):
        decode_plan(payload[:-3])  # a plan cut short
    with pytest.raises(WireError):
        FrameReader().feed(frame(9, b"x"))  # not a kind this format has
    with pytest.raises(WireError):
        FrameReader().feed(b"\xff\xff\xff\x7f\x03")  # a length no frame has


# -- the servo process over simulated chains ------------------------------------------------


def _spec(tmp_path: Any, follower_chains: dict[str, ServoPeer]) -> dict[str, Any]:
    default_calibration("cell-s", leaders=False).save(tmp_path / "cal.json")
    return {
        "cell_id": "cell-s",
        "control_hz": HZ,
        "realtime_priority": 0,
        "calibration": str(tmp_path / "cal.json"),
        "arms": {
            side: {"port": follower_chains[side].port, "baud": 1_000_000, "calibration_arm": side}
            for side in ("left", "right")
        },
        "bus": {},
    }


@pytest.fixture
def servo(tmp_path: Any, follower_chains: dict[str, ServoPeer]) -> Iterator[ServoProcess]:
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, max_step=step_bound(HZ, 2))
    proc = ServoProcess(_spec(tmp_path, follower_chains), (), gate, step_timeout_s=2.0)
    try:
        yield proc
    finally:
        proc.close()


def _steps_through(servo: ServoProcess, last_tick: int) -> dict[int, Step]:
    out: dict[int, Step] = {}
    while not out or max(out) < last_tick:
        step = servo.next_step(5.0)
        out[step.tick] = step
    return out


def _torque(follower_chains: dict[str, ServoPeer]) -> set[int]:
    return {
        follower_chains[s].register(i, ct.TORQUE_ENABLE)
        for s in ("left", "right")
        for i in range(1, 8)
    }


def test_it_follows_the_plan_by_tick_through_the_gate_and_then_holds(
    servo, follower_chains
) -> None:
    servo.skip_to_now()
    first = servo.next_step(5.0)
    q = first.joints
    ramp = np.stack([q + 0.02 * (i + 1) for i in range(10)]).astype(np.float32)
    start = first.tick + 3
    servo.send_plan(Plan(start, ramp, False, "v1"))
    steps = _steps_through(servo, start + 14)
    for i in range(10):  # the actor sent nothing more: the plan ran on by itself
        assert np.allclose(steps[start + i].sent, ramp[i], atol=1e-6)
        assert steps[start + i].version == "v1" and not steps[start + i].intervention
    for tick in range(start + 10, start + 15):  # past its end: hold the last target
        assert np.allclose(steps[tick].sent, ramp[-1], atol=1e-6)
    # A plan from the past is indexed by tick; a wild one is gated at every tick.
    now = max(steps)
    wild = np.full((1, 14), 50.0, np.float32)
    servo.send_plan(Plan(now - 100, wild, True, "operator"))
    steps = _steps_through(servo, now + 15)
    sent = np.stack([steps[t].sent for t in sorted(steps)])
    assert np.all(sent <= JOINT_UPPER + 1e-6) and np.all(sent >= JOINT_LOWER - 1e-6)
    assert np.all(np.abs(np.diff(sent, axis=0)) <= BOUND + 1e-5)
    assert steps[now + 15].intervention and np.any(sent[-1] > ramp[-1] + 0.1)


def test_ticks_go_on_while_the_actor_holds_its_interpreter(servo) -> None:
    servo.skip_to_now()
    before = servo.next_step(5.0)
    switch = sys.getswitchinterval()
    sys.setswitchinterval(5.0)  # nothing else in this process runs until the loop ends
    try:
        t0 = time.monotonic()
        n = 0
        while time.monotonic() - t0 < 1.0:
            n += 1
        t1 = time.monotonic()
    finally:
        sys.setswitchinterval(switch)
    after = _steps_through(servo, before.tick + 1)
    wait_for(lambda: servo.read_joints() is not None, 5.0, "the reader to catch up")
    steps: list[Step] = []
    while True:
        steps.append(servo.next_step(5.0))
        if steps[-1].stamp > t1:
            break
    ticks = [s.tick for s in (*after.values(), *steps)]
    assert ticks == list(range(before.tick + 1, ticks[-1] + 1)), "a tick went missing"
    inside = [s for s in steps if t0 + 0.1 < s.stamp < t1 - 0.1]
    assert inside, "the servo process ran no tick while the actor's interpreter was held"


def test_a_servo_fault_is_reported_safe_and_enable_brings_the_arms_back(
    servo, follower_chains
) -> None:
    servo.skip_to_now()
    servo.next_step(5.0)
    follower_chains["left"].set_fault(3, missing=True)
    with pytest.raises(CellFault) as info:
        while True:
            servo.next_step(5.0)
    assert not info.value.torque_off and "hold" in str(info.value)
    assert servo.current_fault is not None
    with pytest.raises(CellFault):  # the fault stands until the cell is enabled again
        servo.next_step(0.2)
    follower_chains["left"].clear_faults()
    servo.enable()
    assert servo.current_fault is None
    servo.skip_to_now()
    assert servo.next_step(5.0).joints.shape == (14,)
    follower_chains["right"].set_fault(5, hardware_error=0x20)  # an overload: torque must go off
    with pytest.raises(CellFault) as info:
        while True:
            servo.next_step(5.0)
    assert info.value.torque_off
    wait_for(lambda: _torque(follower_chains) == {0}, 5.0, "torque off on every servo")


def test_a_power_cycled_arm_is_a_fault_and_comes_back_holding_with_torque(
    servo, follower_chains
) -> None:
    servo.skip_to_now()
    servo.next_step(5.0)
    follower_chains["right"].power_cycle(off_ms=150)  # RAM reset: torque off, goals at power-on
    with pytest.raises(CellFault) as info:  # silent while off, then found reset: either
        while True:
            servo.next_step(5.0)
    assert not info.value.torque_off
    servo.enable()
    servo.skip_to_now()
    q = servo.next_step(5.0).joints
    assert _torque(follower_chains) == {1}
    assert np.allclose(servo.command(q + 0.01), q + 0.01, atol=1e-5)
    assert wait_until(lambda: servo.bus_stats().get("bus_power_cycles", 0) >= 1, 5.0)


def test_a_dead_servo_process_is_a_fault_and_enable_starts_another(servo, follower_chains) -> None:
    servo.skip_to_now()
    servo.next_step(5.0)
    proc = servo._proc
    assert proc is not None
    os.kill(proc.pid, signal.SIGKILL)
    with pytest.raises(CellFault, match="exited"):
        while True:
            servo.next_step(5.0)
    servo.enable()
    assert servo._proc is not None and servo._proc.pid != proc.pid
    servo.skip_to_now()
    q = servo.next_step(5.0).joints
    assert np.allclose(servo.command(q + 0.01), q + 0.01, atol=1e-5)
    assert _torque(follower_chains) == {1}


def test_an_actor_that_goes_away_leaves_the_arms_holding(servo, follower_chains) -> None:
    servo.skip_to_now()
    servo.next_step(5.0)
    proc = servo._proc
    assert proc is not None and proc.stdin is not None
    proc.stdin.close()  # the actor's end of the pipe closes without asking to stop
    assert proc.wait(10) == 0
    assert _torque(follower_chains) == {1}  # holding where it was, not dropped
    with pytest.raises(CellFault, match="exited"):
        while True:
            servo.next_step(5.0)


def test_garbage_from_the_actor_stops_the_servo_process_holding(servo, follower_chains) -> None:
    proc = servo._proc
    assert proc is not None and proc.stdin is not None
    proc.stdin.write(b"\x05\x00\x00\x00\x03hello")  # a plan frame that is not a plan
    assert proc.wait(10) == 0
    assert _torque(follower_chains) == {1}


def test_signals_to_the_group_leave_the_ending_to_the_actor(servo, follower_chains) -> None:
    """Ctrl-C or a service stop reaches every process of the actor; the servo process
    ticks on until the actor, stopping, asks it for torque off."""
    proc = servo._proc
    assert proc is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        os.kill(proc.pid, sig)
    servo.skip_to_now()
    first = servo.next_step(5.0).tick
    assert servo.next_step(5.0).tick == first + 1 and proc.poll() is None
    servo.close()
    assert proc.returncode == 0 and _torque(follower_chains) == {0}


def test_close_turns_torque_off(tmp_path, follower_chains) -> None:
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, max_step=step_bound(HZ, 2))
    servo = ServoProcess(_spec(tmp_path, follower_chains), (), gate)
    assert _torque(follower_chains) == {1}
    servo.close()
    assert _torque(follower_chains) == {0}
    assert servo._proc is not None and servo._proc.poll() == 0


def test_ports_that_do_not_open_fail_the_start_with_the_reason(tmp_path, follower_chains) -> None:
    spec = _spec(tmp_path, follower_chains)
    spec["arms"]["right"]["port"] = str(tmp_path / "no-such-port")
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, max_step=step_bound(HZ, 2))
    with pytest.raises(CellFault, match="no-such-port"):
        ServoProcess(spec, (), gate)
    assert _torque(follower_chains) == {0}  # the left arm it had opened is closed again


# -- the control loop following the servo process's ticks -------------------------------


class Takeover:
    """The operator: takes over while `on` is set, driving toward a far pose."""

    def __init__(self) -> None:
        self.on = threading.Event()

    def wants_control(self) -> bool:
        return self.on.is_set()

    def action(self) -> np.ndarray:
        return np.full(14, 0.3, np.float32)


def test_the_loop_records_exactly_what_the_servo_process_commanded(servo) -> None:
    chunks: list[Any] = []
    sink = type("Sink", (), {"submit": lambda self, c: chunks.append(c) or True})()
    ticked: dict[float, Step] = {}
    servo.on_step = lambda s: ticked.__setitem__(s.stamp, s)
    operator = Takeover()
    stop = threading.Event()
    runner = SlowRunner("v1", delay_s=2 / HZ)
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-s", learner_address="127.0.0.1:1", control_hz=HZ, max_episode_s=60
        ),
        servo,
        Scene(),
        operator,  # type: ignore[arg-type]
        WallClock(),
        sink,
        Watcher(WallClock(), [(0.0, runner)]),  # type: ignore[arg-type]
    )
    thread = threading.Thread(target=loop.run, args=(stop,))
    thread.start()
    try:
        wait_for(lambda: runner.calls >= 5, 20.0, "the policy's chunks")
        operator.on.set()
        wait_for(lambda: loop.stats["interventions"] >= 5, 20.0, "operator steps")
        operator.on.clear()
        calls = runner.calls
        wait_for(lambda: runner.calls >= calls + 3, 20.0, "the policy again")
    finally:
        stop.set()
        thread.join(30)
    assert not thread.is_alive()
    # The episode ended: what was left of its plan does not run on, the arms hold.
    servo.skip_to_now()
    after = [servo.next_step(5.0) for _ in range(2 * runner.k)]
    assert all(np.array_equal(s.sent, after[0].sent) for s in after)
    stamps = np.concatenate([from_tensor(c.timestamp, "timestamp") for c in chunks])
    actions = np.concatenate([from_tensor(c.action, "action") for c in chunks])
    joints = np.concatenate([from_tensor(c.joint_pos, "joint_pos") for c in chunks])
    flags = np.concatenate([from_tensor(c.intervention, "intervention") for c in chunks])
    steps = [ticked[float(t)] for t in stamps]  # every recorded step is a tick it ran
    ticks = [s.tick for s in steps]
    assert ticks == list(range(ticks[0], ticks[0] + len(ticks))), "a tick was not recorded"
    assert np.array_equal(actions, np.stack([s.sent for s in steps]))
    assert np.array_equal(joints, np.stack([s.joints for s in steps]))
    assert np.array_equal(flags, [s.intervention for s in steps])
    assert 5 <= flags.sum() < len(flags)
    moved = np.delete(actions[~flags][-1] - actions[0], GRIPPER_INDICES)  # grippers: at a limit
    assert np.all(moved > 0.1), "the policy's plan did not drive the arms"
    assert np.all(np.abs(np.diff(actions, axis=0)) <= BOUND + 1e-5)
    assert {s.version for s in steps if not s.intervention} <= {"", "v1"}
    assert loop.stats["policy_errors"] == 0
