"""The Dynamixel arm driver through the real dynamixel_sdk, against the simulated chain.

Every test talks Protocol 2.0 over a pseudo-terminal to a ServoPeer process, so what is
checked is what a cell relies on: one sync read and one sync write per tick, calibration
landing in the servo registers, faults surfacing as errors that name the servo, the
joint and the port, and no process left behind.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from drivers.calibration import ArmCalibration, default_arm_calibration, default_calibration
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.arm_bus import (
    DynamixelArmBus,
    DynamixelCommError,
    DynamixelConfigError,
    DynamixelError,
    DynamixelHardwareError,
    DynamixelPortError,
)
from drivers.dynamixel.leader import LeaderArms
from drivers.interfaces import ArmBus
from drivers.sim.servo_peer import ServoPeer

IDS = tuple(range(1, 8))
TICK = ct.RAD_PER_TICK


@pytest.fixture
def make_peer() -> Iterator[Callable[..., ServoPeer]]:
    """Start peers on demand; every one is closed, and verified gone, at teardown."""
    peers: list[ServoPeer] = []

    def make(ids: tuple[int, ...] = IDS, **kwargs: object) -> ServoPeer:
        peer = ServoPeer(ids, **kwargs).start()  # type: ignore[arg-type]
        peers.append(peer)
        return peer

    yield make
    for peer in peers:
        peer.close()
    for peer in peers:
        assert not peer.alive
        assert not _running(peer.pid)


def _running(pid: int) -> bool:
    """A live (not zombie) process with this pid exists."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def _arm(peer: ServoPeer, cal: ArmCalibration | None = None, **kwargs: object) -> DynamixelArmBus:
    cal = cal or default_arm_calibration("left")
    return DynamixelArmBus(cal.name, peer.port, cal, **kwargs)  # type: ignore[arg-type]


def _wait_until(pred: Callable[[], bool], timeout: float = 2.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_two_arms_of_seven_read_and_write_14_values_one_sync_each(make_peer) -> None:
    cal = default_calibration()
    left_peer, right_peer = make_peer(), make_peer()
    # No periodic power check during the count below: it is about per-tick traffic.
    left = DynamixelArmBus("left", left_peer.port, cal.arm("left"), ram_check_s=600)
    right = DynamixelArmBus("right", right_peer.port, cal.arm("right"), ram_check_s=600)
    arms: dict[str, ArmBus] = {"left": left, "right": right}
    try:
        state = np.concatenate([a.read_state().position for a in arms.values()])
        assert state.shape == (14,)
        np.testing.assert_allclose(state[[0, 1, 2, 3, 4, 5]], 0.0, atol=1e-9)
        assert state[6] == pytest.approx(0.5)  # default shaft 2048 sits mid gripper travel

        for a in (left, right):
            a.set_torque(True)
        target = np.array(
            [0.4, -0.3, 0.2, -0.1, 0.25, 0.5, 0.9, -0.4, 0.3, -0.2, 0.1, -0.25, -0.5, 0.1]
        )
        for peer in (left_peer, right_peer):
            peer.reset_stats()
        left.write_goal(target[:7])
        right.write_goal(target[7:])

        def arrived() -> bool:
            got = np.concatenate([a.read_state().position for a in arms.values()])
            return bool(np.allclose(got, target, atol=1.5 * TICK + 1e-3))

        _wait_until(arrived)
        for peer in (left_peer, right_peer):
            peer.reset_stats()
        for _ in range(5):
            for a in (left, right):
                a.read_state()
                a.write_goal(a.read_state().position)
        for peer in (left_peer, right_peer):
            stats = peer.stats()
            # Per tick: sync reads and sync writes only, never per-servo reads.
            assert stats.get("SYNC_READ") == 10 and stats.get("SYNC_WRITE") == 5
            assert "READ" not in stats and "WRITE" not in stats
        st = left.read_state()
        assert st.velocity.shape == st.current.shape == (7,)
        np.testing.assert_allclose(st.velocity, 0.0)
    finally:
        left.close()
        right.close()


def test_one_bus_of_fourteen_servos(make_peer) -> None:
    from drivers.dynamixel.arm_bus import DynamixelBus

    peer = make_peer(tuple(range(1, 15)))
    bus = DynamixelBus(peer.port, range(1, 15))
    bus.open()
    try:
        peer.reset_stats()
        data = bus.sync_read(ct.STATE_BLOCK_ADDRESS, ct.STATE_BLOCK_SIZE)
        assert sorted(data) == list(range(1, 15)) and all(len(b) == 10 for b in data.values())
        for sid in range(1, 15):
            bus.write(sid, ct.TORQUE_ENABLE, 1)
        bus.sync_write(116, 4, {sid: 2048 + 10 * sid for sid in range(1, 15)})
        assert [peer.register(s, ct.GOAL_POSITION) for s in (1, 14)] == [2058, 2188]
        assert peer.stats()["SYNC_READ"] == 1
    finally:
        bus.close()


def _mirrored_calibration() -> ArmCalibration:
    base = default_arm_calibration("right", first_id=1)
    joints = list(base.joints)
    joints[0] = dataclasses.replace(
        joints[0], homing_offset=-300, direction=-1, lower=-1.0, upper=2.0
    )
    joints[1] = dataclasses.replace(
        joints[1], homing_offset=125, direction=1, lower=-0.5, upper=0.8
    )
    gripper = dataclasses.replace(base.gripper, open_ticks=1500, closed_ticks=2600)
    return ArmCalibration("right", tuple(joints), gripper).validate()


def test_calibration_lands_in_registers_and_converts(make_peer) -> None:
    peer = make_peer()
    cal = _mirrored_calibration()
    arm = _arm(peer, cal, return_delay_us=0, gripper_current_ma=400.0)
    try:
        reg = peer.register
        assert reg(1, ct.HOMING_OFFSET) == -300 and reg(2, ct.HOMING_OFFSET) == 125
        # Direction -1 flips the limits: +2.0 rad is below the centre tick.
        assert reg(1, ct.MIN_POSITION_LIMIT) == math.floor(2048 - 2.0 / TICK)
        assert reg(1, ct.MAX_POSITION_LIMIT) == math.ceil(2048 + 1.0 / TICK)
        assert reg(2, ct.MIN_POSITION_LIMIT) == math.floor(2048 - 0.5 / TICK)
        assert reg(2, ct.MAX_POSITION_LIMIT) == math.ceil(2048 + 0.8 / TICK)
        assert (reg(7, ct.MIN_POSITION_LIMIT), reg(7, ct.MAX_POSITION_LIMIT)) == (1500, 2600)
        assert [reg(s, ct.OPERATING_MODE) for s in IDS] == [3] * 6 + [5]
        assert all(reg(s, ct.RETURN_DELAY_TIME) == 0 for s in IDS)
        assert reg(7, ct.GOAL_CURRENT) == round(400.0 / ct.MA_PER_CURRENT_UNIT)
        assert all(reg(s, ct.TORQUE_ENABLE) == 0 for s in IDS)

        # Reading: present = shaft + homing offset, then direction and centre.
        peer.move_shaft(1, 2048 + 300 + 100)  # present 2148 -> -100 ticks with direction -1
        peer.move_shaft(7, 2600 - 275)  # a quarter of the way from closed to open
        pos = arm.read_state().position
        assert pos[0] == pytest.approx(-100 * TICK)
        assert pos[6] == pytest.approx(0.25)

        # Writing: radians -> ticks with the sign, clamped to the calibrated limits.
        arm.set_torque(True)
        arm.write_goal(np.array([0.5, 5.0, 0.0, 0.0, 0.0, 0.0, 1.0]))
        assert reg(1, ct.GOAL_POSITION) == 2048 - round(0.5 / TICK)
        assert reg(2, ct.GOAL_POSITION) == round(2048 + 0.8 / TICK)  # clamped to upper
        assert reg(7, ct.GOAL_POSITION) == 1500  # open
        arm.write_goal(np.array([-9.0, -9.0, 0.0, 0.0, 0.0, 0.0, -3.0]))
        assert reg(1, ct.GOAL_POSITION) == 2048 + round(1.0 / TICK)
        assert reg(7, ct.GOAL_POSITION) == 2600  # closed
        with pytest.raises(ValueError, match="finite"):
            arm.write_goal(np.array([np.nan, 0, 0, 0, 0, 0, 0]))
        with pytest.raises(ValueError, match="7 values"):
            arm.write_goal(np.zeros(6))
    finally:
        arm.close()


def test_torque_on_holds_present_pose_and_off_releases(make_peer) -> None:
    peer = make_peer(shaft_ticks={1: 2300, 2: 1900})
    arm = _arm(peer)
    try:
        before = arm.read_state().position
        arm.set_torque(True)
        assert arm.torque_enabled
        assert all(peer.register(s, ct.TORQUE_ENABLE) == 1 for s in IDS)
        assert peer.register(1, ct.GOAL_POSITION) == 2300  # goal := present, no jump
        time.sleep(0.05)
        np.testing.assert_allclose(arm.read_state().position, before, atol=1e-9)
        arm.set_torque(False)
        assert all(peer.register(s, ct.TORQUE_ENABLE) == 0 for s in IDS)
        arm.write_goal(np.zeros(7) + 0.5)  # ignored by released servos
        time.sleep(0.05)
        np.testing.assert_allclose(arm.read_state().position, before, atol=1e-9)
    finally:
        arm.close()


def test_operating_modes_are_written_with_torque_off(make_peer) -> None:
    peer = make_peer()
    peer.set_register(3, ct.OPERATING_MODE, ct.MODE_EXTENDED_POSITION)
    peer.set_register(3, ct.TORQUE_ENABLE, 1)  # found holding with the wrong mode
    arm = _arm(peer, operating_modes=(3, 3, 5, 3, 3, 3, 5))
    try:
        assert [peer.register(s, ct.OPERATING_MODE) for s in IDS] == [3, 3, 5, 3, 3, 3, 5]
        assert peer.register(3, ct.TORQUE_ENABLE) == 0
        # The servo itself refuses EEPROM writes while torque is on; the error says which.
        arm.set_torque(True)
        with pytest.raises(DynamixelConfigError, match=r"servo ID 3 \(left_elbow\).*access"):
            arm.bus.write(3, ct.OPERATING_MODE, 3)
    finally:
        arm.close()


def test_missing_servo_is_named_after_bounded_retries(make_peer) -> None:
    peer = make_peer()
    arm = _arm(peer, retries=2)
    try:
        peer.set_fault(4, missing=True)
        start = time.monotonic()
        with pytest.raises(DynamixelCommError) as err:
            arm.read_state()
        elapsed = time.monotonic() - start
        msg = str(err.value)
        assert "servo ID 4 (left_forearm_roll)" in msg and peer.port in msg
        assert "no status packet" in msg and "3 tries" in msg
        assert (err.value.servo_id, err.value.joint, err.value.port) == (
            4,
            "left_forearm_roll",
            peer.port,
        )
        assert elapsed < 0.5  # 3 x ~34 ms SDK timeout, bounded
        peer.clear_faults()
        assert arm.read_state().position.shape == (7,)  # recovers by itself
    finally:
        arm.close()


def test_missing_servo_at_connect_names_it(make_peer) -> None:
    peer = make_peer((1, 2, 3, 4, 5, 6))  # the gripper (id 7) is not on the bus
    with pytest.raises(DynamixelCommError, match=r"servo ID 7 \(left_gripper\).*ping"):
        _arm(peer, retries=0)


def test_crc_corruption_is_named(make_peer) -> None:
    peer = make_peer()
    arm = _arm(peer, retries=1)
    try:
        peer.set_fault(6, corrupt_crc=True)
        with pytest.raises(DynamixelCommError, match=r"servo ID 6 \(left_wrist_rotate\).*corrupt"):
            arm.read_state()
        peer.set_fault(6, corrupt_crc=False)
        arm.read_state()
    finally:
        arm.close()


def test_hardware_error_raises_then_reboot_clears_it(make_peer) -> None:
    peer = make_peer()
    arm = _arm(peer)
    try:
        arm.set_torque(True)
        peer.set_fault(5, hardware_error=ct.HW_OVERLOAD)
        with pytest.raises(DynamixelHardwareError) as err:
            arm.read_state()
        assert err.value.status == ct.HW_OVERLOAD and err.value.servo_id == 5
        assert "left_wrist_angle" in str(err.value) and "overload" in str(err.value)
        assert arm.hardware_errors() == {5: ct.HW_OVERLOAD}
        assert peer.register(5, ct.TORQUE_ENABLE) == 0  # the servo's own shutdown
        with pytest.raises(DynamixelError, match="servo ID 5"):
            arm.set_torque(True)

        arm.reboot([5])
        assert arm.hardware_errors() == {}
        assert peer.stats().get("REBOOT") == 1
        arm.read_state()
        arm.set_torque(True)
        assert peer.register(5, ct.TORQUE_ENABLE) == 1
        assert peer.register(7, ct.GOAL_CURRENT) == round(600.0 / ct.MA_PER_CURRENT_UNIT)
    finally:
        arm.close()


def test_slow_replies_slow_the_tick_and_too_slow_is_a_timeout(make_peer) -> None:
    peer = make_peer()
    arm = _arm(peer, retries=1)
    try:
        peer.set_fault(2, slow_ms=8)
        start = time.monotonic()
        arm.read_state()
        assert time.monotonic() - start >= 0.008
        peer.set_fault(2, slow_ms=80)  # beyond the SDK's ~34 ms packet timeout
        with pytest.raises(DynamixelCommError, match=r"servo ID 2 \(left_shoulder\).*no status"):
            arm.read_state()
        peer.set_fault(2, slow_ms=0)
        time.sleep(0.1)  # let the late reply be dropped
        arm.read_state()
        assert peer.stats().get("status_dropped", 0) >= 1
    finally:
        arm.close()


def test_unplugged_port_is_named_and_reconnects_when_back(make_peer) -> None:
    peer = make_peer(stable_path=True)
    arm = _arm(peer, reconnect_interval_s=0.05)
    try:
        arm.set_torque(True)
        arm.write_goal(np.array([0.3, 0, 0, 0, 0, 0, 0.5]))
        # SYNC_WRITE has no reply: wait until the peer has taken it before pulling the cable.
        deadline = time.monotonic() + 2.0
        while peer.register(1, ct.GOAL_POSITION) != 2048 + round(0.3 / TICK):
            assert time.monotonic() < deadline, "the peer never applied the sync write"
            time.sleep(0.005)
        peer.unplug()
        with pytest.raises(DynamixelPortError, match=peer.port):
            arm.read_state()
        with pytest.raises(DynamixelPortError, match="cannot open port"):
            arm.read_state()
        peer.set_register(3, ct.HOMING_OFFSET, 50)  # servo 3 lost its setting meanwhile
        peer.replug()
        time.sleep(0.06)
        state = arm.read_state()  # reopens, re-checks the servos, reads
        assert state.position.shape == (7,)
        # Servo 1 kept power and settings: still holding its goal, nothing rewritten.
        assert peer.register(1, ct.TORQUE_ENABLE) == 1
        assert peer.register(1, ct.GOAL_POSITION) == 2048 + round(0.3 / TICK)
        # Servo 3 was released just long enough to rewrite it, then holds again.
        assert peer.register(3, ct.HOMING_OFFSET) == 0
        assert peer.register(3, ct.TORQUE_ENABLE) == 1
    finally:
        arm.close()


def test_leader_arms_read_14_positions_torque_off(make_peer) -> None:
    cal = default_calibration(leaders=True)
    left_peer = make_peer(shaft_ticks={1: 2048 + 200})
    right_peer = make_peer(shaft_ticks={7: 2560})
    leaders = LeaderArms.open({"left": left_peer.port, "right": right_peer.port}, cal)
    try:
        pos = leaders.positions()
        assert pos.shape == (14,)
        assert pos[0] == pytest.approx(200 * TICK)
        assert pos[13] == pytest.approx(1.0)  # right gripper fully open
        left_peer.move_shaft(3, 2048 - 512)  # the operator bends the elbow
        assert leaders.positions()[2] == pytest.approx(-512 * TICK)
        assert all(
            p.register(s, ct.TORQUE_ENABLE) == 0 for p in (left_peer, right_peer) for s in IDS
        )
    finally:
        leaders.close()


def test_linked_physics_sees_goals_and_reports_state(make_peer) -> None:
    peer = make_peer(link=True)
    assert peer.link is not None
    cal = _mirrored_calibration()
    arm = _arm(peer, cal)
    try:
        arm.set_torque(True)
        arm.write_goal(np.array([0.5, 0.2, 0, 0, 0, 0, 0.5]))
        peer.flush()
        cmd = peer.link.read_command(1)
        assert cmd.torque_enable and cmd.operating_mode == 3
        # Shaft frame: before homing offset (-300) and direction (-1).
        assert cmd.goal_position == pytest.approx((-round(0.5 / TICK) + 300) * TICK)
        # The physics sim reports: current -1 unit and velocity -3 units make a status
        # packet with FF FF FD inside, which must be stuffed and unstuffed correctly.
        peer.link.write_measurement(
            2,
            position=ct.ticks_to_rad(2048 - 125 + 40),
            velocity=-3 * ct.RAD_S_PER_VELOCITY_UNIT,
            current=-ct.MA_PER_CURRENT_UNIT,
        )
        st = arm.read_state()
        assert st.position[1] == pytest.approx(40 * TICK)
        assert st.velocity[1] == pytest.approx(-3 * ct.RAD_S_PER_VELOCITY_UNIT)
        assert st.current[1] == pytest.approx(-ct.MA_PER_CURRENT_UNIT)
        name = peer.link.name
    finally:
        arm.close()
    peer.close()
    assert not os.path.exists(f"/dev/shm/{name}")


def test_wire_model_costs_bus_time(make_peer) -> None:
    peer = make_peer(wire_model=True)
    arm = _arm(peer)
    try:
        arm.read_state()
        times = []
        for _ in range(20):
            start = time.perf_counter()
            arm.read_state()
            times.append(time.perf_counter() - start)
        # 7 status packets of 21 bytes at 10 us a byte, plus the instruction: >= 1.6 ms.
        assert float(np.median(times)) >= 0.0016
        assert float(np.median(times)) < 0.02
    finally:
        arm.close()


def test_peer_is_gone_after_close() -> None:
    peer = ServoPeer(IDS, stable_path=True)
    with peer:
        port, pid = peer.port, peer.pid
        assert os.path.islink(port)
    assert not peer.alive
    assert not os.path.exists(port)
    assert not os.path.exists(os.path.dirname(port))
    assert not _running(pid)
    with pytest.raises(Exception, match="not running"):
        peer.stats()


def test_latency_timer_setup_is_a_no_op_on_a_pty(make_peer) -> None:
    from drivers.dynamixel.arm_bus import set_low_latency

    peer = make_peer()
    assert set_low_latency(peer.port) is False  # no sysfs latency_timer behind a pty
    arm = _arm(peer)  # and connecting through it works
    arm.close()
