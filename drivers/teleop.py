"""ALOHA-style teleoperation: the operator moves torque-off leader arms; while the takeover
input is held, their positions are the cell's action (and the actor flags those steps as
interventions).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from drivers.dynamixel.leader import LeaderArms


class TeleopOperator:
    """The Operator of a real cell: leader arms plus a takeover input (pedal, button).

    `takeover` is polled every tick; any callable works (a foot pedal read as a key, a GPIO
    line, a flag set by a UI).
    """

    def __init__(self, leaders: LeaderArms, takeover: Callable[[], bool]) -> None:
        self.leaders = leaders
        self.takeover = takeover
        self.forced = False

    def force(self, on: bool) -> None:
        """Demonstrations: the operator drives every tick (no policy yet)."""
        self.forced = bool(on)

    def wants_control(self) -> bool:
        return self.forced or bool(self.takeover())

    def action(self) -> np.ndarray:
        """The leader arms' 14 positions, read this tick through the SDK."""
        return np.asarray(self.leaders.positions(), np.float32)

    def close(self) -> None:
        self.leaders.close()
