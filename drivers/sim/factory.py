"""Builds a complete simulated cell: the same CellHardware an actor drives on a real cell,
over a kinematic SimWorld, plus the sim-only pieces (scene, operator, clock)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from drivers.cell import CellHardware
from drivers.interfaces import Clock, Operator, TaskScene
from drivers.safety import SafetyGate
from drivers.sim.devices import SimArmBus, SimCamera, SimClock, SimOperator
from drivers.sim.tasks import ScriptedExpert, SimTaskScene
from drivers.sim.world import SPEEDS, SimWorld
from protos.joint_layout import ARM_SIDES, JOINT_LOWER, JOINT_UPPER

PHYSICS_HZ = 200.0  # about this many substeps per second, a whole number per control tick
EXPERT_TIP_SPEED = 0.25  # m/s the scripted expert moves a gripper tip at (a calm teleoperator)


@dataclass
class SimCell:
    hardware: CellHardware
    scene: TaskScene  # SimTaskScene: reset(task, seed), success(), reward(), tasks
    operator: Operator  # SimOperator: scripted expert using privileged sim state
    clock: Clock  # SimClock
    world: SimWorld
    cell_id: str = ""
    control_hz: float = 20.0


def make_sim_cell(
    cell_id: str,
    *,
    seed: int = 0,
    cameras: Sequence[str] = ("overhead", "front"),
    height: int = 96,
    width: int = 128,
    control_hz: float = 20.0,
    realtime_factor: float = 1.0,
    takeover_prob: float = 0.5,
    takeover_stall_s: float = 0.0,
) -> SimCell:
    """A simulated cell. `seed` is the cell's own (its operator's takeovers); the scene
    layout comes from the episode seed given to `scene.reset`. The safety gate allows each
    joint one tick of servo travel per command (3 rad/s, gripper 4/s, at `control_hz`).
    Unknown camera names raise ValueError (drivers.sim.render.CAMERA_NAMES are known)."""
    if not control_hz > 0:
        raise ValueError("control_hz must be > 0")
    substeps = max(1, round(PHYSICS_HZ / control_hz))
    world = SimWorld(dt=1.0 / (control_hz * substeps))
    gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, max_step=list(SPEEDS / control_hz) * len(ARM_SIDES))
    clock = SimClock(world, realtime_factor=realtime_factor)
    hardware = CellHardware(
        arms={side: SimArmBus(world, side) for side in ARM_SIDES},
        cameras=[SimCamera(world, name, height, width) for name in cameras],
        clock=clock,
        gate=gate,
    )
    expert = ScriptedExpert(world, max_tip_step=EXPERT_TIP_SPEED / control_hz)
    scene = SimTaskScene(world, gate)
    operator = SimOperator(
        world,
        expert,
        seed=seed,
        takeover_prob=takeover_prob,
        progress=scene.reward,
        stall_s=takeover_stall_s,
    )
    return SimCell(
        hardware=hardware,
        scene=scene,
        operator=operator,
        clock=clock,
        world=world,
        cell_id=cell_id,
        control_hz=float(control_hz),
    )
