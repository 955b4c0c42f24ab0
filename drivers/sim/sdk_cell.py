"""A simulated cell that is driven exactly like a real one: through the vendor SDKs.

The arms are real `DynamixelArmBus` objects talking Protocol 2.0 over pseudo-terminals to
simulated servo chains (drivers/sim/servo_peer.py, one process per arm), whose motion comes
from the MuJoCo physics through a shared-memory servo link. The cameras are real
`RealSenseCamera` objects reading frames that the MuJoCo renderer pushes into pyrealsense2's
software device. Only the scene (resets, success), the simulated operator and the sim clock
are sim-only; the same driver classes run on a cell.

Physics and servos meet every COMMAND_CHECK_S (10 ms, five physics steps) of sim time: the
goals the peer last received are applied (only goals newer than the last reset, so a reset
is never undone by a stale goal), the world steps, and after each run of steps the measured
joint positions are published back in each servo's shaft frame (before homing offset and
direction, as a real servo measures). Looking every step cost more CPU than the SDK path
(tests/bench/sim_steps.py) and bought nothing a bus behind a USB adapter (1-16 ms of
latency) would give.

Lockstep (`lockstep=True`, what `fleet eval` runs): the same seed and the same commands give
the same episode, step for step. A goal write is a Protocol 2.0 sync write, which no servo
answers: the driver returns once the bytes are in the pty, and the peer process applies them
whenever the kernel hands them over and its serial thread runs. Without lockstep the physics
may already be stepping by then, so a goal lands a few substeps (or a tick) late at random,
as on a real bus. In lockstep the sim clock first makes one round trip on each arm's bus (a
ping, through the same driver and SDK): the bus is first-in first-out and the peer answers
in order, so the reply proves every earlier goal reached the servo link before the physics
takes a step. The watchdog is off in lockstep: sim time only moves when the loop sleeps, so
commands cannot stop coming in sim time however slowly the host runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from drivers.calibration import ArmCalibration, CellCalibration, default_calibration
from drivers.cell import CellHardware, close_each
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.arm_bus import DynamixelArmBus
from drivers.interfaces import Clock, Operator, TaskScene
from drivers.safety import SafetyGate, step_bound
from drivers.sim.devices import SimClock, SimOperator
from drivers.sim.mujoco import MUJOCO_TASKS, MujocoExpert, MujocoWorld
from drivers.sim.rs_software import PushedRealSense, SoftwareRealSense
from drivers.sim.servo_link import ServoLink
from drivers.sim.servo_peer import ServoPeer
from protos.joint_layout import ARM_SIDES, JOINT_LOWER, JOINT_UPPER

log = logging.getLogger(__name__)

COMMAND_CHECK_S = 0.01  # real time: sim seconds between looks for new goals while stepping
LOCKSTEP_RETRIES = 1000  # bus retries in lockstep, within ...
LOCKSTEP_RETRY_S = 30.0  # ... this many wall seconds a transaction (or a camera frame)


def shaft_from_joint(cal: ArmCalibration, q: np.ndarray) -> list[float]:
    """Joint positions (rad, gripper 0..1) to shaft angles, as the servos would measure."""
    out = []
    for j, value in zip(cal.joints, q[:6], strict=True):
        out.append(float(value) / j.direction - j.homing_offset * ct.RAD_PER_TICK)
    g = cal.gripper
    ticks = g.closed_ticks + float(q[6]) * (g.open_ticks - g.closed_ticks) - g.homing_offset
    out.append(ct.ticks_to_rad(ticks))
    return out


def joint_from_shaft(cal: ArmCalibration, shaft: Sequence[float]) -> np.ndarray:
    """Shaft angles (what a goal register means) back to joint positions."""
    q = [
        j.direction * (s + j.homing_offset * ct.RAD_PER_TICK)
        for j, s in zip(cal.joints, shaft[:6], strict=True)
    ]
    g = cal.gripper
    ticks = shaft[6] / ct.RAD_PER_TICK + ct.CENTER_TICK + g.homing_offset
    q.append((ticks - g.closed_ticks) / (g.open_ticks - g.closed_ticks))
    return np.asarray(q, np.float64)


class LinkedPhysics:
    """The MuJoCo world as SimClock steps it, exchanging goals and measurements with the
    servo peers at every physics step."""

    def __init__(
        self,
        world: MujocoWorld,
        links: dict[str, ServoLink],
        calibration: CellCalibration,
        barrier: Callable[[], None] | None = None,
    ) -> None:
        """`barrier` (lockstep): called before each run of steps; returns once every command
        the driver sent so far is in the servo links."""
        self.world = world
        self.links = links
        self.barrier = barrier
        self.cal = {side: calibration.arm(side) for side in ARM_SIDES}
        # ArmCalibration.ids builds its tuple on every access; looked up at every step
        self._ids = {side: self.cal[side].ids for side in ARM_SIDES}
        self._seen = {side: {sid: 0 for sid in self.cal[side].ids} for side in ARM_SIDES}
        self._counts = {side: -1 for side in ARM_SIDES}  # links' command_count last read
        self.publish()

    @property
    def time(self) -> float:
        return self.world.time

    def steps_until(self, t: float) -> int:
        return self.world.steps_until(t)

    def step(self, n: int = 1) -> None:
        if n > 0 and self.barrier is not None:
            # Lockstep: every goal sent so far is in the links and no more can come before
            # the control loop runs again, so one look covers the whole run.
            self.barrier()
            self.apply_commands()
            self.world.step(n)
        else:
            # Real time: goals still on their way land within COMMAND_CHECK_S of sim time
            # (a USB serial adapter's latency, not the 25 looks a tick that cost CPU).
            chunk = max(1, round(COMMAND_CHECK_S / self.world.dt))
            done = 0
            while done < n:
                self.apply_commands()
                k = min(chunk, n - done)
                self.world.step(k)
                done += k
        self.publish()

    def apply_commands(self) -> None:
        for i, side in enumerate(ARM_SIDES):
            cal, link, seen, ids = (
                self.cal[side],
                self.links[side],
                self._seen[side],
                self._ids[side],
            )
            count = link.command_count  # before the commands: a write after it shows next time
            if count == self._counts[side]:
                continue  # nothing written since the last look (most physics steps)
            self._counts[side] = count
            # (torque, mode, goal, current, seq) per servo, in calibration order
            cmds = [link.read_command_fields(sid) for sid in ids]
            torque = all(c[0] for c in cmds)
            if torque != bool(self.world.torque[i]):  # set_torque re-homes the goal: on change only
                self.world.set_torque(i, torque)
            if any(c[4] != seen[sid] for sid, c in zip(ids, cmds, strict=True)):
                for sid, c in zip(ids, cmds, strict=True):
                    seen[sid] = c[4]
                self.world.set_goal(i, joint_from_shaft(cal, [c[2] for c in cmds]))

    def forget_goals(self) -> None:
        """After a reset: goals sent before it must not pull the arms back (and the
        servos' torque state is applied again at the next step: the reset turned it on)."""
        for side in ARM_SIDES:
            self._counts[side] = -1
            for sid in self.cal[side].ids:
                self._seen[side][sid] = self.links[side].read_command(sid).seq
        self.publish()

    def publish(self) -> None:
        q = self.world.joint_positions()
        v = self.world.joint_velocities()
        for i, side in enumerate(ARM_SIDES):
            cal, link = self.cal[side], self.links[side]
            arm = slice(7 * i, 7 * i + 7)
            link.write_positions(
                list(
                    zip(
                        self._ids[side], shaft_from_joint(cal, q[arm]), v[arm].tolist(), strict=True
                    )
                )
            )


class MujocoScene:
    """TaskScene of the MuJoCo cell: reset re-places objects and homes the arms."""

    def __init__(self, physics: LinkedPhysics, gate: SafetyGate) -> None:
        self.physics = physics
        self.world = physics.world
        self.gate = gate
        self.tasks: tuple[str, ...] = tuple(MUJOCO_TASKS)

    def reset(self, task: str, seed: int) -> None:
        self.world.reset(task, seed)
        self.physics.forget_goals()
        self.gate.reset()

    def success(self) -> bool:
        return self.world.success()

    def reward(self) -> float:
        return self.world.reward()


@dataclass
class SdkSimCell:
    """A simulated cell behind the real drivers; close() stops the servo peers."""

    hardware: CellHardware
    scene: TaskScene
    operator: Operator
    clock: Clock
    world: MujocoWorld
    peers: dict[str, ServoPeer]
    cell_id: str = ""
    control_hz: float = 20.0
    calibration: CellCalibration = field(default_factory=default_calibration)

    def close(self) -> None:
        close_each(
            (self.hardware.close, *(p.close for p in self.peers.values()), self.world.close),
            self.cell_id,
        )


def make_sdk_sim_cell(
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
    wire_model: bool = False,
    calibration: CellCalibration | None = None,
    watchdog: bool = True,
    lockstep: bool = False,
) -> SdkSimCell:
    """A MuJoCo cell whose arms and cameras are reached through dynamixel_sdk and
    pyrealsense2. `seed` is the cell's own (its operator's takeovers). `lockstep`: every
    goal reaches the physics before it steps (reproducible episodes, no watchdog; see the
    module docstring)."""
    cal = calibration or default_calibration(cell_id)
    world = MujocoWorld(seed=seed, control_hz=control_hz)
    peers: dict[str, ServoPeer] = {}
    try:
        for side in ARM_SIDES:
            arm_cal = cal.arm(side)
            i = ARM_SIDES.index(side)
            start = shaft_from_joint(arm_cal, world.joint_positions()[7 * i : 7 * i + 7])
            ticks = {
                sid: s / ct.RAD_PER_TICK + ct.CENTER_TICK
                for sid, s in zip(arm_cal.ids, start, strict=True)
            }
            peers[side] = ServoPeer(
                arm_cal.ids, link=True, wire_model=wire_model, shaft_ticks=ticks
            ).start()
        links = {side: peer.link for side, peer in peers.items()}
        assert all(link is not None for link in links.values())
        physics = LinkedPhysics(world, links, cal)  # type: ignore[arg-type]
        clock = SimClock(physics, realtime_factor=realtime_factor)  # type: ignore[arg-type]
        # More retries than a real bus needs: a simulated chain shares the CPU with the
        # renderer and the learner, and a late reply there is not a broken servo. In
        # lockstep sim time waits for the bus, so a starved servo process only costs wall
        # time (LOCKSTEP_RETRIES), never a fault that a faster host would not have had.
        retries, budget_s = (LOCKSTEP_RETRIES, LOCKSTEP_RETRY_S) if lockstep else (4, 0.25)
        arms = {
            side: DynamixelArmBus(
                side,
                peers[side].port,
                cal.arm(side),
                clock=clock,
                retries=retries,
                retry_budget_s=budget_s,
            )
            for side in ARM_SIDES
        }
        cams = [
            _camera(world, name, i, cell_id, height, width, control_hz, lockstep)
            for i, name in enumerate(cameras)
        ]
        gate = SafetyGate(JOINT_LOWER, JOINT_UPPER, max_step=step_bound(control_hz, len(ARM_SIDES)))
        hardware = CellHardware(arms=arms, cameras=cams, clock=clock, gate=gate)
        hardware.enable()
        if lockstep:
            physics.barrier = lambda: bus_barrier(arms.values())
        elif watchdog:
            hardware.start_watchdog(
                1.0 / control_hz / max(realtime_factor, 1e-9)
                if realtime_factor > 0
                else 1.0 / control_hz
            )
    except BaseException:
        for peer in peers.values():
            peer.close()
        world.close()
        raise
    scene = MujocoScene(physics, gate)
    operator = SimOperator(
        world,
        MujocoExpert(world),
        seed=seed,  # type: ignore[arg-type]
        takeover_prob=takeover_prob,
        progress=scene.reward,
        stall_s=takeover_stall_s,
    )
    return SdkSimCell(
        hardware=hardware,
        scene=scene,
        operator=operator,
        clock=clock,
        world=world,
        peers=peers,
        cell_id=cell_id,
        control_hz=float(control_hz),
        calibration=cal,
    )


def bus_barrier(arms: Iterable[DynamixelArmBus]) -> None:
    """One ping round trip per arm: returns once the servos answered it, so every packet
    sent before it on that bus has been handled (a bus is first-in first-out)."""
    for arm in arms:
        with arm.bus.lock:
            arm.bus.ping(arm.ids[0])


def _camera(
    world: MujocoWorld,
    name: str,
    index: int,
    cell_id: str,
    height: int,
    width: int,
    fps: float,
    lockstep: bool = False,
) -> PushedRealSense:
    serial = f"sim-{cell_id}-{index}"
    sensor = SoftwareRealSense(serial, width=width, height=height, fps=max(1, round(fps)))

    def render() -> tuple[Any, Any, float]:
        color, depth = world.render(name, height, width)
        return color, depth, world.time

    return PushedRealSense(
        name,
        sensor,
        render,
        revision=lambda: world.revision,
        min_read_timeout_s=LOCKSTEP_RETRY_S if lockstep else 0.0,
    )
