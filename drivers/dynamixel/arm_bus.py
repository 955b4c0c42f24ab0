"""A Dynamixel X-series arm on one serial bus, through dynamixel_sdk (Protocol 2.0).

Two layers:

- `DynamixelBus`: one port and the servos on it. Every transaction goes through the SDK
  (PortHandler, PacketHandler, GroupSyncRead, GroupSyncWrite); this layer adds what a
  robot needs around it: bounded retries, errors that name the servo ID, joint and port,
  hardware-alert detection, and reconnecting when the port comes back.
- `DynamixelArmBus`: the ArmBus of drivers/interfaces.py for one 7-servo arm (six joints
  then the gripper). Per tick it does one sync read of present current+velocity+position
  (one contiguous 10-byte block, 126..135) and one sync write of goal positions. At connect
  it applies the arm's calibration (homing offset, position limits, operating mode, return
  delay) to the servos and keeps the direction signs and limits for converting and
  clamping: joints in radians, the gripper normalised 0 (closed) .. 1 (open).

Measured on the SDK (4.1): it busy-waits for status packets and gives up after a fixed
~34 ms (2 x LATENCY_TIMER + 2 ms). The port handler here waits in select() instead of
spinning (reads return as soon as the bytes the SDK asked for arrived) and sets the FTDI
latency timer to 1 ms through sysfs when the port is a USB serial adapter that allows it.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import math
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
from dynamixel_sdk import (
    COMM_RX_CORRUPT,
    COMM_RX_TIMEOUT,
    COMM_SUCCESS,
    GroupSyncRead,
    GroupSyncWrite,
    PacketHandler,
    PortHandler,
)

from drivers.calibration import ArmCalibration
from drivers.clock import WallClock
from drivers.dynamixel import control_table as ct
from drivers.dynamixel import protocol as pr
from drivers.interfaces import Clock, DriverFault, JointState

log = logging.getLogger(__name__)

T = TypeVar("T")
_PORT_ERRORS = (OSError, termios.error)  # serial.SerialException is an OSError


class DynamixelError(DriverFault):
    """A servo bus failure; `port`, `servo_id` and `joint` say where (when known)."""

    def __init__(
        self,
        message: str,
        *,
        port: str = "",
        servo_id: int | None = None,
        joint: str | None = None,
    ) -> None:
        super().__init__(message)
        self.port = port
        self.servo_id = servo_id
        self.joint = joint


class DynamixelPortError(DynamixelError):
    """The serial port cannot be opened or went away (USB unplugged, adapter reset)."""


class DynamixelCommError(DynamixelError):
    """A servo did not answer, or answered garbage, within the retry budget."""

    def __init__(self, message: str, *, result: int, **where: Any) -> None:
        super().__init__(message, **where)
        self.result = result


class DynamixelHardwareError(DynamixelError):
    """A servo raised its hardware alert (overload, overheating, ...); reboot clears it."""

    torque_off = True

    def __init__(self, message: str, *, status: int, **where: Any) -> None:
        super().__init__(message, **where)
        self.status = status


class DynamixelPowerLossError(DynamixelError):
    """Servos lost power and came back (RAM reset: torque off, goals and currents at their
    power-on values). The driver has already restored its settings and, if torque was on,
    turned it back on holding where the arm is now; the arm may have dropped meanwhile, so
    whoever drives it must start again from the present pose."""

    def __init__(self, message: str, *, servo_ids: Sequence[int], **where: Any) -> None:
        super().__init__(message, **where)
        self.servo_ids = tuple(servo_ids)


class DynamixelConfigError(DynamixelError):
    """A servo refused an instruction (e.g. EEPROM write with torque on, bad value)."""

    def __init__(self, message: str, *, error: int, **where: Any) -> None:
        super().__init__(message, **where)
        self.error = error


def _reason(result: int) -> str:
    if result == _STILL_OWED:
        return (
            "an earlier request's late reply is still due and would look like this one's "
            "(servo answering too slowly)"
        )
    if result == COMM_RX_TIMEOUT:
        return "no status packet (servo missing, unpowered, wrong ID or baud, or too slow)"
    if result == COMM_RX_CORRUPT:
        return "corrupt status packet (CRC mismatch or truncated)"
    return PacketHandler(2.0).getTxRxResult(result) or f"SDK result {result}"


def set_low_latency(port: str) -> bool:
    """Set an FTDI adapter's latency timer to 1 ms (default 16 ms) if the kernel lets us.

    A pty or a non-FTDI port has no such file: nothing to do, not an error.
    """
    name = os.path.basename(os.path.realpath(port))
    path = f"/sys/bus/usb-serial/devices/{name}/latency_timer"
    try:
        with open(path) as f:
            if int(f.read().strip()) <= 1:
                return True
        with open(path, "w") as f:
            f.write("1")
        return True
    except FileNotFoundError:
        return False
    except (OSError, ValueError) as exc:
        log.warning(
            "port %s: cannot set %s to 1 ms (%s); reads may wait up to 16 ms "
            "(add a udev rule or run: echo 1 | sudo tee %s)",
            port,
            path,
            exc,
            path,
        )
        return False


class _WaitingPortHandler(PortHandler):
    """PortHandler whose reads wait in select() for the bytes asked for, not spin.

    The SDK asks for exactly the bytes still missing from the packet it is parsing, so a
    read returns the moment they arrive; when nothing comes it returns after `read_wait_s`
    and the SDK's own packet timeout decides, as before.
    """

    def __init__(self, port_name: str, read_wait_s: float) -> None:
        super().__init__(port_name)
        self._read_wait_s = read_wait_s

    def setupPort(self, cflag_baud: int) -> bool:  # SDK method name
        ok = bool(super().setupPort(cflag_baud))
        if ok and self._read_wait_s > 0:
            self.ser.timeout = self._read_wait_s
        return ok


# Not an SDK result: a request not sent because a late reply like its own was still due.
_STILL_OWED = -1001
# A status packet's LEN field counts INST, ERROR, the data and the CRC.
_STATUS_OVERHEAD = 4
# Reads may be widened backwards by up to this many bytes so that a reply's length tells it
# apart from the late replies still owed to earlier requests (see DynamixelBus).
_MAX_PAD = 5


@dataclass
class _Owed:
    """A status packet an earlier request may still bring: who sends it, its LEN field, and
    until when it is expected."""

    servo_id: int
    length: int
    until: float


@dataclass
class BusStats:
    """What the bus saw, for a cell's metrics and for tests."""

    transactions: int = 0
    failed: int = 0  # transactions that timed out or got a corrupt reply
    late_replies: int = 0  # status packets that answered an earlier request: discarded
    late_bytes: int = 0  # bytes drained from the line before a transaction
    owed_waits: int = 0  # times a request waited for an earlier one's late reply to clear
    reconnects: int = 0
    power_cycles: int = 0  # servos found powered up anew (RAM reset) and restored


def _rx_packet(ph: Any) -> Callable[[PortHandler], tuple[list[int], int]]:
    """The SDK's status-packet reader (its signature grew a `fast_option` in 3.8)."""
    if "fast_option" in inspect.signature(ph.rxPacket).parameters:
        return lambda port: ph.rxPacket(port, False)  # type: ignore[no-any-return]
    return ph.rxPacket  # type: ignore[no-any-return]


class DynamixelBus:
    """One serial port and the servos on it, through dynamixel_sdk.

    Transient failures (no reply, corrupt reply) are retried up to `retries` more times
    within `retry_budget_s`, then raise DynamixelCommError naming the servo. A vanished
    port raises DynamixelPortError; the next call reopens it (at most every
    `reconnect_interval_s`) and runs `on_reconnect` so the owner can re-check its servos;
    until that check has passed the bus is not used for anything else (the check is retried
    for `settle_s`, then the port is dropped and the whole reconnect tried again later).

    Replies never answer the wrong request. A servo may answer after the SDK gave up on it
    (a slow servo, a busy host); the SDK would take that late status packet as the answer
    to the next request. So every transaction first drains what already arrived, accepts
    only status packets from the servos it asked and of the length its own request makes,
    and remembers, for `late_reply_s`, the replies a failed request may still bring. A new
    request whose reply would look like one of those is widened (reads start up to
    `_MAX_PAD` bytes earlier) or waits until the late reply came or expired. Discarded late
    replies are counted in `stats`.
    """

    def __init__(
        self,
        port: str,
        servo_ids: Sequence[int],
        *,
        names: Mapping[int, str] | None = None,
        label: str = "",
        baud: int = 1_000_000,
        retries: int = 2,
        retry_budget_s: float = 0.25,
        reconnect_interval_s: float = 0.25,
        read_wait_s: float = 0.002,
        late_reply_s: float = 0.5,
        settle_s: float = 1.0,
    ) -> None:
        self.port = port
        self.servo_ids = tuple(int(s) for s in servo_ids)
        if len(set(self.servo_ids)) != len(self.servo_ids) or not self.servo_ids:
            raise ValueError(f"servo ids must be unique and non-empty, got {self.servo_ids}")
        self.names = dict(names or {})
        self.label = label or f"bus {port}"
        self.baud = baud
        self.retries = max(0, int(retries))
        self.retry_budget_s = retry_budget_s
        self.reconnect_interval_s = reconnect_interval_s
        self.read_wait_s = read_wait_s
        self.late_reply_s = late_reply_s
        self.settle_s = settle_s
        self.on_reconnect: Callable[[], None] | None = None
        self.lock = threading.RLock()
        self.stats = BusStats()
        self._ph = PacketHandler(2.0)
        self._rx = _rx_packet(self._ph)
        self._port: PortHandler | None = None
        self._opened_once = False
        self._closed = False
        self._next_attempt = 0.0
        self._rechecking = False
        self._owed: list[_Owed] = []
        self._stale = pr.PacketParser()
        self._reads: dict[tuple[int, int, tuple[int, ...]], GroupSyncRead] = {}
        self._writes: dict[tuple[int, int], GroupSyncWrite] = {}
        # Set when a servo failed to answer; the owner clears it once it has checked that
        # the servos kept their RAM (a power cycle resets it).
        self.silence_seen = False

    # Naming -----------------------------------------------------------------------------

    def where(self, servo_id: int | None) -> dict[str, Any]:
        return {"port": self.port, "servo_id": servo_id, "joint": self.names.get(servo_id or -1)}

    def describe(self, servo_id: int | None) -> str:
        if servo_id is None:
            return f"{self.label} on {self.port}"
        joint = self.names.get(servo_id)
        part = f"servo ID {servo_id}" + (f" ({joint})" if joint else "")
        return f"{self.label}: {part} on {self.port}"

    # Port lifetime ------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return self._port is not None

    def open(self) -> None:
        with self.lock:
            self._closed = False
            self._next_attempt = 0.0
            self._ensure_open()

    def close(self) -> None:
        with self.lock:
            self._closed = True
            self._drop_port()

    def _drop_port(self) -> None:
        port, self._port = self._port, None
        self._reads.clear()
        self._writes.clear()
        self._owed.clear()  # a new port starts with a silent line
        if port is not None and port.ser is not None:
            with contextlib.suppress(*_PORT_ERRORS):
                port.closePort()

    def _ensure_open(self) -> PortHandler:
        if self._port is not None:
            return self._port
        if self._closed:
            raise DynamixelPortError(f"{self.describe(None)}: bus is closed", port=self.port)
        now = time.monotonic()
        if now < self._next_attempt:
            raise DynamixelPortError(
                f"{self.describe(None)}: port is disconnected; next reconnect attempt in "
                f"{self._next_attempt - now:.2f} s",
                port=self.port,
            )
        handler = _WaitingPortHandler(self.port, self.read_wait_s)
        try:
            ok = handler.openPort()
        except (*_PORT_ERRORS, ValueError) as exc:
            self._next_attempt = now + self.reconnect_interval_s
            raise DynamixelPortError(
                f"{self.describe(None)}: cannot open port: {exc}", port=self.port
            ) from exc
        if not ok:
            raise DynamixelPortError(
                f"{self.describe(None)}: baud {self.baud} is not supported", port=self.port
            )
        if self.baud != handler.getBaudRate() and not handler.setBaudRate(self.baud):
            handler.closePort()
            raise DynamixelPortError(
                f"{self.describe(None)}: baud {self.baud} is not supported", port=self.port
            )
        set_low_latency(self.port)
        self._port = handler
        if self._opened_once:
            log.warning("%s: port is back, reconnected", self.describe(None))
            self.stats.reconnects += 1
            self.silence_seen = True  # the servos may have lost power meanwhile
            self._recheck()
        self._opened_once = True
        return handler

    def _recheck(self) -> None:
        """Run the owner's post-reconnect check until it passes, for at most `settle_s`
        (servos may answer a moment after the port came back); if it never passes, the
        reconnect failed as a whole: drop the port so the next call starts over."""
        if self.on_reconnect is None or self._rechecking:
            return
        deadline = time.monotonic() + self.settle_s
        self._rechecking = True
        try:
            while True:
                try:
                    self.on_reconnect()
                    return
                except DynamixelPortError:
                    raise
                except DynamixelError as exc:
                    if time.monotonic() >= deadline:
                        log.error(
                            "%s: servos not ready %.1f s after reconnect (%s); will reconnect "
                            "again",
                            self.describe(None),
                            self.settle_s,
                            exc,
                        )
                        self._drop_port()
                        self._next_attempt = time.monotonic() + self.reconnect_interval_s
                        raise
                    log.info("%s: re-checking servos after reconnect: %s", self.describe(None), exc)
                    time.sleep(0.02)
        except BaseException:
            if self._port is not None:
                self._drop_port()
            raise
        finally:
            self._rechecking = False

    def _lost(self, exc: BaseException) -> DynamixelPortError:
        log.warning("%s: port lost (%s); will reconnect when it is back", self.describe(None), exc)
        self._drop_port()
        self._next_attempt = 0.0
        return DynamixelPortError(
            f"{self.describe(None)}: port lost ({exc}); will reconnect when it is back",
            port=self.port,
        )

    def _io(self, fn: Callable[[PortHandler], T]) -> T:
        port = self._ensure_open()
        try:
            return fn(port)
        except _PORT_ERRORS as exc:
            raise self._lost(exc) from exc
        finally:
            port.is_using = False  # the SDK leaves it set when an exception escapes

    # Matching replies to requests ---------------------------------------------------------

    def _drain(self, port: PortHandler) -> None:
        """Discard whatever arrived since the last transaction (late status packets)."""
        ser = port.ser
        self._stale.clear()
        while True:
            waiting = ser.in_waiting
            if not waiting:
                return
            data = ser.read(waiting)
            if not data:
                return
            self.stats.late_bytes += len(data)
            for pkt in self._stale.feed(data):
                length = len(pkt.params) + 3 if isinstance(pkt, pr.Packet) else 0
                self._late(pkt.servo_id, length)

    def _late(self, servo_id: int, length: int) -> None:
        self.stats.late_replies += 1
        for i, owed in enumerate(self._owed):
            if owed.servo_id == servo_id and owed.length == length:
                del self._owed[i]
                break
        log.debug("%s: discarded a late status packet (length %d)", self.describe(servo_id), length)

    def _owes(self, servo_id: int, length: int) -> bool:
        now = time.monotonic()
        self._owed = [o for o in self._owed if o.until > now]
        return any(o.servo_id == servo_id and o.length == length for o in self._owed)

    def _wait_owed(self, port: PortHandler, want: Mapping[int, int], deadline: float) -> bool:
        """Drain the line until no owed reply looks like one of `want`; False at deadline."""
        counted = False
        while any(self._owes(sid, n) for sid, n in want.items()):
            if not counted:
                self.stats.owed_waits += 1
                counted = True
            now = time.monotonic()
            if now >= deadline:
                return False
            fd = port.ser.fileno()
            select.select([fd], [], [], min(0.005, deadline - now))
            self._drain(port)
        return True

    def _receive(
        self, port: PortHandler, want: Mapping[int, int]
    ) -> tuple[dict[int, tuple[int, bytes]], int]:
        """Status packets for `want` ({id: LEN}) until all came or the SDK's packet timeout;
        anything else is a late reply to an earlier request and is discarded."""
        got: dict[int, tuple[int, bytes]] = {}
        while len(got) < len(want):
            rx, result = self._rx(port)
            if result != COMM_SUCCESS:
                return got, int(result)
            sid = rx[4]
            length = rx[5] | rx[6] << 8
            refused = length == _STATUS_OVERHEAD and rx[8] & ~pr.ERRBIT_ALERT
            if sid in want and sid not in got and (want[sid] == length or refused):
                # A refusal carries no data whatever was asked; no ack of ours is an error.
                got[sid] = (rx[8], bytes(rx[9 : 9 + length - _STATUS_OVERHEAD]))
            else:
                self._late(sid, length)
        return got, COMM_SUCCESS

    def _exchange(
        self,
        send: Callable[[PortHandler], int],
        want: Mapping[int, int],
        deadline: float,
    ) -> tuple[dict[int, tuple[int, bytes]], int]:
        """One request and its replies: drain, wait out look-alike owed replies, send
        (through the SDK, which sets the packet timeout), receive. On failure the missing
        replies are owed for `late_reply_s`."""

        sent = False

        def run(port: PortHandler) -> tuple[dict[int, tuple[int, bytes]], int]:
            nonlocal sent
            self._drain(port)
            if not self._wait_owed(port, want, deadline):
                return {}, _STILL_OWED  # nothing sent: nothing more is owed
            port.is_using = False
            result = send(port)
            if result != COMM_SUCCESS:
                return {}, int(result)
            sent = True
            return self._receive(port, want)

        self.stats.transactions += 1
        got, result = self._io(run)
        if result != COMM_SUCCESS and sent:
            self.stats.failed += 1
            self.silence_seen = True
            until = time.monotonic() + self.late_reply_s
            self._owed.extend(_Owed(sid, n, until) for sid, n in want.items() if sid not in got)
        return got, result

    def _window(self, address: int, size: int, ids: Sequence[int]) -> tuple[int, int, int]:
        """(start, length, offset of `address` in it) for a read whose replies cannot be
        mistaken for an owed one; the plain window when nothing is owed."""
        for pad in range(_MAX_PAD + 1):
            if address >= pad:
                start, offset = address - pad, pad
            elif address + size + pad <= ct.TABLE_SIZE:
                start, offset = address, 0
            else:
                continue
            n = size + pad
            if not any(self._owes(sid, n + _STATUS_OVERHEAD) for sid in ids):
                return start, n, offset
        return address, size, 0  # every width is owed: _exchange waits for them

    def _tx(self, servo_id: int, instruction: int, params: Sequence[int] = ()) -> Any:
        """An instruction packet sent through the SDK's framing (CRC, stuffing)."""

        def send(port: PortHandler) -> int:
            packet = [0] * (10 + len(params))
            packet[4] = servo_id
            packet[5] = (len(params) + 3) & 0xFF
            packet[6] = (len(params) + 3) >> 8
            packet[7] = instruction
            packet[8 : 8 + len(params)] = list(params)
            result = int(self._ph.txPacket(port, packet))
            if result == COMM_SUCCESS:
                port.setPacketTimeout(11 + _MAX_PAD)
            return result

        return send

    # Transactions -------------------------------------------------------------------------

    def _check_status(self, servo_id: int, error: int, what: str, allow_alert: bool) -> None:
        number = error & ~pr.ERRBIT_ALERT
        if number:
            raise DynamixelConfigError(
                f"{self.describe(servo_id)}: {what} refused: {pr.describe_error(error)}",
                error=error,
                **self.where(servo_id),
            )
        if error & pr.ERRBIT_ALERT and not allow_alert:
            raise self.hardware_error(servo_id)

    def hardware_error(self, servo_id: int, others: Sequence[int] = ()) -> DynamixelHardwareError:
        """The error to raise for a servo whose status packets carry the alert bit."""
        try:
            status = self.read(servo_id, ct.HARDWARE_ERROR_STATUS, allow_alert=True)
            words = f"0x{status:02x} ({ct.describe_hardware_error(status)})"
        except DynamixelCommError:
            status, words = -1, "unreadable"
        also = f"; also alerting: IDs {list(others)}" if others else ""
        return DynamixelHardwareError(
            f"{self.describe(servo_id)}: hardware error {words}; the servo disabled its "
            f"torque, reboot it to clear{also}",
            status=status,
            **self.where(servo_id),
        )

    def _txrx(
        self,
        servo_id: int,
        what: str,
        request: Callable[[], tuple[Callable[[PortHandler], int], int, int]],
        allow_alert: bool = False,
    ) -> bytes:
        """One servo's request with retries. `request()` gives (send, reply LEN, offset of
        the wanted data in the reply) afresh for each try (a read may widen its window)."""
        with self.lock:
            start = time.monotonic()
            deadline = start + self.retry_budget_s
            result = COMM_SUCCESS
            for attempt in range(self.retries + 1):
                send, length, offset = request()
                got, result = self._exchange(send, {servo_id: length}, deadline)
                if result == COMM_SUCCESS:
                    error, data = got[servo_id]
                    self._check_status(servo_id, error, what, allow_alert)
                    return data[offset:]
                log.debug("%s: %s attempt %d: %s", self.describe(servo_id), what, attempt, result)
                if time.monotonic() > deadline:
                    break
            raise DynamixelCommError(
                f"{self.describe(servo_id)}: {what} failed: {_reason(result)} "
                f"(after {attempt + 1} tries)",
                result=result,
                **self.where(servo_id),
            )

    def ping(self, servo_id: int) -> int:
        """The servo's model number."""
        send = self._tx(servo_id, pr.INST_PING)
        info = self._txrx(servo_id, "ping", lambda: (send, 3 + _STATUS_OVERHEAD, 0), True)
        return int(ct.decode_value(info, ct.MODEL_NUMBER))

    def ping_info(self, servo_id: int) -> tuple[int, int]:
        """(model number, firmware version) from a PING's status packet."""
        send = self._tx(servo_id, pr.INST_PING)
        info = self._txrx(servo_id, "ping", lambda: (send, 3 + _STATUS_OVERHEAD, 0), True)
        return int(ct.decode_value(info, ct.MODEL_NUMBER)), int(info[2])

    def answers(self, servo_id: int, listen_s: float = 0.02) -> list[tuple[int, int]]:
        """Every (model number, firmware) that answers a PING to `servo_id`, listening
        `listen_s` past the first answer: two entries mean two servos share the ID (a new
        servo left at its factory ID 1). Empty when nobody answers; DynamixelCommError when
        the answer is garbled (two servos answering at once does that on a real bus)."""
        want = {servo_id: 3 + _STATUS_OVERHEAD}
        with self.lock:
            send = self._tx(servo_id, pr.INST_PING)
            got, result = self._exchange(send, want, time.monotonic() + self.retry_budget_s)
            if result in (COMM_RX_TIMEOUT, _STILL_OWED):
                return []
            if result != COMM_SUCCESS:
                raise DynamixelCommError(
                    f"{self.describe(servo_id)}: ping answered with a garbled packet "
                    f"({_reason(result)}); two servos with this ID answer at once?",
                    result=result,
                    **self.where(servo_id),
                )
            out = [got[servo_id]]

            def listen(port: PortHandler) -> None:
                port.setPacketTimeoutMillis(listen_s * 1000.0)
                while True:
                    rx, res = self._rx(port)
                    if res != COMM_SUCCESS:
                        return
                    if rx[4] == servo_id and (rx[5] | rx[6] << 8) == want[servo_id]:
                        out.append((rx[8], bytes(rx[9:12])))

            self._io(listen)
        return [
            (ct.decode_value(data, ct.MODEL_NUMBER), data[2] if len(data) > 2 else -1)
            for _, data in out
        ]

    def scan(self) -> dict[int, tuple[int, int]]:
        """{id: (model number, firmware)} of every servo answering a broadcast PING at
        this baud (the servos on the bus, expected or not)."""
        with self.lock:

            def ping_all(port: PortHandler) -> tuple[Any, int]:
                self._drain(port)
                port.is_using = False
                return self._ph.broadcastPing(port)  # type: ignore[no-any-return]

            found, result = self._io(ping_all)
        if result != COMM_SUCCESS:
            return {}
        return {int(sid): (int(v[0]), int(v[1])) for sid, v in found.items()}

    def read(self, servo_id: int, reg: ct.Register, allow_alert: bool = False) -> int:
        def request() -> tuple[Callable[[PortHandler], int], int, int]:
            start, n, offset = self._window(reg.address, reg.size, (servo_id,))

            def send(port: PortHandler) -> int:
                return int(self._ph.readTx(port, servo_id, start, n))

            return send, n + _STATUS_OVERHEAD, offset

        data = self._txrx(servo_id, f"read {reg.name}", request, allow_alert)
        if len(data) < reg.size:
            raise DynamixelCommError(
                f"{self.describe(servo_id)}: read {reg.name} returned {len(data)} bytes",
                result=COMM_RX_CORRUPT,
                **self.where(servo_id),
            )
        return ct.decode_value(data, reg)

    def write(self, servo_id: int, reg: ct.Register, value: int, allow_alert: bool = False) -> None:
        """An acknowledged write (for configuration and torque, not per-tick goals)."""
        params = [reg.address & 0xFF, reg.address >> 8, *ct.encode_value(value, reg.size)]
        send = self._tx(servo_id, pr.INST_WRITE, params)
        self._txrx(
            servo_id, f"write {reg.name}={value}", lambda: (send, _STATUS_OVERHEAD, 0), allow_alert
        )

    def sync_read(
        self,
        address: int,
        size: int,
        ids: Sequence[int] | None = None,
        *,
        allow_alert: bool = False,
    ) -> dict[int, bytes]:
        """One SYNC_READ of [address, address+size) from every servo: {id: bytes}."""
        ids = tuple(ids) if ids is not None else self.servo_ids
        with self.lock:
            start = time.monotonic()
            deadline = start + self.retry_budget_s
            result = COMM_SUCCESS
            failed: int | None = None
            for attempt in range(self.retries + 1):
                first, n, offset = self._window(address, size, ids)

                def send(port: PortHandler, first: int = first, n: int = n) -> int:
                    group = self._reads.get((first, n, ids))
                    if group is None or group.port is not port:
                        group = GroupSyncRead(port, self._ph, first, n)
                        for sid in ids:
                            group.addParam(sid)
                        self._reads[(first, n, ids)] = group
                    return int(group.txPacket())

                want = dict.fromkeys(ids, n + _STATUS_OVERHEAD)
                got, result = self._exchange(send, want, deadline)
                if result == COMM_SUCCESS:
                    return self._sync_result(got, ids, address, size, offset, allow_alert)
                failed = next((sid for sid in ids if sid not in got), None)
                log.debug("%s: sync read try %d: %s", self.describe(failed), attempt, result)
                if time.monotonic() > deadline:
                    break
            raise DynamixelCommError(
                f"{self.describe(failed)}: sync read of {len(ids)} servos failed: "
                f"{_reason(result)} (after {attempt + 1} tries)",
                result=result,
                **self.where(failed),
            )

    def _sync_result(
        self,
        got: Mapping[int, tuple[int, bytes]],
        ids: tuple[int, ...],
        address: int,
        size: int,
        offset: int,
        allow_alert: bool,
    ) -> dict[int, bytes]:
        what = f"sync read of {address}..{address + size - 1}"
        for sid in ids:
            self._check_status(sid, got[sid][0] & ~pr.ERRBIT_ALERT, what, True)
        alerts = [sid for sid in ids if got[sid][0] & pr.ERRBIT_ALERT]
        if alerts and not allow_alert:
            raise self.hardware_error(alerts[0], alerts[1:])
        return {sid: got[sid][1][offset : offset + size] for sid in ids}

    def sync_write(self, address: int, size: int, values: Mapping[int, int]) -> None:
        """One SYNC_WRITE of a value per servo (no status packets come back)."""
        with self.lock:
            port = self._ensure_open()
            group = self._writes.get((address, size))
            if group is None:
                group = GroupSyncWrite(port, self._ph, address, size)
                self._writes[(address, size)] = group
            group.clearParam()
            for sid, value in values.items():
                group.addParam(sid, list(ct.encode_value(value, size)))

            def send(p: PortHandler) -> int:
                self._drain(p)
                return int(group.txPacket())

            result = self._io(send)
            if result != COMM_SUCCESS:
                raise DynamixelCommError(
                    f"{self.describe(None)}: sync write of {address}..{address + size - 1} "
                    f"failed: {_reason(result)}",
                    result=result,
                    port=self.port,
                )

    def reboot(self, servo_id: int, timeout_s: float = 2.0) -> None:
        """REBOOT one servo and wait until it answers again (RAM back to defaults)."""
        with self.lock:
            send = self._tx(servo_id, pr.INST_REBOOT)
            self._txrx(servo_id, "reboot", lambda: (send, _STATUS_OVERHEAD, 0), True)
            deadline = time.monotonic() + timeout_s
            ping = self._tx(servo_id, pr.INST_PING)
            while True:
                time.sleep(0.02)
                got, result = self._exchange(
                    ping, {servo_id: 3 + _STATUS_OVERHEAD}, time.monotonic() + self.retry_budget_s
                )
                if result == COMM_SUCCESS:
                    model = ct.decode_value(got[servo_id][1], ct.MODEL_NUMBER)
                    log.info("%s: rebooted (model %d)", self.describe(servo_id), model)
                    return
                if time.monotonic() > deadline:
                    raise DynamixelCommError(
                        f"{self.describe(servo_id)}: did not come back within {timeout_s} s "
                        "after reboot",
                        result=result,
                        **self.where(servo_id),
                    )


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
        return self.calibration.ids

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
        base = ct.STATE_BLOCK_ADDRESS
        ticks = np.empty(len(self.ids), dtype=np.float64)
        vel = np.empty(len(self.ids), dtype=np.float64)
        cur = np.empty(len(self.ids), dtype=np.float64)
        for i, sid in enumerate(self.ids):
            b = blocks[sid]
            cur[i] = ct.decode_value(b, ct.PRESENT_CURRENT, ct.PRESENT_CURRENT.address - base)
            vel[i] = ct.decode_value(b, ct.PRESENT_VELOCITY, ct.PRESENT_VELOCITY.address - base)
            ticks[i] = ct.decode_value(b, ct.PRESENT_POSITION, ct.PRESENT_POSITION.address - base)
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
