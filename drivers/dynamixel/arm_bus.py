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
spinning, takes every byte that has arrived in one read (the SDK then parses from that
buffer: ~2 system calls for a 7-servo sync read instead of ~16 small pyserial reads), and
sets the FTDI latency timer to 1 ms through sysfs when the port is a USB serial adapter
that allows it.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import math
import os
import select
import termios
import threading
import time
from collections.abc import Callable, Mapping, Sequence
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


class DynamixelConfigError(DynamixelError):
    """A servo refused an instruction (e.g. EEPROM write with torque on, bad value)."""

    def __init__(self, message: str, *, error: int, **where: Any) -> None:
        super().__init__(message, **where)
        self.error = error


def _reason(result: int) -> str:
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
    that has arrived at once.

    The SDK asks for a few bytes at a time (11 for a status header, then the rest, packet
    after packet: ~16 reads for one 7-servo sync read, each a select and a read through
    pyserial). Here one wakeup takes all that is there into a buffer the SDK's reads are
    served from, so a sync read whose status packets came together costs one or two
    system calls. When nothing comes a read returns empty after `read_wait_s` and the SDK's
    own packet timeout decides, as before; `clearPort` (before every instruction) drops
    the buffer with the kernel's.
    """

    def __init__(self, port_name: str, read_wait_s: float) -> None:
        super().__init__(port_name)
        self._read_wait_s = max(0.0, read_wait_s)
        self._rx = bytearray()

    def readPort(self, length: int) -> bytes:  # SDK method name
        if length <= 0:
            return b""
        if len(self._rx) < length:
            self._fill()
        out = bytes(self._rx[:length])
        del self._rx[:length]
        return out

    def _fill(self) -> None:
        ser = self.ser
        if ser is None or not ser.is_open:
            raise OSError(errno.EBADF, f"port {self.port_name} is not open")
        ready, _, _ = select.select([ser.fd], [], [], self._read_wait_s)
        if not ready:
            return
        try:
            data = os.read(ser.fd, 4096)
        except (BlockingIOError, InterruptedError):
            return
        if not data:  # what pyserial says when a USB adapter (or a pty's far end) went away
            raise OSError(
                errno.EIO,
                f"port {self.port_name} reports data but returned none (device disconnected?)",
            )
        self._rx += data

    def getBytesAvailable(self) -> int:  # SDK method name
        return len(self._rx) + int(self.ser.in_waiting)

    def clearPort(self) -> None:  # SDK method name
        self._rx.clear()
        super().clearPort()

    def closePort(self) -> None:  # SDK method name
        self._rx.clear()
        super().closePort()


class _SyncRead(GroupSyncRead):
    """GroupSyncRead that remembers which servo failed and every status ERROR byte.

    The SDK's rxPacket reads the status packets in order and stops at the first failure
    without saying whose it was, and drops the ERROR byte (the hardware-alert bit).
    Same packets, same readRx calls; only the bookkeeping differs.
    """

    def __init__(self, port: PortHandler, ph: Any, address: int, size: int) -> None:
        super().__init__(port, ph, address, size)
        self.failed_id: int | None = None
        self.errors: dict[int, int] = {}

    def rxPacket(self) -> int:  # SDK method name
        self.last_result = False
        self.failed_id = None
        self.errors = {}
        result = COMM_SUCCESS
        for dxl_id in self.data_dict:
            data, result, error = self.ph.readRx(self.port, dxl_id, self.data_length)
            self.data_dict[dxl_id] = data
            self.errors[dxl_id] = error
            if result != COMM_SUCCESS:
                self.failed_id = dxl_id
                return int(result)
        self.last_result = True
        return int(result)


class DynamixelBus:
    """One serial port and the servos on it, through dynamixel_sdk.

    Transient failures (no reply, corrupt reply) are retried up to `retries` more times
    within `retry_budget_s`, then raise DynamixelCommError naming the servo. A vanished
    port raises DynamixelPortError; the next call reopens it (at most every
    `reconnect_interval_s`) and runs `on_reconnect` so the owner can re-check its servos.
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
        self.on_reconnect: Callable[[], None] | None = None
        self.lock = threading.RLock()
        self._ph = PacketHandler(2.0)
        self._port: PortHandler | None = None
        self._opened_once = False
        self._closed = False
        self._next_attempt = 0.0
        self._reads: dict[tuple[int, int, tuple[int, ...]], _SyncRead] = {}
        self._writes: dict[tuple[int, int], GroupSyncWrite] = {}

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
            if self.on_reconnect is not None:
                try:
                    self.on_reconnect()
                except DynamixelError:
                    log.exception("%s: re-checking servos after reconnect", self.describe(None))
                    raise
        self._opened_once = True
        return handler

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
        op: Callable[[PortHandler], tuple[Any, int, int]],
        allow_alert: bool = False,
    ) -> Any:
        start = time.monotonic()
        result = COMM_SUCCESS
        for attempt in range(self.retries + 1):
            payload, result, error = self._io(op)
            if result == COMM_SUCCESS:
                self._check_status(servo_id, error, what, allow_alert)
                return payload
            log.debug("%s: %s attempt %d: %s", self.describe(servo_id), what, attempt, result)
            if time.monotonic() - start > self.retry_budget_s:
                break
        raise DynamixelCommError(
            f"{self.describe(servo_id)}: {what} failed: {_reason(result)} "
            f"(after {attempt + 1} tries)",
            result=result,
            **self.where(servo_id),
        )

    def ping(self, servo_id: int) -> int:
        """The servo's model number."""
        model: int = self._txrx(servo_id, "ping", lambda p: self._ph.ping(p, servo_id), True)
        return model

    def read(self, servo_id: int, reg: ct.Register, allow_alert: bool = False) -> int:
        with self.lock:
            data = self._txrx(
                servo_id,
                f"read {reg.name}",
                lambda p: self._ph.readTxRx(p, servo_id, reg.address, reg.size),
                allow_alert,
            )
        if len(data) < reg.size:
            raise DynamixelCommError(
                f"{self.describe(servo_id)}: read {reg.name} returned {len(data)} bytes",
                result=COMM_RX_CORRUPT,
                **self.where(servo_id),
            )
        return ct.decode_value(bytes(data), reg)

    def write(self, servo_id: int, reg: ct.Register, value: int, allow_alert: bool = False) -> None:
        """An acknowledged write (for configuration and torque, not per-tick goals)."""
        data = list(ct.encode_value(value, reg.size))

        def op(p: PortHandler) -> tuple[None, int, int]:
            result, error = self._ph.writeTxRx(p, servo_id, reg.address, reg.size, data)
            return None, result, error

        with self.lock:
            self._txrx(servo_id, f"write {reg.name}={value}", op, allow_alert)

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
            result = COMM_SUCCESS
            failed: int | None = None
            for attempt in range(self.retries + 1):
                port = self._ensure_open()
                group = self._reads.get((address, size, ids))
                if group is None:
                    group = _SyncRead(port, self._ph, address, size)
                    for sid in ids:
                        group.addParam(sid)
                    self._reads[(address, size, ids)] = group
                result = self._io(lambda _p, g=group: g.txRxPacket())
                failed = group.failed_id
                if result == COMM_SUCCESS:
                    # A late status packet of an earlier, given-up instruction (a ping's,
                    # say) can arrive after the port was cleared and pass for this servo's
                    # reply; its length gives it away, and a retry reads the real one.
                    failed = next((s for s in ids if len(group.data_dict[s]) != size), None)
                    if failed is None:
                        return self._sync_result(group, ids, address, size, allow_alert)
                    result = COMM_RX_CORRUPT
                log.debug("%s: sync read try %d: %s", self.describe(failed), attempt, result)
                if time.monotonic() - start > self.retry_budget_s:
                    break
            raise DynamixelCommError(
                f"{self.describe(failed)}: sync read of {len(ids)} servos failed: "
                f"{_reason(result)} (after {attempt + 1} tries)",
                result=result,
                **self.where(failed),
            )

    def _sync_result(
        self, group: _SyncRead, ids: tuple[int, ...], address: int, size: int, allow_alert: bool
    ) -> dict[int, bytes]:
        what = f"sync read of {address}..{address + size - 1}"
        for sid in ids:
            self._check_status(sid, group.errors.get(sid, 0) & ~pr.ERRBIT_ALERT, what, True)
        alerts = [sid for sid in ids if group.errors.get(sid, 0) & pr.ERRBIT_ALERT]
        if alerts and not allow_alert:
            raise self.hardware_error(alerts[0], alerts[1:])
        out = {sid: bytes(group.data_dict[sid]) for sid in ids}
        for sid, data in out.items():
            if len(data) != size:
                raise DynamixelCommError(
                    f"{self.describe(sid)}: {what} returned {len(data)} of {size} bytes",
                    result=COMM_RX_CORRUPT,
                    **self.where(sid),
                )
        return out

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
            result = self._io(lambda _p: group.txPacket())
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
            self._txrx(servo_id, "reboot", lambda p: (None, *self._ph.reboot(p, servo_id)), True)
            deadline = time.monotonic() + timeout_s
            while True:
                time.sleep(0.02)
                model, result, _ = self._io(lambda p: self._ph.ping(p, servo_id))
                if result == COMM_SUCCESS:
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
            units = round(self.gripper_current_ma / ct.MA_PER_CURRENT_UNIT)
            bus.write(self.ids[-1], ct.GOAL_CURRENT, units, allow_alert=True)

    def _on_reconnect(self) -> None:
        for sid in self.ids:
            self.bus.ping(sid)
        self._configure(initial=False)

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
        """One sync read of present current, velocity and position for all 7 servos."""
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
