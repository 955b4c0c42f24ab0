"""Protocol 2.0 framing, byte stuffing and CRC, checked against dynamixel_sdk itself.

The simulated servo chain speaks through drivers/dynamixel/protocol.py while the driver
speaks through the SDK, so the two must agree on every byte: the SDK is the reference.
"""

from __future__ import annotations

from typing import Any

import pytest
from dynamixel_sdk import COMM_SUCCESS, PacketHandler
from hypothesis import given, settings
from hypothesis import strategies as st

from drivers.dynamixel import protocol as pr

SDK = PacketHandler(2.0)
# Byte soup rich in the values that trigger stuffing.
SOUP = st.lists(st.sampled_from([0xFF, 0xFD, 0x00, 0x55, 0x01]) | st.integers(0, 255), max_size=40)


class _TxCapture:
    """The slice of a PortHandler that the SDK's txPacket touches."""

    is_using = False

    def clearPort(self) -> None:  # SDK method name
        pass

    def writePort(self, packet: list[int]) -> int:  # SDK method name
        self.sent = bytes(packet)
        return len(packet)


class _RxFeed:
    """The slice of a PortHandler that the SDK's rxPacket touches, fed from bytes."""

    is_using = True

    def __init__(self, data: bytes) -> None:
        self.data = data

    def readPort(self, length: int) -> list[int]:  # SDK method name
        chunk, self.data = self.data[: max(0, length)], self.data[max(0, length) :]
        return list(chunk)

    def isPacketTimeout(self) -> bool:  # SDK method name
        return not self.data


def _has_unstuffed_header(body: bytes) -> bool:
    return any(
        body[i : i + 3] == b"\xff\xff\xfd" and body[i + 3 : i + 4] != b"\xfd"
        for i in range(len(body) - 2)
    )


@settings(max_examples=300, deadline=None)
@given(SOUP)
def test_stuffing_round_trips_and_hides_the_header(data: list[int]) -> None:
    body = bytes(data)
    stuffed = pr.stuff(body)
    assert pr.unstuff(stuffed) == body
    assert not _has_unstuffed_header(stuffed)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64), st.integers(0, 0xFFFF))
def test_crc_matches_the_sdk(data: bytes, start: int) -> None:
    assert pr.crc16(data, start) == SDK.updateCRC(start, list(data), len(data))


def test_crc_known_vector() -> None:
    # The e-manual's example: PING to ID 1 is FF FF FD 00 01 03 00 01 19 4E.
    assert pr.encode_packet(1, pr.INST_PING) == bytes.fromhex(
        "fffffd00010300 01 194e".replace(" ", "")
    )


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFD), st.integers(0, 0xFF), SOUP)
def test_encode_decode_round_trip(servo_id: int, instruction: int, params: list[int]) -> None:
    raw = pr.encode_packet(servo_id, instruction, bytes(params))
    assert raw[:4] == pr.HEADER
    pkt = pr.decode_packet(raw)
    assert (pkt.servo_id, pkt.instruction, pkt.params) == (servo_id, instruction, bytes(params))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFC), st.sampled_from([1, 2, 3, 0x82, 0x83]), SOUP)
def test_instruction_packets_equal_the_sdks(
    servo_id: int, instruction: int, params: list[int]
) -> None:
    body = bytes([instruction, *params])
    # dynamixel_sdk 4.1's addStuffing builds its stuffed packet in a new list that txPacket
    # drops, so the SDK never stuffs what it sends; compare where no stuffing is needed.
    if pr.stuff(body) != body:
        return
    tx: list[Any] = [0] * (10 + len(params))
    tx[4], tx[5], tx[6], tx[7] = (
        servo_id,
        (len(params) + 3) & 0xFF,
        (len(params) + 3) >> 8,
        instruction,
    )
    tx[8 : 8 + len(params)] = params
    port = _TxCapture()
    assert SDK.txPacket(port, tx) == COMM_SUCCESS
    assert port.sent == pr.encode_packet(servo_id, instruction, bytes(params))


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFC), st.integers(0, 0xFF), SOUP)
def test_sdk_parses_our_status_packets(servo_id: int, error: int, data: list[int]) -> None:
    payload = bytes(data)
    # The SDK's in-place removeStuffing reads bytes it has already shifted, so it mangles a
    # packet holding two stuffed sequences close together; one is what real data produces.
    if pr.stuff(bytes([pr.INST_STATUS, error]) + payload).count(b"\xff\xff\xfd\xfd") > 1:
        return
    raw = pr.encode_status(servo_id, error, payload)
    rx, result = SDK.rxPacket(_RxFeed(raw), False)
    assert result == COMM_SUCCESS
    length = rx[5] | rx[6] << 8
    assert rx[4] == servo_id and rx[7] == pr.INST_STATUS and rx[8] == error
    assert bytes(rx[9 : 7 + length - 2]) == payload


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 0xFC), SOUP, st.data())
def test_any_single_byte_corruption_is_rejected(
    servo_id: int, params: list[int], data: Any
) -> None:
    raw = bytearray(pr.encode_packet(servo_id, pr.INST_WRITE, bytes(params)))
    i = data.draw(st.integers(0, len(raw) - 1))
    raw[i] ^= data.draw(st.integers(1, 255))
    with pytest.raises(pr.ProtocolError):
        pr.decode_packet(raw)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 0xFC), SOUP), min_size=1, max_size=5),
    st.binary(max_size=8),
    st.lists(st.integers(1, 17), min_size=1, max_size=8),
)
def test_parser_frames_a_stream_in_any_chunking(
    packets: list[tuple[int, list[int]]], garbage: bytes, cuts: list[int]
) -> None:
    garbage = garbage.replace(b"\xff", b"")  # garbage that cannot start a header
    stream = garbage + b"".join(pr.encode_status(sid, 0, bytes(p)) for sid, p in packets)
    parser = pr.PacketParser()
    got: list[Any] = []
    pos, k = 0, 0
    while pos < len(stream):
        step = cuts[k % len(cuts)]
        got.extend(parser.feed(stream[pos : pos + step]))
        pos += step
        k += 1
    assert [(p.servo_id, p.data) for p in got] == [(sid, bytes(p)) for sid, p in packets]
    assert parser.pending == 0


def test_parser_reports_a_corrupt_packet_and_resyncs() -> None:
    bad = bytearray(pr.encode_packet(3, pr.INST_READ, b"\x84\x00\x04\x00"))
    bad[-1] ^= 0x55
    good = pr.encode_packet(4, pr.INST_PING)
    out = pr.PacketParser().feed(bytes(bad) + good)
    assert isinstance(out[0], pr.CorruptPacket) and out[0].servo_id == 3
    assert isinstance(out[1], pr.Packet) and out[1].servo_id == 4


def test_status_error_bits() -> None:
    pkt = pr.decode_packet(pr.encode_status(5, pr.ERRBIT_ALERT | pr.ERR_ACCESS, b"\x01"))
    assert pkt.is_status and pkt.error == 0x87 and pkt.data == b"\x01"
    assert pr.describe_error(pkt.error) == "hardware alert + access error"
    assert pr.describe_error(0) == "ok"
    assert "Hardware error" in SDK.getRxPacketError(pkt.error)
    with pytest.raises(pr.ProtocolError):
        _ = pr.decode_packet(pr.encode_packet(5, pr.INST_PING)).error
