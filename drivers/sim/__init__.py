"""Simulated cells that stand in for the hardware below the driver interfaces."""

from drivers.sim.devices import SimArmBus, SimCamera, SimClock, SimOperator
from drivers.sim.factory import SimCell, make_sim_cell
from drivers.sim.render import CAMERA_NAMES
from drivers.sim.tasks import EPISODE_TIME_S, SIM_TASKS, ScriptedExpert, SimTaskScene
from drivers.sim.world import SimWorld

__all__ = [
    "CAMERA_NAMES",
    "EPISODE_TIME_S",
    "SIM_TASKS",
    "ScriptedExpert",
    "SimArmBus",
    "SimCamera",
    "SimCell",
    "SimClock",
    "SimOperator",
    "SimTaskScene",
    "SimWorld",
    "make_sim_cell",
]
