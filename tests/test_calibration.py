"""Cell calibration files and the calibrate flow, run against the simulated servo chain."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from drivers.calibration import (
    ArmCalibration,
    CalibrationError,
    CalibrationStep,
    CellCalibration,
    calibrate,
    default_arm_calibration,
    default_calibration,
)
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.arm_bus import DynamixelArmBus
from drivers.sim.servo_peer import ServoPeer
from protos.joint_layout import ARM_JOINT_NAMES, JOINT_LOWER, JOINT_UPPER

TICK = ct.RAD_PER_TICK


def test_default_calibration_matches_the_joint_layout() -> None:
    cal = default_calibration("cell-7", leaders=True)
    assert set(cal.arms) == {"left", "right", "leader_left", "leader_right"}
    arm = cal.arm("left")
    assert arm.ids == (1, 2, 3, 4, 5, 6, 7)
    assert arm.servo_names == ARM_JOINT_NAMES
    np.testing.assert_allclose(arm.lower, JOINT_LOWER[:7], atol=1e-6)
    np.testing.assert_allclose(arm.upper, JOINT_UPPER[:7], atol=1e-6)
    with pytest.raises(CalibrationError, match="no calibration for arm 'front'"):
        cal.arm("front")


def test_save_load_round_trip(tmp_path: Path) -> None:
    cal = default_calibration("cell-3")
    left = cal.arm("left")
    joints = list(left.joints)
    joints[2] = dataclasses.replace(
        joints[2], homing_offset=-417, direction=-1, lower=-1.2, upper=0.9
    )
    cal = dataclasses.replace(
        cal, arms={**cal.arms, "left": dataclasses.replace(left, joints=tuple(joints))}
    )
    path = cal.save(tmp_path / "cells" / "cell-3.json")
    loaded = CellCalibration.load(path)
    assert loaded == cal
    assert json.loads(path.read_text())["format"] == "fleetlearn.calibration"


def _edit(tmp_path: Path, change) -> Path:
    data = default_calibration("c").to_dict()
    change(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            lambda d: d["arms"]["left"]["joints"][1].update(direction=0),
            r"arm 'left', joint 'shoulder' \(id 2\): direction",
        ),
        (
            lambda d: d["arms"]["right"]["joints"][0].update(lower=1.0, upper=-1.0),
            r"arm 'right', joint 'waist'.*lower < upper",
        ),
        (lambda d: d["arms"]["left"]["joints"][0].update(upper=4.0), r"joint 'waist'.*within"),
        (
            lambda d: d["arms"]["left"]["joints"][4].update(id=1),
            r"arm 'left': servo ids must be unique",
        ),
        (
            lambda d: d["arms"]["left"]["gripper"].update(open_ticks=1540),
            r"gripper \(id 7\).*was the gripper moved",
        ),
        (
            lambda d: d["arms"]["left"]["joints"][3].update(homing_offset="12"),
            r"must be an integer",
        ),
        (lambda d: d["arms"]["left"]["joints"][3].pop("lower"), r"missing field 'lower'"),
        (lambda d: d["arms"]["left"]["joints"].pop(), r"joints must be"),
        (lambda d: d.update(version=9), r"version 9"),
        (lambda d: d.update(format="other"), r"not a fleetlearn.calibration file"),
    ],
)
def test_invalid_files_fail_with_a_clear_message(tmp_path: Path, change, message: str) -> None:
    path = _edit(tmp_path, change)
    with pytest.raises(CalibrationError, match=message) as err:
        CellCalibration.load(path)
    assert str(path) in str(err.value)


def test_missing_and_broken_files(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="fleet calibrate"):
        CellCalibration.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CalibrationError, match="not valid JSON"):
        CellCalibration.load(tmp_path / "bad.json")


def test_limits_in_ticks_follow_the_direction() -> None:
    arm = default_arm_calibration("left", direction=(1, -1, 1, 1, 1, 1))
    shoulder = dataclasses.replace(arm.joints[1], lower=-0.5, upper=1.0)
    assert shoulder.lower_upper_ticks() == (
        math.floor(2048 - 1.0 / TICK),
        math.ceil(2048 + 0.5 / TICK),
    )


def test_calibrate_flow_against_the_simulated_arm(tmp_path: Path) -> None:
    """A scripted operator moves the simulated servos; the file and registers follow."""
    rng = np.random.default_rng(7)
    start = {sid: float(rng.integers(1200, 2900)) for sid in range(1, 8)}
    home_shaft = {sid: int(rng.integers(1500, 2600)) for sid in range(1, 7)}
    opened, closed = 2900, 1800
    base = default_arm_calibration("left", direction=(1, -1, 1, 1, -1, 1))
    path = tmp_path / "cell-9.json"
    default_calibration("cell-9").save(path)  # a right arm calibrated earlier is kept

    with ServoPeer(range(1, 8), shaft_ticks=start) as peer:
        arm = DynamixelArmBus("left", peer.port, base)
        arm.set_torque(True)
        steps: list[str] = []

        def operator(step: CalibrationStep) -> None:
            steps.append(step.key)
            assert step.arm == "left" and step.message
            assert peer.register(1, ct.TORQUE_ENABLE) == 0  # free to move by hand
            if step.key == "home":
                for sid, ticks in home_shaft.items():
                    peer.move_shaft(sid, ticks)
            elif step.key == "gripper_open":
                peer.move_shaft(7, opened)
            elif step.key == "gripper_closed":
                peer.move_shaft(7, closed)

        try:
            cal = calibrate({"left": arm}, operator, path, cell_id="cell-9")
            assert steps == ["home", "gripper_open", "gripper_closed"]

            left = cal.arm("left")
            assert [j.homing_offset for j in left.joints] == [
                2048 - home_shaft[s] for s in range(1, 7)
            ]
            assert [j.direction for j in left.joints] == [1, -1, 1, 1, -1, 1]  # kept
            assert (left.gripper.open_ticks, left.gripper.closed_ticks) == (opened, closed)
            assert CellCalibration.load(path) == cal
            assert set(cal.arms) == {"left", "right"}

            # The servos hold the new offsets and limits, and the home pose now reads zero.
            for j in left.joints:
                assert peer.register(j.id, ct.HOMING_OFFSET) == j.homing_offset
                lo, hi = j.lower_upper_ticks()
                assert peer.register(j.id, ct.MIN_POSITION_LIMIT) == lo
                assert peer.register(j.id, ct.MAX_POSITION_LIMIT) == hi
            pos = arm.read_state().position
            np.testing.assert_allclose(pos[:6], 0.0, atol=1e-12)
            assert pos[6] == pytest.approx(0.0)  # the gripper was left closed
            peer.move_shaft(7, opened)
            peer.move_shaft(2, home_shaft[2] + 100)
            pos = arm.read_state().position
            assert pos[6] == pytest.approx(1.0)
            assert pos[1] == pytest.approx(-100 * TICK)  # direction -1

            # A new bus from the file sees the same thing.
            arm.close()
            again = DynamixelArmBus("left", peer.port, CellCalibration.load(path).arm("left"))
            np.testing.assert_allclose(again.read_state().position, pos, atol=1e-12)
            again.close()
        finally:
            arm.close()


def test_calibrate_refuses_a_gripper_that_did_not_move(tmp_path: Path) -> None:
    with ServoPeer(range(1, 8)) as peer:
        arm = DynamixelArmBus("left", peer.port, default_arm_calibration("left"))
        try:
            with pytest.raises(CalibrationError, match="was the gripper moved"):
                calibrate({"left": arm}, lambda step: None, tmp_path / "c.json", "c")
            assert not (tmp_path / "c.json").exists()
        finally:
            arm.close()


def test_calibration_belongs_to_one_cell(tmp_path: Path) -> None:
    path = default_calibration("cell-1").save(tmp_path / "c.json")
    with pytest.raises(CalibrationError, match="belongs to cell 'cell-1'"):
        calibrate({}, lambda step: None, path, "cell-2")


def test_arm_calibration_round_trips_through_dict() -> None:
    arm = default_arm_calibration("right", first_id=11)
    assert ArmCalibration.from_dict("right", arm.to_dict()) == arm
    assert arm.ids == tuple(range(11, 18))
