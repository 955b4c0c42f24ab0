"""A cheap kinematic dual-arm cell: two 7-servo arms at the ends of a table, a cube, a target.

World frame: metres, origin at the centre of the table top, x to the right as seen from
the front camera, y away from it, z up. The table top is the plane z = 0 over
|x| <= TABLE_HALF_X, |y| <= TABLE_HALF_Y; the floor is at z = FLOOR_Z.

Each arm stands at one end of the table (left at -x facing +x, right at +x facing -x) and
has the servo order and limits of `protos.joint_layout` (waist, shoulder, elbow, forearm_roll,
wrist_angle, wrist_rotate, gripper). Its forward kinematics, all joints at 0: upper arm
straight up from the shoulder, forearm and gripper pointing horizontally at the other arm.

- waist: yaw about +z;
- shoulder, elbow, wrist_angle: pitch, positive tips the next link forward/down;
- forearm_roll, wrist_rotate: roll about the link's own axis (the first turns the wrist's
  pitch plane, the second only the gripper fingers);
- gripper: 0 closed .. 1 open (normalised travel).

Servos are ideal position trackers with a velocity limit (no dynamics, no collisions): a
later issue swaps this module for MuJoCo beneath the same device classes.

Grasping is kinematic too: when a gripper closes (its position crosses GRASP_CLOSE going
down) with its tip within GRASP_RADIUS of the cube's centre, the cube attaches to that
gripper and moves with it; the fingers then stop at GRIPPER_ON_CUBE. Opening the gripper
past GRASP_CLOSE releases it and the cube drops straight onto the table.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from protos.joint_layout import ARM_SIDES, JOINT_LOWER, JOINT_UPPER, JOINTS_PER_ARM

# --- geometry (metres) ----------------------------------------------------------------
TABLE_HALF_X = 0.50
TABLE_HALF_Y = 0.40
FLOOR_Z = -0.75
BASE_X = 0.42  # arm bases at x = -BASE_X (left) and +BASE_X (right), y = 0, on the table
SHOULDER_HEIGHT = 0.10
UPPER_ARM = 0.30
FOREARM = 0.30
HAND = 0.15  # wrist pitch axis to gripper tip
FINGER = 0.05  # finger length drawn back from the tip

BASES = np.array([[-BASE_X, 0.0, 0.0], [BASE_X, 0.0, 0.0]])
HEADINGS = np.array([0.0, math.pi])  # yaw of each arm's "forward" at waist = 0

CUBE_HALF = 0.02
TARGET_RADIUS = 0.03  # drawn size of the target marker on the table

GRASP_RADIUS = 0.03  # tip-to-cube-centre distance within which closing grasps it
GRASP_CLOSE = 0.5  # gripper position below which the fingers are "closed"
GRIPPER_ON_CUBE = 0.3  # where the fingers stop when they hold the cube

# --- servos -----------------------------------------------------------------------------
JOINT_SPEED = 3.0  # rad/s for the six joints
GRIPPER_SPEED = 4.0  # normalised travel per second
ARM_LOWER = JOINT_LOWER[:JOINTS_PER_ARM].astype(np.float64)
ARM_UPPER = JOINT_UPPER[:JOINTS_PER_ARM].astype(np.float64)
SPEEDS = np.array([JOINT_SPEED] * (JOINTS_PER_ARM - 1) + [GRIPPER_SPEED])

#: Rest pose of one arm: gripper open, hand pointing down in front of the base.
HOME = np.array([0.0, -0.4, 0.8, 0.0, 1.0, 0.0, 1.0])

# Where reset() places things (world frame, on the table top).
CUBE_REGION = ((-0.22, 0.02), (-0.15, 0.15))  # x range, y range: in front of the left arm
TARGET_REGION = ((-0.02, 0.22), (-0.15, 0.15))  # in front of the right arm


def _rz(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def _ry(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _rx(a: float) -> np.ndarray:
    c, s = math.cos(a), math.sin(a)
    return np.array([[1.0, 0.0, 0.0], [0.0, c, -s], [0.0, s, c]])


@dataclass(frozen=True)
class ArmPose:
    """One arm's forward kinematics: key points (world, metres) and the hand's frame."""

    base: np.ndarray  # (3,) on the table
    shoulder: np.ndarray  # (3,)
    elbow: np.ndarray  # (3,)
    wrist: np.ndarray  # (3,)
    tip: np.ndarray  # (3,) between the finger tips
    hand: np.ndarray  # (3, 3) columns: approach (x), finger-opening (y), normal (z)

    def points(self) -> np.ndarray:
        """(5, 3) base, shoulder, elbow, wrist, tip: the arm drawn as a polyline."""
        return np.stack([self.base, self.shoulder, self.elbow, self.wrist, self.tip])


def forward_kinematics(side: int, q: np.ndarray) -> ArmPose:
    """Key points of arm `side` (0 left, 1 right) at joint positions `q` (7,)."""
    base = BASES[side]
    shoulder = base + np.array([0.0, 0.0, SHOULDER_HEIGHT])
    r1 = _rz(HEADINGS[side] + q[0]) @ _ry(q[1])
    elbow = shoulder + r1[:, 2] * UPPER_ARM
    r2 = r1 @ _ry(q[2])
    wrist = elbow + r2[:, 0] * FOREARM
    r3 = r2 @ _rx(q[3]) @ _ry(q[4]) @ _rx(q[5])
    tip = wrist + r3[:, 0] * HAND
    return ArmPose(base=base, shoulder=shoulder, elbow=elbow, wrist=wrist, tip=tip, hand=r3)


def _wrap(a: float) -> float:
    return (a + math.pi) % (2.0 * math.pi) - math.pi


def inverse_kinematics(
    side: int, tip: np.ndarray, pitch: float = math.pi / 2, gripper: float = 1.0
) -> np.ndarray:
    """Joint positions (7,) putting arm `side`'s tip at `tip` with the hand pitched `pitch`
    below horizontal (pi/2: pointing straight down), rolls at 0, elbow up.

    Analytic (waist yaw, then a two-link planar solve for the wrist point); an unreachable
    point gives the nearest stretched pose, and the result is clamped to the joint limits.
    """
    shoulder = BASES[side] + np.array([0.0, 0.0, SHOULDER_HEIGHT])
    d = np.asarray(tip, dtype=np.float64) - shoulder
    yaw = _wrap(math.atan2(d[1], d[0]) - HEADINGS[side])
    r = math.hypot(d[0], d[1])
    # The wrist point in the arm's vertical plane (forward, up), relative to the shoulder.
    rw = r - HAND * math.cos(pitch)
    zw = d[2] + HAND * math.sin(pitch)
    dist = max(math.hypot(rw, zw), 1e-6)
    reach = UPPER_ARM + FOREARM
    if dist > reach:
        rw, zw, dist = rw * reach / dist, zw * reach / dist, reach
    cos_a = (UPPER_ARM**2 + dist**2 - FOREARM**2) / (2.0 * UPPER_ARM * dist)
    theta1 = math.atan2(zw, rw) + math.acos(min(1.0, max(-1.0, cos_a)))  # upper arm elevation
    ex, ez = UPPER_ARM * math.cos(theta1), UPPER_ARM * math.sin(theta1)
    theta2 = math.atan2(zw - ez, rw - ex)  # forearm elevation
    q1 = math.pi / 2 - theta1
    q2 = -theta2 - q1
    q4 = pitch + theta2
    q = np.array([yaw, q1, q2, 0.0, q4, 0.0, gripper])
    return np.clip(q, ARM_LOWER, ARM_UPPER)


# A time within this many substeps past a grid time counts as that grid time. A control loop
# asks for `start + k * period` on the cell's absolute sim time, and the rounding of that sum
# grows with the time: it must never cost a tick an extra substep, or the same scene plays
# differently on a cell that has run longer (fleet eval's determinism; with the loop's old
# running sum, a tick 200 s into a cell's life came out a substep long). 1e-4 substeps is
# far above the rounding of a clock years old and far below any time a loop means to ask.
GRID_TOLERANCE_STEPS = 1e-4


def grid_index(t: float, dt: float) -> int:
    """Index of the first substep time (k * dt) at or after `t`."""
    return math.ceil(t / dt - GRID_TOLERANCE_STEPS)


class SimWorld:
    """The state of one simulated cell, stepped in fixed substeps of `dt` seconds.

    Time is an integer count of substeps (`time = steps * dt`), so it never drifts and
    nothing depends on how fast the host runs. Only `step()` (driven by the sim clock) and
    `reset()` change the state; `revision` counts both, so renders can be cached.
    """

    def __init__(self, dt: float = 0.005) -> None:
        if not dt > 0:
            raise ValueError("dt must be > 0")
        self.dt = float(dt)
        self.steps = 0
        self.revision = 0
        self.q = np.tile(HOME, (2, 1))
        self.goal = self.q.copy()
        self.velocity = np.zeros_like(self.q)
        self.torque = np.ones(2, dtype=bool)
        self.cube = np.array([0.0, 0.0, CUBE_HALF])
        self.target = np.array([0.1, 0.0, 0.0])
        self.holder: int | None = None  # which arm holds the cube
        self._hold_offset = np.zeros(3)  # cube centre in the holding hand's frame
        self.task: str | None = None
        self.seed: int | None = None
        self.episode = 0
        self.t_reset = 0.0
        self._poses: list[ArmPose] | None = None

    # --- time -----------------------------------------------------------------------------
    @property
    def time(self) -> float:
        return self.steps * self.dt

    def steps_until(self, t: float) -> int:
        """Substeps needed to reach the first grid time >= t (0 if already there)."""
        return max(0, grid_index(t, self.dt) - self.steps)

    # --- state ------------------------------------------------------------------------------
    def reset(self, task: str | None, seed: int) -> None:
        """Arms home (torque on), cube and target placed at random from `seed` alone, so an
        episode seed gives the same scene on every cell."""
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])
        (cx0, cx1), (cy0, cy1) = CUBE_REGION
        (tx0, tx1), (ty0, ty1) = TARGET_REGION
        self.cube = np.array([rng.uniform(cx0, cx1), rng.uniform(cy0, cy1), CUBE_HALF])
        self.target = np.array([rng.uniform(tx0, tx1), rng.uniform(ty0, ty1), 0.0])
        self.q = np.tile(HOME, (2, 1))
        self.goal = self.q.copy()
        self.velocity = np.zeros_like(self.q)
        self.torque[:] = True
        self.holder = None
        self.task = task
        self.seed = int(seed)
        self.episode += 1
        self.t_reset = self.time
        self._changed()

    def set_goal(self, side: int, position: np.ndarray) -> None:
        """A servo chain's goal positions; the servos clamp them to their limits."""
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != (JOINTS_PER_ARM,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"goal must be {JOINTS_PER_ARM} finite values, got {position!r}")
        if self.torque[side]:
            self.goal[side] = np.clip(pos, ARM_LOWER, ARM_UPPER)

    def set_torque(self, side: int, enabled: bool) -> None:
        """Torque off: the servos stop where they are and ignore goals. Torque on: the goal
        becomes the present position, so enabling never jumps."""
        self.torque[side] = bool(enabled)
        self.goal[side] = self.q[side]

    def step(self, n: int = 1) -> None:
        """Advance `n` substeps: servos move toward their goals, the cube follows a grasp."""
        for _ in range(n):
            prev_grip = self.q[:, -1].copy()
            limit = SPEEDS * self.dt
            delta = np.clip(self.goal - self.q, -limit, limit)
            delta[~self.torque] = 0.0
            q = np.clip(self.q + delta, ARM_LOWER, ARM_UPPER)
            if self.holder is not None:
                q[self.holder, -1] = max(q[self.holder, -1], GRIPPER_ON_CUBE)
            self.velocity = (q - self.q) / self.dt
            self.q = q
            self.steps += 1
            self._poses = None
            self._update_cube(prev_grip)
        self._changed()

    def _update_cube(self, prev_grip: np.ndarray) -> None:
        grip = self.q[:, -1]
        if self.holder is not None:
            if grip[self.holder] > GRASP_CLOSE:  # opened: release, the cube drops
                self.holder = None
                self.cube = np.array(
                    [
                        np.clip(self.cube[0], -TABLE_HALF_X + CUBE_HALF, TABLE_HALF_X - CUBE_HALF),
                        np.clip(self.cube[1], -TABLE_HALF_Y + CUBE_HALF, TABLE_HALF_Y - CUBE_HALF),
                        CUBE_HALF,
                    ]
                )
            else:
                pose = self.poses()[self.holder]
                cube = pose.tip + pose.hand @ self._hold_offset
                cube[2] = max(cube[2], CUBE_HALF)  # no sinking into the table
                self.cube = cube
            return
        for side in range(2):
            closing = prev_grip[side] >= GRASP_CLOSE > grip[side]
            if not closing:
                continue
            pose = self.poses()[side]
            if np.linalg.norm(pose.tip - self.cube) <= GRASP_RADIUS:
                self.holder = side
                self._hold_offset = pose.hand.T @ (self.cube - pose.tip)
                self.q[side, -1] = max(self.q[side, -1], GRIPPER_ON_CUBE)
                return

    def _changed(self) -> None:
        self._poses = None
        self.revision += 1

    # --- derived --------------------------------------------------------------------------------
    def poses(self) -> list[ArmPose]:
        """Forward kinematics of both arms at the present positions (cached per state)."""
        if self._poses is None:
            self._poses = [forward_kinematics(s, self.q[s]) for s in range(2)]
        return self._poses

    def tip(self, side: int) -> np.ndarray:
        return self.poses()[side].tip

    def joint_positions(self) -> np.ndarray:
        """(14,) float64, left arm then right arm."""
        return self.q.reshape(-1).copy()

    @staticmethod
    def side_index(side: str) -> int:
        return ARM_SIDES.index(side)
