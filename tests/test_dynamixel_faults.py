"""What real buses do to the arm driver: late replies, power cycles, slow servos after a
reconnect. Each fault is played by the project's servo peer on a pseudo-terminal and met by
the real driver through dynamixel_sdk.

The rule checked throughout: the driver never returns data older than the request it
answers, never leaves an arm limp while it believes torque is on, and never skips its
settings after a reconnect.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest

from drivers.calibration import default_arm_calibration
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.arm_bus import (
    DynamixelArmBus,
    DynamixelCommError,
    DynamixelConfigError,
    DynamixelError,
    DynamixelPowerLossError,
)
from drivers.sim.servo_peer import ServoPeer
from tests.waiting import wait_for

IDS = tuple(range(1, 8))
GRIPPER_UNITS = round(600.0 / ct.MA_PER_CURRENT_UNIT)


@pytest.fixture
def peer() -> Iterator[ServoPeer]:
    with ServoPeer(IDS, stable_path=True) as p:
        yield p
    assert not p.alive


def _arm(peer: ServoPeer, **kwargs: object) -> DynamixelArmBus:
    cal = default_arm_calibration("left")
    return DynamixelArmBus(cal.name, peer.port, cal, **kwargs)  # type: ignore[arg-type]


def _marker(peer: ServoPeer, i: int) -> int:
    """Put servos 4 and 7 (torque off) at a shaft position unique to read number i."""
    ticks = 1500 + 7 * i
    peer.move_shaft(4, ticks)
    peer.move_shaft(7, ticks)
    return ticks


def _raw(arm: DynamixelArmBus) -> dict[int, int]:
    got = arm.raw_positions()
    return {4: int(got[3]), 7: int(got[6])}


def test_late_replies_are_discarded_never_taken_for_fresh(peer: ServoPeer) -> None:
    """A servo answering 40-60 ms late (past the SDK's ~34 ms timeout): every read either
    fails or returns what the servos hold at the time of the request, never an older
    value; the late replies are counted."""
    arm = _arm(peer)
    try:
        peer.set_fault(4, late_ms=(40, 60))
        fresh = failed = stale = 0
        for i in range(30):
            ticks = _marker(peer, i)
            try:
                got = _raw(arm)
            except DynamixelCommError:
                failed += 1
                continue
            if got == {4: ticks, 7: ticks}:
                fresh += 1
            else:
                stale += 1
        assert stale == 0, f"{stale} stale reads ({fresh} fresh, {failed} failed)"
        assert fresh + failed == 30
        assert peer.stats().get("status_sent_late", 0) > 0
    finally:
        arm.close()


def test_one_hiccup_leaves_no_stale_read_behind(peer: ServoPeer) -> None:
    """One late burst (a busy host, a servo hiccup): the read that met it fails, and every
    read after it is fresh, although the late replies arrive during them."""
    arm = _arm(peer, retries=2)
    try:
        _raw(arm)
        peer.set_fault(4, late_ms=150)  # well past the SDK's timeout, even on a busy host
        _marker(peer, 0)
        with pytest.raises(DynamixelCommError, match=r"servo ID 4 \(left_forearm_roll\)"):
            _raw(arm)
        peer.set_fault(4, late_ms=0)
        before = arm.stats.late_replies
        for i in range(1, 20):
            ticks = _marker(peer, i)
            assert _raw(arm) == {4: ticks, 7: ticks}, f"read {i} is stale"
        # The three tries' late replies arrived after the error: all of them discarded.
        assert arm.stats.late_replies - before >= 1
    finally:
        arm.close()


def test_reply_left_after_a_read_is_discarded_by_the_next(peer: ServoPeer) -> None:
    """The last servo answers twice (a second servo with its ID): the extra status packet
    arrives in the same read as the ones wanted and stays behind in the port handler's
    buffer. The next transaction must count it as a late reply, never take it for its
    own answer: every read returns what the servos hold at its request."""
    arm = _arm(peer)
    try:
        _raw(arm)
        peer.set_fault(7, duplicate=True)
        before = arm.stats.late_replies
        for i in range(10):
            ticks = _marker(peer, i)
            assert _raw(arm) == {4: ticks, 7: ticks}, f"read {i} is stale"
        assert arm.stats.late_replies - before >= 9
    finally:
        arm.close()


def test_late_write_ack_is_not_taken_for_the_next_one(peer: ServoPeer) -> None:
    """A write whose ack comes late fails; a write refused right after it is reported as
    refused, not acked by the earlier write's late status packet."""
    arm = _arm(peer, retries=0)
    try:
        peer.set_fault(3, late_ms=45)
        with pytest.raises(DynamixelCommError):
            arm.bus.write(3, ct.LED, 1)
        peer.set_fault(3, late_ms=0)
        arm.set_torque(True)
        with pytest.raises(DynamixelError, match="access error"):
            arm.bus.write(3, ct.HOMING_OFFSET, 5)  # EEPROM while torque is on: refused
        assert arm.stats.late_replies >= 1
    finally:
        arm.close()


def test_power_cycle_restores_settings_and_torque_and_raises(peer: ServoPeer) -> None:
    """Servo power lost and back (port kept): the driver finds the RAM reset, restores the
    gripper current and torque holding the present pose (no jump to an old goal), and
    raises a typed fault so the cell starts again from where the arm is."""
    arm = _arm(peer, ram_check_s=600)
    try:
        arm.set_torque(True)
        target = np.array([0.3, -0.2, 0.1, 0.0, 0.0, 0.0, 0.8])
        arm.write_goal(target)
        wait_for(lambda: np.allclose(arm.read_state().position, target, atol=2e-3), 5, "the goal")
        peer.power_cycle(off_ms=150)
        peer.move_shaft(2, 2048 - 200)  # the limp arm sagged meanwhile
        with pytest.raises(DynamixelError) as info:
            for _ in range(200):  # silent first (comm errors), then the typed fault
                try:
                    arm.read_state()
                except DynamixelCommError:
                    time.sleep(0.01)
        assert isinstance(info.value, DynamixelPowerLossError), info.value
        assert set(info.value.servo_ids) == set(IDS)
        assert "lost power" in str(info.value) and "left_shoulder" in str(info.value)
        for sid in IDS:
            assert peer.register(sid, ct.TORQUE_ENABLE) == 1
        assert peer.register(7, ct.GOAL_CURRENT) == GRIPPER_UNITS
        # Holding where it sagged to, not springing back to the old goal.
        assert peer.register(2, ct.GOAL_POSITION) == 2048 - 200
        assert arm.torque_enabled and arm.stats.power_cycles == 1
        arm.read_state()  # and the arm reads normally again
    finally:
        arm.close()


def test_power_blip_between_ticks_is_found_by_the_periodic_check(peer: ServoPeer) -> None:
    """A power cut too short for any request to go unanswered is still found."""
    arm = _arm(peer, ram_check_s=0.05)
    try:
        arm.set_torque(True)
        arm.read_state()
        peer.power_cycle(off_ms=1)
        time.sleep(0.06)
        with pytest.raises(DynamixelPowerLossError):
            arm.read_state()
        assert peer.register(1, ct.TORQUE_ENABLE) == 1
    finally:
        arm.close()


def test_power_cycle_with_torque_off_still_restores_the_gripper_current(
    peer: ServoPeer,
) -> None:
    arm = _arm(peer, ram_check_s=600)
    try:
        arm.read_state()
        peer.power_cycle(off_ms=80)
        with pytest.raises(DynamixelError):
            for _ in range(200):
                try:
                    arm.read_state()
                except DynamixelCommError:
                    time.sleep(0.01)
        assert peer.register(7, ct.GOAL_CURRENT) == GRIPPER_UNITS
        assert peer.register(1, ct.TORQUE_ENABLE) == 0  # torque stays as the driver had it
    finally:
        arm.close()


def test_settings_check_after_reconnect_waits_for_slow_servos(peer: ServoPeer) -> None:
    """The port comes back but the servos answer only 0.3 s later (and lost power while
    unplugged): the post-reconnect check is retried until they answer, so the gripper's
    goal current is the configured one, not the power-on value."""
    arm = _arm(peer, reconnect_interval_s=0.05, ram_check_s=600)
    try:
        assert peer.register(7, ct.GOAL_CURRENT) == GRIPPER_UNITS
        peer.unplug()
        with pytest.raises(DynamixelError):
            arm.read_state()
        peer.power_cycle(off_ms=1)
        peer.set_register(3, ct.HOMING_OFFSET, 40)  # and an EEPROM setting drifted
        assert peer.register(7, ct.GOAL_CURRENT) != GRIPPER_UNITS
        peer.replug(silent_ms=300)

        def reads() -> bool:
            try:
                arm.read_state()
                return True
            except DynamixelError:
                return False

        wait_for(reads, 10, "the arm to read again after the reconnect")
        assert peer.register(7, ct.GOAL_CURRENT) == GRIPPER_UNITS
        assert peer.register(3, ct.HOMING_OFFSET) == 0
        assert arm.stats.reconnects == 1
    finally:
        arm.close()


def test_reconnect_whose_check_never_passes_is_tried_again_whole(peer: ServoPeer) -> None:
    """Servos silent longer than the settle time: the reconnect fails as a whole, and the
    next attempt runs the check again (nothing is read before the settings are right)."""
    arm = _arm(peer, reconnect_interval_s=0.05, ram_check_s=600)
    arm.bus.settle_s = 0.2
    try:
        peer.unplug()
        with pytest.raises(DynamixelError):
            arm.read_state()
        peer.power_cycle(off_ms=1)
        peer.replug(silent_ms=700)
        with pytest.raises(DynamixelError):
            arm.read_state()  # check retried for 0.2 s, then given up: port dropped
        assert not arm.bus.connected
        assert peer.register(7, ct.GOAL_CURRENT) != GRIPPER_UNITS

        def reads() -> bool:
            try:
                arm.read_state()
                return True
            except DynamixelError:
                return False

        wait_for(reads, 10, "the arm to read again")
        assert peer.register(7, ct.GOAL_CURRENT) == GRIPPER_UNITS
    finally:
        arm.close()


def test_a_refusal_without_data_is_the_answer_not_a_late_reply(peer: ServoPeer) -> None:
    """A servo refusing a read answers with its error and no data: that is this request's
    answer (a clear refusal), not a packet of the wrong length to discard."""
    arm = _arm(peer)
    try:
        beyond = ct.Register("beyond_the_table", ct.TABLE_SIZE - 1, 4)
        with pytest.raises(DynamixelConfigError, match="access error"):
            arm.bus.read(2, beyond)
        assert arm.stats.late_replies == 0
        arm.read_state()  # and the bus carries on
    finally:
        arm.close()


def test_a_port_that_takes_no_bytes_raises_instead_of_hanging_the_loop() -> None:
    """A stalled adapter (nothing drains the line) must end in a bus fault the cell makes
    safe, never in a write that blocks the control loop for good."""
    import os

    from drivers.dynamixel.bus import WRITE_STALL_S, _WaitingPortHandler

    master, slave = os.openpty()  # nobody reads the master: the line's buffer fills
    try:
        port = _WaitingPortHandler(os.ttyname(slave), read_wait_s=0.01)
        assert port.openPort()
        t0 = time.monotonic()
        with pytest.raises(OSError, match="took no bytes"):
            port.writePort(bytes(1 << 20))
        assert time.monotonic() - t0 >= WRITE_STALL_S
        port.closePort()
    finally:
        os.close(master)
        os.close(slave)
