"""Per-cell arm calibration: homing offsets, drive directions, joint limits, gripper travel.

Every arm is assembled a little differently (horn angles, mirrored left/right mounting,
gripper fingers), so the same policy output only means the same pose on every cell once
each servo's raw ticks are mapped to the shared joint convention of protos/joint_layout.py
(radians about a common zero, gripper 0 = closed .. 1 = open). The mapping lives in one
JSON file per cell, written by the `calibrate` flow and applied by the arm bus at connect.

Per joint: `homing_offset` (ticks, written to the servo's Homing Offset so that the home
pose reads 2048), `direction` (+1/-1: joint angle = direction * (ticks - 2048) * 2*pi/4096)
and `lower`/`upper` (radians, written to the servo's position limits and kept for clamping).
Per gripper: `open_ticks` and `closed_ticks` (present-position ticks at either extreme).
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from drivers.dynamixel import control_table as ct
from protos.joint_layout import ARM_JOINT_NAMES, ARM_SIDES, JOINT_LOWER, JOINT_UPPER

log = logging.getLogger(__name__)

FORMAT = "fleetlearn.calibration"
FORMAT_VERSION = 1
JOINT_NAMES = ARM_JOINT_NAMES[:-1]  # the six joints, in bus order; the gripper comes last
GRIPPER_NAME = ARM_JOINT_NAMES[-1]
# A limit must map into the 0..4095 position range around the 2048 centre.
MAX_LIMIT_RAD = (ct.CENTER_TICK - 1) * ct.RAD_PER_TICK
MIN_GRIPPER_TRAVEL_TICKS = 64


class CalibrationError(ValueError):
    """A calibration that cannot be right (the message names the arm and field)."""


@dataclass(frozen=True)
class JointCalibration:
    name: str
    id: int
    homing_offset: int = 0
    direction: int = 1
    lower: float = -math.pi / 2
    upper: float = math.pi / 2

    def lower_upper_ticks(self) -> tuple[int, int]:
        """The (Min, Max) Position Limit registers that hold this joint's limits."""
        a = ct.CENTER_TICK + self.direction * self.lower / ct.RAD_PER_TICK
        b = ct.CENTER_TICK + self.direction * self.upper / ct.RAD_PER_TICK
        lo = max(0, math.floor(min(a, b) + 1e-9))
        hi = min(ct.TICKS_PER_REV - 1, math.ceil(max(a, b) - 1e-9))
        return lo, hi


@dataclass(frozen=True)
class GripperCalibration:
    id: int
    open_ticks: int
    closed_ticks: int
    homing_offset: int = 0
    name: str = GRIPPER_NAME

    def lower_upper_ticks(self) -> tuple[int, int]:
        return min(self.open_ticks, self.closed_ticks), max(self.open_ticks, self.closed_ticks)


@dataclass(frozen=True)
class ArmCalibration:
    """One arm: six joints in protos/joint_layout.py order, then the gripper (7 servos)."""

    name: str
    joints: tuple[JointCalibration, ...]
    gripper: GripperCalibration

    @property
    def ids(self) -> tuple[int, ...]:
        return (*(j.id for j in self.joints), self.gripper.id)

    @property
    def servo_names(self) -> tuple[str, ...]:
        return (*(j.name for j in self.joints), self.gripper.name)

    @property
    def lower(self) -> np.ndarray:
        """(7,) lower limits in bus units (radians; gripper 0)."""
        return np.array([*(j.lower for j in self.joints), 0.0])

    @property
    def upper(self) -> np.ndarray:
        return np.array([*(j.upper for j in self.joints), 1.0])

    def validate(self) -> ArmCalibration:
        where = f"arm {self.name!r}"
        if tuple(j.name for j in self.joints) != JOINT_NAMES:
            raise CalibrationError(
                f"{where}: joints must be {JOINT_NAMES} in this order, "
                f"got {tuple(j.name for j in self.joints)}"
            )
        ids = self.ids
        if len(set(ids)) != len(ids):
            raise CalibrationError(f"{where}: servo ids must be unique, got {ids}")
        for j in self.joints:
            at = f"{where}, joint {j.name!r} (id {j.id})"
            if not 0 <= j.id <= 252:
                raise CalibrationError(f"{at}: id must be 0..252")
            if j.direction not in (1, -1):
                raise CalibrationError(f"{at}: direction must be +1 or -1, got {j.direction}")
            if abs(j.homing_offset) > ct.MAX_HOMING_OFFSET:
                raise CalibrationError(f"{at}: homing_offset {j.homing_offset} out of range")
            if not (math.isfinite(j.lower) and math.isfinite(j.upper) and j.lower < j.upper):
                raise CalibrationError(f"{at}: need finite lower < upper, got {j.lower}, {j.upper}")
            if max(abs(j.lower), abs(j.upper)) > MAX_LIMIT_RAD:
                raise CalibrationError(
                    f"{at}: limits must lie within +-{MAX_LIMIT_RAD:.4f} rad of the centre "
                    f"(one turn of position mode), got [{j.lower}, {j.upper}]"
                )
        g = self.gripper
        at = f"{where}, gripper (id {g.id})"
        if not 0 <= g.id <= 252:
            raise CalibrationError(f"{at}: id must be 0..252")
        for tick_name in ("open_ticks", "closed_ticks"):
            value = getattr(g, tick_name)
            if not 0 <= value < ct.TICKS_PER_REV:
                raise CalibrationError(f"{at}: {tick_name} {value} outside 0..4095")
        if abs(g.open_ticks - g.closed_ticks) < MIN_GRIPPER_TRAVEL_TICKS:
            raise CalibrationError(
                f"{at}: open ({g.open_ticks}) and closed ({g.closed_ticks}) are less than "
                f"{MIN_GRIPPER_TRAVEL_TICKS} ticks apart; was the gripper moved?"
            )
        if abs(g.homing_offset) > ct.MAX_HOMING_OFFSET:
            raise CalibrationError(f"{at}: homing_offset {g.homing_offset} out of range")
        return self

    def to_dict(self) -> dict[str, Any]:
        return {
            "joints": [
                {
                    "name": j.name,
                    "id": j.id,
                    "homing_offset": j.homing_offset,
                    "direction": j.direction,
                    "lower": j.lower,
                    "upper": j.upper,
                }
                for j in self.joints
            ],
            "gripper": {
                "name": self.gripper.name,
                "id": self.gripper.id,
                "homing_offset": self.gripper.homing_offset,
                "open_ticks": self.gripper.open_ticks,
                "closed_ticks": self.gripper.closed_ticks,
            },
        }

    @classmethod
    def from_dict(cls, name: str, data: Mapping[str, Any]) -> ArmCalibration:
        where = f"arm {name!r}"
        try:
            joints = tuple(
                JointCalibration(
                    name=str(j["name"]),
                    id=_int(j["id"], f"{where}.joints[{i}].id"),
                    homing_offset=_int(j.get("homing_offset", 0), f"{where}.joints[{i}]"),
                    direction=_int(j.get("direction", 1), f"{where}.joints[{i}].direction"),
                    lower=float(j["lower"]),
                    upper=float(j["upper"]),
                )
                for i, j in enumerate(data["joints"])
            )
            g = data["gripper"]
            gripper = GripperCalibration(
                name=str(g.get("name", GRIPPER_NAME)),
                id=_int(g["id"], f"{where}.gripper.id"),
                open_ticks=_int(g["open_ticks"], f"{where}.gripper.open_ticks"),
                closed_ticks=_int(g["closed_ticks"], f"{where}.gripper.closed_ticks"),
                homing_offset=_int(g.get("homing_offset", 0), f"{where}.gripper.homing_offset"),
            )
        except KeyError as exc:
            raise CalibrationError(f"{where}: missing field {exc}") from None
        except (TypeError, ValueError) as exc:
            if isinstance(exc, CalibrationError):
                raise
            raise CalibrationError(f"{where}: {exc}") from None
        return cls(name=name, joints=joints, gripper=gripper).validate()


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CalibrationError(f"{where} must be an integer, got {value!r}")
    return value


@dataclass(frozen=True)
class CellCalibration:
    """Every arm of one cell (followers and, if present, leaders), keyed by arm name."""

    cell_id: str
    arms: Mapping[str, ArmCalibration]
    created_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    def arm(self, name: str) -> ArmCalibration:
        try:
            return self.arms[name]
        except KeyError:
            raise CalibrationError(
                f"cell {self.cell_id!r} has no calibration for arm {name!r} "
                f"(has {sorted(self.arms)})"
            ) from None

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "cell_id": self.cell_id,
            "created_at": self.created_at,
            "arms": {name: arm.to_dict() for name, arm in self.arms.items()},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "calibration") -> CellCalibration:
        if not isinstance(data, Mapping) or data.get("format") != FORMAT:
            raise CalibrationError(f"{source}: not a {FORMAT} file")
        if data.get("version") != FORMAT_VERSION:
            raise CalibrationError(
                f"{source}: version {data.get('version')!r}, this code reads {FORMAT_VERSION}"
            )
        arms_data = data.get("arms")
        if not isinstance(arms_data, Mapping) or not arms_data:
            raise CalibrationError(f"{source}: 'arms' must be a non-empty object")
        try:
            arms = {str(n): ArmCalibration.from_dict(str(n), a) for n, a in arms_data.items()}
        except CalibrationError as exc:
            raise CalibrationError(f"{source}: {exc}") from None
        return cls(
            cell_id=str(data.get("cell_id", "")),
            arms=arms,
            created_at=str(data.get("created_at", "")),
        )

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write atomically (a half-written calibration must never be loaded)."""
        for arm in self.arms.values():
            arm.validate()
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        os.replace(tmp, target)
        return target

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> CellCalibration:
        source = str(path)
        try:
            text = Path(path).read_text()
        except FileNotFoundError:
            raise CalibrationError(
                f"{source}: no calibration file; run `fleet calibrate` for this cell"
            ) from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise CalibrationError(f"{source}: not valid JSON ({exc})") from None
        return cls.from_dict(data, source)


def default_arm_calibration(
    name: str,
    first_id: int = 1,
    *,
    direction: tuple[int, ...] = (1, 1, 1, 1, 1, 1),
    gripper_open_ticks: int = 2560,
    gripper_closed_ticks: int = 1536,
) -> ArmCalibration:
    """Uncalibrated servos: no offsets, protos/joint_layout.py limits, ids first_id..first_id+6."""
    lower = JOINT_LOWER[: len(JOINT_NAMES)].astype(float)
    upper = JOINT_UPPER[: len(JOINT_NAMES)].astype(float)
    joints = tuple(
        JointCalibration(
            name=n,
            id=first_id + i,
            homing_offset=0,
            direction=direction[i],
            lower=float(lower[i]),
            upper=float(upper[i]),
        )
        for i, n in enumerate(JOINT_NAMES)
    )
    gripper = GripperCalibration(
        id=first_id + len(JOINT_NAMES),
        open_ticks=gripper_open_ticks,
        closed_ticks=gripper_closed_ticks,
    )
    return ArmCalibration(name=name, joints=joints, gripper=gripper).validate()


def default_calibration(
    cell_id: str = "sim",
    *,
    arms: tuple[str, ...] = ARM_SIDES,
    leaders: bool = False,
    first_id: int = 1,
) -> CellCalibration:
    """A cell of uncalibrated arms, each on its own bus with ids first_id..first_id+6.

    With `leaders`, adds `leader_<side>` arms (ALOHA: every follower has a leader).
    """
    names = list(arms) + ([f"leader_{a}" for a in arms] if leaders else [])
    return CellCalibration(
        cell_id=cell_id,
        arms={n: default_arm_calibration(n, first_id) for n in names},
    )


# Calibration flow -----------------------------------------------------------------------


@dataclass(frozen=True)
class CalibrationStep:
    """One thing the operator must do before the flow reads the servos."""

    arm: str
    key: str  # "home" | "gripper_open" | "gripper_closed"
    message: str


class CalibratableBus(Protocol):
    """What the flow needs from an arm bus (DynamixelArmBus provides it)."""

    name: str
    calibration: ArmCalibration

    def set_torque(self, enabled: bool) -> None: ...

    def raw_positions(self) -> np.ndarray: ...

    def apply_calibration(self, calibration: ArmCalibration) -> None: ...


def calibrate_arm(
    bus: CalibratableBus, prompt: Callable[[CalibrationStep], None]
) -> ArmCalibration:
    """Record one arm's home pose and gripper extremes; apply the result to the bus.

    Torque goes off first so the operator can move the arm by hand. Directions and joint
    limits are kept from the bus's current calibration (they come from the arm's build).
    """
    old = bus.calibration
    bus.set_torque(False)
    prompt(
        CalibrationStep(
            old.name,
            "home",
            f"{old.name}: move every joint of the arm to its home (zero) pose, then continue",
        )
    )
    home = np.asarray(bus.raw_positions(), dtype=np.int64)
    joints = tuple(
        # present = shaft + offset; the new offset makes the home shaft read 2048.
        replace(j, homing_offset=int(j.homing_offset + ct.CENTER_TICK - home[i]))
        for i, j in enumerate(old.joints)
    )
    prompt(CalibrationStep(old.name, "gripper_open", f"{old.name}: open the gripper fully"))
    opened = int(np.asarray(bus.raw_positions())[-1])
    prompt(CalibrationStep(old.name, "gripper_closed", f"{old.name}: close the gripper fully"))
    closed = int(np.asarray(bus.raw_positions())[-1])
    new = ArmCalibration(
        name=old.name,
        joints=joints,
        gripper=replace(old.gripper, open_ticks=opened, closed_ticks=closed),
    ).validate()
    bus.apply_calibration(new)
    log.info(
        "calibrated arm %s: offsets %s, gripper open %d closed %d",
        old.name,
        [j.homing_offset for j in joints],
        opened,
        closed,
    )
    return new


def calibrate(
    buses: Mapping[str, CalibratableBus],
    prompt: Callable[[CalibrationStep], None],
    path: str | os.PathLike[str],
    cell_id: str,
) -> CellCalibration:
    """Calibrate each arm in turn and write the cell's file (arms not given are kept)."""
    previous: dict[str, ArmCalibration] = {}
    if Path(path).exists():
        old = CellCalibration.load(path)
        if old.cell_id and old.cell_id != cell_id:
            raise CalibrationError(f"{path} belongs to cell {old.cell_id!r}, not {cell_id!r}")
        previous = dict(old.arms)
    for name, bus in buses.items():
        previous[name] = replace(calibrate_arm(bus, prompt), name=name)
    cal = CellCalibration(cell_id=cell_id, arms=previous)
    cal.save(path)
    log.info("cell %s: calibration of %s written to %s", cell_id, sorted(buses), path)
    return cal
