"""What the tasks and the scripted expert see of a MuJoCo cell: a narrow, typed view.

Why: MujocoWorld runs the tasks (layout, success, reward) and owns the expert, so they must
not import it back; they are written against these protocols instead, which MujocoWorld
satisfies. The package's imports then form a DAG (scene <- tasks <- expert <- world),
which tests/test_mujoco_imports.py checks.
"""

from __future__ import annotations

from typing import Protocol

import mujoco
import numpy as np


class TaskWorld(Protocol):
    """Privileged sim state a task reads to judge and score, and moves to lay out a scene."""

    def object_pos(self, name: str) -> np.ndarray: ...

    def object_mat(self, name: str) -> np.ndarray: ...

    def target_pos(self) -> np.ndarray: ...

    def tip(self, side: int) -> np.ndarray: ...

    def touching(self, side: int, name: str) -> tuple[bool, bool]: ...

    def holds(self, side: int, name: str) -> bool: ...

    def place(self, name: str, xy_z: np.ndarray, yaw: float) -> None: ...

    def set_target(self, xy: np.ndarray) -> None: ...


class ExpertWorld(TaskWorld, Protocol):
    """What the scripted expert adds: the model for its IK, joint addresses, time, and the
    episode it plans for."""

    model: mujoco.MjModel
    arm_qpos: np.ndarray  # per arm, qpos addresses of the six arm joints
    arm_dof: np.ndarray  # per arm, dof addresses of the six arm joints
    site: np.ndarray  # per arm, the gripper site's id
    control_hz: float
    dt: float
    steps: int
    episode: int
    task: str | None

    @property
    def q(self) -> np.ndarray: ...

    def hand_frame(self, side: int) -> np.ndarray: ...
