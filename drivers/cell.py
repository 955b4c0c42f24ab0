"""One cell's hardware (follower arms, cameras, clock) behind one observe/command pair.

The actor sees only this: it observes the 14 joint positions and the camera frames, and
commands 14 joint targets, which always pass the safety gate before reaching an arm. The
same class fronts real buses and cameras and the simulated ones in drivers/sim.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from drivers.interfaces import ArmBus, Camera, Clock, DriverFault, Observation
from drivers.safety import SafetyGate
from protos.joint_layout import ARM_SIDES, JOINT_DIM, arm_slice

log = logging.getLogger(__name__)


class CellFault(RuntimeError):
    """A driver fault the cell has already been made safe from (held, or torque off).

    The message names the part and what the cell did about it; the actor reports it and
    stays up.
    """

    def __init__(self, message: str, *, torque_off: bool) -> None:
        super().__init__(message)
        self.torque_off = torque_off


class CellHardware:
    """A cell's follower arms, cameras and clock behind one observe/command pair.

    Every bus access holds one lock, so the watchdog (which holds position when commands
    stop coming) and the control loop never interleave packets on a bus.
    """

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
        self._lock = threading.RLock()
        self._last_command = time.monotonic()
        self._watchdog: threading.Thread | None = None
        self._watchdog_stop = threading.Event()
        self.watchdog_holds = 0
        # The fault the cell was made safe from, until enable() succeeds; decisions read its
        # typed fields (torque_off), never its words.
        self.current_fault: CellFault | None = None

    @property
    def fault(self) -> str:
        """The current fault in words ("" when healthy), for people and logs."""
        return str(self.current_fault) if self.current_fault is not None else ""

    def enable(self) -> None:
        """Torque on for every arm (the arms hold where they are until commanded)."""
        with self._lock, self._safe("enabling torque"):
            for arm in self.arms.values():
                arm.set_torque(True)
            self.current_fault = None

    def bus_stats(self) -> dict[str, int]:
        """Servo-bus counters summed over the arms that keep them (Dynamixel buses):
        transactions, failed ones, late replies discarded, reconnects, power cycles."""
        out: dict[str, int] = {}
        for arm in self.arms.values():
            stats = getattr(arm, "stats", None)
            if stats is None or not dataclasses.is_dataclass(stats):
                continue
            for key, value in dataclasses.asdict(stats).items():
                out[f"bus_{key}"] = out.get(f"bus_{key}", 0) + int(value)
        return out

    def torque_off(self) -> None:
        """Torque off on every arm that still answers; errors are logged, never raised."""
        with self._lock:
            for side, arm in self.arms.items():
                try:
                    arm.set_torque(False)
                except Exception as exc:
                    log.error("torque off failed on the %s arm: %s", side, exc)

    def start_watchdog(self, period_s: float, ticks: int = 2) -> None:
        """Hold position whenever no command arrived for `ticks` control periods."""
        limit = ticks * period_s
        self._watchdog_stop.clear()

        def watch() -> None:
            held_since = None
            wait = period_s / 2
            while not self._watchdog_stop.wait(wait):
                quiet = time.monotonic() - self._last_command
                if quiet < limit:  # no hold can be due before the limit: sleep until then
                    wait = max(limit - quiet, 0.001)
                    continue
                wait = period_s / 2
                if self.current_fault or held_since == self._last_command:
                    continue
                held_since = self._last_command
                try:
                    self.hold()
                    self.watchdog_holds += 1
                    log.warning("watchdog: no command for %.0f ms, holding position", quiet * 1000)
                except CellFault as exc:
                    log.error("watchdog could not hold: %s", exc)

        self._watchdog = threading.Thread(target=watch, name="cell-watchdog", daemon=True)
        self._watchdog.start()

    def stop_watchdog(self) -> None:
        self._watchdog_stop.set()
        if self._watchdog is not None:
            self._watchdog.join(2.0)
            self._watchdog = None

    def _safe(self, doing: str) -> _FaultGuard:
        return _FaultGuard(self, doing)

    def make_safe(self, exc: DriverFault, doing: str) -> CellFault:
        """Torque off after a hardware error, else hold what still answers; say which.
        Also for faults of parts outside this object (a leader arm the operator reads)."""
        if exc.torque_off:
            self.torque_off()
            action = "torque off on every arm"
        else:
            action = "holding position"
            for side, arm in self.arms.items():
                try:
                    arm.write_goal(np.asarray(arm.read_state().position, np.float64))
                except Exception:
                    log.debug("the %s arm does not answer; it keeps its last goal", side)
            self.gate.reset()
        fault = CellFault(f"{exc} (while {doing}; {action})", torque_off=exc.torque_off)
        self.current_fault = fault
        log.error("cell fault: %s", fault)
        return fault

    def read_joints(self) -> np.ndarray:
        """(14,) float32 present positions, left arm then right, one sync read per arm."""
        return np.concatenate(
            [np.asarray(self.arms[side].read_state().position) for side in ARM_SIDES]
        ).astype(np.float32)

    def observe(self) -> Observation:
        with self._lock, self._safe("observing"):
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
        with self._lock, self._safe("commanding"):
            current = self.read_joints() if self.gate.last_command is None else None
            cmd = self.gate.filter(targets, current)
            self._write(cmd)
            self._last_command = time.monotonic()
        return cmd

    def hold(self) -> None:
        """Command the present positions (clamped into the limits): the arms stop here."""
        with self._lock, self._safe("holding"):
            current = self.read_joints()
            self.gate.reset()
            self._write(self.gate.filter(current, current))

    def close(self) -> None:
        """Hold, then close every arm and camera (each once, errors of one don't stop the
        rest)."""
        if self._closed:
            return
        self._closed = True
        self.stop_watchdog()
        errors: list[BaseException] = []
        if self.current_fault is None:
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


def close_each(closers: Iterable[Callable[[], None]], cell_id: str) -> None:
    """Call every closer even when some fail (one stuck device must not keep the others
    open), then log the failures."""
    errors: list[Exception] = []
    for closer in closers:
        try:
            closer()
        except Exception as exc:
            errors.append(exc)
    if errors:
        log.warning("cell %s: %d errors while closing: %s", cell_id, len(errors), errors[0])


class _FaultGuard:
    """Turns a DriverFault inside a cell operation into a CellFault after making it safe."""

    def __init__(self, cell: CellHardware, doing: str) -> None:
        self.cell = cell
        self.doing = doing

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: object) -> None:
        if isinstance(exc, DriverFault):
            raise self.cell.make_safe(exc, self.doing) from exc
