"""ALOHA-style leader arms: the operator moves them by hand, the followers copy them.

Leaders are the same Dynamixel arms on the same bus class as the followers, with torque
off and their own calibration, so a leader pose read in the shared joint convention
(radians, gripper 0..1) is directly a follower goal.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np

from drivers.calibration import CellCalibration
from drivers.dynamixel.arm_bus import DynamixelArmBus
from drivers.interfaces import JointState
from protos.joint_layout import ARM_SIDES

log = logging.getLogger(__name__)


class LeaderArms:
    """The pair of leader arms, read every tick: `positions()` is the (14,) teleop target."""

    def __init__(self, arms: Mapping[str, DynamixelArmBus]) -> None:
        if set(arms) != set(ARM_SIDES):
            raise ValueError(f"leader arms must be keyed {ARM_SIDES}, got {tuple(arms)}")
        self.arms = {side: arms[side] for side in ARM_SIDES}
        for arm in self.arms.values():
            arm.set_torque(False)  # the operator moves them by hand

    @classmethod
    def open(
        cls,
        ports: Mapping[str, str],
        calibration: CellCalibration,
        *,
        prefix: str = "leader_",
        **bus_kwargs: Any,
    ) -> LeaderArms:
        """Connect both leaders: `ports` keyed by side, calibration arms `leader_<side>`."""
        bus_kwargs.setdefault("gripper_current_ma", None)  # never powered: no current limit
        opened: dict[str, DynamixelArmBus] = {}
        try:
            for side in ARM_SIDES:
                name = f"{prefix}{side}"
                opened[side] = DynamixelArmBus(
                    name, ports[side], calibration.arm(name), **bus_kwargs
                )
            return cls(opened)
        except BaseException:
            for arm in opened.values():
                arm.close()
            raise

    def states(self) -> dict[str, JointState]:
        """One sync read per leader arm."""
        return {side: arm.read_state() for side, arm in self.arms.items()}

    def positions(self) -> np.ndarray:
        """(14,) float64: left then right, six joints (rad) and the gripper (0..1) each."""
        return np.concatenate([arm.read_state().position for arm in self.arms.values()])

    def close(self) -> None:
        errors: list[BaseException] = []
        for arm in self.arms.values():
            try:
                arm.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> LeaderArms:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
