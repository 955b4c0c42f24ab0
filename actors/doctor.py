"""`fleet doctor --cell-config cell.toml`: a real cell's preflight, in one table.

Before a cell's first run a person wants to know, in one place, whether what the config
describes is what is plugged in: each arm's port opens; every servo ID answers, once, with
a model and firmware this driver knows, at the configured baud, with the return delay the
actor wants; the calibration file fits the arms (their present poses lie inside its limits);
each RealSense serial is connected and offers the configured modes; the spool's disk has
room; the clock agrees with the learner's; the learner takes this cell's certificate and
token. Every row that is not OK says what to do.

It only reads: no servo setting is written and no torque is turned on (the actor writes
the settings at connect). Exit status 0 when nothing failed, 1 otherwise, 2 when the config
itself cannot be read.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from actors.cell_config import ArmPort, CameraConfig, CellConfig, CellConfigError
from actors.thread_priority import realtime_allowed
from drivers.calibration import ArmCalibration, CellCalibration
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.bus import DynamixelBus, DynamixelError

OK, WARN, FAIL = "ok", "warn", "FAIL"
_STYLE = {OK: "green", WARN: "yellow", FAIL: "bold red"}
# Models the driver's control table fits (X series, Protocol 2.0): what ALOHA arms use.
KNOWN_MODELS = {
    ct.MODEL_XM430_W350: "XM430-W350",
    ct.MODEL_XM540_W270: "XM540-W270",
    ct.MODEL_XL430_W250: "XL430-W250",
}
BAUD_CODES = {0: 9_600, 1: 57_600, 2: 115_200, 3: 1_000_000, 4: 2_000_000, 5: 3_000_000}
BAUD_CODES |= {6: 4_000_000, 7: 4_500_000}
CALIBRATION_MARGIN_TICKS = 100  # ~9 degrees: a joint resting just past a limit is fine


@dataclass(frozen=True)
class Check:
    """One row of the doctor's table."""

    part: str
    check: str
    status: str
    detail: str


@dataclass(frozen=True)
class DoctorOptions:
    learner: str = ""
    token: str = ""
    tls_dir: Path | None = None
    spool_dir: Path | None = None
    spool_quota_mb: int = 2048
    min_firmware: int = 38
    return_delay_us: int = 0  # what the actor writes at connect
    max_clock_offset_s: float = 0.5
    timeout_s: float = 5.0


def _ids_text(ids: Sequence[int]) -> str:
    return ", ".join(str(i) for i in ids)


def _ids_label(ids: Sequence[int]) -> str:
    return f"ID {ids[0]}" if len(ids) == 1 else f"IDs {_ids_text(ids)}"


def _ids_phrase(ids: Sequence[int]) -> str:
    if len(ids) == 1:
        return f"ID {ids[0]} does not answer"
    return f"IDs {_ids_text(ids)} do not answer"


def check_arm(label: str, spec: ArmPort, cal: ArmCalibration, opts: DoctorOptions) -> list[Check]:
    """Port, IDs, models and firmware, baud and return delay, calibration fit: one arm."""
    part = f"arm {label} ({spec.port})"
    names = dict(zip(cal.ids, (f"{label}_{n}" for n in cal.servo_names), strict=True))
    # Patient retries: a preflight has time, and a busy computer is not a missing servo.
    bus = DynamixelBus(
        spec.port,
        cal.ids,
        names=names,
        label=f"arm {label}",
        baud=spec.baud,
        retries=4,
        retry_budget_s=1.0,
    )
    rows: list[Check] = []
    try:
        bus.open()
    except DynamixelError as exc:
        return [
            Check(
                part,
                "port opens",
                FAIL,
                f"{exc}. Is the U2D2 plugged in and this its /dev/serial/by-id name? "
                "Is the user in the dialout group?",
            )
        ]
    try:
        rows.append(Check(part, "port opens", OK, f"{spec.baud} baud"))
        rows += _check_ids(part, bus, cal, spec, opts)
        if not any(r.status == FAIL and r.check == "servo IDs" for r in rows):
            rows += _check_calibration(part, bus, cal)
    except DynamixelError as exc:
        rows.append(Check(part, "servo bus", FAIL, f"{exc}. Check the cable and servo power."))
    finally:
        bus.close()
    return rows


def _check_ids(
    part: str, bus: DynamixelBus, cal: ArmCalibration, spec: ArmPort, opts: DoctorOptions
) -> list[Check]:
    rows: list[Check] = []
    missing: list[int] = []
    duplicated: list[int] = []
    garbled: list[int] = []
    models: dict[int, tuple[int, int]] = {}
    for sid in cal.ids:
        try:
            answers = bus.answers(sid)
        except DynamixelError:
            garbled.append(sid)
            continue
        if not answers:
            missing.append(sid)
        elif len(answers) > 1:
            duplicated.append(sid)
        else:
            models[sid] = answers[0]
    if missing:
        found = sorted(bus.scan())
        extra = [i for i in found if i not in cal.ids]
        rows.append(
            Check(
                part,
                "servo IDs",
                FAIL,
                f"{_ids_phrase(missing)} at {spec.baud} baud (the bus answers "
                f"with IDs {_ids_text(found) or 'none'}). Check power and the daisy chain; "
                + (
                    f"set ID {extra[0]} to the missing one with Dynamixel Wizard."
                    if extra
                    else "a servo at another baud needs Dynamixel Wizard to set it."
                ),
            )
        )
    if duplicated or garbled:
        both = sorted(duplicated + garbled)
        rows.append(
            Check(
                part,
                "servo IDs",
                FAIL,
                f"ID {_ids_text(both)} is answered by more than one servo (a new servo still "
                "at its factory ID 1?). Connect the servos one at a time and give each its "
                "own ID with Dynamixel Wizard.",
            )
        )
    if not missing and not duplicated and not garbled:
        rows.append(Check(part, "servo IDs", OK, f"{_ids_text(cal.ids)} each answer once"))
    bad_model = {s: m for s, (m, _) in models.items() if m not in KNOWN_MODELS}
    old_fw = {s: fw for s, (_, fw) in models.items() if fw < opts.min_firmware}
    if bad_model:
        rows.append(
            Check(
                part,
                "model",
                FAIL,
                "; ".join(f"ID {s} is model {m}" for s, m in bad_model.items())
                + f": the driver supports {', '.join(KNOWN_MODELS.values())}. Replace it.",
            )
        )
    elif models:
        kinds = sorted({KNOWN_MODELS[m] for m, _ in models.values()})
        rows.append(Check(part, "model", OK, ", ".join(kinds)))
    if old_fw:
        rows.append(
            Check(
                part,
                "firmware",
                FAIL,
                "; ".join(f"ID {s} has firmware {fw}" for s, fw in old_fw.items())
                + f"; at least {opts.min_firmware} is needed. Update it with Dynamixel Wizard.",
            )
        )
    elif models:
        versions = sorted({fw for _, fw in models.values()})
        rows.append(Check(part, "firmware", OK, "version " + ", ".join(map(str, versions))))
    rows += _check_registers(part, bus, sorted(models), spec, opts)
    return rows


def _check_registers(
    part: str, bus: DynamixelBus, ids: Sequence[int], spec: ArmPort, opts: DoctorOptions
) -> list[Check]:
    if not ids:
        return []
    bauds = {sid: bus.read(sid, ct.BAUD_RATE) for sid in ids}
    delays = {sid: bus.read(sid, ct.RETURN_DELAY_TIME) * ct.RETURN_DELAY_UNIT_US for sid in ids}
    rows = []
    wrong_baud = {
        s: BAUD_CODES.get(b, b) for s, b in bauds.items() if BAUD_CODES.get(b) != spec.baud
    }
    if wrong_baud:
        rows.append(
            Check(
                part,
                "baud",
                FAIL,
                "; ".join(f"ID {s} holds baud {b}" for s, b in wrong_baud.items())
                + f", the config says {spec.baud}. Set them alike (Dynamixel Wizard, or "
                "the config's baud).",
            )
        )
    else:
        rows.append(Check(part, "baud", OK, f"{spec.baud} on every servo"))
    slow = {s: d for s, d in delays.items() if d != opts.return_delay_us}
    if slow:
        rows.append(
            Check(
                part,
                "return delay",
                WARN,
                "; ".join(
                    f"{_ids_label(sorted(s for s in slow if slow[s] == d))} wait {d} us"
                    for d in sorted(set(slow.values()))
                )
                + f". The actor sets {opts.return_delay_us} us at connect; nothing to do "
                "unless another tool resets it.",
            )
        )
    else:
        rows.append(Check(part, "return delay", OK, f"{opts.return_delay_us} us"))
    return rows


def _check_calibration(part: str, bus: DynamixelBus, cal: ArmCalibration) -> list[Check]:
    """The present pose, seen through the calibration's offsets, must lie within its
    limits: an arm that is not the calibrated one (swapped ports, a replaced servo) shows
    joints far outside them."""
    servos = [*cal.joints, cal.gripper]
    outside = []
    offsets_differ = []
    for servo, name in zip(servos, cal.servo_names, strict=True):
        held = bus.read(servo.id, ct.HOMING_OFFSET)
        present = bus.read(servo.id, ct.PRESENT_POSITION)
        ticks = present - held + servo.homing_offset
        lo, hi = servo.lower_upper_ticks()
        if not lo - CALIBRATION_MARGIN_TICKS <= ticks <= hi + CALIBRATION_MARGIN_TICKS:
            outside.append(f"{name} (ID {servo.id}) at {ticks} ticks, limits {lo}..{hi}")
        if held != servo.homing_offset:
            offsets_differ.append(servo.id)
    if outside:
        return [
            Check(
                part,
                "calibration",
                FAIL,
                f"arm {cal.name!r} of the calibration does not fit: {'; '.join(outside)}. "
                "Are the arms' ports swapped, or a servo replaced? Check the ports, else "
                "recalibrate with `fleet calibrate`.",
            )
        ]
    note = (
        f"; IDs {_ids_text(offsets_differ)} hold other homing offsets, the actor writes "
        "the calibration's at connect"
        if offsets_differ
        else ""
    )
    return [Check(part, "calibration", OK, f"the pose fits arm {cal.name!r}'s limits{note}")]


def check_camera(cam: CameraConfig, devices: Mapping[str, Any]) -> list[Check]:
    """The serial is connected and offers RGB8 (and Z16 when depth) at the configured mode."""
    import pyrealsense2 as rs

    from drivers.realsense import CameraError, find_device

    part = f"camera {cam.name} ({cam.serial})"
    try:
        dev = devices.get(cam.serial) or find_device(cam.serial)
    except CameraError as exc:
        return [
            Check(
                part,
                "connected",
                FAIL,
                f"{exc}. Plug it into a USB 3 port; `rs-enumerate-devices -s` lists serials.",
            )
        ]
    offered: set[tuple[Any, Any, int, int, int]] = set()
    for sensor in dev.query_sensors():
        for p in sensor.get_stream_profiles():
            if p.is_video_stream_profile():
                v = p.as_video_stream_profile()
                offered.add((p.stream_type(), p.format(), v.width(), v.height(), p.fps()))
    rows = [Check(part, "connected", OK, dev.get_info(rs.camera_info.name))]
    wanted = [("colour RGB8", (rs.stream.color, rs.format.rgb8, cam.width, cam.height, cam.fps))]
    if cam.depth:
        wanted.append(
            ("depth Z16", (rs.stream.depth, rs.format.z16, cam.width, cam.height, cam.fps))
        )
    for what, mode in wanted:
        text = f"{what} {cam.width}x{cam.height} at {cam.fps} fps"
        if mode in offered:
            rows.append(Check(part, "stream mode", OK, text))
        else:
            same = sorted(f"{w}x{h}@{f}" for s, fm, w, h, f in offered if (s, fm) == mode[:2])
            rows.append(
                Check(
                    part,
                    "stream mode",
                    FAIL,
                    f"{text} is not offered (it offers {', '.join(same) or 'none'}). "
                    "Pick one of those in the config.",
                )
            )
    return rows


def check_spool(spool_dir: Path, quota_mb: int) -> Check:
    """The spool's disk must hold the spool's quota (the cell spools while offline)."""
    where = spool_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free_mb = shutil.disk_usage(where).free >> 20
    part = f"spool ({spool_dir})"
    if free_mb < quota_mb:
        return Check(
            part,
            "disk free",
            FAIL,
            f"{free_mb} MB free on {where}, the spool may need {quota_mb} MB. Free space, or "
            "give `fleet actor` a smaller --spool-quota-mb or another --spool-dir.",
        )
    return Check(part, "disk free", OK, f"{free_mb} MB free, quota {quota_mb} MB")


def check_learner(cell_id: str, opts: DoctorOptions) -> list[Check]:
    """One heartbeat (task "doctor") with the cell's TLS and token: reachable, accepted,
    and the clock offset from the learner's answer (NTP style: its time at our midpoint)."""
    if not opts.learner:
        return [
            Check(
                "learner",
                "reachable",
                WARN,
                "not checked: give --learner HOST:PORT (and --tls-dir, --token-file) as "
                "`fleet actor` will get them",
            )
        ]
    import grpc

    from fleet.common.cell_auth import call_credentials
    from fleet.common.tls import channel_credentials
    from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc

    part = f"learner ({opts.learner})"
    try:
        if opts.tls_dir is not None:
            creds = channel_credentials(opts.tls_dir, cell_id)
            if opts.token:  # as `fleet actor` sends it: call credentials, only over TLS
                creds = grpc.composite_channel_credentials(
                    creds, call_credentials(cell_id, opts.token)
                )
            channel = grpc.secure_channel(opts.learner, creds)
        else:
            channel = grpc.insecure_channel(opts.learner)
    except (OSError, ValueError) as exc:
        return [Check(part, "TLS files", FAIL, f"{exc}. Copy the lab CA and {cell_id}.pem/.key")]
    beat = policy_pb2.Heartbeat(cell_id=cell_id, task="doctor")
    stub = policy_pb2_grpc.PolicyServiceStub(channel)
    try:
        sent = time.time()
        reply = stub.ReportHeartbeat(beat, timeout=opts.timeout_s)
        back = time.time()
    except grpc.RpcError as exc:
        code = exc.code()
        hint = {
            grpc.StatusCode.UNAVAILABLE: "Is `fleet learner` running, the address right, the "
            "port open, and (with TLS) the CA the learner's?",
            grpc.StatusCode.UNAUTHENTICATED: "The learner refused this cell's token: check "
            "--token-file against the learner's tokens file.",
            grpc.StatusCode.PERMISSION_DENIED: "The learner refused this cell: is it in the "
            "tokens file, and the certificate's name the cell id?",
            grpc.StatusCode.DEADLINE_EXCEEDED: "No answer in time: check the network.",
        }.get(code, "See the learner's log.")
        name = code.name if code is not None else "?"
        return [Check(part, "reachable", FAIL, f"{name}: {exc.details()}. {hint}")]
    finally:
        channel.close()
    secure = "mutual TLS" if opts.tls_dir is not None else "plaintext (no --tls-dir)"
    rows = [
        Check(
            part,
            "reachable",
            OK if opts.tls_dir is not None else WARN,
            f"token accepted over {secure}, {1000 * (back - sent):.0f} ms round trip",
        )
    ]
    offset = reply.server_time - (sent + back) / 2
    text = f"{round(offset * 1000):+d} ms (learner minus cell, +/- {500 * (back - sent):.0f} ms)"
    if abs(offset) > opts.max_clock_offset_s:
        rows.append(
            Check(
                part,
                "clock offset",
                FAIL,
                f"{text}. Episode times come from this clock: run NTP (chrony or "
                "systemd-timesyncd) on the cell against the lab's time server.",
            )
        )
    else:
        rows.append(Check(part, "clock offset", OK, text))
    return rows


def check_realtime(priority: int) -> Check:
    """The tick's real-time priority (the config's `realtime_priority`, taken by the servo
    process) must be allowed; a refusal is a warning, not a failure: the cell runs, its tick
    as an ordinary thread."""
    part = "control loop"
    if priority <= 0:
        return Check(part, "real-time priority", OK, "off (realtime_priority = 0)")
    allowed, reason = realtime_allowed(priority)
    if not allowed:
        return Check(
            part,
            "real-time priority",
            WARN,
            f"SCHED_FIFO {priority} refused ({reason}); the servo process's tick would run "
            "as an ordinary thread. Run the actor under ops/systemd/fleet-actor@.service "
            "(LimitRTPRIO) or grant CAP_SYS_NICE.",
        )
    return Check(part, "real-time priority", OK, f"SCHED_FIFO {priority} allowed")


def run_doctor(
    config: CellConfig,
    opts: DoctorOptions,
    *,
    camera_devices: Mapping[str, Any] | None = None,
) -> list[Check]:
    """Every check for the cell `config` describes, in table order."""
    cal = CellCalibration.load(config.calibration)
    rows: list[Check] = []
    arms: list[tuple[str, ArmPort]] = [(s, a) for s, a in config.followers.items()]
    arms += [(f"leader_{s}", a) for s, a in (config.leaders or {}).items()]
    for label, spec in arms:
        rows += check_arm(label, spec, cal.arm(spec.calibration_arm), opts)
    for cam in config.cameras:
        rows += check_camera(cam, camera_devices or {})
    spool = opts.spool_dir or Path.home() / ".local" / "share" / "fleetlearn" / config.cell_id
    rows.append(check_spool(spool if opts.spool_dir else spool / "spool", opts.spool_quota_mb))
    rows.append(check_realtime(config.realtime_priority))
    rows += check_learner(config.cell_id, opts)
    return rows


def render(cell_id: str, rows: Sequence[Check]) -> Table:
    failed = sum(r.status == FAIL for r in rows)
    title = f"fleet doctor: cell {cell_id}: " + (
        f"{failed} check(s) FAILED" if failed else "ready for its first run"
    )
    table = Table(title=title, show_lines=False)
    for col in ("part", "check", "result", "detail / what to do"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r.part, r.check, f"[{_STYLE[r.status]}]{r.status}[/]", r.detail)
    return table


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet doctor",
        description="Check a real cell before its first run: arms, servos, calibration, "
        "cameras, spool disk, clock and learner, in one table (reads only; writes nothing "
        "to the servos).",
    )
    p.add_argument("--cell-config", type=Path, required=True, help="the cell's TOML config")
    p.add_argument("--learner", default="", help="learner gateway host:port (as `fleet actor`)")
    p.add_argument("--token-file", type=Path, default=None, help="file holding the cell's token")
    p.add_argument("--tls-dir", type=Path, default=None, help="ca.pem and <cell>.pem/.key")
    p.add_argument("--spool-dir", type=Path, default=None, help="as `fleet actor --spool-dir`")
    p.add_argument("--spool-quota-mb", type=int, default=2048, help="as `fleet actor`")
    p.add_argument("--min-firmware", type=int, default=DoctorOptions.min_firmware)
    p.add_argument(
        "--max-clock-offset-s",
        type=float,
        default=DoctorOptions.max_clock_offset_s,
        help="largest clock offset to the learner that passes",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        config = CellConfig.load(args.cell_config)
    except CellConfigError as exc:
        console.print(f"[bold red]cell config:[/] {exc}")
        return 2
    opts = DoctorOptions(
        learner=args.learner,
        token=args.token_file.read_text().strip() if args.token_file else "",
        tls_dir=args.tls_dir,
        spool_dir=args.spool_dir,
        spool_quota_mb=args.spool_quota_mb,
        min_firmware=args.min_firmware,
        max_clock_offset_s=args.max_clock_offset_s,
    )
    with console.status(f"checking cell {config.cell_id} ..."):
        rows = run_doctor(config, opts)
    console.print(render(config.cell_id, rows))
    return 1 if any(r.status == FAIL for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
