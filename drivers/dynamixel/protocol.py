"""Dynamixel Protocol 2.0 packets: framing, byte stuffing, CRC-16 and status errors.

The driver itself lets dynamixel_sdk build and parse its packets; this module is the
other side of the wire (the simulated servo chain answers with it) and the reference the
protocol tests check the SDK against. Standard library only, for a fast-starting peer.

Packet layout (little-endian):

    FF FF FD 00 | ID | LEN_L LEN_H | INST | PARAMS ... | CRC_L CRC_H

LEN counts INST + PARAMS (after stuffing) + CRC. Status packets carry INST 0x55 and an
ERROR byte as their first parameter. Inside INST..PARAMS every FF FF FD is followed by an
extra FD (byte stuffing), so the header never appears inside a packet. The CRC is the
CRC-16 with polynomial 0x8005 (no reflection, initial value 0) over everything before it,
after stuffing.
"""

from __future__ import annotations

from dataclasses import dataclass

HEADER = b"\xff\xff\xfd\x00"
BROADCAST_ID = 0xFE
MAX_ID = 0xFC
MAX_PACKET_LENGTH = 1024  # the SDK's RXPACKET_MAX_LEN

INST_PING = 0x01
INST_READ = 0x02
INST_WRITE = 0x03
INST_REG_WRITE = 0x04
INST_ACTION = 0x05
INST_FACTORY_RESET = 0x06
INST_REBOOT = 0x08
INST_CLEAR = 0x10
INST_STATUS = 0x55
INST_SYNC_READ = 0x82
INST_SYNC_WRITE = 0x83
INST_FAST_SYNC_READ = 0x8A
INST_BULK_READ = 0x92
INST_BULK_WRITE = 0x93

INSTRUCTION_NAMES = {
    INST_PING: "PING",
    INST_READ: "READ",
    INST_WRITE: "WRITE",
    INST_REG_WRITE: "REG_WRITE",
    INST_ACTION: "ACTION",
    INST_FACTORY_RESET: "FACTORY_RESET",
    INST_REBOOT: "REBOOT",
    INST_CLEAR: "CLEAR",
    INST_STATUS: "STATUS",
    INST_SYNC_READ: "SYNC_READ",
    INST_SYNC_WRITE: "SYNC_WRITE",
    INST_FAST_SYNC_READ: "FAST_SYNC_READ",
    INST_BULK_READ: "BULK_READ",
    INST_BULK_WRITE: "BULK_WRITE",
}

# Status packet ERROR byte: bit 7 is the hardware alert, bits 0..6 an error number.
ERRBIT_ALERT = 0x80
ERR_RESULT_FAIL = 1
ERR_INSTRUCTION = 2
ERR_CRC = 3
ERR_DATA_RANGE = 4
ERR_DATA_LENGTH = 5
ERR_DATA_LIMIT = 6
ERR_ACCESS = 7
ERROR_NAMES = {
    ERR_RESULT_FAIL: "result fail",
    ERR_INSTRUCTION: "instruction error",
    ERR_CRC: "CRC error",
    ERR_DATA_RANGE: "data range error",
    ERR_DATA_LENGTH: "data length error",
    ERR_DATA_LIMIT: "data limit error",
    ERR_ACCESS: "access error",
}


def _make_crc_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        crc = i << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x8005) if crc & 0x8000 else (crc << 1)
        table.append(crc & 0xFFFF)
    return tuple(table)


_CRC_TABLE = _make_crc_table()


def crc16(data: bytes | bytearray, crc: int = 0) -> int:
    """Dynamixel CRC-16 (poly 0x8005, MSB first, init 0) of `data`, continuing `crc`."""
    table = _CRC_TABLE
    crc &= 0xFFFF
    for byte in data:  # (crc >> 8) ^ byte is a byte already: one mask fewer a byte
        crc = ((crc & 0xFF) << 8) ^ table[(crc >> 8) ^ byte]
    return crc


def stuff(body: bytes | bytearray) -> bytes:
    """Insert an FD after every FF FF FD in INST..PARAMS (so no header appears inside)."""
    if HEADER[:3] not in body:  # nearly every packet: nothing to stuff
        return bytes(body)
    out = bytearray()
    for i, byte in enumerate(body):
        out.append(byte)
        if byte == 0xFD and i >= 2 and body[i - 1] == 0xFF and body[i - 2] == 0xFF:
            out.append(0xFD)
    return bytes(out)


def unstuff(body: bytes | bytearray) -> bytes:
    """Undo `stuff`: drop the FD that follows each FF FF FD."""
    if HEADER[:3] not in body:  # nearly every packet: nothing was stuffed
        return bytes(body)
    out = bytearray()
    i = 0
    n = len(body)
    while i < n:
        out.append(body[i])
        i += 1
        if len(out) >= 3 and out[-3:] == b"\xff\xff\xfd":
            if i >= n or body[i] != 0xFD:
                raise ProtocolError("FF FF FD inside a packet without its stuffing byte")
            i += 1
    return bytes(out)


class ProtocolError(ValueError):
    """Bytes that are not a valid Protocol 2.0 packet."""


class CRCError(ProtocolError):
    """A packet whose CRC does not match its contents."""


@dataclass(frozen=True)
class Packet:
    """One decoded packet (parameters unstuffed)."""

    servo_id: int
    instruction: int
    params: bytes

    @property
    def is_status(self) -> bool:
        return self.instruction == INST_STATUS

    @property
    def error(self) -> int:
        """Status packets: the ERROR byte."""
        if not self.is_status or not self.params:
            raise ProtocolError("only a status packet carries an error byte")
        return self.params[0]

    @property
    def data(self) -> bytes:
        """Status packets: the parameters after the ERROR byte."""
        return self.params[1:] if self.is_status else self.params


@dataclass(frozen=True)
class CorruptPacket:
    """A framed packet that failed its CRC (what a servo answers with ERR_CRC)."""

    servo_id: int
    instruction: int
    reason: str


def encode_packet(servo_id: int, instruction: int, params: bytes | bytearray = b"") -> bytes:
    """A complete packet: header, ID, length, stuffed INST+PARAMS, CRC."""
    if not 0 <= servo_id <= 0xFF:
        raise ValueError(f"servo id {servo_id} is not a byte")
    if not 0 <= instruction <= 0xFF:
        raise ValueError(f"instruction {instruction} is not a byte")
    body = stuff(bytes([instruction]) + bytes(params))
    length = len(body) + 2
    if length + 7 > MAX_PACKET_LENGTH:
        raise ValueError(f"packet of {length + 7} bytes exceeds {MAX_PACKET_LENGTH}")
    head = HEADER + bytes([servo_id, length & 0xFF, length >> 8])
    crc = crc16(head + body)
    return head + body + bytes([crc & 0xFF, crc >> 8])


def encode_status(servo_id: int, error: int = 0, data: bytes | bytearray = b"") -> bytes:
    """A status packet (what a servo answers): INST 0x55, ERROR byte, then data."""
    return encode_packet(servo_id, INST_STATUS, bytes([error & 0xFF]) + bytes(data))


def decode_packet(raw: bytes | bytearray) -> Packet:
    """Decode exactly one complete packet; raises ProtocolError / CRCError."""
    raw = bytes(raw)
    if len(raw) < 10 or raw[:4] != HEADER:
        raise ProtocolError(f"not a Protocol 2.0 packet: {raw[:8].hex(' ')}")
    length = raw[5] | (raw[6] << 8)
    if length < 3 or len(raw) != 7 + length:
        raise ProtocolError(f"length field {length} does not match {len(raw)} bytes")
    crc = raw[-2] | (raw[-1] << 8)
    if crc16(raw[:-2]) != crc:
        raise CRCError(f"CRC mismatch from id {raw[4]}: got 0x{crc:04x}")
    body = unstuff(raw[7:-2])
    return Packet(servo_id=raw[4], instruction=body[0], params=body[1:])


_SEEN_MAX = 8  # decoded packets a PacketParser remembers


class PacketParser:
    """Frames packets out of a byte stream (resyncing on garbage, as a servo does)."""

    def __init__(self) -> None:
        self._buf = bytearray()
        # Packets decoded lately, by their bytes: a host repeats the same request every
        # tick (a sync read between the goal writes), and a decoded packet is immutable, so
        # it is not decoded again. Emptied when full: a few entries, whatever comes.
        self._seen: dict[bytes, Packet | CorruptPacket] = {}

    @property
    def pending(self) -> int:
        """Bytes received that do not yet form a whole packet."""
        return len(self._buf)

    def clear(self) -> None:
        self._buf.clear()

    def feed(self, data: bytes | bytearray) -> list[Packet | CorruptPacket]:
        """Add received bytes; return every complete packet they finish, in order."""
        self._buf.extend(data)
        out: list[Packet | CorruptPacket] = []
        buf = self._buf
        while True:
            start = buf.find(HEADER)
            if start < 0:
                # Keep a possible partial header at the end, drop the rest.
                keep = 0
                for k in (3, 2, 1):
                    if len(buf) >= k and buf[-k:] == HEADER[:k]:
                        keep = k
                        break
                del buf[: len(buf) - keep]
                return out
            if start:
                del buf[:start]
            if len(buf) < 7:
                return out
            length = buf[5] | (buf[6] << 8)
            if length < 3 or length + 7 > MAX_PACKET_LENGTH:
                del buf[:1]  # a false header: resync past it
                continue
            total = 7 + length
            if len(buf) < total:
                return out
            raw = bytes(buf[:total])
            del buf[:total]
            pkt = self._seen.get(raw)
            if pkt is None:
                try:
                    pkt = decode_packet(raw)
                except ProtocolError as exc:
                    pkt = CorruptPacket(servo_id=raw[4], instruction=raw[7], reason=str(exc))
                if len(self._seen) >= _SEEN_MAX:
                    self._seen.clear()
                self._seen[raw] = pkt
            out.append(pkt)


def describe_error(error: int) -> str:
    """A status ERROR byte as words, e.g. 'hardware alert + access error'."""
    parts = []
    if error & ERRBIT_ALERT:
        parts.append("hardware alert")
    number = error & ~ERRBIT_ALERT
    if number:
        parts.append(ERROR_NAMES.get(number, f"error {number}"))
    return " + ".join(parts) if parts else "ok"
