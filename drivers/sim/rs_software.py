"""A simulated RealSense that enters the SDK through `rs.software_device`.

The sim renders colour and depth and pushes them here; from then on the frames travel the
RealSense SDK's own path (sensor, syncer, pipeline, align), so `drivers.realsense.
RealSenseCamera` reads them exactly as it reads a real camera. Hand the driver `device=`
(`.device`): a software device is invisible to `rs.context().query_devices()` in
pyrealsense2 2.59, so it cannot be found by serial.

Geometry: a pinhole with square pixels, horizontal field of view `hfov_deg`, principal point
at the image centre (pixel centres on integers, the SDK's convention), matching
`drivers.sim.render`. Depth and colour share the optical centre (identity extrinsics); by
default they also share the resolution, so alignment is the identity. A depth stream of
another resolution gets the same field of view at its own pixel size.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import pyrealsense2 as rs

from drivers.interfaces import Frame
from drivers.realsense import RealSenseCamera

_IDENTITY = rs.extrinsics()
_IDENTITY.rotation = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
_IDENTITY.translation = [0.0, 0.0, 0.0]


def pinhole(width: int, height: int, hfov_deg: float) -> rs.intrinsics:
    """Distortion-free intrinsics: fx = fy from the horizontal field of view, centred."""
    f = (width / 2.0) / math.tan(math.radians(hfov_deg) / 2.0)
    intr = rs.intrinsics()
    intr.width, intr.height = width, height
    intr.fx = intr.fy = f
    intr.ppx, intr.ppy = (width - 1) / 2.0, (height - 1) / 2.0
    intr.model = rs.distortion.none
    intr.coeffs = [0.0] * 5
    return intr


def _video_stream(
    stream: rs.stream, fmt: rs.format, bpp: int, uid: int, fps: int, intr: rs.intrinsics
) -> rs.video_stream:
    vs = rs.video_stream()
    vs.type, vs.index, vs.uid = stream, 0, uid
    vs.width, vs.height, vs.fps = intr.width, intr.height, fps
    vs.bpp, vs.fmt, vs.intrinsics = bpp, fmt, intr
    return vs


class SoftwareRealSense:
    """An `rs.software_device` with an RGB8 colour sensor and a Z16 depth sensor.

    `push(color, depth, stamp_s)` injects one colour/depth pair with that timestamp and the
    next frame number. Pushing is thread-safe and cheap (push plus driver read back: ~0.07 ms
    a pair at 320x240, tests/bench/camera_fps.py).
    """

    def __init__(
        self,
        serial: str,
        width: int = 320,
        height: int = 240,
        fps: int = 30,
        *,
        name: str = "Intel RealSense D405 (sim)",
        hfov_deg: float = 75.0,
        depth_width: int | None = None,
        depth_height: int | None = None,
        depth_units_m: float = 0.001,
    ) -> None:
        self.serial = serial
        self.width, self.height, self.fps = int(width), int(height), int(fps)
        self.depth_width = int(depth_width or width)
        self.depth_height = int(depth_height or height)
        self.depth_units_m = float(depth_units_m)
        self.color_intrinsics = pinhole(self.width, self.height, hfov_deg)
        # the same field of view at the depth resolution
        self.depth_intrinsics = pinhole(self.depth_width, self.depth_height, hfov_deg)

        dev = rs.software_device()
        dev.register_info(rs.camera_info.name, name)
        dev.register_info(rs.camera_info.serial_number, serial)
        dev.register_info(rs.camera_info.product_line, "D400")
        dev.register_info(rs.camera_info.firmware_version, "sim")
        self._depth_sensor = dev.add_sensor("Stereo Module")
        self._color_sensor = dev.add_sensor("RGB Camera")
        depth_profile = self._depth_sensor.add_video_stream(
            _video_stream(rs.stream.depth, rs.format.z16, 2, 0, self.fps, self.depth_intrinsics),
            True,
        )
        color_profile = self._color_sensor.add_video_stream(
            _video_stream(rs.stream.color, rs.format.rgb8, 3, 1, self.fps, self.color_intrinsics),
            True,
        )
        # makes the sensor a depth sensor with get_depth_scale(), as on a real camera
        self._depth_sensor.add_read_only_option(rs.option.depth_units, self.depth_units_m)
        depth_profile.register_extrinsics_to(color_profile, _IDENTITY)
        self._depth_profile = depth_profile.as_video_stream_profile()
        self._color_profile = color_profile.as_video_stream_profile()
        self.device: rs.software_device = dev
        self._frame_number = 0
        self._lock = threading.Lock()

    @property
    def frame_number(self) -> int:
        """The frame number of the last pair pushed (0 before the first)."""
        return self._frame_number

    def push(self, color: np.ndarray, depth: np.ndarray, stamp_s: float) -> int:
        """Inject one pair: colour (H, W, 3) uint8 RGB, depth (h, w) uint16 millimetres,
        both stamped `stamp_s` seconds. Returns the frame number given to the pair."""
        if color.shape != (self.height, self.width, 3) or color.dtype != np.uint8:
            raise ValueError(
                f"color must be ({self.height}, {self.width}, 3) uint8, "
                f"got {color.shape} {color.dtype}"
            )
        if depth.shape != (self.depth_height, self.depth_width) or depth.dtype != np.uint16:
            raise ValueError(
                f"depth must be ({self.depth_height}, {self.depth_width}) uint16 mm, "
                f"got {depth.shape} {depth.dtype}"
            )
        raw = self._mm_to_units(depth)
        color = np.ascontiguousarray(color)
        stamp_ms = float(stamp_s) * 1000.0
        with self._lock:
            self._frame_number += 1
            n = self._frame_number
            self._depth_sensor.on_video_frame(
                self._frame(raw, 2, self._depth_profile, stamp_ms, n, depth_units=True)
            )
            self._color_sensor.on_video_frame(
                self._frame(color, 3, self._color_profile, stamp_ms, n)
            )
        return n

    def _frame(
        self,
        pixels: np.ndarray,
        bpp: int,
        profile: rs.video_stream_profile,
        stamp_ms: float,
        number: int,
        depth_units: bool = False,
    ) -> rs.software_video_frame:
        f = rs.software_video_frame()
        f.pixels = pixels  # the SDK copies the buffer
        f.stride = pixels.shape[1] * bpp
        f.bpp = bpp
        f.timestamp = stamp_ms
        f.domain = rs.timestamp_domain.hardware_clock
        f.frame_number = number
        f.profile = profile
        if depth_units:
            f.depth_units = self.depth_units_m
        return f

    def _mm_to_units(self, depth_mm: np.ndarray) -> np.ndarray:
        """Millimetres to this device's depth units (identity at the default 1 mm)."""
        per_mm = 0.001 / self.depth_units_m
        if abs(per_mm - 1.0) < 1e-9:
            return np.ascontiguousarray(depth_mm)
        raw = np.rint(depth_mm.astype(np.float64) * per_mm)
        if raw.max(initial=0) > np.iinfo(np.uint16).max:
            raise ValueError(
                f"depth beyond {np.iinfo(np.uint16).max * self.depth_units_m:.3f} m does not "
                f"fit {self.depth_units_m} m units"
            )
        return raw.astype(np.uint16)


class PushedRealSense:
    """A `Camera` for a sim cell: renders, pushes through a `SoftwareRealSense`, and reads
    back with the real driver, so the sim exercises the SDK path end to end.

    `render()` returns (color, depth_mm, stamp_s). With `revision` given, a frame is
    rendered and pushed only when the revision changed; an unchanged scene returns the last
    frame (a real camera would repeat the same picture). A read returns the pair it pushed,
    never an older one still queued in the pipeline.
    """

    def __init__(
        self,
        name: str,
        sensor: SoftwareRealSense,
        render: Callable[[], tuple[np.ndarray, np.ndarray, float]],
        revision: Callable[[], int] | None = None,
        min_read_timeout_s: float = 0.0,
        **camera_options: Any,
    ) -> None:
        """`min_read_timeout_s`: a lockstep cell's floor under every read's timeout (sim time
        waits for the frame, so a slow host must not turn into a camera fault)."""
        self.sensor = sensor
        self.min_read_timeout_s = float(min_read_timeout_s)
        self.camera = RealSenseCamera(
            name,
            sensor.serial,
            sensor.height,
            sensor.width,
            sensor.fps,
            device=sensor.device,
            **camera_options,
        )
        self.name = name
        self.height = sensor.height
        self.width = sensor.width
        self._render = render
        self._revision = revision
        self._last: tuple[int, Frame] | None = None

    def read(self, timeout_s: float = 1.0) -> Frame:
        timeout_s = max(timeout_s, self.min_read_timeout_s)
        rev = self._revision() if self._revision is not None else None
        if rev is not None and self._last is not None and self._last[0] == rev:
            return self._last[1]
        color, depth, stamp = self._render()
        number = self.sensor.push(color, depth, stamp)
        deadline = time.monotonic() + timeout_s
        while True:
            frame = self.camera.read(max(deadline - time.monotonic(), 0.001))
            if (self.camera.last_frame_number or 0) >= number:
                break
        if rev is not None:
            self._last = (rev, frame)
        return frame

    def close(self) -> None:
        self.camera.close()
        self._last = None
