"""Simulated devices behind the driver interfaces: arm buses, cameras, clock, operator.

Each implements the protocol in drivers/interfaces.py and nothing more is needed by the
actor, so a cell built from these runs the same control loop as a real one.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import numpy as np

from drivers.interfaces import Frame, JointState
from drivers.sim.render import Renderer
from drivers.sim.tasks import ScriptedExpert
from drivers.sim.world import GRIPPER_ON_CUBE, SimWorld

_MA_PER_RAD = 400.0  # synthetic present current: proportional to tracking error ...
_MA_HOLDING = 180.0  # ... plus a steady load on a gripper that holds the cube
_MAX_MA = 1200.0


class SimArmBus:
    """ArmBus for one arm of a SimWorld: one "sync read" of all 7 servos, one goal write.

    Goals are clamped to the joint limits like a servo's own position limits; a non-finite
    goal raises ValueError (a real bus cannot carry one). Torque off stops the arm where it
    is and ignores goals; torque on makes the present position the goal.
    """

    def __init__(self, world: SimWorld, side: str) -> None:
        self.world = world
        self.name = side
        self._index = SimWorld.side_index(side)
        self._closed = False

    def _check(self) -> None:
        if self._closed:
            raise RuntimeError(f"arm bus {self.name!r} is closed")

    def read_state(self) -> JointState:
        self._check()
        w, i = self.world, self._index
        error = np.abs(w.goal[i] - w.q[i])
        current = np.minimum(_MA_PER_RAD * error, _MAX_MA) * np.sign(w.goal[i] - w.q[i])
        if w.holder == i and w.goal[i, -1] <= GRIPPER_ON_CUBE:
            current[-1] = -_MA_HOLDING  # fingers squeezing the cube
        if not w.torque[i]:
            current[:] = 0.0
        return JointState(
            position=w.q[i].copy(),
            velocity=w.velocity[i].copy(),
            current=current,
            stamp=w.time,
        )

    def write_goal(self, position: np.ndarray) -> None:
        self._check()
        self.world.set_goal(self._index, position)

    def set_torque(self, enabled: bool) -> None:
        self._check()
        self.world.set_torque(self._index, enabled)

    def close(self) -> None:
        self._closed = True


class SimCamera:
    """Camera rendering a SimWorld: frames carry aligned depth and the sim-time stamp.

    Rendering happens in read() only (nothing is drawn for a camera nobody reads), and a
    second read of an unchanged world returns the same frame, its arrays read-only.
    """

    def __init__(self, world: SimWorld, name: str, height: int = 96, width: int = 128) -> None:
        self.world = world
        self._renderer = Renderer(name, height, width)  # ValueError for unknown names
        self.name = name
        self.height = int(height)
        self.width = int(width)
        self._cache: tuple[int, Frame] | None = None
        self._closed = False

    def read(self, timeout_s: float = 1.0) -> Frame:
        if self._closed:
            raise RuntimeError(f"camera {self.name!r} is closed")
        rev = self.world.revision
        if self._cache is not None and self._cache[0] == rev:
            return self._cache[1]
        color, depth = self._renderer.render(self.world)
        color.setflags(write=False)  # frames are shared (cached): nobody may draw on them
        depth.setflags(write=False)
        frame = Frame(camera=self.name, color=color, stamp=self.world.time, depth=depth)
        self._cache = (rev, frame)
        return frame

    def close(self) -> None:
        self._closed = True
        self._cache = None


class SimClock:
    """Clock on sim time. `sleep_until(t)` steps the world's physics in its fixed substeps
    to the first substep time >= t, then, if `realtime_factor` > 0, waits so sim time runs
    at realtime_factor x wall time (0: as fast as the host can). The physics never depends
    on the host's speed: only on the sequence of times asked for.
    """

    #: fall this far behind (wall seconds) and pacing restarts instead of rushing to catch up
    MAX_LAG_S = 0.25

    def __init__(self, world: SimWorld, realtime_factor: float = 1.0) -> None:
        if not (realtime_factor >= 0 and math.isfinite(realtime_factor)):
            raise ValueError("realtime_factor must be finite and >= 0")
        self.world = world
        self.realtime_factor = float(realtime_factor)
        self._anchor: tuple[float, float] | None = None  # (sim time, wall time)

    def now(self) -> float:
        return self.world.time

    def sleep_until(self, t: float) -> None:
        if self.realtime_factor > 0 and self._anchor is None:
            self._anchor = (self.world.time, time.monotonic())
        n = self.world.steps_until(t)
        if n:
            self.world.step(n)
        if self.realtime_factor <= 0:
            return
        sim_now, wall_now = self.world.time, time.monotonic()
        assert self._anchor is not None
        sim0, wall0 = self._anchor
        due = wall0 + (sim_now - sim0) / self.realtime_factor
        if due > wall_now:
            time.sleep(due - wall_now)
        elif wall_now - due > self.MAX_LAG_S:
            self._anchor = (sim_now, wall_now)


class SimOperator:
    """A simulated human operator at a sim cell, driving with the scripted expert.

    At each episode (seen as a new world reset) it decides, from (cell seed, episode seed)
    alone, whether it will take over: with probability `takeover_prob`, after a delay drawn
    uniformly from `takeover_delay_s` of sim time since the reset; once it has taken over it
    keeps control to the end of that episode. `force(True)` makes it want control at every
    tick (whole demonstration episodes while no policy exists), `force(False)` undoes it.
    `action()` is always the expert's 14 joint targets for this tick.

    With `stall_s` > 0 and a `progress` signal (the scene's dense reward), it also takes over
    the way a watching operator does, DAgger style: when the policy has made no progress
    (best reward up by less than STALL_EPS) for `stall_s` of sim time. Those corrections are
    the data the policy lacks, and episodes it was left alone on measure it honestly.
    """

    STALL_EPS = 0.01

    def __init__(
        self,
        world: SimWorld,
        expert: ScriptedExpert,
        *,
        seed: int = 0,
        takeover_prob: float = 0.5,
        takeover_delay_s: tuple[float, float] = (0.5, 3.0),
        progress: Callable[[], float] | None = None,
        stall_s: float = 0.0,
    ) -> None:
        if not 0.0 <= takeover_prob <= 1.0:
            raise ValueError("takeover_prob must be in [0, 1]")
        if stall_s < 0 or (stall_s > 0 and progress is None):
            raise ValueError("stall_s must be >= 0, and > 0 needs a progress signal")
        lo, hi = takeover_delay_s
        if not 0.0 <= lo <= hi:
            raise ValueError("takeover_delay_s must be (lo, hi) with 0 <= lo <= hi")
        self.world = world
        self.expert = expert
        self.seed = int(seed)
        self.takeover_prob = float(takeover_prob)
        self.takeover_delay_s = (float(lo), float(hi))
        self.progress = progress
        self.stall_s = float(stall_s)
        self.forced = False
        self._episode = -1
        self._takeover_at: float | None = None  # sim time of this episode's takeover
        self._best = -math.inf  # best progress this episode, and when it was reached
        self._best_at = 0.0

    def force(self, on: bool) -> None:
        self.forced = bool(on)

    def _plan(self) -> None:
        w = self.world
        if self._episode == w.episode:
            return
        self._episode = w.episode
        self._takeover_at = None
        self._best, self._best_at = -math.inf, w.t_reset
        if w.seed is None:
            return
        rng = np.random.default_rng([self.seed & 0xFFFFFFFF, w.seed & 0xFFFFFFFF, 0x0B5E7A70])
        takes_over = rng.random() < self.takeover_prob
        delay = rng.uniform(*self.takeover_delay_s)
        if takes_over:
            self._takeover_at = w.t_reset + delay

    @property
    def takeover_at(self) -> float | None:
        """Sim time at which the operator takes this episode over (None: it will not)."""
        self._plan()
        return self._takeover_at

    def wants_control(self) -> bool:
        if self.forced:
            return True
        self._plan()
        now = self.world.time
        if self._takeover_at is None and self.stall_s > 0 and self.progress is not None:
            p = float(self.progress())
            if p > self._best + self.STALL_EPS:
                self._best, self._best_at = p, now
            elif now - self._best_at >= self.stall_s:
                self._takeover_at = now  # stalled: take over for the rest of the episode
        return self._takeover_at is not None and now >= self._takeover_at - 1e-9

    def action(self) -> np.ndarray:
        return self.expert.action()
