"""The small typed interfaces the edge actor drives a cell through.

The same interfaces sit in front of real hardware and of the simulated cell, so the actor
never knows which it runs on.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class DriverFault(RuntimeError):
    """A hardware fault a driver raises; the message names the part (servo, port, camera).

    `torque_off` says the part must not be driven any more (a servo's hardware error):
    the cell then turns torque off instead of holding position.
    """

    torque_off: bool = False


@dataclass(frozen=True)
class JointState:
    """One arm's servos read in one sync transaction (radians; gripper normalised 0..1)."""

    position: np.ndarray  # (7,) float64
    velocity: np.ndarray  # (7,) float64, rad/s
    current: np.ndarray  # (7,) float64, mA
    stamp: float  # clock seconds when read


class ArmBus(Protocol):
    """One arm on one bus: read all servos at once, write all goals at once."""

    name: str

    def read_state(self) -> JointState: ...

    def write_goal(self, position: np.ndarray) -> None: ...

    def set_torque(self, enabled: bool) -> None: ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Frame:
    """One camera image with its capture time."""

    camera: str
    color: np.ndarray  # (H, W, 3) uint8, RGB
    stamp: float  # clock seconds at capture
    depth: np.ndarray | None = None  # (H, W) uint16, millimetres, aligned to color


class Camera(Protocol):
    """A camera that yields timestamped frames."""

    name: str
    height: int
    width: int

    def read(self, timeout_s: float = 1.0) -> Frame: ...

    def close(self) -> None: ...


class Clock(Protocol):
    """What the control loop ticks on: wall time on hardware, sim time in simulation."""

    def now(self) -> float: ...

    def sleep_until(self, t: float) -> None: ...


class Operator(Protocol):
    """The human (leader arms + takeover input) or simulated operator of a cell."""

    def wants_control(self) -> bool: ...

    def action(self) -> np.ndarray:
        """The 14 joint targets the operator commands this tick."""
        ...


class TaskScene(Protocol):
    """Episode boundaries and outcomes: a person (or the sim) resets and judges the scene.

    A scene may also have `failed() -> bool` (a real cell's operator console does): the
    control loop then ends the episode early with reason "failure" when it turns True.
    """

    tasks: tuple[str, ...]

    def reset(self, task: str, seed: int) -> None: ...

    def success(self) -> bool: ...

    def reward(self) -> float: ...


@dataclass
class Observation:
    """Everything the policy sees at one tick."""

    joint_pos: np.ndarray  # (14,) float32
    frames: dict[str, Frame] = field(default_factory=dict)
    stamp: float = 0.0
