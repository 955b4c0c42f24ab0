"""Frames the trainer could not decode, or that decode to gigabytes, are refused at ingest,
before anything is decompressed, and the refusal names cell, episode, seq, camera and why."""

from __future__ import annotations

import struct
import time
import zlib
from pathlib import Path

import grpc
import numpy as np
import pytest
import simplejpeg
from numcodecs import Zstd

from learner.chunks import ChunkRejected, decode_chunk
from learner.frame_checks import zstd_content_size
from learner.ingest import IngestServicer
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2
from tests.test_ingest import TASKS, make_msg

H, W = 8, 8
GOOD_JPEG = simplejpeg.encode_jpeg(np.full((H, W, 3), 90, np.uint8), quality=90)
NOISE = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
NOISE_JPEG = simplejpeg.encode_jpeg(NOISE, quality=90)  # 64x64, mostly entropy data


def _with_frames(
    frames: list[bytes], *, encoding: str = "jpeg", channels: int = 3, h: int = H, w: int = W
) -> trajectory_pb2.StepChunk:
    msg = make_msg(0)
    del msg.cameras[:]
    msg.cameras.append(
        arrays_pb2.CameraFrames(
            camera="wrist", encoding=encoding, height=h, width=w, channels=channels, frames=frames
        )
    )
    return msg


def _refusal(msg: trajectory_pb2.StepChunk, *, full_decode: bool = False) -> ChunkRejected:
    with pytest.raises(ChunkRejected) as info:
        decode_chunk(msg, known_tasks=TASKS, full_decode=full_decode)
    return info.value


def _jpeg_claiming(height: int, width: int) -> bytes:
    """A real JPEG whose SOF0 segment is rewritten to claim another size."""
    data = bytearray(GOOD_JPEG)
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _png(height: int, width: int, depth: int = 16, colour: int = 0) -> bytes:
    raw = b"".join(b"\x00" + bytes(width * 2) for _ in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))


def _zstd_bomb(content_size: int) -> bytes:
    """A zstd frame header declaring `content_size`, then one RLE block of zeros (a real
    decoder would expand it); the header is all ingest may read."""
    descriptor = bytes([0b1110_0000])  # 8-byte content size, single segment
    block = struct.pack("<I", (min(content_size, 1 << 17) << 3) | (1 << 1) | 1)[:3] + b"\x00"
    return b"\x28\xb5\x2f\xfd" + descriptor + struct.pack("<Q", content_size) + block


def test_well_formed_frames_pass() -> None:
    depth = Zstd().encode(np.zeros((H, W), "<u2").tobytes())
    assert zstd_content_size(bytes(depth)) == H * W * 2
    decode_chunk(_with_frames([GOOD_JPEG] * 6), known_tasks=TASKS, full_decode=True)
    decode_chunk(_with_frames([bytes(depth)] * 6, encoding="zstd16", channels=1), known_tasks=TASKS)
    decode_chunk(_with_frames([_png(H, W)] * 6, encoding="png16", channels=1), known_tasks=TASKS)


def test_huge_jpeg_header_is_refused_before_decoding() -> None:
    frames = [GOOD_JPEG] * 5 + [_jpeg_claiming(60000, 60000)]
    t0 = time.perf_counter()
    exc = _refusal(_with_frames(frames), full_decode=True)
    assert time.perf_counter() - t0 < 1.0  # nothing was decoded at 60000x60000
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    for part in ("cell c1", "episode e1", "seq 0", "cameras[wrist]", "step 5", "60000x60000"):
        assert part in exc.message, (part, exc.message)


def test_declared_size_over_the_pixel_cap_is_refused() -> None:
    exc = _refusal(_with_frames([_jpeg_claiming(8000, 8000)] * 6, h=8000, w=8000))
    assert exc.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "pixels" in exc.message


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (b"\xff\xd8" + bytes(2000), "header"),  # the magic bytes, then nothing of a JPEG
        (NOISE_JPEG[: len(NOISE_JPEG) * 9 // 10], "EOI"),  # cut short in the entropy data
        (b"\xff\xd8\xff\xe0" + b"\xff" * 500, "header"),
        (b"GIF89a" + bytes(100), "SOI"),
    ],
)
def test_jpeg_that_does_not_decode_is_refused(frame: bytes, why: str) -> None:
    exc = _refusal(_with_frames([NOISE_JPEG, frame, *[NOISE_JPEG] * 4], h=64, w=64))
    assert exc.code == grpc.StatusCode.INVALID_ARGUMENT
    assert "step 1" in exc.message and why in exc.message, exc.message


def test_full_decode_catches_corrupt_entropy_data() -> None:
    sos = NOISE_JPEG.index(b"\xff\xda")
    corrupt = NOISE_JPEG[: sos + 20] + b"\xff\xd9"  # right header and EOI, entropy data cut
    msg = _with_frames([corrupt] * 6, h=64, w=64)
    decode_chunk(msg, known_tasks=TASKS)  # the header checks alone let it through
    exc = _refusal(msg, full_decode=True)
    assert "does not decode" in exc.message


def test_zstd_bomb_is_refused_without_decompressing() -> None:
    bomb = _zstd_bomb(4 << 30)  # a few bytes that claim 4 GiB
    assert zstd_content_size(bomb) == 4 << 30
    t0 = time.perf_counter()
    exc = _refusal(_with_frames([bomb] * 6, encoding="zstd16", channels=1))
    assert time.perf_counter() - t0 < 1.0
    assert "4294967296" in exc.message and str(H * W * 2) in exc.message


def test_zstd_without_content_size_is_refused() -> None:
    frame = b"\x28\xb5\x2f\xfd" + bytes([0b0000_0000, 0x50]) + bytes(10)  # no size field
    exc = _refusal(_with_frames([frame] * 6, encoding="zstd16", channels=1))
    assert "content size" in exc.message


@pytest.mark.parametrize(
    ("frame", "why"),
    [
        (_png(H * 1000, W * 1000)[:40], "8000x8000"),
        (_png(H, W, depth=8), "16-bit"),
        (b"\x89PNG\r\n\x1a\n" + bytes(30), "IHDR"),
    ],
)
def test_png16_header_must_match_the_camera(frame: bytes, why: str) -> None:
    exc = _refusal(_with_frames([frame] * 6, encoding="png16", channels=1))
    assert why in exc.message, exc.message


def test_refused_first_chunk_leaves_nothing_on_disk(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path / "store")
    servicer = IngestServicer(store, known_tasks=TASKS)
    bad_start = make_msg(0)
    bad_start.first_step = 7
    bad_frames = _with_frames([_jpeg_claiming(60000, 60000)] * 6)
    bad_frames.episode_id = "e2"
    for msg in (bad_start, bad_frames):
        ack = servicer._handle(msg, "test")
        assert not ack.durable and ack.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert store.totals() == (0, 0)
    assert store.episodes(complete_only=False) == []
    episodes_dir = tmp_path / "store" / "episodes"
    leftovers = [p for p in episodes_dir.rglob("*") if p.is_dir()] if episodes_dir.exists() else []
    assert leftovers == [], leftovers


def test_overlong_task_is_refused_even_when_any_task_is_accepted() -> None:
    msg = make_msg(0)
    msg.task = "t" * 100_000
    with pytest.raises(ChunkRejected) as info:
        decode_chunk(msg, known_tasks=None)
    assert "task: longer than 128 characters" in info.value.message
