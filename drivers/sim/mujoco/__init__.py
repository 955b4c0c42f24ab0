"""A MuJoCo dual-arm cell: real contact physics and GL rendering behind the sim's world API.

Import sets MUJOCO_GL=egl (unless already set) before MuJoCo loads, so offscreen rendering
works on a headless cell computer or CI runner.
"""

from __future__ import annotations

import os

os.environ.setdefault("MUJOCO_GL", "egl")

from drivers.sim.mujoco.expert import MujocoExpert
from drivers.sim.mujoco.scene import CAMERA_NAMES
from drivers.sim.mujoco.tasks import EPISODE_TIME_S, MUJOCO_TASKS
from drivers.sim.mujoco.world import MujocoWorld

__all__ = ["CAMERA_NAMES", "EPISODE_TIME_S", "MUJOCO_TASKS", "MujocoExpert", "MujocoWorld"]
