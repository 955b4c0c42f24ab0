"""A real cell's follower arms in a process of their own: the fixed-rate tick that reads them,
takes this tick's target from the actor's plan, passes it through the safety gate and
writes it.

Why a process: in the actor's process the tick thread shares one interpreter with
inference, recording, the uplink and version loading, and a woken tick waits for the GIL
whoever holds it (measured at 50 Hz: 12 missed ticks in ten minutes, p99 2 ms late, while a
bare loop in a process of its own missed none, p99 0.17 ms). Here the tick is the only
thread: nothing else can hold it up.

The actor (actors/servo_client.py) starts this as `python -m actors.servo_process --spec
JSON` and talks over its stdin/stdout (actors/servo_wire.py). Each tick: read the arms,
pick the target (the newest plan's entry for this tick, past its end its last target; with
no plan, hold the last command), gate it, write it, and send the step back without waiting
(a step the actor cannot take now is dropped and counted, never waited for). Plans are
keyed by tick, so an actor that is late with the next plan leaves the arm following the
current one, exactly as the in-process loop follows its blended plan. A fault makes the arms
safe (drivers/cell.py), is reported, and stops the ticks until the actor asks to enable
again. When the actor goes away (its pipe closes) the arms hold and the ports close; when
it asks to stop, torque goes off first, as a cell's close always did.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import fcntl
import gc
import json
import logging
import os
import signal
import sys
import time
from collections import deque
from typing import Any

import numpy as np

from actors.servo_wire import (
    CONTROL,
    EVENT,
    PLAN,
    FrameReader,
    Plan,
    Step,
    WireError,
    decode_json,
    decode_plan,
    encode_json,
    encode_step,
)
from actors.thread_priority import realtime_this_thread
from drivers.calibration import CellCalibration
from drivers.cell import CellFault, CellHardware
from drivers.clock import WallClock
from drivers.dynamixel.arm_bus import DynamixelArmBus
from drivers.safety import SafetyGate, step_bound
from protos.joint_layout import ARM_SIDES, JOINT_LOWER, JOINT_UPPER

log = logging.getLogger("actors.servo_process")

STATS_EVERY_S = 1.0
PIPE_BYTES = 1 << 20  # about 2 minutes of steps at 50 Hz before any is dropped
F_SETPIPE_SZ = 1031  # Linux fcntl


def open_followers(spec: dict[str, Any]) -> CellHardware:
    """The follower arms the spec names, behind the cell's safety gate, torque on; on a
    failure half way every port already opened is closed again."""
    cal = CellCalibration.load(spec["calibration"])
    clock = WallClock()
    arms: dict[str, DynamixelArmBus] = {}
    try:
        for side in ARM_SIDES:
            arm = spec["arms"][side]
            arms[side] = DynamixelArmBus(
                side,
                arm["port"],
                cal.arm(arm["calibration_arm"]),
                baud=int(arm["baud"]),
                clock=clock,
                **spec.get("bus", {}),
            )
        gate = SafetyGate(
            JOINT_LOWER,
            JOINT_UPPER,
            max_step=step_bound(float(spec["control_hz"]), len(ARM_SIDES)),
        )
        hardware = CellHardware(arms=arms, cameras=(), clock=clock, gate=gate)
        hardware.enable()
    except BaseException:
        for arm in arms.values():
            try:
                if arm.torque_enabled:
                    arm.set_torque(False)
                arm.close()
            except Exception:
                log.exception("closing the %s arm failed", arm.name)
        raise
    return hardware


class ServoTicker:
    """The tick loop; see the module docstring."""

    def __init__(
        self, hardware: CellHardware, control_hz: float, read_fd: int, write_fd: int
    ) -> None:
        self.hw = hardware
        self.period = 1.0 / control_hz
        self.read_fd = read_fd
        self.write_fd = write_fd
        self.reader = FrameReader()
        self.tick = 0
        self.late_ticks = 0
        self.dropped_steps = 0
        self.busy_max = 0.0  # the longest a tick's work (read, gate, write) took
        self.overruns = 0  # ticks whose work took longer than a period
        self.plan: Plan | None = None
        self.upcoming: Plan | None = None  # arrived before its first tick
        self.last_sent: np.ndarray | None = None
        self.ticking = True  # False after torque off, until enabled again
        self._outbox: deque[bytes] = deque()  # events not written yet (never dropped)
        self._goodbye = "stop"  # why the loop ended: stop (asked) or eof (actor gone)

    # -- the loop ----------------------------------------------------------------------

    def run(self) -> str:
        """Tick until the actor asks to stop or goes away; returns which."""
        next_tick = time.monotonic()
        last_stats = next_tick
        while True:
            now = time.monotonic()
            lateness = max(0.0, now - next_tick)
            if now - next_tick > self.period:
                self.late_ticks += 1
                next_tick = now  # resync: never burst to catch up
            if not self._read_messages():
                return self._goodbye
            if self.ticking and self.hw.current_fault is None:
                self._tick_once(now, lateness)
            if now - last_stats >= STATS_EVERY_S:
                last_stats = now
                self._event({"event": "stats", **self.stats()})
            self._flush()
            next_tick += self.period
            delay = next_tick - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def stats(self) -> dict[str, Any]:
        return {
            "ticks": self.tick,
            "late_ticks": self.late_ticks,
            "dropped_steps": self.dropped_steps,
            "busy_max_ms": round(1000 * self.busy_max, 3),
            "overruns": self.overruns,
            "bus": self.hw.bus_stats(),
        }

    def _tick_once(self, started: float, lateness: float) -> None:
        try:
            obs = self.hw.observe()
            target, intervention, version = self._target(obs.joint_pos)
            sent = self.hw.command(target)
        except CellFault as exc:  # already made safe (held, or torque off)
            self._forget_plans()
            self._event({"event": "fault", "message": str(exc), "torque_off": exc.torque_off})
            return
        self.last_sent = sent
        busy = time.monotonic() - started
        self.busy_max = max(self.busy_max, busy)
        self.overruns += int(busy > self.period)
        step = Step(
            self.tick, obs.stamp, lateness, busy, obs.joint_pos, sent, intervention, version
        )
        self.tick += 1
        if self._outbox:  # events first, in order; a step is not worth waiting for
            self.dropped_steps += 1
            return
        try:
            os.write(self.write_fd, encode_step(step))  # < PIPE_BUF: all or nothing
        except BlockingIOError:
            self.dropped_steps += 1

    def _target(self, joints: np.ndarray) -> tuple[np.ndarray, bool, str]:
        if self.upcoming is not None and self.upcoming.first_tick <= self.tick:
            self.plan, self.upcoming = self.upcoming, None
        plan = self.plan
        if plan is None:  # nothing planned: hold the last command (or where the arm is)
            hold = self.last_sent if self.last_sent is not None else joints
            return hold, False, ""
        i = min(max(self.tick - plan.first_tick, 0), len(plan.targets) - 1)
        return plan.targets[i], plan.intervention, plan.version

    def _forget_plans(self) -> None:
        self.plan = self.upcoming = None
        self.last_sent = None

    # -- messages ------------------------------------------------------------------------

    def _read_messages(self) -> bool:
        """Take every plan and control that arrived; False when the loop must end."""
        while True:
            try:
                data = os.read(self.read_fd, 65536)
            except BlockingIOError:
                return True
            if not data:
                self._goodbye = "eof"
                return False
            try:
                for kind, payload in self.reader.feed(data):
                    if kind == PLAN:
                        self._take_plan(decode_plan(payload))
                    elif kind == CONTROL:
                        if not self._control(decode_json(payload)):
                            return False
                    else:
                        raise WireError(f"frame of kind {kind} from the actor")
            except WireError as exc:
                log.error("unreadable message from the actor (%s): holding and stopping", exc)
                self._goodbye = "eof"
                return False

    def _take_plan(self, plan: Plan) -> None:
        if plan.first_tick <= self.tick:
            self.plan, self.upcoming = plan, None
        else:
            self.upcoming = plan

    def _control(self, message: dict[str, Any]) -> bool:
        op = message.get("op")
        reply: dict[str, Any] = {"event": "reply", "id": message.get("id"), "op": op}
        try:
            if op == "stop":
                return False
            if op == "enable":
                self.hw.enable()
                self.hw.hold()
                self._forget_plans()
                self.ticking = True
            elif op == "hold":
                self.hw.hold()
                self._forget_plans()
            elif op == "torque_off":
                self.hw.torque_off()
                self._forget_plans()
                self.ticking = False
            else:
                reply["error"] = f"unknown control {op!r}"
        except CellFault as exc:
            reply.update(fault=str(exc), torque_off=exc.torque_off)
        self._event(reply)
        return True

    def _event(self, message: dict[str, Any]) -> None:
        self._outbox.append(encode_json(EVENT, message))
        self._flush()

    def _flush(self) -> None:
        while self._outbox:
            data = self._outbox[0]
            try:
                n = os.write(self.write_fd, data)
            except BlockingIOError:
                return
            except BrokenPipeError:
                self._outbox.clear()
                return
            if n < len(data):
                self._outbox[0] = data[n:]
                return
            self._outbox.popleft()


def _pipes() -> tuple[int, int]:
    read_fd, write_fd = sys.stdin.fileno(), sys.stdout.fileno()
    os.set_blocking(read_fd, False)
    os.set_blocking(write_fd, False)
    try:
        fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BYTES)
    except OSError as exc:
        if exc.errno not in (errno.EPERM, errno.EINVAL, errno.EBUSY):
            raise
    return read_fd, write_fd


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m actors.servo_process",
        description="A real cell's follower arms at a fixed rate in a process of their own; "
        "started by `fleet actor` with a cell config, talking over stdin/stdout.",
    )
    p.add_argument("--spec", required=True, help="JSON: cell_id, control_hz, calibration, arms")
    args = p.parse_args(argv)
    spec = json.loads(args.spec)
    cell_id = str(spec.get("cell_id", "?"))
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format=f"%(asctime)s %(levelname)s servo-process cell {cell_id}: %(message)s",
    )
    # Its life is the actor's pipe: a Ctrl-C or a service stop signals the whole group, and
    # the actor, stopping, asks for torque off; were this process to die first, it could not.
    # (An actor that dies closes the pipe: the arms hold.)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    read_fd, write_fd = _pipes()
    try:
        hardware = open_followers(spec)
    except Exception as exc:
        log.error("could not open the follower arms: %s", exc)
        os.set_blocking(write_fd, True)
        os.write(write_fd, encode_json(EVENT, {"event": "error", "message": str(exc)}))
        return 1
    ticker = ServoTicker(hardware, float(spec["control_hz"]), read_fd, write_fd)
    priority = int(spec.get("realtime_priority", 0))
    realtime = priority > 0 and realtime_this_thread(priority, cell_id=cell_id)
    ticker._event({"event": "ready", "realtime_priority": priority if realtime else 0})
    gc.collect()
    gc.freeze()  # what lives as long as the process is never walked by a collection
    log.info("follower arms at %.0f Hz (real-time priority %d)", spec["control_hz"], priority)
    goodbye = "eof"
    try:
        goodbye = ticker.run()
    finally:
        if goodbye == "stop":
            hardware.torque_off()  # logs, never raises
        else:
            log.warning("the actor went away: holding the arms (torque stays on)")
        try:
            hardware.close()  # holds, then closes the ports
        except Exception as exc:
            log.error("closing the arms: %s", exc)
        os.set_blocking(write_fd, True)
        with contextlib.suppress(OSError):
            os.write(write_fd, encode_json(EVENT, {"event": "closed", **ticker.stats()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
