"""One Dynamixel Protocol 2.0 bus through dynamixel_sdk: transactions a robot can trust.

`DynamixelBus` owns one port and the servos on it. Every transaction goes through the SDK
(PortHandler, PacketHandler, GroupSyncRead, GroupSyncWrite); this layer adds what a robot
needs around it: bounded retries, errors that name the servo ID, joint and port,
hardware-alert detection, reconnecting when the port comes back, and replies matched to
the request they answer (a late status packet is never taken for a fresh one).

Measured on the SDK (4.1): it busy-waits for status packets and gives up after a fixed
~34 ms (2 x LATENCY_TIMER + 2 ms). The port handler here waits in select() instead of
spinning, takes every byte that arrived in one read (the SDK's own reads are then served
from that buffer), and sets the FTDI latency timer to 1 ms through sysfs when the port is a
USB serial adapter that allows it.
"""

from __future__ import annotations

import contextlib
import errno
import inspect
import logging
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from dynamixel_sdk import (
    COMM_RX_CORRUPT,
    COMM_RX_TIMEOUT,
    COMM_SUCCESS,
    GroupSyncRead,
    GroupSyncWrite,
    PacketHandler,
    PortHandler,
)

from drivers.dynamixel import control_table as ct
from drivers.dynamixel import protocol as pr
from drivers.interfaces import DriverFault

log = logging.getLogger(__name__)

T = TypeVar("T")
_PORT_ERRORS = (OSError, termios.error)  # serial.SerialException is an OSError
# An instruction packet is a few dozen bytes: a port that takes none for this long is stalled.
WRITE_STALL_S = 0.5


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
    """PortHandler whose reads wait in select() for bytes, not spin, and take every byte
    that has arrived in one system call.

    The SDK reads a status packet in pieces (its 11-byte minimum, then the rest), packet
    after packet: a 7-servo sync read is ~14 reads, each a select and a read through
    pyserial. Here one wakeup takes all that is there into a buffer that the SDK's next
    reads are served from, so status packets that came together cost one or two system
    calls. When nothing comes, a read returns what it has after `read_wait_s` and the SDK's
    own packet timeout decides, as before (`read_wait_s=0`: poll, the stock SDK's spin).

    Bytes still buffered after a transaction are the line's, not the transaction's:
    `take_buffered` hands them to the bus's drain (late replies are counted and never taken
    for a fresh one), and `clearPort` (the SDK's, before every instruction) drops them with
    the kernel's.
    """

    def __init__(self, port_name: str, read_wait_s: float) -> None:
        super().__init__(port_name)
        self._read_wait_s = max(0.0, read_wait_s)
        self._rx = bytearray()

    def readPort(self, length: int) -> bytes:  # SDK method name
        if length <= 0:
            return b""
        if len(self._rx) < length:
            self._fill(self._read_wait_s)
        out = bytes(self._rx[:length])
        del self._rx[:length]
        return out

    def _fill(self, wait_s: float) -> bool:
        """Append whatever the kernel holds, waiting up to `wait_s` for something."""
        ser = self.ser
        if ser is None or not ser.is_open:
            raise OSError(errno.EBADF, f"port {self.port_name} is not open")
        ready, _, _ = select.select([ser.fd], [], [], wait_s)
        if not ready:
            return False
        try:
            data = os.read(ser.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return False
        if not data:  # what a USB adapter (or a pty whose far end closed) does when gone
            raise OSError(
                errno.EIO,
                f"port {self.port_name} reports data but returned none (device disconnected?)",
            )
        self._rx += data
        return True

    def take_buffered(self) -> bytes:
        """Every byte that has arrived and no read took yet (buffered, then the kernel's)."""
        while self._fill(0.0):
            pass
        out = bytes(self._rx)
        self._rx.clear()
        return out

    def writePort(self, packet: Any) -> int:  # SDK method name
        """The whole packet with os.write, waiting in select() only if the kernel's buffer
        is full: pyserial's write also selects for writability after every write, one
        more system call per instruction packet."""
        ser = self.ser
        if ser is None or not ser.is_open:
            raise OSError(errno.EBADF, f"port {self.port_name} is not open")
        view = memoryview(bytes(packet))
        deadline = time.monotonic() + WRITE_STALL_S
        while view:
            try:
                n = os.write(ser.fd, view)
            except (BlockingIOError, InterruptedError):
                left = deadline - time.monotonic()
                if left <= 0:  # a bus fault (hold or torque off), never a hung control loop
                    raise OSError(
                        errno.ETIMEDOUT,
                        f"port {self.port_name} took no bytes for {WRITE_STALL_S:.1f} s "
                        "(adapter stalled or unplugged?)",
                    ) from None
                select.select([], [ser.fd], [], left)
                continue
            view = view[n:]
        return len(packet)

    def getBytesAvailable(self) -> int:  # SDK method name
        return len(self._rx) + int(self.ser.in_waiting)

    def clearPort(self) -> None:  # SDK method name
        self._rx.clear()
        super().clearPort()

    def closePort(self) -> None:  # SDK method name
        self._rx.clear()
        super().closePort()


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


def _rx_packet(ph: Any) -> Callable[[_WaitingPortHandler], tuple[list[int], int]]:
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
        self._port: _WaitingPortHandler | None = None
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

    def _ensure_open(self) -> _WaitingPortHandler:
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

    def _io(self, fn: Callable[[_WaitingPortHandler], T]) -> T:
        port = self._ensure_open()
        try:
            return fn(port)
        except _PORT_ERRORS as exc:
            raise self._lost(exc) from exc
        finally:
            port.is_using = False  # the SDK leaves it set when an exception escapes

    # Matching replies to requests ---------------------------------------------------------

    def _drain(self, port: _WaitingPortHandler) -> None:
        """Discard whatever arrived since the last transaction (late status packets)."""
        self._stale.clear()
        data = port.take_buffered()
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
        if not self._owed:  # the usual case: every earlier request was answered
            return False
        now = time.monotonic()
        self._owed = [o for o in self._owed if o.until > now]
        return any(o.servo_id == servo_id and o.length == length for o in self._owed)

    def _wait_owed(
        self, port: _WaitingPortHandler, want: Mapping[int, int], deadline: float
    ) -> bool:
        """Drain the line until no owed reply looks like one of `want`; False at deadline."""
        if not self._owed:
            return True
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
        self, port: _WaitingPortHandler, want: Mapping[int, int]
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
        send: Callable[[_WaitingPortHandler], int],
        want: Mapping[int, int],
        deadline: float,
    ) -> tuple[dict[int, tuple[int, bytes]], int]:
        """One request and its replies: drain, wait out look-alike owed replies, send
        (through the SDK, which sets the packet timeout), receive. On failure the missing
        replies are owed for `late_reply_s`."""

        sent = False

        def run(port: _WaitingPortHandler) -> tuple[dict[int, tuple[int, bytes]], int]:
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
        if not self._owed:  # the usual case: every earlier request was answered
            return address, size, 0
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

        def send(port: _WaitingPortHandler) -> int:
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
        request: Callable[[], tuple[Callable[[_WaitingPortHandler], int], int, int]],
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
            deadline = time.monotonic() + self.retry_budget_s
            for _ in range(self.retries + 1):  # a busy host is not a missing servo
                got, result = self._exchange(send, want, deadline)
                if result == COMM_SUCCESS or time.monotonic() > deadline:
                    break
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

            def listen(port: _WaitingPortHandler) -> None:
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

            def ping_all(port: _WaitingPortHandler) -> tuple[Any, int]:
                self._drain(port)
                port.is_using = False
                return self._ph.broadcastPing(port)  # type: ignore[no-any-return]

            found, result = self._io(ping_all)
        if result != COMM_SUCCESS:
            return {}
        return {int(sid): (int(v[0]), int(v[1])) for sid, v in found.items()}

    def read(self, servo_id: int, reg: ct.Register, allow_alert: bool = False) -> int:
        def request() -> tuple[Callable[[_WaitingPortHandler], int], int, int]:
            start, n, offset = self._window(reg.address, reg.size, (servo_id,))

            def send(port: _WaitingPortHandler) -> int:
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

                def send(port: _WaitingPortHandler, first: int = first, n: int = n) -> int:
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

            def send(p: _WaitingPortHandler) -> int:
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
