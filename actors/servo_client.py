"""The actor's side of a servo process (actors/servo_process.py): a real cell's hardware
whose follower arms tick in a process of their own.

It offers what drivers/cell.CellHardware offers (observe, command, hold, enable, torque off,
the current fault, bus counters), so everything that drives a cell drives this too, plus
what the control loop uses to follow the servo process's ticks instead of keeping time
itself: `next_step` (the next tick the servo process ran: joints read, target sent, how
late it started) and `send_plan` (targets for the coming ticks). The cameras stay in the
actor's process: frames are read when a step is taken, next to inference and recording,
which are their only users, so no frame ever crosses the pipe.

A servo process that exits or stops ticking is a fault like any other (the arms keep their
last goal; the servo process holds them when the actor's pipe closes); `enable` starts a new
one, which reconnects the arms and holds them where they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.servo_wire import (
    CONTROL,
    EVENT,
    STEP,
    FrameReader,
    Plan,
    Step,
    WireError,
    decode_json,
    decode_step,
    encode_json,
    encode_plan,
)
from drivers.cell import CellFault, close_each
from drivers.clock import WallClock
from drivers.interfaces import Camera, DriverFault, Observation
from drivers.safety import SafetyGate

log = logging.getLogger(__name__)

START_TIMEOUT_S = 60.0  # imports, opening the ports, pinging and configuring 14 servos
REPLY_TIMEOUT_S = 10.0  # a control (enable, hold, torque off) answered
MAX_QUEUED_STEPS = 6000  # two minutes at 50 Hz; older ones are dropped (between episodes)
ROOT = Path(__file__).resolve().parents[1]
DROPPED_STEPS_KEY = "servo_dropped_steps"  # in bus_stats, beside the bus counters


class ServoProcess:
    """A real cell's follower arms (in a servo process) and cameras (here); see the module
    docstring."""

    ticks_itself = True  # the control loop follows `next_step` instead of its own clock

    def __init__(
        self,
        spec: dict[str, Any],
        cameras: Sequence[Camera],
        gate: SafetyGate,
        *,
        step_timeout_s: float = 2.0,
    ) -> None:
        """`spec` is what the servo process opens (cell_id, control_hz, realtime_priority,
        calibration, arms: {side: {port, baud, calibration_arm}}, bus: DynamixelArmBus
        options); `gate` is the same gate the servo process builds, here for its limits
        (the blender's max step); `step_timeout_s`: no tick for this long is a fault."""
        self.spec = dict(spec)
        self.cell_id = str(spec.get("cell_id", ""))
        self.cameras = tuple(cameras)
        self.camera_names: tuple[str, ...] = tuple(c.name for c in cameras)
        self.gate = gate
        self.clock = WallClock()
        self.period = 1.0 / float(spec["control_hz"])
        self.step_timeout_s = step_timeout_s
        self.current_fault: CellFault | None = None
        self.realtime_priority = 0  # what the servo process got
        self.on_step: Callable[[Step], None] | None = None  # every step, on the reader thread
        self._cond = threading.Condition()
        self._write_lock = threading.Lock()
        self._steps: deque[Step] = deque(maxlen=MAX_QUEUED_STEPS)
        self._latest: Step | None = None
        self._replies: dict[int, dict[str, Any]] = {}
        self._awaited: dict[str, np.ndarray | None] = {}  # command() plans: first sent
        self._next_id = 0
        self._stats: dict[str, Any] = {}
        self._proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None
        self._exited = False
        self._closed = False
        self._start()

    # -- the process -----------------------------------------------------------------------

    def _start(self) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
        proc = subprocess.Popen(
            [sys.executable, "-m", "actors.servo_process", "--spec", json.dumps(self.spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            bufsize=0,
            env=env,
        )
        with self._cond:
            self._proc, self._exited = proc, False
            self._steps.clear()
            self._latest = None
            self._replies.clear()
        self._reader = threading.Thread(
            target=self._read, args=(proc,), name=f"servo-reader-{self.cell_id}", daemon=True
        )
        self._reader.start()
        ready = self._wait_reply("ready", START_TIMEOUT_S)
        if ready.get("event") != "ready":
            self._reap(proc)
            raise CellFault(
                f"cell {self.cell_id}: the servo process could not open the follower arms: "
                f"{ready.get('message', 'it exited')}",
                torque_off=True,
            )
        self.realtime_priority = int(ready.get("realtime_priority", 0))
        log.info("cell %s: follower arms tick in servo process %d", self.cell_id, proc.pid)

    def _read(self, proc: subprocess.Popen[bytes]) -> None:
        """The reader thread: steps to the queue, events to whoever waits for them."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        reader = FrameReader()
        try:
            while data := os.read(fd, 65536):
                for kind, payload in reader.feed(data):
                    if kind == STEP:
                        self._take_step(decode_step(payload))
                    elif kind == EVENT:
                        self._take_event(decode_json(payload))
                    else:
                        raise WireError(f"frame of kind {kind} from the servo process")
        except (OSError, WireError) as exc:
            log.error("cell %s: servo process stream broke: %s", self.cell_id, exc)
        with self._cond:
            if self._proc is proc:
                self._exited = True
            self._cond.notify_all()

    def _take_step(self, step: Step) -> None:
        with self._cond:
            self._steps.append(step)
            self._latest = step
            if step.version in self._awaited and self._awaited[step.version] is None:
                self._awaited[step.version] = step.sent
            self._cond.notify_all()
        if self.on_step is not None:
            self.on_step(step)

    def _take_event(self, event: dict[str, Any]) -> None:
        kind = event.get("event")
        with self._cond:
            if kind == "stats" or kind == "closed":
                self._stats = event
            elif kind == "fault":
                self._fault(str(event.get("message")), bool(event.get("torque_off")))
            elif kind in ("ready", "error"):
                self._replies[-1] = event
            elif kind == "reply":
                self._replies[int(event.get("id") or 0)] = event
            self._cond.notify_all()

    def _fault(self, message: str, torque_off: bool) -> CellFault:
        fault = CellFault(message, torque_off=torque_off)
        self.current_fault = fault
        log.error("cell %s: cell fault: %s", self.cell_id, fault)
        return fault

    def _wait_reply(self, what: str, timeout_s: float, reply_id: int = -1) -> dict[str, Any]:
        with self._cond:
            self._cond.wait_for(lambda: reply_id in self._replies or self._exited, timeout_s)
            reply = self._replies.pop(reply_id, None)
        if reply is None:
            return {"event": "error", "message": f"no answer to {what} in {timeout_s:.0f} s"}
        return reply

    def _control(self, op: str) -> dict[str, Any]:
        with self._cond:
            self._next_id += 1
            reply_id = self._next_id
        self._write(encode_json(CONTROL, {"op": op, "id": reply_id}))
        return self._wait_reply(op, REPLY_TIMEOUT_S, reply_id)

    def _write(self, data: bytes) -> None:
        proc = self._proc
        try:
            assert proc is not None and proc.stdin is not None
            with self._write_lock:
                proc.stdin.write(data)
        except (OSError, ValueError, AssertionError) as exc:
            raise self._fault(
                f"the servo process is gone ({exc}); the arms keep their last goal",
                torque_off=False,
            ) from None

    def _alive(self) -> bool:
        return self._proc is not None and not self._exited and self._proc.poll() is None

    def _reap(self, proc: subprocess.Popen[bytes], timeout_s: float = 5.0) -> int:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.close()
        try:
            code = proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            log.error("cell %s: servo process %d did not exit; killing it", self.cell_id, proc.pid)
            proc.kill()
            code = proc.wait()
        if self._reader is not None:
            self._reader.join(2.0)
        if proc.stdout is not None:
            proc.stdout.close()
        return code

    # -- what the control loop follows -------------------------------------------------------

    def skip_to_now(self) -> None:
        """Forget the ticks run so far: the next step is one that starts after this call."""
        with self._cond:
            self._steps.clear()

    def next_step(self, timeout_s: float | None = None) -> Step:
        """The oldest tick not taken yet, waiting for it; raises the cell's fault (a fault
        the servo process reported, or no tick within `step_timeout_s`)."""
        limit = self.step_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            self._cond.wait_for(
                lambda: self._steps or self.current_fault is not None or self._exited, limit
            )
            if self.current_fault is not None:
                raise self.current_fault
            if self._steps:
                return self._steps.popleft()
            if self._exited:
                code = self._proc.poll() if self._proc is not None else None
                raise self._fault(
                    f"the servo process exited (code {code}); the arms keep their last goal",
                    torque_off=False,
                )
        self._send_control_quietly("hold")
        raise self._fault(f"the servo process ran no tick for {limit:.1f} s", torque_off=False)

    def send_plan(self, plan: Plan) -> None:
        """Targets for the coming ticks; the servo process follows them until the next."""
        self._write(encode_plan(plan))

    def hold_last(self) -> None:
        """From the next tick on, hold the last commanded target (an episode ended: what is
        left of its plan must not run on while the next scene is set up). Never raises."""
        with self._cond:
            latest = self._latest
        if latest is None:
            return
        with contextlib.suppress(CellFault):
            self.send_plan(Plan(latest.tick + 1, latest.sent[None], False, ""))

    def frames(self) -> dict[str, Any]:
        """Every camera's newest frame (read here, in the actor's process)."""
        return {cam.name: cam.read() for cam in self.cameras}

    def servo_stats(self) -> dict[str, Any]:
        """The servo process's own counts (ticks, late ticks, dropped steps, bus), each second."""
        with self._cond:
            return dict(self._stats)

    # -- what CellHardware offers ---------------------------------------------------------

    @property
    def fault(self) -> str:
        return str(self.current_fault) if self.current_fault is not None else ""

    def observe(self) -> Observation:
        """The next tick's joints and the cameras' newest frames."""
        self.skip_to_now()
        step = self.next_step()
        return Observation(joint_pos=step.joints, frames=self.frames(), stamp=step.stamp)

    def read_joints(self) -> np.ndarray:
        """The joints the servo process read last (waiting for a first tick)."""
        with self._cond:
            latest = self._latest
        if latest is None:
            return self.observe().joint_pos
        return latest.joints.copy()

    def command(self, targets: np.ndarray) -> np.ndarray:
        """Command `targets` from the next tick on (held after it, like any plan's last
        target) and return what the gate let through on the first tick that took them."""
        with self._cond:
            self._next_id += 1
            tag = f"command-{self._next_id}"
            self._awaited[tag] = None
            tick = self._latest.tick + 1 if self._latest is not None else 0
        self.send_plan(Plan(tick, np.asarray(targets, np.float32)[None], False, tag))
        with self._cond:
            self._cond.wait_for(
                lambda: (
                    self._awaited[tag] is not None or self.current_fault is not None or self._exited
                ),
                self.step_timeout_s + 2 * self.period,
            )
            sent = self._awaited.pop(tag)
            if self.current_fault is not None:
                raise self.current_fault
        if sent is None:
            raise self._fault("the servo process did not take the command", torque_off=False)
        return sent.copy()

    def enable(self) -> None:
        """Torque on and hold where the arms are; a servo process that is gone is started
        again (it reconnects the arms)."""
        if not self._alive():
            if self._proc is not None:
                self._reap(self._proc)
            self._start()
        else:
            reply = self._control("enable")
            self._raise_if_failed(reply, "enabling torque")
        self.current_fault = None

    def hold(self) -> None:
        """The arms stop where they are; the plan is forgotten."""
        self._raise_if_failed(self._control("hold"), "holding")

    def torque_off(self) -> None:
        """Torque off on every arm that answers; errors are logged, never raised."""
        try:
            reply = self._control("torque_off")
        except CellFault as exc:
            log.error("cell %s: torque off: %s", self.cell_id, exc)
            return
        if "fault" in reply or reply.get("event") == "error":
            log.error("cell %s: torque off: %s", self.cell_id, reply)

    def make_safe(self, exc: DriverFault, doing: str) -> CellFault:
        """Torque off after a hardware error, else hold; for faults of parts outside the
        servo process (a leader arm the operator reads)."""
        if exc.torque_off:
            self.torque_off()
            action = "torque off on every arm"
        else:
            self._send_control_quietly("hold")
            action = "holding position"
        return self._fault(f"{exc} (while {doing}; {action})", torque_off=exc.torque_off)

    def bus_stats(self) -> dict[str, int]:
        with self._cond:
            bus = dict(self._stats.get("bus", {}))
            bus[DROPPED_STEPS_KEY] = int(self._stats.get("dropped_steps", 0))
        return {k: int(v) for k, v in bus.items()}

    def close(self) -> None:
        """Torque off (the servo process does it on the way out), close it and the cameras."""
        if self._closed:
            return
        self._closed = True
        proc = self._proc
        closers: list[Callable[[], None]] = [cam.close for cam in self.cameras]
        if proc is not None:
            if self._alive():
                self._send_control_quietly("stop")

            def reap() -> None:
                code = self._reap(proc)
                log.info("cell %s: servo process exited (code %s)", self.cell_id, code)

            closers.insert(0, reap)
        close_each(closers, self.cell_id)

    def _send_control_quietly(self, op: str) -> None:
        with contextlib.suppress(CellFault):
            self._write(encode_json(CONTROL, {"op": op, "id": 0}))

    def _raise_if_failed(self, reply: dict[str, Any], doing: str) -> None:
        if reply.get("event") == "error":
            raise self._fault(f"servo process, {doing}: {reply.get('message')}", torque_off=False)
        if "fault" in reply:
            raise self._fault(str(reply["fault"]), bool(reply.get("torque_off")))
        if "error" in reply:
            raise self._fault(f"servo process, {doing}: {reply['error']}", torque_off=False)
