"""What ingest checks in each encoded camera frame before it is acked.

Why: an acked frame is one the trainer will decode, so a frame that would make the decoder
fail, or allocate gigabytes, must be refused while the cell can still be told. Every check
here reads headers only, so the decoded size is known BEFORE anything is decoded:

- jpeg: libjpeg-turbo reads the header (simplejpeg.decode_jpeg_header, ~1 us); its
  dimensions must be the camera's declared height x width, and the frame must end with the
  EOI marker (a truncated upload does not). A full decode is not affordable here: measured
  on the ingest benchmark's chunks (3 cameras of 240x320 JPEG a step) decode_chunk costs
  0.02 ms a step with header checks and 1.5 ms with a full decode, against ~0.4 ms a step
  for all of ingest, i.e. ingest would fall under its 1,000 steps/s/core goal. So it is off
  by default (`full_decode=True` turns it on); a frame whose header is right but
  whose entropy data is corrupt is caught by the learner's quarantine of undecodable
  episodes instead.
- png16: the IHDR chunk must declare the camera's size, 16-bit greyscale.
- zstd16: the frame header must declare its content size, and that size must be exactly
  height x width x 2 bytes: a small frame that expands to gigabytes is refused without
  decompressing a byte (numcodecs would otherwise stream it out without bound).
"""

from __future__ import annotations

import struct

import simplejpeg

MAX_IMAGE_PIXELS = 4096 * 3072  # 12.6 MP; a RealSense stream is at most 1920x1080

JPEG_MAGIC = b"\xff\xd8"
JPEG_EOI = b"\xff\xd9"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAGIC = {"jpeg": JPEG_MAGIC, "png16": PNG_MAGIC, "zstd16": ZSTD_MAGIC}

_PNG_GREY = 0
_FCS_BYTES = (0, 2, 4, 8)  # by the Frame_Content_Size_flag (0 means 1 when single-segment)
_DICT_ID_BYTES = (0, 1, 2, 4)


def frame_problem(
    frame: bytes, encoding: str, height: int, width: int, channels: int, *, full_decode: bool
) -> str | None:
    """What is wrong with one frame for a camera declared (height, width, channels), or None."""
    if encoding == "jpeg":
        return _jpeg_problem(frame, height, width, full_decode=full_decode)
    if encoding == "png16":
        return _png16_problem(frame, height, width, channels)
    if encoding == "zstd16":
        return _zstd16_problem(frame, height * width * channels * 2)
    return None


def _jpeg_problem(frame: bytes, height: int, width: int, *, full_decode: bool) -> str | None:
    if not frame.startswith(JPEG_MAGIC):
        return "is not jpeg data (no SOI marker)"
    try:
        got_h, got_w, _, _ = simplejpeg.decode_jpeg_header(frame)
    except ValueError as exc:
        return f"has an unreadable jpeg header ({exc})"
    if (got_h, got_w) != (height, width):
        return f"jpeg header says {got_h}x{got_w}, the camera is declared {height}x{width}"
    if not frame.endswith(JPEG_EOI):
        return "jpeg data does not end with the EOI marker (truncated?)"
    if full_decode:
        try:
            simplejpeg.decode_jpeg(frame, colorspace="RGB")
        except ValueError as exc:
            return f"does not decode as jpeg ({exc})"
    return None


def _png16_problem(frame: bytes, height: int, width: int, channels: int) -> str | None:
    if not frame.startswith(PNG_MAGIC):
        return "is not png data (no PNG signature)"
    if len(frame) < 33 or frame[12:16] != b"IHDR":
        return "png without an IHDR chunk first"
    got_w, got_h, depth, colour = struct.unpack(">IIBB", frame[16:26])
    if (got_h, got_w) != (height, width):
        return f"png header says {got_h}x{got_w}, the camera is declared {height}x{width}"
    if depth != 16 or colour != _PNG_GREY or channels != 1:
        return f"png16 must be 16-bit greyscale with 1 channel (bit depth {depth}, type {colour})"
    return None


def _zstd16_problem(frame: bytes, expected: int) -> str | None:
    size = zstd_content_size(frame)
    if isinstance(size, str):
        return size
    if size != expected:
        return (
            f"zstd frame declares {size} bytes of content; the camera's depth image is "
            f"{expected} bytes"
        )
    return None


def zstd_content_size(frame: bytes) -> int | str:
    """The content size a zstd frame header declares, or a message saying why there is none
    (RFC 8878 section 3.1.1.1: magic, header descriptor, window, dictionary id, size)."""
    if not frame.startswith(ZSTD_MAGIC) or len(frame) < 6:
        return "is not a zstd frame"
    descriptor = frame[4]
    fcs_flag, single_segment = descriptor >> 6, (descriptor >> 5) & 1
    if descriptor & 0x08:
        return "zstd frame header has its reserved bit set"
    dict_bytes = _DICT_ID_BYTES[descriptor & 0x03]
    if dict_bytes:
        return "zstd frame needs a dictionary; depth frames are compressed without one"
    fcs_bytes = _FCS_BYTES[fcs_flag] or (1 if single_segment else 0)
    if not fcs_bytes:
        return "zstd frame does not declare its content size; compress the whole image at once"
    at = 5 + (0 if single_segment else 1)
    field = frame[at : at + fcs_bytes]
    if len(field) != fcs_bytes:
        return "zstd frame header is cut short"
    size = int.from_bytes(field, "little")
    return size + 256 if fcs_bytes == 2 else size
