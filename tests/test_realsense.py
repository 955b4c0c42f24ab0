"""The RealSense driver read through the SDK's software device: what a sim pushes is what
the driver returns (pixels, millimetres, stamps), per camera, and faults are loud."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pyrealsense2 as rs
import pytest

from drivers.realsense import CameraError, CameraTimeout, RealSenseCamera, find_device, sensor_for
from drivers.sim.rs_software import PushedRealSense, SoftwareRealSense
from tests.waiting import wait_until

H, W = 240, 320


def pattern(k: int, h: int = H, w: int = W) -> tuple[np.ndarray, np.ndarray]:
    """Colour gradients and a sloped depth plane with a square that moves with k (nearer,
    white): every pixel differs from its neighbours and from frame to frame."""
    yy, xx = np.mgrid[0:h, 0:w]
    color = np.stack([xx % 256, yy % 256, (xx + yy + 7 * k) % 256], axis=-1).astype(np.uint8)
    depth = (500 + 3 * xx + 2 * yy + k).astype(np.uint16)
    top, left = (10 + 5 * k) % (h - 40), (20 + 9 * k) % (w - 40)
    color[top : top + 40, left : left + 40] = 255
    depth[top : top + 40, left : left + 40] = 300
    return color, depth


@pytest.fixture
def sim() -> Iterator[tuple[SoftwareRealSense, RealSenseCamera]]:
    sensor = SoftwareRealSense("SIM-0001", W, H)
    cam = RealSenseCamera("overhead", "SIM-0001", H, W, device=sensor.device)
    yield sensor, cam
    cam.close()


def test_color_and_depth_round_trip_exactly(sim: tuple[SoftwareRealSense, RealSenseCamera]):
    sensor, cam = sim
    for k in range(5):
        color, depth = pattern(k)
        sensor.push(color, depth, 10.0 + k / 30)
        frame = cam.read(timeout_s=2.0)
        assert frame.camera == "overhead"
        assert frame.color.shape == (H, W, 3) and frame.color.dtype == np.uint8
        assert frame.depth is not None
        assert frame.depth.shape == (H, W) and frame.depth.dtype == np.uint16
        np.testing.assert_array_equal(frame.color, color)
        np.testing.assert_array_equal(frame.depth, depth)
        assert cam.last_frame_number == k + 1
    assert cam.depth_scale_m == pytest.approx(0.001)
    assert cam.intrinsics is not None and cam.intrinsics.fx == pytest.approx(
        sensor.color_intrinsics.fx
    )


def test_color_only_camera_has_no_depth():
    sensor = SoftwareRealSense("SIM-RGB", W, H)
    cam = RealSenseCamera("front", "SIM-RGB", H, W, depth=False, device=sensor.device)
    color, depth = pattern(2)
    sensor.push(color, depth, 3.0)  # the idle depth sensor drops its half
    frame = cam.read(2.0)
    cam.close()
    np.testing.assert_array_equal(frame.color, color)
    assert frame.depth is None


def test_hardware_timestamps_are_carried_in_seconds(
    sim: tuple[SoftwareRealSense, RealSenseCamera],
):
    sensor, cam = sim
    stamps = [123.456, 123.4893, 500.0, 0.25]  # includes a jump back (a new sim episode)
    for k, stamp in enumerate(stamps):
        sensor.push(*pattern(k), stamp)
        frame = cam.read(timeout_s=2.0)
        assert frame.stamp == pytest.approx(stamp, abs=1e-9)
    assert cam.time_domain == "hardware_clock"


def test_alignment_with_shared_geometry_is_identity():
    """Same intrinsics, identity extrinsics: auto mode returns the depth untouched. The
    SDK's rs.align (forced) agrees up to its pixel rounding: a few holes, and some values
    moved by one pixel."""
    sensor = SoftwareRealSense("SIM-ALIGN", W, H)
    auto = RealSenseCamera("a", "SIM-ALIGN", H, W, device=sensor.device)
    color, depth = pattern(3)
    sensor.push(color, depth, 1.0)
    np.testing.assert_array_equal(auto.read(2.0).depth, depth)
    auto.close()

    forced = RealSenseCamera("a", "SIM-ALIGN", H, W, device=sensor.device, align="always")
    sensor.push(color, depth, 2.0)
    aligned = forced.read(2.0).depth
    forced.close()
    assert aligned is not None and aligned.shape == (H, W)
    covered = aligned != 0
    assert covered.mean() > 0.9
    assert (aligned == depth)[covered].mean() > 0.9
    padded = np.pad(depth, 1, mode="edge")
    near = np.stack(
        [padded[1 + dy : 1 + dy + H, 1 + dx : 1 + dx + W] for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
    )
    assert ((near == aligned).any(axis=0) | ~covered).all()


def test_depth_of_another_resolution_is_aligned_to_color():
    """Half-resolution depth, same field of view: rs.align upsamples it onto colour pixels
    (nearest; at a depth edge the nearer surface wins by up to one pixel)."""
    sensor = SoftwareRealSense("SIM-HALF", W, H, depth_width=W // 2, depth_height=H // 2)
    cam = RealSenseCamera(
        "front", "SIM-HALF", H, W, device=sensor.device, depth_size=(H // 2, W // 2)
    )
    depth_small = np.full((H // 2, W // 2), 1200, np.uint16)
    depth_small[30:60, 40:80] = 600  # colour pixels rows 60..119, cols 80..159
    sensor.push(pattern(0)[0], depth_small, 1.0)
    frame = cam.read(2.0)
    cam.close()
    assert frame.depth is not None and frame.depth.shape == (H, W)
    truth = np.repeat(np.repeat(depth_small, 2, axis=0), 2, axis=1)
    wrong = frame.depth != truth
    # away from the square's edge (more than a pixel) every pixel is exact
    edge = np.zeros_like(wrong)
    edge[58:122, 78:162] = True
    edge[62:118, 82:158] = False
    assert not wrong[~edge].any()
    assert set(np.unique(frame.depth[edge])) <= {600, 1200}


def test_depth_units_other_than_mm_come_back_in_mm():
    sensor = SoftwareRealSense("SIM-D405", W, H, depth_units_m=0.0001)  # a D405's units
    cam = RealSenseCamera("left_wrist", "SIM-D405", H, W, device=sensor.device)
    color, depth = pattern(1)  # max ~1.9 m, fits 0.1 mm units
    sensor.push(color, depth, 1.0)
    frame = cam.read(2.0)
    cam.close()
    assert cam.depth_scale_m == pytest.approx(0.0001)
    np.testing.assert_array_equal(frame.depth, depth)


def test_two_cameras_stream_at_once_each_from_its_serial():
    a = SoftwareRealSense("SIM-LEFT", W, H)
    b = SoftwareRealSense("SIM-RIGHT", W, H)
    cam_a = RealSenseCamera("left_wrist", "SIM-LEFT", H, W, device=a.device)
    cam_b = RealSenseCamera("right_wrist", "SIM-RIGHT", H, W, device=b.device)
    try:
        for k in range(3):
            ca, da = pattern(k)
            cb, db = pattern(k + 10)
            a.push(ca, da, 1.0 + k)
            b.push(cb, db, 2.0 + k)
            fa, fb = cam_a.read(2.0), cam_b.read(2.0)
            assert (fa.camera, fb.camera) == ("left_wrist", "right_wrist")
            np.testing.assert_array_equal(fa.color, ca)
            np.testing.assert_array_equal(fb.depth, db)
            assert (fa.stamp, fb.stamp) == (pytest.approx(1.0 + k), pytest.approx(2.0 + k))
    finally:
        cam_a.close()
        cam_b.close()
    with pytest.raises(CameraError, match="SIM-LEFT"):
        RealSenseCamera("x", "SIM-OTHER", H, W, device=a.device)


def test_unsupported_mode_is_a_camera_error_naming_it():
    sensor = SoftwareRealSense("SIM-MODE", W, H)
    with pytest.raises(CameraError, match=r"'front'.*SIM-MODE.*640x480"):
        RealSenseCamera("front", "SIM-MODE", 480, 640, device=sensor.device)


def test_reopen_of_a_real_device_resets_it_and_waits_for_it(monkeypatch: pytest.MonkeyPatch):
    """No camera on a test machine: a stand-in device checks the reset-and-wait logic."""
    sensor = SoftwareRealSense("SIM-REAL", W, H)
    cam = RealSenseCamera("front", "SIM-REAL", H, W, device=sensor.device)
    cam.close()
    resets: list[str] = []
    lookups: list[str] = []

    class FakeDevice:
        def hardware_reset(self) -> None:
            resets.append("reset")

    def find_after_two_tries(serial: str, context: object = None) -> rs.device:
        lookups.append(serial)
        if len(lookups) < 3:
            raise CameraError("not back yet")
        return sensor.device

    monkeypatch.setattr("drivers.realsense.find_device", find_after_two_tries)
    monkeypatch.setattr("drivers.realsense.time.sleep", lambda s: None)
    cam._device = FakeDevice()  # type: ignore[assignment]
    cam._reset_device()
    assert resets == ["reset"] and lookups == ["SIM-REAL"] * 3
    assert cam._given_device is None  # the stale handle is dropped: reopen looks it up again


def test_sensors_are_found_by_stream_type_on_a_software_device():
    dev = SoftwareRealSense("SIM-SENS", W, H).device
    assert sensor_for(dev, rs.stream.depth).is_depth_sensor()
    assert sensor_for(dev, rs.stream.color).get_info(rs.camera_info.name) == "RGB Camera"


def test_unknown_serial_names_what_was_found():
    with pytest.raises(CameraError, match="NOT-A-SERIAL"):
        find_device("NOT-A-SERIAL")


def test_timeout_names_camera_and_serial(sim: tuple[SoftwareRealSense, RealSenseCamera]):
    _, cam = sim
    with pytest.raises(CameraTimeout) as err:
        cam.read(timeout_s=0.05)
    assert "overhead" in str(err.value) and "SIM-0001" in str(err.value)
    assert isinstance(err.value, TimeoutError)
    assert (err.value.camera, err.value.serial, err.value.in_a_row) == ("overhead", "SIM-0001", 1)


def test_repeated_timeouts_reopen_and_streaming_resumes():
    sensor = SoftwareRealSense("SIM-FLAKY", W, H)
    cam = RealSenseCamera("front", "SIM-FLAKY", H, W, device=sensor.device, reset_after_timeouts=2)
    try:
        with pytest.raises(CameraTimeout):
            cam.read(0.05)
        assert cam.reopen_count == 0
        with pytest.raises(CameraTimeout) as err:
            cam.read(0.05)
        assert err.value.in_a_row == 2
        assert cam.reopen_count == 1
        color, depth = pattern(4)
        sensor.push(color, depth, 7.0)
        frame = cam.read(2.0)
        np.testing.assert_array_equal(frame.color, color)
        np.testing.assert_array_equal(frame.depth, depth)
        with pytest.raises(CameraTimeout) as err:  # the count starts again after a frame
            cam.read(0.05)
        assert err.value.in_a_row == 1
    finally:
        cam.close()
    with pytest.raises(CameraError, match="closed"):
        cam.read(0.05)


def test_pushed_camera_returns_the_pair_it_pushed():
    """The sim-cell adapter: render on read, push, read back through the SDK; an unchanged
    scene revision returns the cached frame without pushing."""
    sensor = SoftwareRealSense("SIM-CELL", W, H)
    state = {"rev": 0, "renders": 0}

    def render() -> tuple[np.ndarray, np.ndarray, float]:
        state["renders"] += 1
        return (*pattern(state["rev"]), state["rev"] * 0.02)

    cam = PushedRealSense("overhead", sensor, render, revision=lambda: state["rev"])
    try:
        # a stale pair queued before the read must not be returned
        sensor.push(*pattern(99), 99.0)
        first = cam.read(2.0)
        np.testing.assert_array_equal(first.color, pattern(0)[0])
        assert cam.read(2.0) is first and state["renders"] == 1
        state["rev"] = 1
        second = cam.read(2.0)
        np.testing.assert_array_equal(second.depth, pattern(1)[1])
        assert second.stamp == pytest.approx(0.02)
    finally:
        cam.close()


def test_push_rejects_wrong_shapes():
    sensor = SoftwareRealSense("SIM-SHAPE", W, H)
    color, depth = pattern(0)
    with pytest.raises(ValueError, match="color"):
        sensor.push(color[:, :, 0], depth, 0.0)
    with pytest.raises(ValueError, match="depth"):
        sensor.push(color, depth.astype(np.float32), 0.0)  # type: ignore[arg-type]


def test_a_loop_faster_than_the_camera_gets_the_last_frame_without_waiting() -> None:
    """50 Hz ticks on a 30 fps camera: with reuse_s a read returns at once, the newest frame
    if one came, else the last one again (until it is older than reuse_s)."""
    sensor = SoftwareRealSense("SIM-0003", W, H, 30)
    cam = RealSenseCamera("overhead", "SIM-0003", H, W, device=sensor.device, reuse_s=0.3)
    try:
        color1, depth1 = pattern(1)
        sensor.push(color1, depth1, 1.0)
        first = cam.read(2.0)
        np.testing.assert_array_equal(first.color, color1)
        started = time.monotonic()
        again = cam.read(2.0)
        assert again is first and cam.reused == 1
        assert time.monotonic() - started < 0.1  # no wait for a frame that is not coming
        color2, depth2 = pattern(2)
        sensor.push(color2, depth2, 1.05)
        assert wait_until(lambda: np.array_equal(cam.read(2.0).color, color2), timeout_s=2.0)

        def times_out() -> bool:
            try:
                cam.read(0.01)
            except CameraTimeout:
                return True
            return False

        assert wait_until(times_out, timeout_s=3.0)  # too old to reuse: a real timeout
    finally:
        cam.close()
