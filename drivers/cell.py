"""One cell's hardware (follower arms, cameras, clock) behind one observe/command pair.

The actor sees only this: it observes the 14 joint positions and the camera frames, and
commands 14 joint targets, which always pass the safety gate before reaching an arm. The
same class fronts real buses and cameras and the simulated ones in drivers/sim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from drivers.interfaces import ArmBus, Camera, Clock, Observation
from drivers.safety import SafetyGate
from fleet.robot import ARM_SIDES, JOINT_DIM, arm_slice


class CellHardware:
    """A cell's follower arms, cameras and clock behind one observe/command pair."""

    def __init__(
        self,
        arms: Mapping[str, ArmBus],
        cameras: Sequence[Camera],
        clock: Clock,
        gate: SafetyGate,
    ) -> None:
        if set(arms) != set(ARM_SIDES):
            raise ValueError(f"arms must be keyed {ARM_SIDES}, got {tuple(arms)}")
        if gate.dim != JOINT_DIM:
            raise ValueError(f"gate covers {gate.dim} joints, the cell has {JOINT_DIM}")
        names = tuple(cam.name for cam in cameras)
        if len(set(names)) != len(names):
            raise ValueError(f"camera names must be unique, got {names}")
        self.arms = {side: arms[side] for side in ARM_SIDES}
        self.cameras = tuple(cameras)
        self.camera_names: tuple[str, ...] = names
        self.clock = clock
        self.gate = gate
        self._closed = False

    def read_joints(self) -> np.ndarray:
        """(14,) float32 present positions, left arm then right, one sync read per arm."""
        return np.concatenate(
            [np.asarray(self.arms[side].read_state().position) for side in ARM_SIDES]
        ).astype(np.float32)

    def observe(self) -> Observation:
        joint_pos = self.read_joints()
        frames = {cam.name: cam.read() for cam in self.cameras}
        return Observation(joint_pos=joint_pos, frames=frames, stamp=self.clock.now())

    def _write(self, cmd: np.ndarray) -> None:
        for side in ARM_SIDES:
            self.arms[side].write_goal(cmd[arm_slice(side)].astype(np.float64))

    def command(self, targets: np.ndarray) -> np.ndarray:
        """Send 14 targets through the gate, one write_goal per arm; returns what was sent.

        The arms' present positions are read only when the gate has no last command to
        step from (the first command, or the first after an episode reset).
        """
        current = self.read_joints() if self.gate.last_command is None else None
        cmd = self.gate.filter(targets, current)
        self._write(cmd)
        return cmd

    def hold(self) -> None:
        """Command the present positions (clamped into the limits): the arms stop here."""
        current = self.read_joints()
        self.gate.reset()
        self._write(self.gate.filter(current, current))

    def close(self) -> None:
        """Hold, then close every arm and camera (each once, errors of one don't stop the
        rest)."""
        if self._closed:
            return
        self._closed = True
        errors: list[BaseException] = []
        try:
            self.hold()
        except Exception as exc:
            errors.append(exc)
        for dev in (*self.arms.values(), *self.cameras):
            try:
                dev.close()
            except Exception as exc:
                errors.append(exc)
        if errors:
            raise errors[0]
