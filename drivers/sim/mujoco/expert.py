"""Scripted experts for the MuJoCo cell: privileged object poses in, 14 joint targets out.

Each arm follows a Cartesian reference for its gripper site (position plus a "pointing
down, fingers opening along yaw psi" orientation). Per control tick the reference moves
toward the phase's waypoint by at most TIP_SPEED / control_hz metres and ROT_SPEED /
control_hz radians, and damped least squares on the site Jacobian (mj_jacSite) turns it
into joint targets, warm-started from the last tick's solution. Where the arm has drifted
from the reference (a policy drove it, or it was pushed) the reference restarts from the
measured pose, so the expert can take over from any state. The IK weighs the hand's pitch
about its finger-opening axis lightly: near an arm's base, where pointing straight down
is out of reach (the elbow's +-1.6 rad limit keeps the wrist >= 0.42 m from the
shoulder), the hand tilts instead of missing the point.

The phases of each task are small state machines that re-read the world every tick: a
grasp that closed on nothing, or an object that slipped out, sends the arm back to
approach, so one miss costs time, not the episode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mujoco
import numpy as np

from drivers.sim.mujoco.scene import ARM_LOWER, ARM_UPPER, BASE_X, BLOCK_HALF, CUBE_HALF, HOME
from drivers.sim.mujoco.tasks import LEFT, RIGHT, bar_grasp_points
from drivers.sim.mujoco.world_view import ExpertWorld

TIP_SPEED = 0.30  # m/s of the reference in free motion
SLOW_SPEED = 0.12  # m/s for the last centimetres down onto an object and while pushing
ROT_SPEED = 2.5  # rad/s of the reference's orientation
APPROACH_HEIGHT = 0.08  # above a grasp point before going down
GRASP_MIN_Z = 0.02  # the site never goes below this in a grasp (fingers 5 mm off the table)
CLOSE_S = 0.35  # sim seconds the fingers get to close before the grasp is judged
RELEASE_S = 0.3
PUSH_PRESS = 0.03  # the pushing reference runs this far inside the block's back face
PUSH_RADIUS_RETRY = 0.03  # a pushed block further than this from the zone gets pushed again
RESYNC_M = 0.05  # reference further than this from the measured tip restarts from it
IK_ITERS = 4
IK_DAMPING = 0.03
ROT_WEIGHT = 0.3  # metres per radian in the IK error
PITCH_WEIGHT = 0.2  # of that, for tilting the hand about its finger-opening axis


def down_frame(psi: float) -> np.ndarray:
    """Hand frame pointing straight down, fingers opening along (-sin psi, cos psi, 0)."""
    c, s = math.cos(psi), math.sin(psi)
    return np.array([[0.0, -s, c], [0.0, c, s], [-1.0, 0.0, 0.0]])


def _wrap(a: float) -> float:
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def _quat(mat: np.ndarray) -> np.ndarray:
    q = np.empty(4)
    mujoco.mju_mat2Quat(q, np.ascontiguousarray(mat).reshape(-1))
    return q


def _rot_toward(current: np.ndarray, goal: np.ndarray, max_angle: float) -> np.ndarray:
    """Rotate `current` toward `goal` by at most `max_angle` radians (slerp)."""
    q0, q1 = _quat(current), _quat(goal)
    dot = float(np.dot(q0, q1))
    if dot < 0.0:
        q1, dot = -q1, -dot
    angle = 2.0 * math.acos(min(1.0, dot))
    if angle <= max_angle or angle < 1e-9:
        return goal.copy()
    t = max_angle / angle
    half = angle / 2.0
    q = (math.sin((1 - t) * half) * q0 + math.sin(t * half) * q1) / math.sin(half)
    q /= np.linalg.norm(q)
    out = np.empty(9)
    mujoco.mju_quat2Mat(out, q)
    return out.reshape(3, 3)


@dataclass
class Waypoint:
    """Where one arm's gripper site should go this tick, and its gripper (0 shut, 1 open)."""

    pos: np.ndarray
    psi: float
    grip: float
    slow: bool = False


class ArmIK:
    """Damped least squares IK for one arm's site on a scratch copy of the model's data."""

    def __init__(self, world: ExpertWorld) -> None:
        self.world = world
        self.data = mujoco.MjData(world.model)
        self._jacp = np.zeros((3, world.model.nv))
        self._jacr = np.zeros((3, world.model.nv))
        self._rot_w = np.array([ROT_WEIGHT, ROT_WEIGHT * PITCH_WEIGHT, ROT_WEIGHT])

    def solve(self, side: int, q0: np.ndarray, pos: np.ndarray, rot: np.ndarray) -> np.ndarray:
        w, m, d = self.world, self.world.model, self.data
        qadr, dof, site = w.arm_qpos[side], w.arm_dof[side], w.site[side]
        q = q0.copy()
        for _ in range(IK_ITERS):
            d.qpos[qadr] = q
            mujoco.mj_kinematics(m, d)
            mujoco.mj_comPos(m, d)
            r = d.site_xmat[site].reshape(3, 3)
            e_pos = pos - d.site_xpos[site]
            e_rot = 0.5 * (
                np.cross(r[:, 0], rot[:, 0])
                + np.cross(r[:, 1], rot[:, 1])
                + np.cross(r[:, 2], rot[:, 2])
            )
            mujoco.mj_jacSite(m, d, self._jacp, self._jacr, site)
            # Rotation rows in the goal's hand frame: pitch (about the finger-opening axis)
            # weighs little, so a goal too close to the base tilts the hand, not misses.
            jr = rot.T @ self._jacr[:, dof]
            er = rot.T @ e_rot
            jr *= self._rot_w[:, None]
            er *= self._rot_w
            jac = np.vstack([self._jacp[:, dof], jr])
            err = np.concatenate([e_pos, er])
            if float(np.dot(err, err)) < 1e-10:
                break
            dq = jac.T @ np.linalg.solve(jac @ jac.T + IK_DAMPING**2 * np.eye(6), err)
            norm = float(np.linalg.norm(dq))
            if norm > 0.4:
                dq *= 0.4 / norm
            q = np.clip(q + dq, ARM_LOWER[:6], ARM_UPPER[:6])
        return q


class MujocoExpert:
    """Solves the MuJoCo cell's tasks from privileged state; `action()` once per tick."""

    def __init__(self, world: ExpertWorld) -> None:
        self.world = world
        self.ik = ArmIK(world)
        self._episode = -1
        self._reset_memory()

    def _reset_memory(self) -> None:
        self.phase = ["idle", "idle"]
        self._since = [0, 0]  # substep count at which each arm entered its phase
        self._ref_pos: list[np.ndarray | None] = [None, None]
        self._ref_rot: list[np.ndarray | None] = [None, None]
        self._q: list[np.ndarray | None] = [None, None]
        self._push_dir: np.ndarray | None = None

    # --- phases -------------------------------------------------------------------------------
    def _go(self, side: int, phase: str) -> None:
        if self.phase[side] != phase:
            self.phase[side] = phase
            self._since[side] = self.world.steps

    def _in_phase(self, side: int) -> float:
        """Sim seconds in the present phase (from whole substeps: exact for any start time)."""
        return (self.world.steps - self._since[side]) * self.world.dt

    def _psi_near(self, side: int, psi: float, symmetry: float) -> float:
        """Of psi + k * symmetry, the yaw nearest the hand's present one (no wrist spins)."""
        y = self.world.hand_frame(side)[:, 1]
        if abs(y[2]) > 0.9:  # hand not pointing down: the yaw the arm faces along
            tip = self.world.tip(side)
            now = math.atan2(tip[1], tip[0] - BASE_X * (-1.0 if side == LEFT else 1.0))
        else:
            now = math.atan2(-y[0], y[1])
        k = round(_wrap(now - psi) / symmetry)
        return psi + k * symmetry

    def _grasp(
        self, side: int, name: str, point: np.ndarray, psi: float, next_phase: str
    ) -> Waypoint:
        """Approach above `point`, go down, close; on a hold go to `next_phase`."""
        w = self.world
        p = point.copy()
        p[2] = max(p[2], GRASP_MIN_Z)
        tip = w.tip(side)
        above = p + np.array([0.0, 0.0, APPROACH_HEIGHT])
        phase = self.phase[side]
        horizontal = float(np.linalg.norm(tip[:2] - p[:2]))
        if phase not in ("approach", "descend", "close"):
            self._go(side, "approach")
            phase = "approach"
        if phase == "approach":
            if np.linalg.norm(tip - above) < 0.012:
                self._go(side, "descend")
            return Waypoint(above, psi, 1.0)
        if phase == "descend":
            if horizontal > 0.02:
                self._go(side, "approach")
                return Waypoint(above, psi, 1.0)
            if np.linalg.norm(tip - p) < 0.006:
                self._go(side, "close")
            return Waypoint(p, psi, 1.0, slow=True)
        # close
        if self._in_phase(side) >= CLOSE_S:
            if w.holds(side, name):
                self._go(side, next_phase)
            else:
                self._go(side, "approach")
                return Waypoint(above, psi, 1.0)
        return Waypoint(p, psi, 0.0)

    # --- tasks ---------------------------------------------------------------------------------
    def _handover(self) -> list[Waypoint | None]:
        w = self.world
        left_at, right_at = bar_grasp_points(w)
        axis = right_at - left_at
        bar_psi = math.atan2(axis[1], axis[0])  # fingers open across the bar
        plan: list[Waypoint | None] = [None, None]
        present = np.array([-0.04, 0.0, 0.16])
        # left arm
        lp = self.phase[LEFT]
        right_holds = w.holds(RIGHT, "bar")
        if lp in ("release", "retreat", "done"):
            tip = w.tip(LEFT)
            if lp == "release":
                plan[LEFT] = Waypoint(tip, self._psi_near(LEFT, 0.0, math.pi), 1.0)
                if self._in_phase(LEFT) >= RELEASE_S:
                    self._go(LEFT, "retreat")
            elif lp == "retreat":
                up = np.array([tip[0] - 0.02, tip[1], 0.28])
                plan[LEFT] = Waypoint(up, self._psi_near(LEFT, 0.0, math.pi), 1.0)
                if tip[2] > 0.25:
                    self._go(LEFT, "done")
        elif lp in ("carry", "present"):
            if not w.holds(LEFT, "bar"):
                self._go(LEFT, "approach")
                plan[LEFT] = self._grasp(LEFT, "bar", left_at, bar_psi, "carry")
            else:
                tip = w.tip(LEFT)
                psi = self._psi_near(LEFT, 0.0, math.pi)
                if tip[2] < 0.12 and np.linalg.norm(tip[:2] - present[:2]) > 0.03:
                    goal = np.array([tip[0], tip[1], present[2]])
                else:
                    goal = present
                plan[LEFT] = Waypoint(goal, psi, 0.0)
                if np.linalg.norm(tip - present) < 0.012:
                    self._go(LEFT, "present")
                if lp == "present" and right_holds and self.phase[RIGHT] == "hold":
                    self._go(LEFT, "release")
        else:
            plan[LEFT] = self._grasp(
                LEFT,
                "bar",
                left_at,
                self._psi_near(LEFT, bar_psi, math.pi),
                "carry",
            )
        # right arm
        rp = self.phase[RIGHT]
        bar_up = w.object_pos("bar")[2] > 0.08
        if self.phase[LEFT] in ("present", "release", "retreat", "done") and bar_up:
            psi = self._psi_near(RIGHT, bar_psi, math.pi)
            if rp == "hold":
                if not right_holds and self._in_phase(RIGHT) > 0.2:
                    self._go(RIGHT, "approach")
                tip = w.tip(RIGHT)
                goal = right_at if self.phase[LEFT] != "done" else np.array([tip[0], tip[1], 0.20])
                plan[RIGHT] = Waypoint(goal, psi, 0.0)
            else:
                plan[RIGHT] = self._grasp(RIGHT, "bar", right_at, psi, "hold")
        return plan

    def _place(self) -> list[Waypoint | None]:
        w = self.world
        cube = w.object_pos("cube")
        pad = w.target_pos()
        mat = w.object_mat("cube")
        cube_psi = math.atan2(mat[1, 0], mat[0, 0])
        tip = w.tip(RIGHT)
        plan: list[Waypoint | None] = [None, None]
        rp = self.phase[RIGHT]
        psi_now = self._psi_near(RIGHT, cube_psi, math.pi / 2)
        if rp in ("carry", "lower"):
            if not w.holds(RIGHT, "cube"):
                self._go(RIGHT, "approach")
                plan[RIGHT] = self._grasp(RIGHT, "cube", cube, psi_now, "carry")
                return plan
            offset = tip - cube  # the cube's place in the hand
            above = np.array([pad[0], pad[1], 0.12]) + np.array([offset[0], offset[1], 0.0])
            if rp == "carry":
                if tip[2] < 0.10 and np.linalg.norm(tip[:2] - above[:2]) > 0.03:
                    goal = np.array([tip[0], tip[1], 0.12])
                else:
                    goal = above
                if np.linalg.norm(tip - above) < 0.012:
                    self._go(RIGHT, "lower")
                plan[RIGHT] = Waypoint(goal, psi_now, 0.0)
            else:
                down = above.copy()
                down[2] = CUBE_HALF + 0.003 + offset[2]
                plan[RIGHT] = Waypoint(down, psi_now, 0.0, slow=True)
                if cube[2] < CUBE_HALF + 0.004 or np.linalg.norm(tip - down) < 0.004:
                    self._go(RIGHT, "release")
        elif rp == "release":
            plan[RIGHT] = Waypoint(tip, psi_now, 1.0)
            if self._in_phase(RIGHT) >= RELEASE_S:
                self._go(RIGHT, "retreat")
        elif rp == "retreat":
            plan[RIGHT] = Waypoint(np.array([tip[0], tip[1], 0.15]), psi_now, 1.0)
        else:
            plan[RIGHT] = self._grasp(RIGHT, "cube", cube, psi_now, "carry")
        return plan

    def _push(self) -> list[Waypoint | None]:
        w = self.world
        block = w.object_pos("block")
        target = w.target_pos()
        to_go = target[:2] - block[:2]
        dist = float(np.linalg.norm(to_go))
        if self._push_dir is None or dist > 0.02:
            self._push_dir = to_go / max(dist, 1e-9)
        u = self._push_dir
        mat = w.object_mat("block")
        rel = math.atan2(mat[1, 0], mat[0, 0]) - math.atan2(u[1], u[0])
        extent = BLOCK_HALF[0] * (abs(math.cos(rel)) + abs(math.sin(rel)))
        push_z = 0.025
        grip = 0.35
        psi = self._psi_near(LEFT, math.atan2(u[1], u[0]), math.pi)
        tip = w.tip(LEFT)
        rel_tip = tip[:2] - block[:2]
        along = float(np.dot(rel_tip, u))
        lateral = abs(float(u[0] * rel_tip[1] - u[1] * rel_tip[0]))
        behind = block[:2] - u * (extent + 0.012 + 0.02)
        plan: list[Waypoint | None] = [None, None]
        lp = self.phase[LEFT]
        if lp not in ("above", "lower", "push", "lift", "done"):
            self._go(LEFT, "above")
            lp = "above"
        if lp == "push":
            if dist < 0.008:
                self._go(LEFT, "done")
            elif lateral > 0.025 or along > -0.5 * extent or tip[2] > 0.05:
                self._go(LEFT, "lift")
            else:
                contact = block[:2] - u * (extent + 0.012 - PUSH_PRESS)
                plan[LEFT] = Waypoint(np.r_[contact, push_z], psi, grip, slow=True)
                return plan
            lp = self.phase[LEFT]
        if lp == "done":
            back = tip[:2] - u * 0.03
            plan[LEFT] = Waypoint(np.r_[back, 0.09], psi, grip)
            if dist > PUSH_RADIUS_RETRY:
                self._go(LEFT, "lift")
            return plan
        if lp == "lift":
            back = tip[:2] - u * 0.02
            plan[LEFT] = Waypoint(np.r_[back, 0.09], psi, grip)
            if tip[2] > 0.07:
                self._go(LEFT, "above")
            return plan
        if lp == "above":
            plan[LEFT] = Waypoint(np.r_[behind, 0.09], psi, grip)
            if np.linalg.norm(tip[:2] - behind) < 0.01:
                self._go(LEFT, "lower")
            return plan
        # lower
        plan[LEFT] = Waypoint(np.r_[behind, push_z], psi, grip, slow=True)
        if np.linalg.norm(tip[:2] - behind) > 0.02:
            self._go(LEFT, "above")
        elif abs(tip[2] - push_z) < 0.006:
            self._go(LEFT, "push")
        return plan

    # --- output ----------------------------------------------------------------------------------
    def _track(self, side: int, wp: Waypoint) -> np.ndarray:
        """Joint targets (7,) for one tick along the reference toward waypoint `wp`."""
        w = self.world
        step = 1.0 / w.control_hz
        tip, frame = w.tip(side), w.hand_frame(side)
        pos, rot, q = self._ref_pos[side], self._ref_rot[side], self._q[side]
        if pos is None or rot is None or q is None or np.linalg.norm(pos - tip) > RESYNC_M:
            pos, rot, q = tip, frame, w.q[side, :6].copy()
        delta = wp.pos - pos
        dist = float(np.linalg.norm(delta))
        max_step = (SLOW_SPEED if wp.slow else TIP_SPEED) * step
        pos = wp.pos.copy() if dist <= max_step else pos + delta * (max_step / dist)
        rot = _rot_toward(rot, down_frame(wp.psi), ROT_SPEED * step)
        q = self.ik.solve(side, q, pos, rot)
        self._ref_pos[side], self._ref_rot[side], self._q[side] = pos, rot, q
        return np.r_[q, wp.grip]

    def action(self) -> np.ndarray:
        """The 14 joint targets (float32) for this tick."""
        w = self.world
        if self._episode != w.episode:
            self._episode = w.episode
            self._reset_memory()
        if w.task == "handover_bar":
            plan = self._handover()
        elif w.task == "place_cube":
            plan = self._place()
        else:
            plan = self._push()
        out = []
        for side in (LEFT, RIGHT):
            wp = plan[side]
            if wp is None:
                self._ref_pos[side] = self._ref_rot[side] = self._q[side] = None
                out.append(HOME.copy())
            else:
                out.append(self._track(side, wp))
        return np.concatenate(out).astype(np.float32)
