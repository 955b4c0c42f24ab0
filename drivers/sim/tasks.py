"""The simulated tasks: episode reset, success, reward, and a scripted expert that solves them.

- "pick_cube": the left gripper grasps the cube and lifts it: success while the left arm
  holds the cube with its centre at least LIFT_HEIGHT above the table.
- "touch_target": the right gripper's tip comes within TOUCH_RADIUS of the target marker
  (a point on the table top).

`reward()` is 1.0 on success, otherwise minus the distance in metres still to cover (so it
lies in about [-1, 0) and rises as the arm gets closer): pick_cube, the left tip's distance
to the cube until it is held, then the height still missing; touch_target, the right tip's
distance to the marker.
"""

from __future__ import annotations

import math

import numpy as np

from drivers.safety import SafetyGate
from drivers.sim.world import (
    CUBE_HALF,
    HOME,
    SimWorld,
    forward_kinematics,
    inverse_kinematics,
)

SIM_TASKS: tuple[str, ...] = ("pick_cube", "touch_target")

EPISODE_TIME_S = 8.0  # sim seconds an episode may take (160 ticks at 20 Hz)
LIFT_HEIGHT = 0.10  # cube centre above the table, metres
TOUCH_RADIUS = 0.03  # tip to target marker, metres

LEFT, RIGHT = 0, 1


def check_task(task: str) -> str:
    if task not in SIM_TASKS:
        raise ValueError(f"unknown sim task {task!r}; known: {', '.join(SIM_TASKS)}")
    return task


def task_success(world: SimWorld, task: str) -> bool:
    if task == "pick_cube":
        return world.holder == LEFT and world.cube[2] >= LIFT_HEIGHT
    if task == "touch_target":
        return bool(np.linalg.norm(world.tip(RIGHT) - world.target) <= TOUCH_RADIUS)
    raise ValueError(f"unknown sim task {task!r}")


def task_reward(world: SimWorld, task: str) -> float:
    if task_success(world, task):
        return 1.0
    if task == "pick_cube":
        if world.holder == LEFT:
            return -float(max(0.0, LIFT_HEIGHT - world.cube[2]))
        return -float(np.linalg.norm(world.tip(LEFT) - world.cube))
    return -float(np.linalg.norm(world.tip(RIGHT) - world.target))


class SimTaskScene:
    """TaskScene of a simulated cell: reset puts both arms home, re-places the cube and the
    target from the episode seed, and forgets the safety gate's last command."""

    tasks: tuple[str, ...] = SIM_TASKS

    def __init__(self, world: SimWorld, gate: SafetyGate | None = None) -> None:
        self.world = world
        self.gate = gate
        self.task: str | None = None

    def reset(self, task: str, seed: int) -> None:
        self.task = check_task(task)
        self.world.reset(task, seed)
        if self.gate is not None:
            self.gate.reset()

    def _task(self) -> str:
        if self.task is None:
            raise RuntimeError("reset(task, seed) the scene first")
        return self.task

    def success(self) -> bool:
        return task_success(self.world, self._task())

    def reward(self) -> float:
        return task_reward(self.world, self._task())


class ScriptedExpert:
    """Solves the sim tasks from privileged state (true cube/target positions), with
    analytic IK: the working arm's tip moves in straight Cartesian steps of at most
    `max_tip_step` metres per call toward a waypoint; the other arm goes home.

    It reads the world afresh each call, so it can take over from any state a policy left
    behind (an arm anywhere, the cube held, dropped or moved). Its only memory is the
    hysteresis of the phase it is in, dropped at every new episode.
    """

    APPROACH_HEIGHT = 0.08  # above the object before going down
    ALIGN_IN, ALIGN_OUT = 0.008, 0.025  # horizontal error to start / abandon a descent
    LIFT_TIP_Z = 0.20

    def __init__(self, world: SimWorld, max_tip_step: float = 0.03) -> None:
        self.world = world
        self.max_tip_step = float(max_tip_step)
        self._episode = -1
        self._descending = False
        self._closing = False

    def _sync_episode(self) -> None:
        if self._episode != self.world.episode:
            self._episode = self.world.episode
            self._descending = False
            self._closing = False

    def _toward(self, side: int, goal: np.ndarray, gripper: float) -> np.ndarray:
        """Joints for one Cartesian step of the tip toward `goal`; where that step has no
        exact IK solution (an arm left stretched or twisted), joints straight for the goal."""
        tip = self.world.tip(side)
        delta = goal - tip
        dist = float(np.linalg.norm(delta))
        if dist <= self.max_tip_step:
            return inverse_kinematics(side, goal, pitch=math.pi / 2, gripper=gripper)
        waypoint = tip + delta * (self.max_tip_step / dist)
        q = inverse_kinematics(side, waypoint, pitch=math.pi / 2, gripper=gripper)
        if np.linalg.norm(forward_kinematics(side, q).tip - waypoint) > 1e-3:
            return inverse_kinematics(side, goal, pitch=math.pi / 2, gripper=gripper)
        return q

    def _descend_to(self, side: int, point: np.ndarray) -> tuple[np.ndarray, bool]:
        """Tip goal above `point`, then down onto it; True once the tip is there."""
        tip = self.world.tip(side)
        horizontal = float(np.linalg.norm(tip[:2] - point[:2]))
        if horizontal > self.ALIGN_OUT:
            self._descending = False
        elif horizontal < self.ALIGN_IN:
            self._descending = True
        if not self._descending:
            return np.array([point[0], point[1], point[2] + self.APPROACH_HEIGHT]), False
        return point.copy(), bool(np.linalg.norm(tip - point) < 0.01)

    def action(self) -> np.ndarray:
        """The 14 joint targets (float32) for this tick."""
        self._sync_episode()
        w = self.world
        task = w.task or "pick_cube"
        arms = [HOME.copy(), HOME.copy()]
        if task == "pick_cube":
            if w.holder == LEFT:
                tip = w.tip(LEFT)
                arms[LEFT] = self._toward(LEFT, np.array([tip[0], tip[1], self.LIFT_TIP_Z]), 0.0)
            else:
                point = w.cube.copy()
                point[2] = max(point[2], CUBE_HALF)
                goal, arrived = self._descend_to(LEFT, point)
                grip = w.q[LEFT, -1]
                if not self._descending or (self._closing and grip < 0.1):
                    self._closing = False  # moved off, or closed on nothing: open, retry
                elif arrived and grip > 0.95:
                    self._closing = True
                arms[LEFT] = self._toward(LEFT, goal, 0.0 if self._closing else 1.0)
        else:
            point = w.target + np.array([0.0, 0.0, 0.01])
            goal, _ = self._descend_to(RIGHT, point)
            arms[RIGHT] = self._toward(RIGHT, goal, 0.0)
        return np.concatenate(arms).astype(np.float32)
