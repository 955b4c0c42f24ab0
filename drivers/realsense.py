"""Intel RealSense camera on `pyrealsense2`: one pipeline per camera, found by serial.

How a camera is opened (verified on pyrealsense2 2.59.1):

- A real camera is looked up by serial in `rs.context().query_devices()`. A simulated one
  (`drivers.sim.rs_software.SoftwareRealSense`) is an `rs.software_device` handed in as
  `device=`: in this SDK version a software device is invisible to `query_devices()` (even
  after `software_device.add_to(ctx)`), and `config.enable_device(serial)` fails with "No
  device connected". `pipeline.set_device(dev)` followed by `pipeline.start(config)` works
  for both, so that is the one path real and simulated cameras share; everything after it
  (syncer, `rs.align`, timestamps, depth units) is the SDK's own code in both cases.
- Sensors are picked by the stream type of their profiles, not `first_color_sensor()`
  (which raises on a software device); the depth scale comes from the depth sensor.

Frames: colour is RGB8 at the configured size; depth is aligned to colour with `rs.align`
and converted from depth units to uint16 millimetres. When depth and colour already share
one geometry (same intrinsics, identity extrinsics, as the default simulated camera has),
alignment is the identity and is skipped (`align="auto"`): on such input the SDK's align
only adds rounding artefacts (measured at 320x240: 2-6 % zero pixels, ~2 % of values moved
by one pixel). `align="always"` runs it anyway.

Time: `Frame.stamp` is `frame.get_timestamp() / 1000` (the SDK gives milliseconds) in the
frame's own time domain, reported by `RealSenseCamera.time_domain`. On a D400 with global
time enabled (the SDK default) that is `global_time`: the camera's hardware clock mapped onto
the host's system clock (Unix epoch seconds), comparable across cameras of one host. With
global time off it is `hardware_clock` (device-local, not comparable across cameras). A
simulated camera stamps frames with the sim time it was given (domain `hardware_clock`).

Faults: a read that gets no complete frame in time raises `CameraTimeout` naming the camera
and serial. After `reset_after_timeouts` timeouts in a row the pipeline is stopped, a real
device is hardware-reset and looked up again by serial, and the pipeline is restarted; the
next read streams from the fresh pipeline.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

import numpy as np
import pyrealsense2 as rs

from drivers.interfaces import DriverFault, Frame

log = logging.getLogger(__name__)

#: depth units of one millimetre, as the SDK stores them (float32)
_MM = 0.001


class CameraError(DriverFault):
    """A camera could not be found, opened or restarted."""


class CameraTimeout(CameraError, TimeoutError):
    """No complete frame arrived within the read timeout."""

    def __init__(self, camera: str, serial: str, timeout_s: float, in_a_row: int) -> None:
        super().__init__(
            f"camera {camera!r} (RealSense {serial}): no frame within {timeout_s:.3f} s "
            f"({in_a_row} timeout(s) in a row)"
        )
        self.camera = camera
        self.serial = serial
        self.timeout_s = timeout_s
        self.in_a_row = in_a_row


def find_device(serial: str, context: rs.context | None = None) -> rs.device:
    """The connected RealSense with this serial; CameraError listing the ones seen if none."""
    ctx = context if context is not None else rs.context()
    seen = []
    for dev in ctx.query_devices():
        s = dev.get_info(rs.camera_info.serial_number)
        if s == serial:
            return dev
        seen.append(s)
    raise CameraError(f"no RealSense with serial {serial!r} connected (found: {seen or 'none'})")


def sensor_for(device: rs.device, stream: rs.stream) -> rs.sensor:
    """The device's sensor that offers `stream` (works on software devices, unlike
    `first_color_sensor()`)."""
    for sensor in device.query_sensors():
        if any(p.stream_type() == stream for p in sensor.get_stream_profiles()):
            return sensor
    raise CameraError(f"device has no sensor offering {stream}")


def _same_geometry(depth: rs.video_stream_profile, color: rs.video_stream_profile) -> bool:
    """True when depth pixels already are colour pixels: align would be the identity."""
    a, b = depth.get_intrinsics(), color.get_intrinsics()
    same_intrinsics = (
        (a.width, a.height, a.model) == (b.width, b.height, b.model)
        and np.allclose([a.fx, a.fy, a.ppx, a.ppy], [b.fx, b.fy, b.ppx, b.ppy], atol=1e-6)
        and np.allclose(a.coeffs, b.coeffs, atol=1e-9)
    )
    if not same_intrinsics:
        return False
    ext = depth.get_extrinsics_to(color)
    return bool(
        np.allclose(np.asarray(ext.rotation), np.eye(3).ravel(), atol=1e-9)
        and np.allclose(ext.translation, 0.0, atol=1e-9)
    )


class RealSenseCamera:
    """One RealSense camera (colour, optionally depth aligned to it) behind `Camera`.

    Each camera of a cell is its own object with its own pipeline. `device` is for a device
    the caller already holds (a simulated `rs.software_device`); otherwise the camera is
    found by `serial` among the connected ones. Opening happens in the constructor.
    """

    def __init__(
        self,
        name: str,
        serial: str,
        height: int = 240,
        width: int = 320,
        fps: int = 30,
        *,
        depth: bool = True,
        depth_size: tuple[int, int] | None = None,
        device: rs.device | None = None,
        context: rs.context | None = None,
        align: Literal["auto", "always"] = "auto",
        reset_after_timeouts: int = 3,
        reset_wait_s: float = 10.0,
        reuse_s: float = 0.0,
    ) -> None:
        if reset_after_timeouts < 1:
            raise ValueError("reset_after_timeouts must be >= 1")
        self.name = name
        self.serial = serial
        self.height = int(height)
        self.width = int(width)
        self.fps = int(fps)
        self.depth_enabled = depth
        #: (height, width) the depth stream runs at; aligned depth is always colour-sized
        self.depth_size = depth_size or (self.height, self.width)
        self.align_mode = align
        self.reset_after_timeouts = int(reset_after_timeouts)
        self.reset_wait_s = float(reset_wait_s)
        # A control loop faster than the camera (50 Hz on 30 fps) must not wait for the next
        # frame every tick: while the last frame is younger than this, read() returns it
        # again instead of blocking (its stamp still says when it was taken). 0: always a
        # new frame.
        self.reuse_s = float(reuse_s)
        self._last: Frame | None = None
        self._last_at = 0.0
        #: reads answered with the previous frame (no new one yet, within reuse_s)
        self.reused = 0
        self._context = context
        self._given_device = device
        self._device: rs.device | None = None
        self._pipeline: rs.pipeline | None = None
        self._align: rs.align | None = None
        self._mm_per_unit = 1.0
        self._timeouts_in_a_row = 0
        self._closed = False
        #: how often the pipeline was restarted after repeated timeouts
        self.reopen_count = 0
        #: the SDK frame number of the last colour frame read (gaps mean dropped frames)
        self.last_frame_number: int | None = None
        #: the time domain of the last frame's stamp ("global_time", "hardware_clock", ...)
        self.time_domain: str | None = None
        #: colour intrinsics of the running stream (fx, fy, ppx, ppy in pixels)
        self.intrinsics: rs.intrinsics | None = None
        self.depth_scale_m: float | None = None
        self._open()

    # -- opening -------------------------------------------------------------------------

    def _resolve_device(self) -> rs.device:
        if self._given_device is not None:
            got = self._given_device.get_info(rs.camera_info.serial_number)
            if got != self.serial:
                raise CameraError(
                    f"camera {self.name!r}: device handed in has serial {got!r}, "
                    f"expected {self.serial!r}"
                )
            return self._given_device
        return find_device(self.serial, self._context)

    def _open(self) -> None:
        dev = self._resolve_device()
        cfg = rs.config()
        cfg.enable_stream(rs.stream.color, self.width, self.height, rs.format.rgb8, self.fps)
        if self.depth_enabled:
            dh, dw = self.depth_size
            cfg.enable_stream(rs.stream.depth, dw, dh, rs.format.z16, self.fps)
        pipe = rs.pipeline(self._context) if self._context is not None else rs.pipeline()
        try:
            pipe.set_device(dev)  # the one path a software device and a real one share
            profile = pipe.start(cfg)
        except RuntimeError as exc:
            depth = (
                f" + Z16 {self.depth_size[1]}x{self.depth_size[0]}" if self.depth_enabled else ""
            )
            raise CameraError(
                f"camera {self.name!r} (RealSense {self.serial}): cannot stream "
                f"RGB8 {self.width}x{self.height}{depth} at {self.fps} fps: {exc}"
            ) from exc
        try:
            self._configure(dev, profile)
        except BaseException:
            pipe.stop()
            raise
        self._device = dev
        self._pipeline = pipe
        log.info(
            "camera %s: RealSense %s streaming %dx%d@%d%s (depth scale %s m, align %s)",
            self.name,
            self.serial,
            self.width,
            self.height,
            self.fps,
            " + depth" if self.depth_enabled else "",
            self.depth_scale_m,
            "on" if self._align is not None else "identity",
        )

    def _configure(self, dev: rs.device, profile: rs.pipeline_profile) -> None:
        """Intrinsics, depth scale and whether depth needs aligning, from what started."""
        color_profile = profile.get_stream(rs.stream.color).as_video_stream_profile()
        self.intrinsics = color_profile.get_intrinsics()
        self._align = None
        if self.depth_enabled:
            depth_sensor = sensor_for(dev, rs.stream.depth).as_depth_sensor()
            self.depth_scale_m = float(depth_sensor.get_depth_scale())
            self._mm_per_unit = self.depth_scale_m / _MM
            depth_profile = profile.get_stream(rs.stream.depth).as_video_stream_profile()
            if self.align_mode == "always" or not _same_geometry(depth_profile, color_profile):
                self._align = rs.align(rs.stream.color)

    def _stop(self) -> None:
        pipe, self._pipeline = self._pipeline, None
        if pipe is not None:
            try:
                pipe.stop()
            except RuntimeError as exc:  # already stopped, or the device went away
                log.warning("camera %s: pipeline stop failed: %s", self.name, exc)

    def _reset_device(self) -> None:
        """Hardware-reset a real device and wait until it is back on the bus."""
        dev = self._device
        if dev is None or isinstance(dev, rs.software_device):
            return  # a software device has no hardware to reset
        try:
            dev.hardware_reset()
        except RuntimeError as exc:
            log.warning("camera %s: hardware reset of %s failed: %s", self.name, self.serial, exc)
            return
        self._given_device = None  # the old handle is stale once the device re-enumerates
        time.sleep(1.0)  # the device drops off the bus before it comes back
        deadline = time.monotonic() + self.reset_wait_s
        while True:
            try:
                find_device(self.serial, self._context)
                return
            except CameraError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)

    def reopen(self) -> None:
        """Stop, hardware-reset (real devices) and restart the pipeline."""
        log.warning("camera %s: reopening RealSense %s", self.name, self.serial)
        self._stop()
        self._reset_device()
        self._open()
        self.reopen_count += 1
        self._timeouts_in_a_row = 0

    # -- reading -------------------------------------------------------------------------

    def _wait_complete(self, timeout_s: float) -> rs.composite_frame | None:
        """The next frameset holding colour (and depth when enabled), or None at the
        deadline. Partial sets (the syncer gave up waiting for a partner) are skipped."""
        assert self._pipeline is not None
        deadline = time.monotonic() + timeout_s
        while True:
            left_ms = int((deadline - time.monotonic()) * 1000)
            if left_ms <= 0:
                return None
            ok, frames = self._pipeline.try_wait_for_frames(left_ms)
            if not ok:
                return None
            if frames.get_color_frame() and (not self.depth_enabled or frames.get_depth_frame()):
                return frames

    def read(self, timeout_s: float = 1.0) -> Frame:
        if self._closed:
            raise CameraError(f"camera {self.name!r} (RealSense {self.serial}) is closed")
        if self._pipeline is None:  # an earlier reopen failed: try again
            self.reopen()
        frames = self._newest_ready() if self.reuse_s > 0 else None
        if frames is None:
            if self._last is not None and time.monotonic() - self._last_at <= self.reuse_s:
                self.reused += 1
                return self._last
            frames = self._wait_complete(timeout_s)
        if frames is None:
            return self._timed_out(timeout_s)
        self._timeouts_in_a_row = 0
        if self._align is not None:
            frames = self._align.process(frames)
        color_frame = frames.get_color_frame()
        color = np.array(color_frame.get_data(), dtype=np.uint8, copy=True)
        depth_mm: np.ndarray | None = None
        if self.depth_enabled:
            raw = np.asanyarray(frames.get_depth_frame().get_data())
            depth_mm = self._to_mm(raw)
        self.last_frame_number = int(color_frame.get_frame_number())
        self.time_domain = color_frame.get_frame_timestamp_domain().name
        frame = Frame(
            camera=self.name,
            color=color,
            stamp=color_frame.get_timestamp() / 1000.0,
            depth=depth_mm,
        )
        self._last, self._last_at = frame, time.monotonic()
        return frame

    def _newest_ready(self) -> rs.composite_frame | None:
        """The newest complete frameset already delivered, without waiting (None if none)."""
        assert self._pipeline is not None
        newest = None
        for _ in range(8):  # the pipeline queue is short; never spin on a flood
            frames = self._pipeline.poll_for_frames()
            if not frames:
                break
            if frames.get_color_frame() and (not self.depth_enabled or frames.get_depth_frame()):
                newest = frames
        return newest

    def _to_mm(self, raw: np.ndarray) -> np.ndarray:
        """Depth units to uint16 millimetres (a copy: the SDK reuses its frame memory)."""
        if abs(self._mm_per_unit - 1.0) < 1e-6:
            return np.array(raw, dtype=np.uint16, copy=True)
        mm = np.rint(raw.astype(np.float32) * np.float32(self._mm_per_unit))
        return np.clip(mm, 0, np.iinfo(np.uint16).max).astype(np.uint16)

    def _timed_out(self, timeout_s: float) -> Frame:
        self._timeouts_in_a_row += 1
        err = CameraTimeout(self.name, self.serial, timeout_s, self._timeouts_in_a_row)
        log.warning("%s", err)
        if self._timeouts_in_a_row >= self.reset_after_timeouts:
            try:
                self.reopen()
            except RuntimeError as exc:  # CameraError, or the SDK's own
                log.error("camera %s: reopen failed: %s", self.name, exc)
                raise exc from err
        raise err

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._stop()
        log.info("camera %s: RealSense %s closed", self.name, self.serial)
