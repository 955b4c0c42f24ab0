"""A simulated Dynamixel X-series servo chain that answers Protocol 2.0 on a pseudo-terminal.

It replaces the hardware *below* dynamixel_sdk (DESIGN: sim at the lowest level), so the
real driver, the real SDK and pyserial all run unchanged; only the far end of the serial
line is simulated. The chain runs in its own process (started with subprocess: no pickles,
no fork of the test process), because dynamixel_sdk busy-waits for replies and would
starve a thread in the same interpreter.

Child process layout:

- the serial thread owns the pty master: it frames instruction packets, lets the chain
  answer them and writes the status packets, optionally timed like a 1 Mbps bus (10 bits
  per byte plus each servo's Return Delay Time). Nothing slow ever runs on it.
- the main thread serves a JSON-lines control channel on stdin/stdout (fault injection,
  register peeks, moving a shaft by hand, unplug/replug). EOF on stdin means the parent is
  gone: the child cleans up and exits, so a crashed test never leaves a peer behind.

Servo dynamics: with torque on in a position mode the shaft moves toward the goal at a
bounded speed (evaluated lazily from elapsed time, no ticking thread); with torque off it
stays where it is (or where `move_shaft` puts it). When linked to a physics sim through
drivers/sim/servo_link.py, the chain writes the commands into the link and reports what the
physics sim measured instead.

Run directly: `python -m drivers.sim.servo_peer '<json config>'`; use `ServoPeer` instead.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import logging
import math
import os
import random
import select
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
import tty
import weakref
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from drivers.dynamixel import control_table as ct
from drivers.dynamixel import protocol as pr
from drivers.sim.servo_link import ServoLink

log = logging.getLogger(__name__)

_MA_PER_RAD_ERROR = 1500.0  # synthetic current: proportional to tracking error
_MOVING_TICKS_S = 5.0
# Present current, velocity, position (126..135) and realtime tick, moving (120..122), as
# the control table lays them out (checked below), written as unsigned bit patterns.
_PRESENT_BLOCK = struct.Struct("<HII")
_TICK_MOVING = struct.Struct("<HB")
# Register value readers by (size, signed): one unpack instead of ct.decode_value's slice,
# int.from_bytes and sign fix, for the registers every instruction reads.
_REG_STRUCTS = {
    (size, signed): struct.Struct("<" + (code.lower() if signed else code))
    for size, code in ((1, "B"), (2, "H"), (4, "I"))
    for signed in (False, True)
}
if (
    ct.PRESENT_VELOCITY.address != ct.PRESENT_CURRENT.address + ct.PRESENT_CURRENT.size
    or ct.PRESENT_POSITION.address != ct.PRESENT_VELOCITY.address + ct.PRESENT_VELOCITY.size
    or ct.MOVING.address != ct.REALTIME_TICK.address + ct.REALTIME_TICK.size
    or (ct.PRESENT_CURRENT.size, ct.PRESENT_VELOCITY.size, ct.PRESENT_POSITION.size) != (2, 4, 4)
    or (ct.REALTIME_TICK.size, ct.MOVING.size) != (2, 1)
):
    raise ImportError("control table layout differs from what the servo peer packs")


class PeerError(RuntimeError):
    """The simulated servo chain failed to start or refused a control request."""


# --------------------------------------------------------------------------------------
# Child process: the simulated chain.
# --------------------------------------------------------------------------------------


@dataclass
class _Faults:
    missing: bool = False  # not on the bus: never answers, ignores writes
    corrupt_crc: bool = False  # answers with a broken CRC
    slow_s: float = 0.0  # extra delay before each reply (dropped if the host moves on)
    late_s: tuple[float, float] = (0.0, 0.0)  # replies sent this late (min, max) regardless
    duplicate: bool = False  # a second servo with the same ID answers too


class _Servo:
    def __init__(self, servo_id: int, model: int, shaft_ticks: float) -> None:
        self.id = servo_id
        self.table = ct.default_table(servo_id, model)
        self.shaft = float(shaft_ticks)  # raw ticks before homing offset
        self.velocity = 0.0  # ticks/s
        self.current_ma = 0.0
        self.updated = time.monotonic()
        self.offline_until = 0.0  # rebooting until then
        self.faults = _Faults()

    def get(self, reg: ct.Register) -> int:
        return int(_REG_STRUCTS[reg.size, reg.signed].unpack_from(self.table, reg.address)[0])

    def put(self, reg: ct.Register, value: int) -> None:
        self.table[reg.address : reg.address + reg.size] = ct.encode_value(value, reg.size)

    @property
    def torque(self) -> bool:
        return self.table[ct.TORQUE_ENABLE.address] == 1

    @property
    def hardware_error(self) -> int:
        return self.table[ct.HARDWARE_ERROR_STATUS.address]


class _Chain:
    """The servos' control tables and dynamics; every method runs under `lock`."""

    def __init__(self, cfg: Mapping[str, Any], link: ServoLink | None) -> None:
        self.lock = threading.Lock()
        self.link = link
        self.max_speed = float(cfg["max_speed_rad_s"]) / ct.RAD_PER_TICK  # ticks/s
        self.reboot_s = float(cfg["reboot_s"])
        shaft = {int(k): float(v) for k, v in cfg["shaft_ticks"].items()}
        self.servos = {
            sid: _Servo(sid, int(cfg["model_number"]), shaft.get(sid, ct.CENTER_TICK))
            for sid in sorted(int(s) for s in cfg["servo_ids"])
        }
        self.stats: Counter[str] = Counter()
        for servo in self.servos.values():
            self._refresh_registers(servo)
            self._push(servo)

    # Dynamics -------------------------------------------------------------------------

    def advance(self, servo: _Servo, now: float) -> None:
        """Bring the servo's shaft, velocity and current up to `now`."""
        dt = max(0.0, now - servo.updated)
        servo.updated = now
        if self.link is not None:
            position, velocity, current, hardware_error = self.link.read_present(servo.id)
            servo.shaft = ct.CENTER_TICK + position / ct.RAD_PER_TICK
            servo.velocity = velocity / ct.RAD_PER_TICK
            servo.current_ma = current
            if hardware_error and not servo.hardware_error & hardware_error:
                self.raise_hardware_error(servo, servo.hardware_error | hardware_error)
        elif servo.torque and servo.table[ct.OPERATING_MODE.address] in ct.POSITION_MODES:
            goal = servo.get(ct.GOAL_POSITION) - servo.get(ct.HOMING_OFFSET)
            err = goal - servo.shaft
            step = min(abs(err), self.max_speed * dt)
            servo.shaft += math.copysign(step, err)
            # Still travelling at the end of the interval: full speed; arrived: at rest.
            servo.velocity = math.copysign(self.max_speed, err) if step < abs(err) else 0.0
            limit = ct.MA_PER_CURRENT_UNIT * servo.get(ct.GOAL_CURRENT)
            ma = _MA_PER_RAD_ERROR * (goal - servo.shaft) * ct.RAD_PER_TICK
            servo.current_ma = max(-limit, min(limit, ma))
        else:
            servo.velocity = 0.0
            servo.current_ma = 0.0
        self._refresh_registers(servo)

    def _refresh_registers(self, servo: _Servo) -> None:
        # Twice per servo per instruction: two packs instead of five register puts.
        position = round(servo.shaft) + servo.get(ct.HOMING_OFFSET)
        vel_units = round(servo.velocity * ct.RAD_PER_TICK / ct.RAD_S_PER_VELOCITY_UNIT)
        current = round(servo.current_ma / ct.MA_PER_CURRENT_UNIT)
        _PRESENT_BLOCK.pack_into(
            servo.table,
            ct.PRESENT_CURRENT.address,
            current & 0xFFFF,
            vel_units & 0xFFFFFFFF,
            position & 0xFFFFFFFF,
        )
        moving = 1 if abs(servo.velocity) > _MOVING_TICKS_S else 0
        tick = int(time.monotonic() * 1000) % 32768
        _TICK_MOVING.pack_into(servo.table, ct.REALTIME_TICK.address, tick, moving)

    def _push(self, servo: _Servo) -> None:
        """Publish the servo's command to the physics sim (when linked)."""
        if self.link is None:
            return
        goal_shaft = servo.get(ct.GOAL_POSITION) - servo.get(ct.HOMING_OFFSET)
        self.link.write_command(
            servo.id,
            servo.torque,
            servo.table[ct.OPERATING_MODE.address],
            ct.ticks_to_rad(goal_shaft),
            ct.MA_PER_CURRENT_UNIT * servo.get(ct.GOAL_CURRENT),
        )

    def raise_hardware_error(self, servo: _Servo, status: int) -> None:
        servo.put(ct.HARDWARE_ERROR_STATUS, status)
        if status & servo.get(ct.SHUTDOWN):
            servo.put(ct.TORQUE_ENABLE, 0)  # the servo's own shutdown
            self._push(servo)

    def reboot(self, servo: _Servo, now: float, off_s: float | None = None) -> None:
        """RAM back to power-on values (EEPROM kept), errors cleared, offline a moment
        (`off_s`, default the reboot time: a power cycle is a longer one)."""
        fresh = ct.default_table(servo.id, servo.get(ct.MODEL_NUMBER))
        servo.table[ct.EEPROM_END :] = fresh[ct.EEPROM_END :]
        servo.velocity = 0.0
        servo.current_ma = 0.0
        self._refresh_registers(servo)
        servo.put(ct.GOAL_POSITION, servo.get(ct.PRESENT_POSITION))
        servo.offline_until = now + (self.reboot_s if off_s is None else off_s)
        self._push(servo)

    # Register access ------------------------------------------------------------------

    def read(self, servo: _Servo, address: int, size: int, now: float) -> tuple[int, bytes]:
        if address < 0 or size < 0 or address + size > ct.TABLE_SIZE:
            return pr.ERR_ACCESS, b""
        self.advance(servo, now)
        return 0, bytes(servo.table[address : address + size])

    def write(self, servo: _Servo, address: int, data: bytes, now: float) -> int:
        """Apply a write as the servo firmware would; returns the status error number."""
        if ct.write_access_error(address, len(data), servo.torque) is not None:
            return pr.ERR_ACCESS
        if address == ct.GOAL_POSITION.address and len(data) == ct.GOAL_POSITION.size:
            return self._write_goal(servo, data, now)
        new = bytearray(servo.table)
        new[address : address + len(data)] = data

        def val(reg: ct.Register) -> int:
            return ct.decode_value(new, reg, reg.address)

        def touches(reg: ct.Register) -> bool:
            return address < reg.address + reg.size and address + len(data) > reg.address

        if touches(ct.OPERATING_MODE) and val(ct.OPERATING_MODE) not in ct.OPERATING_MODES:
            return pr.ERR_DATA_RANGE
        if touches(ct.TORQUE_ENABLE) and val(ct.TORQUE_ENABLE) not in (0, 1):
            return pr.ERR_DATA_RANGE
        if touches(ct.HOMING_OFFSET) and abs(val(ct.HOMING_OFFSET)) > ct.MAX_HOMING_OFFSET:
            return pr.ERR_DATA_RANGE
        if touches(ct.TORQUE_ENABLE) and val(ct.TORQUE_ENABLE) and servo.hardware_error:
            return pr.ERR_RESULT_FAIL  # no torque until a reboot clears the error
        if (
            touches(ct.GOAL_POSITION)
            and new[ct.OPERATING_MODE.address] in ct.POSITION_MODES
            and not val(ct.MIN_POSITION_LIMIT)
            <= val(ct.GOAL_POSITION)
            <= val(ct.MAX_POSITION_LIMIT)
        ):
            return pr.ERR_DATA_LIMIT
        self.advance(servo, now)
        torque_was = servo.torque
        servo.table[address : address + len(data)] = data
        if servo.torque and not torque_was:
            # Torque on holds where the shaft is (Goal Position := Present Position).
            servo.put(ct.GOAL_POSITION, round(servo.shaft) + servo.get(ct.HOMING_OFFSET))
        if touches(ct.HOMING_OFFSET):  # present position is measured through it
            self._refresh_registers(servo)  # (advance just refreshed the rest)
        self._push(servo)
        return 0

    def _write_goal(self, servo: _Servo, data: bytes, now: float) -> int:
        """`write` of Goal Position alone (every tick's sync write): the same checks and
        effects without copying the table to validate it (no other register changes)."""
        table = servo.table
        if table[ct.OPERATING_MODE.address] in ct.POSITION_MODES:
            goal = _REG_STRUCTS[4, True].unpack_from(data)[0]
            if not servo.get(ct.MIN_POSITION_LIMIT) <= goal <= servo.get(ct.MAX_POSITION_LIMIT):
                return pr.ERR_DATA_LIMIT
        self.advance(servo, now)
        table[ct.GOAL_POSITION.address : ct.GOAL_POSITION.address + 4] = data
        self._push(servo)
        return 0

    # Packets -------------------------------------------------------------------------

    def online(self, servo_id: int, now: float) -> _Servo | None:
        servo = self.servos.get(servo_id)
        if servo is None or servo.faults.missing or now < servo.offline_until:
            return None
        return servo

    def status(self, servo: _Servo, error: int = 0, data: bytes = b"") -> tuple[_Servo, bytes]:
        if servo.hardware_error:
            error |= pr.ERRBIT_ALERT
        pkt = pr.encode_status(servo.id, error, data)
        if servo.faults.corrupt_crc:
            pkt = pkt[:-1] + bytes([pkt[-1] ^ 0xFF])
        return servo, pkt

    def handle(self, pkt: pr.Packet | pr.CorruptPacket, now: float) -> list[tuple[_Servo, bytes]]:
        """Answer one instruction packet: the status packets to send, in bus order."""
        if isinstance(pkt, pr.CorruptPacket):
            self.stats["corrupt_instruction"] += 1
            servo = self.online(pkt.servo_id, now)
            return [self.status(servo, pr.ERR_CRC)] if servo is not None else []
        if pkt.instruction == pr.INST_STATUS:
            return []  # another device's status packet on the bus
        name = pr.INSTRUCTION_NAMES.get(pkt.instruction, f"0x{pkt.instruction:02x}")
        self.stats[name] += 1
        p = pkt.params
        bcast = pkt.servo_id == pr.BROADCAST_ID

        def targets() -> list[_Servo]:
            """The servos the packet's ID addresses (sync and bulk instructions name theirs
            in the parameters: not worked out for them)."""
            if bcast:
                return [s for s in self.servos.values() if self.online(s.id, now)]
            return [s for s in [self.online(pkt.servo_id, now)] if s is not None]

        replies: list[tuple[_Servo, bytes]] = []

        def answer(servo: _Servo, error: int = 0, data: bytes = b"", level: int = 2) -> None:
            if servo.table[ct.STATUS_RETURN_LEVEL.address] >= level:
                replies.append(self.status(servo, error, data))
                if servo.faults.duplicate:
                    replies.append(self.status(servo, error, data))

        ins = pkt.instruction
        if ins == pr.INST_PING:
            for s in targets():
                info = s.table[0:2] + s.table[ct.FIRMWARE_VERSION.address : 7]
                answer(s, 0, bytes(info), level=0)
        elif ins == pr.INST_READ and not bcast:
            for s in targets():
                if len(p) != 4:
                    answer(s, pr.ERR_DATA_LENGTH, level=1)
                    continue
                err, data = self.read(s, p[0] | p[1] << 8, p[2] | p[3] << 8, now)
                answer(s, err, data, level=1)
        elif ins == pr.INST_WRITE:
            for s in targets():
                err = (
                    self.write(s, p[0] | p[1] << 8, p[2:], now)
                    if len(p) > 2
                    else pr.ERR_DATA_LENGTH
                )
                if not bcast:
                    answer(s, err)
        elif ins == pr.INST_SYNC_READ and len(p) >= 4:
            address, size = p[0] | p[1] << 8, p[2] | p[3] << 8
            for sid in p[4:]:
                s = self.online(sid, now)
                if s is not None:
                    err, data = self.read(s, address, size, now)
                    answer(s, err, data, level=1)
        elif ins == pr.INST_SYNC_WRITE and len(p) >= 4:
            address, size = p[0] | p[1] << 8, p[2] | p[3] << 8
            for i in range(4, len(p) - size, size + 1):
                s = self.online(p[i], now)
                if s is not None:
                    self.write(s, address, p[i + 1 : i + 1 + size], now)
        elif ins == pr.INST_BULK_READ:
            for i in range(0, len(p) - 4, 5):
                s = self.online(p[i], now)
                if s is not None:
                    err, data = self.read(
                        s, p[i + 1] | p[i + 2] << 8, p[i + 3] | p[i + 4] << 8, now
                    )
                    answer(s, err, data, level=1)
        elif ins == pr.INST_BULK_WRITE:
            i = 0
            while i + 5 <= len(p):
                size = p[i + 3] | p[i + 4] << 8
                s = self.online(p[i], now)
                if s is not None:
                    self.write(s, p[i + 1] | p[i + 2] << 8, p[i + 5 : i + 5 + size], now)
                i += 5 + size
        elif ins == pr.INST_REBOOT and not bcast:
            for s in targets():
                answer(s)
                self.reboot(s, now)
        elif ins == pr.INST_CLEAR and not bcast:
            for s in targets():
                answer(s)
        elif not bcast:
            for s in targets():
                answer(s, pr.ERR_INSTRUCTION)
        return replies


class _PtyServer:
    """Owns the pty and the serial thread; replies never wait on the control channel."""

    def __init__(self, chain: _Chain, cfg: Mapping[str, Any]) -> None:
        self.chain = chain
        self.wire_model = bool(cfg["wire_model"])
        self.byte_s = 10.0 / float(cfg["baud"])  # 8N1: 10 bits a byte
        self.stable_path: str | None = cfg.get("stable_path")
        self.master = -1
        self.slave = -1
        self.port = ""
        self._parser = pr.PacketParser()
        self._bus_free = 0.0
        self._late: list[tuple[float, int, bytes]] = []  # (due, order, packet), a heap
        self._late_order = 0
        self._wake_r, self._wake_w = os.pipe()
        self._actions: list[tuple[str, threading.Event]] = []
        self._actions_lock = threading.Lock()
        self._stop = False
        self.thread = threading.Thread(target=self._run, name="servo-serial", daemon=True)

    # Plugging (serial thread only, or before it starts) --------------------------------

    def plug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(slave)  # no echo, no line discipline: bytes pass untouched
        self.master, self.slave = master, slave
        self.port = os.ttyname(slave)
        self._parser.clear()
        if self.stable_path:
            tmp = f"{self.stable_path}.{os.getpid()}.tmp"
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            os.symlink(self.port, tmp)
            os.replace(tmp, self.stable_path)

    def unplug(self) -> None:
        self._late.clear()  # what was still on its way dies with the cable
        if self.stable_path:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.stable_path)
        for fd in (self.master, self.slave):
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.master = self.slave = -1

    def request(self, action: str, timeout: float = 5.0) -> None:
        """Run `action` ('unplug', 'replug', 'sync', 'stop') on the serial thread; wait."""
        done = threading.Event()
        with self._actions_lock:
            self._actions.append((action, done))
        os.write(self._wake_w, b"x")
        if not done.wait(timeout):
            raise PeerError(f"serial thread did not {action} within {timeout} s")

    def _run_actions(self) -> None:
        with contextlib.suppress(BlockingIOError, OSError):
            os.read(self._wake_r, 512)
        with self._actions_lock:
            actions, self._actions = self._actions, []
        for action, done in actions:
            if action in ("unplug", "stop"):
                self.unplug()
            if action == "replug" and self.master < 0:
                self.plug()
            if action == "sync":
                # Serve every byte the host has written so far (a pty hands written bytes
                # over through a kernel work queue, so allow it a moment to arrive).
                while self.master >= 0 and select.select([self.master], [], [], 0.002)[0]:
                    self._serve_input()
            if action == "stop":
                self._stop = True
            done.set()

    # Serial loop --------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop:
            self._send_due()
            fds = [self._wake_r] + ([self.master] if self.master >= 0 else [])
            wait = 1.0 if not self._late else max(0.0, self._late[0][0] - time.monotonic())
            readable, _, _ = select.select(fds, [], [], wait)
            if self._wake_r in readable:
                self._run_actions()
                continue
            if self.master >= 0 and self.master in readable:
                self._serve_input()

    def _serve_input(self) -> None:
        try:
            data = os.read(self.master, 4096)
        except OSError:
            data = b""
        if not data:
            time.sleep(0.001)
            return
        for pkt in self._parser.feed(data):
            now = time.monotonic()
            with self.chain.lock:
                replies = self.chain.handle(pkt, now)
            size = 10 + (len(pkt.params) if isinstance(pkt, pr.Packet) else 0)
            self._send(replies, size, now)

    def _input_pending(self) -> bool:
        if self._parser.pending:
            return True
        readable, _, _ = select.select([self.master], [], [], 0)
        return bool(readable)

    def _send_due(self) -> None:
        """Write the late status packets whose time has come (whatever the host is doing)."""
        now = time.monotonic()
        while self._late and self._late[0][0] <= now:
            _, _, pkt = heapq.heappop(self._late)
            if self.master >= 0:
                self._write(pkt)
                self._count("status_sent_late")

    def _send(self, replies: list[tuple[_Servo, bytes]], instruction_size: int, now: float) -> None:
        if any(s.faults.late_s[1] for s, _ in replies):
            # A servo answering late: it and every servo after it in this reply (each waits
            # for the one before on a sync read) arrive late, even after the next request.
            delay = 0.0
            for servo, pkt in replies:
                lo, hi = servo.faults.late_s
                delay = max(delay, random.uniform(lo, hi) if hi else 0.0)
                self._late_order += 1
                heapq.heappush(self._late, (now + delay, self._late_order, pkt))
            self._send_due()
            return
        slow = any(s.faults.slow_s for s, _ in replies)
        if not self.wire_model and not slow:
            if replies:
                self._write(b"".join(pkt for _, pkt in replies))
                self._count("status_sent", len(replies))
            return
        t = now
        if self.wire_model:
            t = max(now, self._bus_free) + instruction_size * self.byte_s
        for servo, pkt in replies:
            if self.wire_model:
                delay_us = ct.RETURN_DELAY_UNIT_US * servo.table[ct.RETURN_DELAY_TIME.address]
                t += delay_us * 1e-6 + len(pkt) * self.byte_s
            t += servo.faults.slow_s
            wait = t - time.monotonic()
            if wait > 0 and self.master >= 0:
                select.select([self.master], [], [], wait)  # wakes early if the host moves on
            if self._input_pending():
                # The host gave up and sent a new instruction: a late status packet would
                # collide with it on a half-duplex bus, so it is never sent.
                self._count("status_dropped")
                break
            self._write(pkt)
            self._count("status_sent")
        self._bus_free = max(t, self._bus_free)

    def _count(self, key: str, n: int = 1) -> None:
        with self.chain.lock:
            self.chain.stats[key] += n

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view and self.master >= 0:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                time.sleep(0.0005)
                continue
            except OSError:
                return
            view = view[n:]


class _Control:
    """JSON-lines control channel (main thread of the child)."""

    def __init__(self, chain: _Chain, server: _PtyServer) -> None:
        self.chain = chain
        self.server = server
        self._out_lock = threading.Lock()

    def send(self, obj: Mapping[str, Any]) -> None:
        line = (json.dumps(obj) + "\n").encode()
        with self._out_lock:
            os.write(1, line)

    def _servo(self, args: Mapping[str, Any]) -> _Servo:
        sid = int(args["id"])
        if sid not in self.chain.servos:
            raise PeerError(f"no servo with id {sid} in this chain")
        return self.chain.servos[sid]

    def handle(self, op: str, args: Mapping[str, Any]) -> Any:
        chain = self.chain
        now = time.monotonic()
        if op == "ping":
            return {"port": self.server.port, "pid": os.getpid()}
        if op in ("unplug", "replug", "sync"):
            self.server.request(op)
            silent_s = float(args.get("silent_ms") or 0.0) / 1000.0
            if op == "replug" and silent_s:
                # Servos that answer only a moment after the port is back (still booting).
                with chain.lock:
                    for s in chain.servos.values():
                        s.offline_until = max(s.offline_until, time.monotonic() + silent_s)
            return {"port": self.server.port}
        if op == "power_cycle":
            # Servo power lost and back: silent meanwhile, then RAM at power-on values
            # (torque off, goal current at its limit), EEPROM kept. The port stays.
            ids = args.get("ids") or list(chain.servos)
            off_s = float(args.get("off_ms", 200.0)) / 1000.0
            self.server.request("sync")
            with chain.lock:
                for sid in ids:
                    servo = self._servo({"id": sid})
                    chain.advance(servo, now)
                    chain.reboot(servo, now, off_s=off_s)
                    servo.put(ct.HARDWARE_ERROR_STATUS, 0)
                chain.stats["power_cycles"] += 1
            return None
        if op in ("stats", "read", "write", "move_shaft", "fault"):
            # Everything the host already sent takes effect before the control request.
            self.server.request("sync")
        if op == "stats":
            with chain.lock:
                return dict(chain.stats)
        if op == "reset_stats":
            with chain.lock:
                chain.stats.clear()
            return None
        if op == "clear_faults":
            with chain.lock:
                for s in chain.servos.values():
                    s.faults = _Faults()
            return None
        servo = self._servo(args)
        with chain.lock:
            if op == "fault":
                if args.get("missing") is not None:
                    servo.faults.missing = bool(args["missing"])
                if args.get("corrupt_crc") is not None:
                    servo.faults.corrupt_crc = bool(args["corrupt_crc"])
                if args.get("slow_ms") is not None:
                    servo.faults.slow_s = float(args["slow_ms"]) / 1000.0
                if args.get("duplicate") is not None:
                    servo.faults.duplicate = bool(args["duplicate"])
                if args.get("late_ms") is not None:
                    late = args["late_ms"]
                    lo, hi = (late, late) if isinstance(late, int | float) else late
                    servo.faults.late_s = (float(lo) / 1000.0, float(hi) / 1000.0)
                if args.get("hardware_error") is not None:
                    chain.advance(servo, now)
                    chain.raise_hardware_error(servo, int(args["hardware_error"]))
                return None
            if op == "read":
                chain.advance(servo, now)
                a, n = int(args["address"]), int(args["size"])
                return bytes(servo.table[a : a + n]).hex()
            if op == "write":
                chain.advance(servo, now)
                a = int(args["address"])
                data = bytes.fromhex(args["data"])
                servo.table[a : a + len(data)] = data
                chain._refresh_registers(servo)
                chain._push(servo)
                return None
            if op == "move_shaft":
                if chain.link is not None:
                    raise PeerError("linked to a physics sim: move the joint there")
                chain.advance(servo, now)
                servo.shaft = float(args["ticks"])
                chain._refresh_registers(servo)
                return None
        raise PeerError(f"unknown control op {op!r}")

    def serve(self) -> None:
        for line in sys.stdin.buffer:
            try:
                req = json.loads(line)
            except ValueError:
                continue
            seq = req.get("seq")
            try:
                result = self.handle(str(req.get("op")), req.get("args") or {})
                self.send({"seq": seq, "ok": True, "result": result})
            except Exception as exc:
                self.send({"seq": seq, "ok": False, "error": f"{type(exc).__name__}: {exc}"})


def _die_with_parent() -> None:
    """Ask Linux to SIGTERM this process when its parent dies (stdin EOF is the backup)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def child_main(argv: Sequence[str]) -> int:
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    _die_with_parent()
    cfg = json.loads(argv[0])
    link = ServoLink.attach(cfg["link_name"]) if cfg.get("link_name") else None
    chain = _Chain(cfg, link)
    server = _PtyServer(chain, cfg)
    server.plug()

    def on_term(signum: int, frame: object) -> None:
        server.unplug()
        os._exit(0)

    signal.signal(signal.SIGTERM, on_term)
    server.thread.start()
    control = _Control(chain, server)
    # Announce only now: the pty is open, raw, and the serial thread is listening.
    control.send({"ready": True, "port": server.stable_path or server.port, "pid": os.getpid()})
    try:
        control.serve()
    finally:
        with contextlib.suppress(PeerError):
            server.request("stop", timeout=2.0)
        server.unplug()
        if link is not None:
            link.close()
    return 0


# --------------------------------------------------------------------------------------
# Parent side.
# --------------------------------------------------------------------------------------


def _reap(
    proc: subprocess.Popen[bytes], link: ServoLink | None, paths: list[str], tmpdir: str | None
) -> None:
    """Stop the child and free what it used (idempotent; also runs from a finalizer)."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            if proc.stdin:
                proc.stdin.close()  # EOF: the child exits cleanly
        try:
            proc.wait(timeout=2.0)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5.0)
    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            if stream:
                stream.close()
    if link is not None:
        link.close()
        link.unlink()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    if tmpdir:
        with contextlib.suppress(OSError):
            os.rmdir(tmpdir)


class ServoPeer:
    """A simulated Dynamixel chain in its own process, reachable at `port` (a pty).

    `stable_path` (a path, or True for a private temp path) makes `port` a symlink to the
    pty that survives unplug/replug, like /dev/serial/by-id/... does for a U2D2.

    Use as a context manager (or call `close()`): the process is stopped, its pty closed
    and any shared memory unlinked. Faults are settable at any time and act on the very
    next packet: `set_fault(id, missing=True)`, `corrupt_crc=True`, `slow_ms=...`,
    `hardware_error=0x20`.
    """

    def __init__(
        self,
        servo_ids: Sequence[int],
        *,
        model_number: int = ct.MODEL_XM430_W350,
        shaft_ticks: Mapping[int, float] | None = None,
        wire_model: bool = False,
        baud: int = 1_000_000,
        max_speed_rad_s: float = 6.0,
        reboot_s: float = 0.05,
        link: bool = False,
        stable_path: str | bool | None = None,
        start_timeout_s: float = 20.0,
    ) -> None:
        ids = [int(s) for s in servo_ids]
        if not ids or len(set(ids)) != len(ids) or not all(0 <= s <= pr.MAX_ID for s in ids):
            raise ValueError(f"servo ids must be unique, in 0..{pr.MAX_ID}, got {ids}")
        self.servo_ids = tuple(ids)
        self._tmpdir: str | None = None
        if stable_path is True:
            self._tmpdir = tempfile.mkdtemp(prefix="servo-peer-")
            stable_path = os.path.join(self._tmpdir, "ttyDXL")
        self._cfg: dict[str, Any] = {
            "servo_ids": ids,
            "model_number": model_number,
            "shaft_ticks": {str(k): float(v) for k, v in (shaft_ticks or {}).items()},
            "wire_model": wire_model,
            "baud": baud,
            "max_speed_rad_s": max_speed_rad_s,
            "reboot_s": reboot_s,
            "stable_path": stable_path or None,
        }
        self._want_link = link
        self._start_timeout_s = start_timeout_s
        self.link: ServoLink | None = None
        self.port = ""
        self.pid = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._finalizer: weakref.finalize | None = None
        self._buf = b""
        self._seq = 0
        self._lock = threading.Lock()

    # Lifetime -------------------------------------------------------------------------

    def start(self) -> ServoPeer:
        if self._proc is not None:
            raise PeerError("servo peer already started")
        cfg = dict(self._cfg)
        if self._want_link:
            self.link = ServoLink.create(self.servo_ids)
            shaft = cfg["shaft_ticks"]
            for sid in self.servo_ids:
                ticks = float(shaft.get(str(sid), ct.CENTER_TICK))
                self.link.write_measurement(sid, ct.ticks_to_rad(ticks))
            cfg["link_name"] = self.link.name
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "drivers.sim.servo_peer", json.dumps(cfg)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            close_fds=True,
        )
        paths = [cfg["stable_path"]] if cfg.get("stable_path") else []
        self._finalizer = weakref.finalize(self, _reap, self._proc, self.link, paths, self._tmpdir)
        try:
            ready = self._read_message(self._start_timeout_s)
        except BaseException:
            self.close()
            raise
        if not ready.get("ready"):
            self.close()
            raise PeerError(f"servo peer sent {ready!r} instead of its ready line")
        self.port = str(ready["port"])
        self.pid = int(ready["pid"])
        log.debug("servo peer %s ready on %s (ids %s)", self.pid, self.port, self.servo_ids)
        return self

    def close(self) -> None:
        if self._finalizer is not None:
            self._finalizer()  # runs _reap once

    @property
    def alive(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def __enter__(self) -> ServoPeer:
        return self if self._proc is not None else self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    # Control channel ------------------------------------------------------------------

    def _read_message(self, timeout: float) -> dict[str, Any]:
        assert self._proc is not None and self._proc.stdout is not None
        fd = self._proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PeerError(f"servo peer (pid {self._proc.pid}) silent for {timeout} s")
            readable, _, _ = select.select([fd], [], [], left)
            if readable:
                chunk = os.read(fd, 65536)
                if not chunk:
                    code = self._proc.poll()
                    raise PeerError(f"servo peer exited (code {code}) before answering")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        msg: dict[str, Any] = json.loads(line)
        return msg

    def _request(self, op: str, **args: Any) -> Any:
        if not self.alive:
            raise PeerError("servo peer is not running")
        assert self._proc is not None and self._proc.stdin is not None
        with self._lock:
            self._seq += 1
            seq = self._seq
            self._proc.stdin.write(
                (json.dumps({"seq": seq, "op": op, "args": args}) + "\n").encode()
            )
            self._proc.stdin.flush()
            while True:
                msg = self._read_message(10.0)
                if msg.get("seq") == seq:
                    break
        if not msg.get("ok"):
            raise PeerError(f"servo peer refused {op}: {msg.get('error')}")
        return msg.get("result")

    def set_fault(
        self,
        servo_id: int,
        *,
        missing: bool | None = None,
        corrupt_crc: bool | None = None,
        slow_ms: float | None = None,
        hardware_error: int | None = None,
        late_ms: float | tuple[float, float] | None = None,
        duplicate: bool | None = None,
    ) -> None:
        """Inject a fault on one servo (None leaves that fault as it is).

        `slow_ms`: each reply waits this long and is dropped if the host sends a new
        instruction meanwhile. `late_ms` (a value or a (min, max) range): each reply is
        sent this late *whatever* the host does meanwhile, so it arrives during a later
        transaction, as a slow servo's does on a real bus. `duplicate`: a second servo
        with the same ID answers every instruction too.
        """
        self._request(
            "fault",
            id=servo_id,
            missing=missing,
            corrupt_crc=corrupt_crc,
            slow_ms=slow_ms,
            hardware_error=hardware_error,
            late_ms=list(late_ms) if isinstance(late_ms, tuple) else late_ms,
            duplicate=duplicate,
        )

    def power_cycle(self, off_ms: float = 200.0, ids: Sequence[int] | None = None) -> None:
        """Cut the servos' power for `off_ms` (the USB adapter stays): they go silent, then
        come back with RAM at power-on values (torque off) and EEPROM kept."""
        self._request("power_cycle", off_ms=float(off_ms), ids=list(ids) if ids else None)

    def clear_faults(self) -> None:
        """Every servo back on the bus, answering promptly (hardware errors need a reboot)."""
        self._request("clear_faults")

    def register(self, servo_id: int, reg: ct.Register) -> int:
        """A register's value straight from the simulated servo's memory (not via the bus)."""
        data = bytes.fromhex(self._request("read", id=servo_id, address=reg.address, size=reg.size))
        return ct.decode_value(data, reg)

    def set_register(self, servo_id: int, reg: ct.Register, value: int) -> None:
        """Poke a register in memory, bypassing the bus and its access rules."""
        data = ct.encode_value(value, reg.size).hex()
        self._request("write", id=servo_id, address=reg.address, data=data)

    def move_shaft(self, servo_id: int, ticks: float) -> None:
        """Move a servo's shaft by hand to raw tick `ticks` (before its homing offset)."""
        self._request("move_shaft", id=servo_id, ticks=float(ticks))

    def unplug(self) -> None:
        """Pull the USB cable: the pty closes and the port path disappears."""
        self._request("unplug")

    def replug(self, silent_ms: float = 0.0) -> None:
        """Plug it back in: a new pty (behind the same `stable_path`, if one was given).
        `silent_ms`: the servos answer only that long after the port is back."""
        port = self._request("replug", silent_ms=float(silent_ms))["port"]
        if not self._cfg.get("stable_path"):
            self.port = str(port)

    def flush(self) -> None:
        """Return once every byte the host has written so far has been served (sync writes
        have no reply, so a test that peeks right after one must wait for it this way)."""
        self._request("sync")

    def stats(self) -> dict[str, int]:
        """Instruction packets received by name, status packets sent/dropped."""
        return {str(k): int(v) for k, v in self._request("stats").items()}

    def reset_stats(self) -> None:
        self._request("reset_stats")


if __name__ == "__main__":
    sys.exit(child_main(sys.argv[1:]))
