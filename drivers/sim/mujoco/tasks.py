"""The MuJoCo cell's tasks: seeded layouts, success on privileged sim state, dense rewards.

- "handover_bar": the left gripper picks a bar (14 x 3 x 3 cm) by its left end and holds it
  up in the middle of the table; the right gripper takes it by its right end; the left lets
  go. Success: the right gripper holds the bar (both fingers touch it), no left finger
  touches it, and its centre is at least HANDOVER_HEIGHT above the table. (A bar rather
  than a cube, so two parallel grippers pointing down can hold it at once.)
- "place_cube": the right gripper picks a 4 cm cube and sets it down on a target pad.
  Success: the cube's centre within PLACE_RADIUS of the pad's, resting on the table, and
  no finger touching it (released). Peg insertion was left for later: at 2 ms steps and
  millimetre clearances it needs finer contacts than this lean cell aims at.
- "push_to_target": the left gripper, fingers half open and pointing down, pushes a block
  over the table onto a marked zone. Success: the block's centre within PUSH_RADIUS of the
  zone's centre.

`reward()` is dense, in [0, 1], and 1.0 exactly on success: a weighted sum of stage terms
(reach the object, hold it, bring it to where it must go), each term 1 - tanh(k * metres).
"""

from __future__ import annotations

import math

import numpy as np

from drivers.sim.mujoco.scene import BLOCK_HALF, CUBE_HALF, FLOOR_Z, PAD_RADIUS
from drivers.sim.mujoco.world_view import TaskWorld

MUJOCO_TASKS: tuple[str, ...] = ("handover_bar", "place_cube", "push_to_target")
TASK_OBJECT = {"handover_bar": "bar", "place_cube": "cube", "push_to_target": "block"}
#: sim seconds an episode may take; the scripted experts finish well inside these
EPISODE_TIME_S = {"handover_bar": 10.0, "place_cube": 8.0, "push_to_target": 8.0}

HANDOVER_HEIGHT = 0.10  # bar centre above the table, metres
BAR_GRASP_OFFSET = 0.04  # each arm grasps this far from the bar's centre along it
PLACE_RADIUS = PAD_RADIUS - 0.015
PUSH_RADIUS = 0.02
RESTING_TOL = 0.005  # an object's centre this close to its resting height lies on the table

LEFT, RIGHT = 0, 1


def check_task(task: str) -> str:
    if task not in MUJOCO_TASKS:
        raise ValueError(f"unknown mujoco task {task!r}; known: {', '.join(MUJOCO_TASKS)}")
    return task


def _closeness(metres: float, k: float = 10.0) -> float:
    return 1.0 - math.tanh(k * max(0.0, metres))


def place_objects(world: TaskWorld, task: str, rng: np.random.Generator) -> dict[str, float]:
    """Lay out `task`'s objects and target from `rng`; returns the layout (for logs)."""
    hide = np.array([6.0, 6.0, FLOOR_Z])
    if task == "handover_bar":
        x, y, yaw = rng.uniform(-0.20, -0.10), rng.uniform(-0.10, 0.10), rng.uniform(-0.5, 0.5)
        world.place("bar", np.array([x, y, 0.0]), yaw)
        world.set_target(hide)
        return {"x": x, "y": y, "yaw": yaw}
    if task == "place_cube":
        x, y, yaw = rng.uniform(0.06, 0.20), rng.uniform(-0.14, 0.14), rng.uniform(-0.7, 0.7)
        while True:  # the pad at least 10 cm from the cube, in the right arm's reach
            tx, ty = rng.uniform(-0.06, 0.20), rng.uniform(-0.15, 0.15)
            if math.hypot(tx - x, ty - y) >= 0.10:
                break
        world.place("cube", np.array([x, y, 0.0]), yaw)
        world.set_target(np.array([tx, ty]))
        return {"x": x, "y": y, "yaw": yaw, "target_x": tx, "target_y": ty}
    if task == "push_to_target":
        x, y, yaw = rng.uniform(-0.18, -0.10), rng.uniform(-0.08, 0.08), rng.uniform(-0.3, 0.3)
        dist, heading = rng.uniform(0.10, 0.18), rng.uniform(-0.5, 0.5)
        tx, ty = x + dist * math.cos(heading), y + dist * math.sin(heading)
        world.place("block", np.array([x, y, 0.0]), yaw)
        world.set_target(np.array([tx, ty]))
        return {"x": x, "y": y, "yaw": yaw, "target_x": tx, "target_y": ty}
    raise ValueError(f"unknown mujoco task {task!r}")


def bar_grasp_points(world: TaskWorld) -> tuple[np.ndarray, np.ndarray]:
    """Where the left and right grippers take the bar (its left and right ends' middles)."""
    c = world.object_pos("bar")
    axis = world.object_mat("bar")[:, 0]
    if axis[0] < 0:  # the bar is symmetric: "+axis" is the end nearer the right arm
        axis = -axis
    return c - BAR_GRASP_OFFSET * axis, c + BAR_GRASP_OFFSET * axis


def _any_finger_touches(world: TaskWorld, name: str) -> bool:
    return any(any(world.touching(s, name)) for s in (LEFT, RIGHT))


def task_success(world: TaskWorld, task: str) -> bool:
    if task == "handover_bar":
        return (
            world.holds(RIGHT, "bar")
            and not any(world.touching(LEFT, "bar"))
            and world.object_pos("bar")[2] >= HANDOVER_HEIGHT
        )
    if task == "place_cube":
        cube = world.object_pos("cube")
        return (
            float(np.linalg.norm(cube[:2] - world.target_pos()[:2])) <= PLACE_RADIUS
            and cube[2] <= CUBE_HALF + RESTING_TOL
            and not _any_finger_touches(world, "cube")
        )
    if task == "push_to_target":
        block = world.object_pos("block")
        return (
            float(np.linalg.norm(block[:2] - world.target_pos()[:2])) <= PUSH_RADIUS
            and block[2] <= BLOCK_HALF[2] + RESTING_TOL
        )
    raise ValueError(f"unknown mujoco task {task!r}")


def task_reward(world: TaskWorld, task: str) -> float:
    if task_success(world, task):
        return 1.0
    if task == "handover_bar":
        left_at, right_at = bar_grasp_points(world)
        left_holds = world.holds(LEFT, "bar")
        right_holds = world.holds(RIGHT, "bar")
        lift = min(1.0, max(0.0, world.object_pos("bar")[2] - 0.015) / HANDOVER_HEIGHT)
        r = 0.15 * (
            1.0
            if left_holds or right_holds
            else _closeness(float(np.linalg.norm(world.tip(LEFT) - left_at)))
        )
        r += 0.15 * float(left_holds or right_holds)
        r += 0.2 * lift
        r += 0.2 * (
            1.0
            if right_holds
            else _closeness(float(np.linalg.norm(world.tip(RIGHT) - right_at))) * lift
        )
        r += 0.2 * float(right_holds) + 0.05 * float(right_holds and not left_holds)
        return min(r, 0.95)
    if task == "place_cube":
        cube = world.object_pos("cube")
        held = world.holds(RIGHT, "cube")
        reach = 1.0 if held else _closeness(float(np.linalg.norm(world.tip(RIGHT) - cube)))
        place = _closeness(float(np.linalg.norm(cube[:2] - world.target_pos()[:2])))
        return min(0.2 * reach + 0.2 * float(held) + 0.55 * place, 0.95)
    if task == "push_to_target":
        block = world.object_pos("block")
        reach = _closeness(float(np.linalg.norm(world.tip(LEFT)[:2] - block[:2])) - 0.06)
        to_go = _closeness(float(np.linalg.norm(block[:2] - world.target_pos()[:2])), k=8.0)
        return min(0.2 * reach + 0.75 * to_go, 0.95)
    raise ValueError(f"unknown mujoco task {task!r}")
