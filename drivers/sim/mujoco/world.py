"""One MuJoCo dual-arm cell on a sim clock: servo goals in, joint state and frames out.

Time is an integer count of fixed physics substeps (`time = steps * TIMESTEP`), so a run
depends only on the seed and the sequence of goals and times asked for, never on how fast
the host is. MuJoCo itself is deterministic for one model and one thread.

Servo-link hook: a simulated Dynamixel chain (the pty peer) backs onto this physics with
exactly two calls per sync transaction: `set_goal(side, position7)` for a GroupSyncWrite of
goal positions (or `set_goals(q14)` for both arms), and `joint_positions()` /
`joint_velocities()` (or the per-arm `q` / `velocity` rows) for a GroupSyncRead.
`set_torque(side, enabled)` is the torque-enable register. The attribute names match the
kinematic stand-in's SimWorld (`q`, `goal`, `velocity`, `torque`, `holder`, `steps_until`,
`step`, `revision`, `episode`, `seed`, `task`, `t_reset`), so its SimArmBus and SimClock
drive this world unchanged.
"""

from __future__ import annotations

import logging
import math

import mujoco
import numpy as np

from drivers.sim.mujoco import scene
from drivers.sim.mujoco.expert import MujocoExpert
from drivers.sim.mujoco.render import CellRenderer
from drivers.sim.mujoco.scene import (
    ARM_LOWER,
    ARM_UPPER,
    FINGER_TRAVEL,
    HOME,
    OBJECTS,
    TIMESTEP,
    Names,
    build_model,
)
from drivers.sim.mujoco.tasks import (
    MUJOCO_TASKS,
    TASK_OBJECT,
    check_task,
    place_objects,
    task_reward,
    task_success,
)
from drivers.sim.world import grid_index
from protos.joint_layout import ARM_SIDES, JOINT_DIM, JOINTS_PER_ARM

log = logging.getLogger(__name__)

LOWER14 = np.tile(ARM_LOWER, 2)
UPPER14 = np.tile(ARM_UPPER, 2)


class MujocoWorld:
    """A simulated cell with contact physics: two 7-servo arms, a table, task objects.

    `MujocoWorld(seed)` is ready to run: reset to `task` (default: the first task) with
    `seed`. `control_hz` is only the rate the scripted expert plans its steps for.
    """

    def __init__(self, seed: int = 0, task: str | None = None, control_hz: float = 50.0) -> None:
        if not control_hz > 0:
            raise ValueError("control_hz must be > 0")
        self.tasks: tuple[str, ...] = MUJOCO_TASKS
        self.control_hz = float(control_hz)
        self.dt = TIMESTEP
        self.model = build_model()
        self.data = mujoco.MjData(self.model)
        m = self.model
        self._names = [Names(side) for side in ARM_SIDES]

        def jid(name: str) -> int:
            return mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_JOINT, name)

        def gid(name: str) -> int:
            return mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_GEOM, name)

        arm_joints = [[jid(n.joint(i)) for i in range(6)] for n in self._names]
        finger_joints = [[jid(f) for f in n.fingers] for n in self._names]
        #: per arm, qpos / dof addresses of the six arm joints
        self.arm_qpos = np.array([[m.jnt_qposadr[j] for j in js] for js in arm_joints])
        self.arm_dof = np.array([[m.jnt_dofadr[j] for j in js] for js in arm_joints])
        self.finger_qpos = np.array([[m.jnt_qposadr[j] for j in js] for js in finger_joints])
        self.finger_dof = np.array([[m.jnt_dofadr[j] for j in js] for js in finger_joints])
        # 14-vector read-out: each value is the mean of two addresses (a joint twice, or the
        # gripper's two fingers), scaled (fingers: metres -> normalised travel).
        qa, qb, va, vb = [], [], [], []
        for s in range(2):
            qa += [*self.arm_qpos[s], self.finger_qpos[s, 0]]
            qb += [*self.arm_qpos[s], self.finger_qpos[s, 1]]
            va += [*self.arm_dof[s], self.finger_dof[s, 0]]
            vb += [*self.arm_dof[s], self.finger_dof[s, 1]]
        self._qa, self._qb = np.array(qa), np.array(qb)
        self._va, self._vb = np.array(va), np.array(vb)
        self._scale = np.tile(np.r_[np.ones(6), 1.0 / FINGER_TRAVEL], 2)
        self.site = np.array(
            [mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_SITE, n.site) for n in self._names]
        )
        self.finger_geoms = np.array([[gid(f) for f in n.fingers] for n in self._names])
        self.palm_geoms = np.array([gid(n.palm) for n in self._names])
        self.object_body = {o: mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, o) for o in OBJECTS}
        self.object_geom = {o: gid(o) for o in OBJECTS}
        self.object_qpos = {o: int(m.jnt_qposadr[jid(o)]) for o in OBJECTS}
        self.object_dof = {o: int(m.jnt_dofadr[jid(o)]) for o in OBJECTS}
        self.target_mocap = int(
            m.body_mocapid[mujoco.mj_name2id(m, mujoco.mjtObj.mjOBJ_BODY, "target")]
        )
        # actuators: per arm, 6 joints then 2 fingers (scene order)
        self._act = np.arange(m.nu).reshape(2, 8)
        self._gain = m.actuator_gainprm[:, 0].copy()
        self._bias = m.actuator_biasprm[:, :3].copy()

        self.steps = 0
        self.revision = 0
        self.episode = 0
        self.seed: int | None = None
        self.task: str | None = None
        self.t_reset = 0.0
        self._clock_base = 0  # advance() counts from this substep ...
        self._clock_t = 0.0  # ... this many seconds
        self.goal = np.tile(HOME, (2, 1))
        self.torque = np.ones(2, dtype=bool)
        self.info: dict[str, float] = {}  # task layout from the last reset (target pose etc.)
        self._expert: MujocoExpert | None = None
        self._renderers: dict[tuple[int, int], CellRenderer] = {}
        self.reset(task if task is not None else self.tasks[0], seed)

    # --- time --------------------------------------------------------------------------------
    @property
    def time(self) -> float:
        """Sim seconds since the world was made (never reset, so a clock stays monotonic)."""
        return self.steps * self.dt

    def steps_until(self, t: float) -> int:
        """Substeps needed to reach the first grid time >= t (0 if already there)."""
        return max(0, grid_index(t, self.dt) - self.steps)

    def step(self, n: int = 1) -> None:
        """Advance `n` physics substeps."""
        if n > 0:
            mujoco.mj_step(self.model, self.data, nstep=int(n))
            self.steps += int(n)
            self.revision += 1

    def advance(self, dt: float) -> None:
        """Advance sim time by `dt` seconds (whole substeps; the remainder carries over to
        the next call, so 1/30 s ticks do not drift). Counted from the episode's reset, so
        an episode runs the same whatever the world's absolute time."""
        if not dt >= 0:
            raise ValueError("dt must be >= 0")
        if self.steps - self._clock_base > grid_index(self._clock_t, self.dt):
            self._clock_base, self._clock_t = self.steps, 0.0  # stepped by someone else
        self._clock_t += float(dt)
        target = self._clock_base + grid_index(self._clock_t, self.dt)
        self.step(target - self.steps)

    # --- episode -----------------------------------------------------------------------------
    def reset(self, task: str, seed: int) -> None:
        """Arms home (torque on, grippers open), task objects placed from `seed` alone, the
        others parked out of sight."""
        check_task(task)
        m, d = self.model, self.data
        mujoco.mj_resetData(m, d)
        self.torque[:] = True
        m.actuator_gainprm[:, 0] = self._gain
        m.actuator_biasprm[:, :3] = self._bias
        for s in range(2):
            d.qpos[self.arm_qpos[s]] = HOME[:6]
            d.qpos[self.finger_qpos[s]] = HOME[6] * FINGER_TRAVEL
        self.goal = np.tile(HOME, (2, 1))
        self._apply_goals()
        for name in OBJECTS:
            self.place(name, scene.PARK[name] + np.array([0, 0, scene.FLOOR_Z]), 0.0)
        rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x3D0C0])
        self.info = place_objects(self, task, rng)
        mujoco.mj_forward(m, d)
        self.task = task
        self.seed = int(seed)
        self.episode += 1
        self.t_reset = self.time
        self._clock_base, self._clock_t = self.steps, 0.0
        self.revision += 1
        log.debug("mujoco world reset: task %s seed %d episode %d", task, seed, self.episode)

    def place(self, name: str, xy_z: np.ndarray, yaw: float) -> None:
        """Put object `name` at rest: its bottom face at xy_z's z, its centre above (x, y)."""
        half = scene.OBJECT_HALF[name]
        a = self.object_qpos[name]
        p = np.asarray(xy_z, dtype=np.float64)
        self.data.qpos[a : a + 3] = [p[0], p[1], p[2] + half[2]]
        self.data.qpos[a + 3 : a + 7] = [math.cos(yaw / 2), 0.0, 0.0, math.sin(yaw / 2)]
        dof = self.object_dof[name]
        self.data.qvel[dof : dof + 6] = 0.0

    def set_target(self, xy: np.ndarray) -> None:
        """Move the target pad / zone marker (a mocap body drawn on the table)."""
        self.data.mocap_pos[self.target_mocap] = [xy[0], xy[1], 0.0]

    # --- servos ------------------------------------------------------------------------------
    def _apply_goals(self) -> None:
        ctrl = self.data.ctrl
        for s in range(2):
            ctrl[self._act[s, :6]] = self.goal[s, :6]
            ctrl[self._act[s, 6:]] = self.goal[s, 6] * FINGER_TRAVEL

    def set_goal(self, side: int, position: np.ndarray) -> None:
        """One arm's 7 goal positions (a servo chain's sync write); clamped to the limits,
        ignored while that arm's torque is off."""
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != (JOINTS_PER_ARM,) or not np.all(np.isfinite(pos)):
            raise ValueError(f"goal must be {JOINTS_PER_ARM} finite values, got {position!r}")
        if self.torque[side]:
            self.goal[side] = np.clip(pos, ARM_LOWER, ARM_UPPER)
            self._apply_goals()

    def set_goals(self, q14: np.ndarray) -> np.ndarray:
        """Both arms' goals (14, protos.joint_layout order), clamped to the joint limits; returns
        the goals now in force."""
        q = np.asarray(q14, dtype=np.float64).reshape(-1)
        if q.shape != (JOINT_DIM,) or not np.all(np.isfinite(q)):
            raise ValueError(f"goals must be {JOINT_DIM} finite values, got shape {q.shape}")
        for s in range(2):
            if self.torque[s]:
                self.goal[s] = np.clip(q[s * 7 : s * 7 + 7], ARM_LOWER, ARM_UPPER)
        self._apply_goals()
        return self.goal.reshape(-1).copy()

    def set_torque(self, side: int, enabled: bool) -> None:
        """Torque off: that arm's actuators go limp (the counterbalanced links stay roughly
        where they are) and goals are ignored. Torque on: the present position becomes the
        goal, so enabling never jumps."""
        self.torque[side] = bool(enabled)
        acts = self._act[side]
        if enabled:
            self.model.actuator_gainprm[acts, 0] = self._gain[acts]
            self.model.actuator_biasprm[acts, :3] = self._bias[acts]
        else:
            self.model.actuator_gainprm[acts, 0] = 0.0
            self.model.actuator_biasprm[acts, :3] = 0.0
        self.goal[side] = np.clip(self.q[side], ARM_LOWER, ARM_UPPER)
        self._apply_goals()

    # --- state -------------------------------------------------------------------------------
    def joint_positions(self) -> np.ndarray:
        """(14,) float64 present positions, left arm then right (gripper normalised)."""
        qpos = self.data.qpos
        return (qpos[self._qa] + qpos[self._qb]) * 0.5 * self._scale

    def joint_velocities(self) -> np.ndarray:
        """(14,) float64 present velocities (rad/s; gripper in normalised travel per s)."""
        qvel = self.data.qvel
        return (qvel[self._va] + qvel[self._vb]) * 0.5 * self._scale

    @property
    def q(self) -> np.ndarray:
        """(2, 7) present positions, one row per arm."""
        return self.joint_positions().reshape(2, JOINTS_PER_ARM)

    @property
    def velocity(self) -> np.ndarray:
        return self.joint_velocities().reshape(2, JOINTS_PER_ARM)

    def tip(self, side: int) -> np.ndarray:
        """World position of arm `side`'s gripper site (the middle of the finger pads)."""
        return self.data.site_xpos[self.site[side]].copy()

    def hand_frame(self, side: int) -> np.ndarray:
        """(3, 3) columns: approach, finger opening, normal of arm `side`'s hand."""
        return self.data.site_xmat[self.site[side]].reshape(3, 3).copy()

    def object_pos(self, name: str) -> np.ndarray:
        return self.data.xpos[self.object_body[name]].copy()

    def object_mat(self, name: str) -> np.ndarray:
        return self.data.xmat[self.object_body[name]].reshape(3, 3).copy()

    def target_pos(self) -> np.ndarray:
        return self.data.mocap_pos[self.target_mocap].copy()

    def contacts(self) -> set[tuple[int, int]]:
        """Geom pairs in contact now (each pair sorted)."""
        d = self.data
        geoms = d.contact.geom[: d.ncon]
        return {(int(min(a, b)), int(max(a, b))) for a, b in geoms}

    def touching(self, side: int, name: str) -> tuple[bool, bool]:
        """Whether each finger of arm `side` touches object `name`."""
        pairs = self.contacts()
        g = self.object_geom[name]
        return tuple(  # type: ignore[return-value]
            (min(f, g), max(f, g)) in pairs for f in self.finger_geoms[side]
        )

    def holds(self, side: int, name: str) -> bool:
        """Arm `side` holds object `name`: both its fingers touch it."""
        a, b = self.touching(side, name)
        return a and b

    @property
    def holder(self) -> int | None:
        """Which arm holds the task's object (stand-in compatible; None: neither)."""
        if self.task is None:
            return None
        name = TASK_OBJECT[self.task]
        for s in range(2):
            if self.holds(s, name):
                return s
        return None

    # --- task --------------------------------------------------------------------------------
    def success(self) -> bool:
        return task_success(self, self._task())

    def reward(self) -> float:
        return task_reward(self, self._task())

    def expert_action(self) -> np.ndarray:
        """The scripted expert's 14 joint targets (float32) for this tick, from privileged
        state (object poses) and IK."""
        if self._expert is None:
            self._expert = MujocoExpert(self)
        return self._expert.action()

    def _task(self) -> str:
        if self.task is None:
            raise RuntimeError("reset(task, seed) the world first")
        return self.task

    # --- cameras -----------------------------------------------------------------------------
    def render(self, camera: str, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(color (H, W, 3) uint8 RGB, depth (H, W) uint16 millimetres, 0 = out of range) of
        one of scene.CAMERA_NAMES, from one shared renderer per image size."""
        key = (int(height), int(width))
        renderer = self._renderers.get(key)
        if renderer is None:
            renderer = CellRenderer(self.model, *key)
            self._renderers[key] = renderer
        return renderer.render(self.data, camera)

    def close(self) -> None:
        """Free the GL renderers (the world stays usable; a later render makes new ones)."""
        renderers, self._renderers = self._renderers, {}
        for r in renderers.values():
            r.close()
