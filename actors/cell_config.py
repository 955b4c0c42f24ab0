"""A real cell's hardware description, read from a TOML file the lab keeps on the cell.

Rule between this file and `fleet actor` flags: everything that describes the CELL (arms,
cameras, calibration, control rate, episode limit, tasks, JPEG quality, cell id) comes from
this file; everything about reaching the LEARNER (address, token, TLS, verify key, spool,
version cache, metrics) comes from flags. `--cell` must equal `cell_id` here, so a config
copied to the wrong computer fails loudly instead of uploading under the wrong name.

The file's shape is a set of pydantic models (strict: TOML types are exact, unknown keys are
refused); every error names the file, the key and what was expected, so a person can fix
the file from the message alone. Relative paths resolve against the config file's directory.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import takewhile
from pathlib import Path
from typing import Annotated, Any, ClassVar, get_args, get_origin

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
)
from pydantic_core import PydanticCustomError

from drivers.calibration import CalibrationError, CellCalibration
from fleet.common.ids import ID_RULE, is_safe_id
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
    realtime_priority: int
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
        try:
            file = _CellFile.model_validate(data)
        except ValidationError as exc:
            raise CellConfigError(f"{source}: {_first_problem(exc, data)}") from None
        followers = _arm_ports(file.arms.followers, "")
        leaders = None if file.arms.leaders is None else _arm_ports(file.arms.leaders, "leader_")
        ports = [(f"arms.followers.{s}.port", a.port) for s, a in followers.items()]
        ports += [(f"arms.leaders.{s}.port", a.port) for s, a in (leaders or {}).items()]
        _unique(source, ports, "serial port")
        cameras = tuple(
            CameraConfig(name, c.serial, c.width, c.height, c.fps, c.depth)
            for name, c in file.cameras.items()
        )
        _unique(source, [(f"cameras.{c.name}.serial", c.serial) for c in cameras], "camera serial")
        cal_path = _resolve(source, file.calibration.file)
        if not cal_path.is_file():
            raise CellConfigError(
                f"{source}: key 'calibration.file' names {str(cal_path)!r}, which is not a "
                "file (relative paths are relative to this config file; run `fleet calibrate` "
                "to write a calibration)"
            )
        _check_calibrated(source, cal_path, followers, leaders)
        op_input = file.operator.input or "stdin"
        if op_input != "stdin":
            op_input = str(_resolve(source, op_input))
        return cls(
            cell_id=file.cell.id,
            followers=followers,
            leaders=leaders,
            cameras=cameras,
            calibration=cal_path,
            control_hz=file.actor.control_hz,
            max_episode_s=file.actor.max_episode_s,
            tasks=tuple(file.actor.tasks),
            jpeg_quality=file.actor.jpeg_quality,
            realtime_priority=file.actor.realtime_priority,
            operator_input=op_input,
            source=source,
        )


def _resolve(source: Path, raw: str) -> Path:
    p = Path(raw).expanduser()
    return p if p.is_absolute() else (source.parent / p)


# -- the file's shape --------------------------------------------------------------------
# Each field's description is what the message says is expected when the value is wrong;
# a validator that knows better raises _expected(...) with its own words.


def _expected(what: str, **where: Any) -> PydanticCustomError:
    return PydanticCustomError("expected", "expected {expected}", {"expected": what, **where})


def _not_blank(value: str) -> str:
    if not value.strip():
        raise PydanticCustomError("blank", "is blank")
    return value.strip()


def _serial_as_text(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)  # a bare number in TOML: the serial is still a string
    return value


Text = Annotated[str, AfterValidator(_not_blank)]
TEXT = "a non-empty string"
ARM_TABLE = "a table with port (and optional baud, calibration_arm)"


class _Table(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)
    EXPECTED: ClassVar[str] = "a table"


class _CellSection(_Table):
    id: Text = Field(description=TEXT)

    @field_validator("id")
    @classmethod
    def _safe(cls, value: str) -> str:
        if not is_safe_id(value):  # the learner refuses any other id with every chunk
            raise _expected(ID_RULE)
        return value


class _ArmSpec(_Table):
    EXPECTED: ClassVar[str] = ARM_TABLE
    port: Text = Field(description=TEXT)
    baud: int = Field(DEFAULT_BAUD, description=f"a Dynamixel baud rate, one of {list(BAUDS)}")
    calibration_arm: Text | None = Field(None, description=TEXT)

    @field_validator("baud")
    @classmethod
    def _known_baud(cls, value: int) -> int:
        if value not in BAUDS:
            raise _expected(f"a Dynamixel baud rate, one of {list(BAUDS)}")
        return value


class _ArmPair(_Table):  # one field per side of protos.joint_layout.ARM_SIDES
    left: _ArmSpec = Field(description=ARM_TABLE)
    right: _ArmSpec = Field(description=ARM_TABLE)


class _Arms(_Table):
    followers: _ArmPair = Field(description="a table")
    leaders: _ArmPair | None = Field(None, description="a table")


class _CameraSpec(_Table):
    EXPECTED: ClassVar[str] = "a table with serial, width, height, fps, depth"
    serial: Annotated[Text, BeforeValidator(_serial_as_text)] = Field(
        description="the camera's serial number as a string"
    )
    width: int = Field(640, ge=16, le=4096, description="an integer in 16..4096")
    height: int = Field(480, ge=16, le=4096, description="an integer in 16..4096")
    fps: int = Field(30, ge=1, le=300, description="an integer in 1..300")
    depth: bool = Field(False, description="true or false")


class _Calibration(_Table):
    file: Text = Field(description=TEXT)


class _ActorSection(_Table):
    control_hz: float = Field(50.0, ge=1.0, le=500.0, description="a number in 1..500")
    max_episode_s: float = Field(60.0, ge=0.1, le=3600.0, description="a number in 0.1..3600")
    tasks: list[Annotated[str, Field(min_length=1)]] = Field(
        default_factory=list, validate_default=True, description="a list of task names (strings)"
    )
    jpeg_quality: int = Field(90, ge=1, le=100, description="an integer in 1..100")
    realtime_priority: int = Field(
        0, ge=0, le=99, description="an integer in 0..99 (0 = an ordinary thread)"
    )

    @field_validator("tasks")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise _expected("at least one task name (a real cell has no task list)")
        return value


class _Operator(_Table):
    input: Text | None = Field(None, description=TEXT)


class _CellFile(_Table):
    cell: _CellSection = Field(description="a table")
    arms: _Arms = Field(description="a table")
    cameras: dict[str, _CameraSpec] = Field(
        default_factory=dict, description="a table of [cameras.<name>] tables"
    )
    calibration: _Calibration = Field(description="a table")
    actor: _ActorSection = Field(default_factory=dict, validate_default=True)
    operator: _Operator = Field(default_factory=dict, validate_default=True)

    @field_validator("cameras", mode="before")
    @classmethod
    def _camera_names(cls, value: Any) -> Any:
        for name in value if isinstance(value, Mapping) else ():
            if not is_safe_id(name):  # the camera's array name in the episode store
                raise _expected(f"a camera name of {ID_RULE}", key=f"cameras.{name}", got=name)
        return value


# -- from a pydantic error to a message a person can act on ------------------------------

_ABSENT = object()


def _first_problem(exc: ValidationError, data: Mapping[str, Any]) -> str:
    """The first error in the file's reading order, worded as `key 'a.b' is X; expected Y`.
    A table's unknown keys come before its fields: an unknown key is usually a known one
    misspelled, which pydantic also reports as missing."""
    err = min(exc.errors(), key=lambda e: _reading_order(e, data))
    loc = list(takewhile(lambda part: isinstance(part, str), err["loc"]))  # a list, not its item
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        table = _optional_inner(_type_at(loc[:-1])[0])
        return f"unknown key {key!r}; expected one of {sorted(table.model_fields)}"
    ctx = err.get("ctx") or {}
    key = ctx.get("key", key)
    expected = ctx["expected"] if err["type"] == "expected" else _type_at(loc)[1]
    if err["type"] == "missing":
        return f"key {key!r} is missing; expected {expected}"
    got = ctx["got"] if "got" in ctx else _raw(data, loc)
    if got is _ABSENT:
        got = err["input"]
    return f"key {key!r} is {got!r}; expected {expected}"


def _reading_order(err: Any, data: Any) -> tuple[int, ...]:
    """Where `err` sits when the file is read table by table, field by field."""
    order: list[int] = []
    typ: Any = _CellFile
    for i, part in enumerate(err["loc"]):
        typ = _optional_inner(typ)
        if isinstance(part, int):
            order.append(part)
        elif get_origin(typ) is dict:
            names = list(data) if isinstance(data, Mapping) else []
            order.append(names.index(part) if part in names else len(names))
            typ = get_args(typ)[1]
        elif isinstance(typ, type) and issubclass(typ, BaseModel):
            fields = list(typ.model_fields)
            last = i == len(err["loc"]) - 1
            if err["type"] == "extra_forbidden" and last:
                order.append(-1)
            else:
                order.append(fields.index(part) if part in fields else len(fields))
                typ = typ.model_fields[part].annotation if part in fields else None
        data = data.get(part) if isinstance(data, Mapping) else None
    return tuple(order)


def _type_at(loc: list[str]) -> tuple[Any, str]:
    """The declared type at `loc` in the file's models, and what is expected there."""
    typ: Any = _CellFile
    expected = _Table.EXPECTED
    for part in loc:
        typ = _optional_inner(typ)
        if get_origin(typ) is dict:
            typ = get_args(typ)[1]
            expected = typ.EXPECTED
        elif isinstance(typ, type) and issubclass(typ, BaseModel) and part in typ.model_fields:
            info = typ.model_fields[part]
            typ = info.annotation
            inner = _optional_inner(typ)
            model_expected = getattr(inner, "EXPECTED", _Table.EXPECTED)
            expected = info.description or model_expected
    return typ, expected


def _optional_inner(typ: Any) -> Any:
    args = [a for a in get_args(typ) if a is not type(None)]
    return args[0] if type(None) in get_args(typ) and len(args) == 1 else typ


def _raw(data: Any, loc: list[str]) -> Any:
    for part in loc:
        if not isinstance(data, Mapping) or part not in data:
            return _ABSENT
        data = data[part]
    return data


# -- checks across keys and against the disk ---------------------------------------------


def _arm_ports(pair: _ArmPair, prefix: str) -> dict[str, ArmPort]:
    specs = {"left": pair.left, "right": pair.right}
    return {
        side: ArmPort(
            side=side,
            port=specs[side].port,
            baud=specs[side].baud,
            calibration_arm=specs[side].calibration_arm or f"{prefix}{side}",
        )
        for side in ARM_SIDES
    }


def _check_calibrated(
    source: Path, cal_path: Path, followers: dict[str, ArmPort], leaders: dict[str, ArmPort] | None
) -> None:
    """Every arm named here must be in the calibration file: found now, not at the first
    episode on a cell somebody is waiting at."""
    try:
        cal = CellCalibration.load(cal_path)
    except CalibrationError as exc:
        raise CellConfigError(f"{source}: key 'calibration.file': {exc}") from None
    for where, pair in (("arms.followers", followers), ("arms.leaders", leaders or {})):
        for side, arm in pair.items():
            if arm.calibration_arm not in cal.arms:
                raise CellConfigError(
                    f"{source}: key '{where}.{side}.calibration_arm' is "
                    f"{arm.calibration_arm!r}, which {cal_path} does not calibrate; "
                    f"expected one of {sorted(cal.arms)}"
                )


def _unique(source: Path, items: list[tuple[str, str]], what: str) -> None:
    seen: dict[str, str] = {}
    for key, value in items:
        if value in seen:
            raise CellConfigError(
                f"{source}: key {key!r} repeats {what} {value!r} of {seen[value]!r}; "
                f"each {what} must be unique"
            )
        seen[value] = key
