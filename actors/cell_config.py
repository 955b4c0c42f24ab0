"""A real cell's hardware description, read from a TOML file the lab keeps on the cell.

Rule between this file and `fleet actor` flags: everything that describes the CELL (arms,
cameras, calibration, control rate, episode limit, tasks, JPEG quality, cell id) comes from
this file; everything about reaching the LEARNER (address, token, TLS, verify key, spool,
version cache, metrics) comes from flags. `--cell` must equal `cell_id` here, so a config
copied to the wrong computer fails loudly instead of uploading under the wrong name.

Every error names the file, the key and what was expected, so a person can fix the file
from the message alone. Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from drivers.calibration import CalibrationError, CellCalibration
from fleet.ids import ID_RULE, is_safe_id
from protos.joint_layout import ARM_SIDES

DEFAULT_BAUD = 1_000_000
BAUDS = (9_600, 57_600, 115_200, 1_000_000, 2_000_000, 3_000_000, 4_000_000, 4_500_000)


class CellConfigError(ValueError):
    """A cell config a person must fix; the message says where and how."""


@dataclass(frozen=True)
class ArmPort:
    """One arm's serial bus: the port, its baud rate and its calibration arm name."""

    side: str
    port: str
    baud: int
    calibration_arm: str


@dataclass(frozen=True)
class CameraConfig:
    """One RealSense camera, found by serial number."""

    name: str
    serial: str
    width: int
    height: int
    fps: int
    depth: bool


@dataclass(frozen=True)
class CellConfig:
    cell_id: str
    followers: dict[str, ArmPort]
    leaders: dict[str, ArmPort] | None
    cameras: tuple[CameraConfig, ...]
    calibration: Path
    control_hz: float
    max_episode_s: float
    tasks: tuple[str, ...]
    jpeg_quality: int
    operator_input: str  # "stdin" or a path (a FIFO a pedal or button box writes to)
    source: Path

    @classmethod
    def load(cls, path: str | Path) -> CellConfig:
        src = Path(path).expanduser().resolve()
        try:
            with src.open("rb") as f:
                data = tomllib.load(f)
        except FileNotFoundError:
            raise CellConfigError(f"{src}: no such cell config file") from None
        except tomllib.TOMLDecodeError as exc:
            raise CellConfigError(f"{src}: not valid TOML: {exc}") from None
        return cls.from_dict(data, src)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: Path) -> CellConfig:
        r = _Reader(source)
        r.only(data, "", {"cell", "arms", "cameras", "calibration", "actor", "operator"})
        cell = r.table(data, "cell")
        r.only(cell, "cell", {"id"})
        cell_id = r.string(cell, "cell.id")
        if not is_safe_id(cell_id):  # the learner refuses any other id with every chunk
            r.fail("cell.id", ID_RULE, cell_id)
        arms = r.table(data, "arms")
        r.only(arms, "arms", {"followers", "leaders"})
        followers = r.arm_pair(r.table(arms, "followers", "arms."), "arms.followers", "")
        leaders = None
        if "leaders" in arms:
            leaders = r.arm_pair(r.table(arms, "leaders", "arms."), "arms.leaders", "leader_")
        ports = [(f"arms.followers.{s}.port", a.port) for s, a in followers.items()]
        ports += [(f"arms.leaders.{s}.port", a.port) for s, a in (leaders or {}).items()]
        r.unique(ports, "serial port")
        cams_tbl = data.get("cameras", {})
        if not isinstance(cams_tbl, Mapping):
            r.fail("cameras", "a table of [cameras.<name>] tables")
        cameras = tuple(r.camera(name, spec) for name, spec in cams_tbl.items())
        r.unique([(f"cameras.{c.name}.serial", c.serial) for c in cameras], "camera serial")
        cal = r.table(data, "calibration")
        r.only(cal, "calibration", {"file"})
        cal_path = r.path(cal, "calibration.file", must_exist=True)
        r.calibrated(cal_path, followers, leaders)
        actor = data.get("actor", {})
        if not isinstance(actor, Mapping):
            r.fail("actor", "a table")
        r.only(actor, "actor", {"control_hz", "max_episode_s", "tasks", "jpeg_quality"})
        control_hz = r.number(actor, "actor.control_hz", 50.0, lo=1.0, hi=500.0)
        max_episode_s = r.number(actor, "actor.max_episode_s", 60.0, lo=0.1, hi=3600.0)
        tasks = r.tasks(actor)
        jpeg = int(r.number(actor, "actor.jpeg_quality", 90, lo=1, hi=100, integer=True))
        op = data.get("operator", {})
        if not isinstance(op, Mapping):
            r.fail("operator", "a table")
        r.only(op, "operator", {"input"})
        op_input = "stdin"
        if "input" in op:
            raw = r.string(op, "operator.input")
            op_input = raw if raw == "stdin" else str(_resolve(source, raw))
        return cls(
            cell_id=cell_id,
            followers=followers,
            leaders=leaders,
            cameras=cameras,
            calibration=cal_path,
            control_hz=control_hz,
            max_episode_s=max_episode_s,
            tasks=tasks,
            jpeg_quality=jpeg,
            operator_input=op_input,
            source=source,
        )


def _resolve(source: Path, raw: str) -> Path:
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (source.parent / p)


class _Reader:
    """Typed reads that turn every mistake into one readable CellConfigError."""

    def __init__(self, source: Path) -> None:
        self.source = source

    def fail(self, key: str, expected: str, got: Any = None, *, missing: bool = False) -> None:
        what = "is missing" if missing else f"is {got!r}"
        raise CellConfigError(f"{self.source}: key {key!r} {what}; expected {expected}")

    def only(self, table: Mapping[str, Any], where: str, allowed: set[str]) -> None:
        for k in table:
            if k not in allowed:
                key = f"{where}.{k}" if where else k
                raise CellConfigError(
                    f"{self.source}: unknown key {key!r}; expected one of {sorted(allowed)}"
                )

    def table(self, data: Mapping[str, Any], key: str, prefix: str = "") -> Mapping[str, Any]:
        if key not in data:
            self.fail(prefix + key, "a table", missing=True)
        value = data[key]
        if not isinstance(value, Mapping):
            self.fail(prefix + key, "a table", value)
        return value

    def string(self, table: Mapping[str, Any], key: str) -> str:
        leaf = key.rsplit(".", 1)[-1]
        if leaf not in table:
            self.fail(key, "a non-empty string", missing=True)
        value = table[leaf]
        if not isinstance(value, str) or not value.strip():
            self.fail(key, "a non-empty string", value)
        return value.strip()

    def number(
        self,
        table: Mapping[str, Any],
        key: str,
        default: float,
        *,
        lo: float,
        hi: float,
        integer: bool = False,
    ) -> float:
        leaf = key.rsplit(".", 1)[-1]
        value = table.get(leaf, default)
        kind = "an integer" if integer else "a number"
        ok_type = isinstance(value, int) if integer else isinstance(value, int | float)
        if isinstance(value, bool) or not ok_type or not lo <= value <= hi:
            self.fail(key, f"{kind} in {lo:g}..{hi:g}", value)
        return float(value)

    def path(self, table: Mapping[str, Any], key: str, *, must_exist: bool) -> Path:
        p = _resolve(self.source, self.string(table, key))
        if must_exist and not p.is_file():
            raise CellConfigError(
                f"{self.source}: key {key!r} names {str(p)!r}, which is not a file "
                "(relative paths are relative to this config file; run `fleet calibrate` "
                "to write a calibration)"
            )
        return p

    def arm_pair(self, pair: Mapping[str, Any], where: str, prefix: str) -> dict[str, ArmPort]:
        for side in pair:
            if side not in ARM_SIDES:
                self.fail(f"{where}.{side}", f"an arm named one of {list(ARM_SIDES)}", side)
        out: dict[str, ArmPort] = {}
        for side in ARM_SIDES:
            key = f"{where}.{side}"
            if side not in pair:
                self.fail(
                    key, "a table with port (and optional baud, calibration_arm)", missing=True
                )
            spec = pair[side]
            if not isinstance(spec, Mapping):
                self.fail(key, "a table with port (and optional baud, calibration_arm)", spec)
            self.only(spec, key, {"port", "baud", "calibration_arm"})
            port = self.string(spec, f"{key}.port")
            baud = spec.get("baud", DEFAULT_BAUD)
            if isinstance(baud, bool) or baud not in BAUDS:
                self.fail(f"{key}.baud", f"a Dynamixel baud rate, one of {list(BAUDS)}", baud)
            cal_arm = f"{prefix}{side}"
            if "calibration_arm" in spec:
                cal_arm = self.string(spec, f"{key}.calibration_arm")
            out[side] = ArmPort(side=side, port=port, baud=int(baud), calibration_arm=cal_arm)
        return out

    def camera(self, name: str, spec: Any) -> CameraConfig:
        key = f"cameras.{name}"
        if not is_safe_id(name):  # the camera's array name in the episode store
            self.fail(key, f"a camera name of {ID_RULE}", name)
        if not isinstance(spec, Mapping):
            self.fail(key, "a table with serial, width, height, fps, depth", spec)
        self.only(spec, key, {"serial", "width", "height", "fps", "depth"})
        serial = spec.get("serial")
        if isinstance(serial, int) and not isinstance(serial, bool):
            serial = str(serial)  # a bare number in TOML: the serial is still a string
        if not isinstance(serial, str) or not serial.strip():
            self.fail(f"{key}.serial", "the camera's serial number as a string", serial)
        width = self.number(spec, f"{key}.width", 640, lo=16, hi=4096, integer=True)
        height = self.number(spec, f"{key}.height", 480, lo=16, hi=4096, integer=True)
        fps = self.number(spec, f"{key}.fps", 30, lo=1, hi=300, integer=True)
        depth = spec.get("depth", False)
        if not isinstance(depth, bool):
            self.fail(f"{key}.depth", "true or false", depth)
        return CameraConfig(name, str(serial).strip(), int(width), int(height), int(fps), depth)

    def tasks(self, actor: Mapping[str, Any]) -> tuple[str, ...]:
        value = actor.get("tasks", [])
        if not isinstance(value, list) or not all(isinstance(t, str) and t for t in value):
            self.fail("actor.tasks", "a list of task names (strings)", value)
        if not value:
            self.fail("actor.tasks", "at least one task name (a real cell has no task list)", value)
        return tuple(value)

    def calibrated(
        self, cal_path: Path, followers: dict[str, ArmPort], leaders: dict[str, ArmPort] | None
    ) -> None:
        """Every arm named here must be in the calibration file: found now, not at the
        first episode on a cell somebody is waiting at."""
        try:
            cal = CellCalibration.load(cal_path)
        except CalibrationError as exc:
            raise CellConfigError(f"{self.source}: key 'calibration.file': {exc}") from None
        for where, pair in (("arms.followers", followers), ("arms.leaders", leaders or {})):
            for side, arm in pair.items():
                if arm.calibration_arm not in cal.arms:
                    raise CellConfigError(
                        f"{self.source}: key '{where}.{side}.calibration_arm' is "
                        f"{arm.calibration_arm!r}, which {cal_path} does not calibrate; "
                        f"expected one of {sorted(cal.arms)}"
                    )

    def unique(self, items: list[tuple[str, str]], what: str) -> None:
        seen: dict[str, str] = {}
        for key, value in items:
            if value in seen:
                raise CellConfigError(
                    f"{self.source}: key {key!r} repeats {what} {value!r} of {seen[value]!r}; "
                    f"each {what} must be unique"
                )
            seen[value] = key
