"""A Dynamixel X-series arm on one serial bus, through dynamixel_sdk (Protocol 2.0).

`DynamixelArmBus` is the ArmBus of drivers/interfaces.py for one 7-servo arm (six joints
then the gripper), on a `DynamixelBus` (drivers/dynamixel/bus.py: the port, retries,
reconnects, replies matched to requests). Per tick it does one sync read of present
current+velocity+position (one contiguous 10-byte block, 126..135) and one sync write of
goal positions. At connect it applies the arm's calibration (homing offset, position
limits, operating mode, return delay) to the servos and keeps the direction signs and
limits for converting and clamping: joints in radians, the gripper normalised 0 (closed)
.. 1 (open). It finds servos that lost power (RAM reset) and restores them.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from drivers.calibration import ArmCalibration
from drivers.clock import WallClock
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.bus import (
    BusStats,
    DynamixelBus,
    DynamixelCommError,
    DynamixelConfigError,
    DynamixelError,
    DynamixelHardwareError,
    DynamixelPortError,
    set_low_latency,
)
from drivers.interfaces import Clock, JointState

__all__ = [
    "BusStats",
    "DynamixelArmBus",
    "DynamixelBus",
    "DynamixelCommError",
    "DynamixelConfigError",
    "DynamixelError",
    "DynamixelHardwareError",
    "DynamixelPortError",
    "DynamixelPowerLossError",
    "set_low_latency",
]

log = logging.getLogger(__name__)


class DynamixelPowerLossError(DynamixelError):
    """Servos lost power and came back (RAM reset: torque off, goals and currents at their
    power-on values). The driver has already restored its settings and, if torque was on,
    turned it back on holding where the arm is now; the arm may have dropped meanwhile, so
    whoever drives it must start again from the present pose."""

    def __init__(self, message: str, *, servo_ids: Sequence[int], **where: Any) -> None:
        super().__init__(message, **where)
        self.servo_ids = tuple(servo_ids)


class DynamixelArmBus:
    """One 7-servo arm (six joints then the gripper) on its own bus: the ArmBus contract.

    `connect()` (run by the constructor unless `connect=False`) opens the port, pings
    every servo, turns torque off, and writes whatever of the calibration and settings
    differs from what the servos hold: return delay, operating mode (3 position for
    joints, 5 current-based position for the gripper), homing offset, position limits,
    and the gripper's goal current. Torque stays off until `set_torque(True)`.
    """

    def __init__(
        self,
        name: str,
        port: str,
        calibration: ArmCalibration,
        *,
        baud: int = 1_000_000,
        return_delay_us: int = 0,
        operating_modes: Sequence[int] | None = None,
        gripper_current_ma: float | None = 600.0,
        retries: int = 2,
        retry_budget_s: float = 0.25,
        reconnect_interval_s: float = 0.25,
        ram_check_s: float = 1.0,
        clock: Clock | None = None,
        connect: bool = True,
    ) -> None:
        self.name = name
        self.port = port
        n = len(calibration.ids)
        modes = (
            tuple(int(m) for m in operating_modes)
            if operating_modes is not None
            else (ct.MODE_POSITION,) * (n - 1) + (ct.MODE_CURRENT_BASED_POSITION,)
        )
        if len(modes) != n or not all(m in ct.POSITION_MODES for m in modes):
            raise ValueError(f"operating_modes must be {n} of {sorted(ct.POSITION_MODES)}")
        if not 0 <= return_delay_us <= 508 or return_delay_us % 2:
            raise ValueError("return_delay_us must be even, 0..508")
        self.operating_modes = modes
        self.return_delay_us = return_delay_us
        self.gripper_current_ma = gripper_current_ma
        self.clock: Clock = clock or WallClock()
        self.calibration = calibration.validate()
        self._set_conversion(self.calibration)
        names = {
            sid: f"{name}_{servo}"
            for sid, servo in zip(calibration.ids, calibration.servo_names, strict=True)
        }
        self.bus = DynamixelBus(
            port,
            calibration.ids,
            names=names,
            label=f"arm {name}",
            baud=baud,
            retries=retries,
            retry_budget_s=retry_budget_s,
            reconnect_interval_s=reconnect_interval_s,
        )
        self.bus.on_reconnect = self._on_reconnect
        self.ram_check_s = ram_check_s
        self._next_ram_check = 0.0
        self._torque = False
        if connect:
            try:
                self.connect()
            except BaseException:
                self.bus.close()  # nobody holds this object to close it later
                raise

    # Calibration <-> servo units ----------------------------------------------------------

    def _set_conversion(self, cal: ArmCalibration) -> None:
        self._ids = cal.ids  # built anew on every access of cal.ids; read several times a tick
        self._dir = np.array([j.direction for j in cal.joints], dtype=np.float64)
        self._lower = cal.lower
        self._upper = cal.upper
        self._closed = float(cal.gripper.closed_ticks)
        self._travel = float(cal.gripper.open_ticks - cal.gripper.closed_ticks)
        limits = [j.lower_upper_ticks() for j in cal.joints] + [cal.gripper.lower_upper_ticks()]
        self._min_ticks = np.array([lo for lo, _ in limits], dtype=np.int64)
        self._max_ticks = np.array([hi for _, hi in limits], dtype=np.int64)

    def ticks_to_position(self, ticks: np.ndarray) -> np.ndarray:
        """Present-position ticks (7,) to joint radians and normalised gripper."""
        t = np.asarray(ticks, dtype=np.float64)
        out = np.empty(t.shape, dtype=np.float64)
        out[:-1] = self._dir * (t[:-1] - ct.CENTER_TICK) * ct.RAD_PER_TICK
        out[-1] = (t[-1] - self._closed) / self._travel
        return out

    def position_to_ticks(self, position: np.ndarray) -> np.ndarray:
        """Joint radians and normalised gripper (7,) to goal ticks (not clamped)."""
        p = np.asarray(position, dtype=np.float64)
        out = np.empty(p.shape, dtype=np.float64)
        out[:-1] = ct.CENTER_TICK + self._dir * p[:-1] / ct.RAD_PER_TICK
        out[-1] = self._closed + p[-1] * self._travel
        return np.rint(out).astype(np.int64)

    @property
    def lower(self) -> np.ndarray:
        return self._lower.copy()

    @property
    def upper(self) -> np.ndarray:
        return self._upper.copy()

    @property
    def ids(self) -> tuple[int, ...]:
        return self._ids

    @property
    def torque_enabled(self) -> bool:
        return self._torque

    @property
    def stats(self) -> BusStats:
        """Transactions, failures, discarded late replies, reconnects, power cycles."""
        return self.bus.stats

    # Connect / configure ------------------------------------------------------------------

    def connect(self) -> None:
        with self.bus.lock:
            self.bus.open()
            for sid in self.ids:
                self.bus.ping(sid)
            self._configure(initial=True)
        log.info("arm %s: connected on %s, servos %s", self.name, self.port, self.ids)

    def _desired(self, index: int, have: bytes) -> list[tuple[ct.Register, int]]:
        cal = self.calibration
        servo = cal.joints[index] if index < len(cal.joints) else cal.gripper
        lo, hi = servo.lower_upper_ticks()
        drive = ct.decode_value(
            have, ct.DRIVE_MODE, ct.DRIVE_MODE.address - ct.CONFIG_BLOCK_ADDRESS
        )
        return [
            (ct.RETURN_DELAY_TIME, self.return_delay_us // ct.RETURN_DELAY_UNIT_US),
            (ct.DRIVE_MODE, drive & ~0x01),  # direction is applied here, never reversed twice
            (ct.OPERATING_MODE, self.operating_modes[index]),
            (ct.HOMING_OFFSET, servo.homing_offset),
            (ct.MAX_POSITION_LIMIT, hi),
            (ct.MIN_POSITION_LIMIT, lo),
        ]

    def _configure(self, initial: bool) -> None:
        """Write the settings the servos lack. At connect all torque goes off first; after
        a reconnect only a servo that needs an EEPROM write is briefly released."""
        bus = self.bus
        if initial:
            for sid in self.ids:
                bus.write(sid, ct.TORQUE_ENABLE, 0, allow_alert=True)
            self._torque = False
        blocks = bus.sync_read(ct.CONFIG_BLOCK_ADDRESS, ct.CONFIG_BLOCK_SIZE, allow_alert=True)
        torque = bus.sync_read(ct.TORQUE_ENABLE.address, 1, allow_alert=True)
        for i, sid in enumerate(self.ids):
            have = blocks[sid]
            changes = [
                (reg, value)
                for reg, value in self._desired(i, have)
                if ct.decode_value(have, reg, reg.address - ct.CONFIG_BLOCK_ADDRESS) != value
            ]
            if not changes:
                continue
            held = torque[sid][0] == 1
            if held:
                log.warning(
                    "%s: settings changed while powered (%s); releasing torque to rewrite",
                    bus.describe(sid),
                    ", ".join(r.name for r, _ in changes),
                )
                bus.write(sid, ct.TORQUE_ENABLE, 0, allow_alert=True)
            for reg, value in changes:
                bus.write(sid, reg, value)
            if held:
                present = bus.read(sid, ct.PRESENT_POSITION)
                goal = int(np.clip(present, self._min_ticks[i], self._max_ticks[i]))
                bus.write(sid, ct.GOAL_POSITION, goal)
                bus.write(sid, ct.TORQUE_ENABLE, 1)
        if self.gripper_current_ma is not None:
            bus.write(self.ids[-1], ct.GOAL_CURRENT, self._gripper_units, allow_alert=True)

    @property
    def _gripper_units(self) -> int:
        return round((self.gripper_current_ma or 0.0) / ct.MA_PER_CURRENT_UNIT)

    def _on_reconnect(self) -> None:
        for sid in self.ids:
            self.bus.ping(sid)
        self._configure(initial=False)

    def check_power(self) -> None:
        """Find servos that lost power since the driver set them up (their RAM is reset:
        torque off while it should be on, the gripper's goal current at its power-on value),
        restore the driver's state on them and raise DynamixelPowerLossError.

        Runs before a state read whenever a servo went silent or the port came back, and
        every `ram_check_s` otherwise (a power blip between two transactions)."""
        bus = self.bus
        with bus.lock:
            torque = bus.sync_read(ct.TORQUE_ENABLE.address, 1, allow_alert=True)
            lost = [sid for sid in self.ids if self._torque and torque[sid][0] == 0]
            gripper = self.ids[-1]
            if (
                self.gripper_current_ma is not None
                and gripper not in lost
                and bus.read(gripper, ct.GOAL_CURRENT, allow_alert=True) != self._gripper_units
            ):
                lost.append(gripper)
            bus.silence_seen = False
            self._next_ram_check = time.monotonic() + self.ram_check_s
            if not lost:
                return
            alarms = self.hardware_errors()
            if alarms:  # torque went off by the servo's own shutdown, not a power cut
                sid = min(alarms)
                raise bus.hardware_error(sid, sorted(set(alarms) - {sid}))
            log.warning(
                "arm %s: servos %s lost power and came back (RAM reset); restoring settings%s",
                self.name,
                lost,
                ", then torque holding the present pose" if self._torque else "",
            )
            self._configure(initial=False)
            if self._torque:
                for sid in lost:
                    i = self.ids.index(sid)
                    present = bus.read(sid, ct.PRESENT_POSITION)
                    goal = int(np.clip(present, self._min_ticks[i], self._max_ticks[i]))
                    bus.write(sid, ct.GOAL_POSITION, goal)
                    bus.write(sid, ct.TORQUE_ENABLE, 1)
            bus.stats.power_cycles += 1
            names = ", ".join(f"servo ID {sid} ({bus.names[sid]})" for sid in lost)
            held = ", torque on holding the present pose" if self._torque else ""
            raise DynamixelPowerLossError(
                f"arm {self.name} on {self.port}: {names} lost power and came back with RAM "
                f"reset; settings restored{held}. "
                "The arm may have dropped: start again from where it is.",
                servo_ids=lost,
                **bus.where(lost[0]),
            )

    def apply_calibration(self, calibration: ArmCalibration) -> None:
        """Switch to a new calibration (same servos) and write it to them."""
        calibration.validate()
        if calibration.ids != self.ids:
            raise ValueError(f"calibration ids {calibration.ids} differ from bus ids {self.ids}")
        with self.bus.lock:
            self.calibration = calibration
            self._set_conversion(calibration)
            self._configure(initial=False)

    # ArmBus ---------------------------------------------------------------------------

    def read_state(self) -> JointState:
        """One sync read of present current, velocity and position for all 7 servos
        (after check_power, when a servo went silent or a check is due)."""
        if self.bus.silence_seen or time.monotonic() >= self._next_ram_check:
            self.check_power()
        blocks = self.bus.sync_read(ct.STATE_BLOCK_ADDRESS, ct.STATE_BLOCK_SIZE)
        stamp = self.clock.now()
        unpack = ct.STATE_BLOCK.unpack
        cur, vel, ticks = np.array([unpack(blocks[sid]) for sid in self.ids], np.float64).T
        shaft_rad_s = vel * ct.RAD_S_PER_VELOCITY_UNIT
        velocity = np.empty_like(shaft_rad_s)
        velocity[:-1] = self._dir * shaft_rad_s[:-1]
        velocity[-1] = shaft_rad_s[-1] / ct.RAD_PER_TICK / self._travel
        current = cur * ct.MA_PER_CURRENT_UNIT
        current[:-1] *= self._dir
        current[-1] *= math.copysign(1.0, self._travel)
        return JointState(
            position=self.ticks_to_position(ticks),
            velocity=velocity,
            current=current,
            stamp=stamp,
        )

    def write_goal(self, position: np.ndarray) -> None:
        """One sync write of all 7 goals, clamped to the calibrated limits."""
        pos = np.asarray(position, dtype=np.float64).reshape(-1)
        if pos.shape != (len(self.ids),):
            raise ValueError(f"arm {self.name}: goal must have {len(self.ids)} values")
        if not np.all(np.isfinite(pos)):
            raise ValueError(f"arm {self.name}: goal must be finite, got {pos}")
        ticks = self.position_to_ticks(np.clip(pos, self._lower, self._upper))
        ticks = np.clip(ticks, self._min_ticks, self._max_ticks)
        self.bus.sync_write(
            ct.GOAL_POSITION.address,
            ct.GOAL_POSITION.size,
            {sid: int(t) for sid, t in zip(self.ids, ticks, strict=True)},
        )

    def set_torque(self, enabled: bool) -> None:
        """Torque on holds the present pose (goal := present first, so nothing jumps)."""
        with self.bus.lock:
            if enabled:
                ticks = self.raw_positions()
                goal = np.clip(ticks, self._min_ticks, self._max_ticks)
                self.bus.sync_write(
                    ct.GOAL_POSITION.address,
                    ct.GOAL_POSITION.size,
                    {sid: int(t) for sid, t in zip(self.ids, goal, strict=True)},
                )
                for sid in self.ids:
                    self.bus.write(sid, ct.TORQUE_ENABLE, 1)
            else:
                for sid in self.ids:
                    self.bus.write(sid, ct.TORQUE_ENABLE, 0, allow_alert=True)
            self._torque = enabled
        log.info("arm %s: torque %s", self.name, "on" if enabled else "off")

    def close(self) -> None:
        """Close the port; servos keep their torque state (an arm must not drop on exit)."""
        self.bus.close()

    def __enter__(self) -> DynamixelArmBus:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Maintenance ------------------------------------------------------------------------

    def raw_positions(self) -> np.ndarray:
        """Present Position registers (ticks, homing offset included), in servo order."""
        data = self.bus.sync_read(ct.PRESENT_POSITION.address, ct.PRESENT_POSITION.size)
        return np.array(
            [ct.decode_value(data[sid], ct.PRESENT_POSITION) for sid in self.ids],
            dtype=np.int64,
        )

    def hardware_errors(self) -> dict[int, int]:
        """{servo id: Hardware Error Status} for every servo reporting one (empty: healthy)."""
        data = self.bus.sync_read(ct.HARDWARE_ERROR_STATUS.address, 1, allow_alert=True)
        return {sid: data[sid][0] for sid in self.ids if data[sid][0]}

    def reboot(self, ids: Sequence[int] | None = None) -> None:
        """Reboot servos (all of this arm by default) to clear hardware errors.

        Their RAM resets, so torque comes back off; settings are re-checked and the gripper
        goal current rewritten. Call set_torque(True) to hold again.
        """
        targets = tuple(ids) if ids is not None else self.ids
        unknown = set(targets) - set(self.ids)
        if unknown:
            raise ValueError(f"arm {self.name}: ids {sorted(unknown)} are not on this arm")
        with self.bus.lock:
            for sid in targets:
                self.bus.reboot(sid)
            self._torque = False
            self._configure(initial=False)
        log.info("arm %s: rebooted servos %s", self.name, list(targets))
