"""A real cell from its config: the operator console's keys, the builder over simulated
servo chains on pseudo-terminals (the real dynamixel_sdk path), and `fleet actor
--cell-config` recording an episode the operator marked a success.

Cameras: RealSenseCamera finds a camera by serial among connected devices; the SDK's
software device is not enumerated by rs.context, so the camera test hands the builder the
simulated device for its serial (`camera_devices`), and frames still travel the SDK's own
pipeline into the real driver.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from actors.cell_config import CellConfig
from actors.real_cell import make_real_cell
from drivers.calibration import default_calibration
from drivers.dynamixel import control_table as ct
from drivers.operator_console import NoTakeover, OperatorConsole
from drivers.sim.servo_peer import ServoPeer
from drivers.teleop import TeleopOperator
from protos.joint_layout import JOINT_UPPER
from tests.test_actor_uplink import FakeLearner
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[1]


# Operator console ----------------------------------------------------------------------


@pytest.fixture
def pipe_console() -> Iterator[tuple[OperatorConsole, int, threading.Event]]:
    r, w = os.pipe()
    stop = threading.Event()
    console = OperatorConsole("cell-t", ["transfer_cube"], r, stop=stop)
    yield console, w, stop
    console.close()
    os.close(w)
    os.close(r)


def _reset_in_thread(console: OperatorConsole) -> threading.Thread:
    t = threading.Thread(target=console.reset, args=("transfer_cube", 7), daemon=True)
    t.start()
    return t


def test_reset_waits_for_r_then_s_is_success(pipe_console) -> None:
    console, w, _ = pipe_console
    os.write(w, b"r")  # pressed before the request: must not skip the set-up
    time.sleep(0.15)
    t = _reset_in_thread(console)
    time.sleep(0.3)
    assert t.is_alive(), "reset returned before the operator pressed r"
    os.write(w, b"r\n")
    t.join(2.0)
    assert not t.is_alive()
    assert not console.success() and not console.failed() and console.reward() == 0.0
    os.write(w, b"s\n")
    assert wait_until(console.success, timeout_s=2.0)
    assert console.reward() == 1.0 and not console.failed()
    os.write(w, b"f")  # the first verdict stands
    time.sleep(0.2)
    assert console.success()


def test_f_is_failure_and_the_next_reset_clears_it(pipe_console) -> None:
    console, w, _ = pipe_console
    t = _reset_in_thread(console)
    os.write(w, b"r")
    t.join(2.0)
    os.write(w, b"F")
    assert wait_until(console.failed, timeout_s=2.0)
    assert not console.success() and console.reward() == 0.0
    t = _reset_in_thread(console)
    time.sleep(0.2)
    assert not console.failed()  # a new scene: no verdict yet
    os.write(w, b"r")
    t.join(2.0)
    assert not t.is_alive()


def test_t_toggles_takeover(pipe_console) -> None:
    console, w, _ = pipe_console
    assert not console.takeover()
    os.write(w, b"t")
    assert wait_until(console.takeover, timeout_s=2.0)
    os.write(w, b"t")
    assert wait_until(lambda: not console.takeover(), timeout_s=2.0)


def test_reset_returns_promptly_when_the_actor_stops(pipe_console) -> None:
    console, _, stop = pipe_console
    t = _reset_in_thread(console)
    time.sleep(0.2)
    t0 = time.monotonic()
    stop.set()
    t.join(2.0)
    assert not t.is_alive() and time.monotonic() - t0 < 0.5
    assert not console.success()


def test_keys_from_a_named_pipe(tmp_path: Path) -> None:
    fifo = tmp_path / "pedal"
    os.mkfifo(fifo)
    console = OperatorConsole("cell-t", ["transfer_cube"], str(fifo))
    try:
        t = _reset_in_thread(console)
        for key in (b"r", b"s"):  # the pedal opens, writes a key and closes each time
            with open(fifo, "wb", buffering=0) as pedal:
                pedal.write(key)
            time.sleep(0.15)
        t.join(2.0)
        assert not t.is_alive() and wait_until(console.success, timeout_s=2.0)
    finally:
        console.close()


# The builder over simulated chains -----------------------------------------------------


def _config(
    tmp_path: Path, ports: dict[str, str], leaders: dict[str, str] | None, cameras: str = ""
) -> Path:
    default_calibration("cell-r", leaders=leaders is not None).save(tmp_path / "cal.json")
    text = '[cell]\nid = "cell-r"\n[calibration]\nfile = "cal.json"\n'
    for side, port in ports.items():
        text += f'[arms.followers.{side}]\nport = "{port}"\n'
    for side, port in (leaders or {}).items():
        text += f'[arms.leaders.{side}]\nport = "{port}"\n'
    text += cameras
    text += '[actor]\ncontrol_hz = 20\nmax_episode_s = 20\ntasks = ["transfer_cube"]\n'
    path = tmp_path / "cell.toml"
    path.write_text(text)
    return path


@pytest.fixture
def chains() -> Iterator[dict[str, ServoPeer]]:
    peers: dict[str, ServoPeer] = {}
    try:
        for name in ("left", "right", "leader_left", "leader_right"):
            ticks = {2: 2048 + 200} if name == "leader_left" else None
            peers[name] = ServoPeer(range(1, 8), shaft_ticks=ticks).start()
        yield peers
    finally:
        for p in peers.values():
            p.close()


def test_real_cell_reads_commands_clamps_and_torques_off(tmp_path: Path, chains) -> None:
    ports = {s: chains[s].port for s in ("left", "right")}
    leaders = {s: chains[f"leader_{s}"].port for s in ("left", "right")}
    cfg = CellConfig.load(_config(tmp_path, ports, leaders))
    r, w = os.pipe()
    cell = make_real_cell(cfg, console_source=r)
    try:
        assert all(chains[s].register(1, ct.TORQUE_ENABLE) == 1 for s in ("left", "right"))
        q = cell.hardware.read_joints()
        assert q.shape == (14,) and np.all(np.isfinite(q))
        target = q.copy()
        target[0] += 0.05  # within one tick's step bound (3 rad/s / 20 Hz = 0.15)
        sent = cell.hardware.command(target)
        assert sent[0] == pytest.approx(q[0] + 0.05, abs=1e-6)
        wild = q.copy()
        wild[1] = 50.0  # far beyond the joint limit and the step bound
        sent = cell.hardware.command(wild)
        assert sent[1] <= min(JOINT_UPPER[1], q[1] + 3.0 / 20 + 1e-6)
        assert np.all(sent <= JOINT_UPPER + 1e-9)
        # Leader arms drive the followers while the operator toggles takeover (key t).
        assert isinstance(cell.operator, TeleopOperator)
        assert not cell.operator.wants_control()
        os.write(w, b"t")
        assert wait_until(cell.operator.wants_control, timeout_s=2.0)
        assert cell.operator.action()[1] == pytest.approx(200 * ct.RAD_PER_TICK, abs=1e-4)
    finally:
        cell.close()
        os.close(w)
        os.close(r)
    for side in ("left", "right"):
        assert all(chains[side].register(sid, ct.TORQUE_ENABLE) == 0 for sid in range(1, 8))


def test_real_cell_cameras_come_through_the_realsense_driver(tmp_path: Path, chains) -> None:
    from drivers.sim.rs_software import SoftwareRealSense

    ports = {s: chains[s].port for s in ("left", "right")}
    camera = '[cameras.overhead]\nserial = "SIM-OVERHEAD"\nwidth = 320\nheight = 240\nfps = 30\n'
    cfg = CellConfig.load(_config(tmp_path, ports, None, camera))
    sim = SoftwareRealSense("SIM-OVERHEAD", 320, 240, 30)
    r, w = os.pipe()
    cell = make_real_cell(cfg, console_source=r, camera_devices={"SIM-OVERHEAD": sim.device})
    try:
        color = np.zeros((240, 320, 3), np.uint8)
        color[:, :, 1] = 200
        depth = np.full((240, 320), 500, np.uint16)

        def frame_arrives() -> bool:
            sim.push(color, depth, time.time())
            obs = cell.hardware.observe()
            return "overhead" in obs.frames and int(obs.frames["overhead"].color[0, 0, 1]) == 200

        assert wait_until(frame_arrives, timeout_s=5.0)
    finally:
        cell.close()
        os.close(w)
        os.close(r)


def test_without_leaders_nobody_takes_over(tmp_path: Path, chains) -> None:
    ports = {s: chains[s].port for s in ("left", "right")}
    cfg = CellConfig.load(_config(tmp_path, ports, None))
    r, w = os.pipe()
    cell = make_real_cell(cfg, console_source=r)
    try:
        assert isinstance(cell.operator, NoTakeover)
        os.write(w, b"t")
        time.sleep(0.2)
        assert not cell.operator.wants_control()
    finally:
        cell.close()
        os.close(w)
        os.close(r)


def test_a_failure_half_way_closes_what_was_opened(tmp_path: Path, chains, monkeypatch) -> None:
    from actors import real_cell

    closed: list[str] = []

    class Recording(real_cell.DynamixelArmBus):
        def close(self) -> None:
            closed.append(self.name)
            super().close()

    monkeypatch.setattr(real_cell, "DynamixelArmBus", Recording)
    ports = {s: chains[s].port for s in ("left", "right")}
    leaders = {"left": chains["leader_left"].port, "right": str(tmp_path / "no-such-port")}
    cfg = CellConfig.load(_config(tmp_path, ports, leaders))
    r, w = os.pipe()
    try:
        with pytest.raises(Exception, match="no-such-port"):
            make_real_cell(cfg, console_source=r)
    finally:
        os.close(w)
        os.close(r)
    # The leader opened here is closed; the followers' servo process stopped with torque
    # off, so a retry finds every port free.
    assert closed == ["leader_left"]
    for side in ("left", "right"):
        assert all(chains[side].register(sid, ct.TORQUE_ENABLE) == 0 for sid in range(1, 8))
    leaders["right"] = chains["leader_right"].port
    r, w = os.pipe()
    cell = make_real_cell(CellConfig.load(_config(tmp_path, ports, leaders)), console_source=r)
    try:
        assert cell.hardware.read_joints().shape == (14,)
    finally:
        cell.close()
        os.close(w)
        os.close(r)


# `fleet actor --cell-config` end to end ------------------------------------------------


def test_fleet_actor_runs_a_real_cell_config(tmp_path: Path, chains) -> None:
    ports = {s: chains[s].port for s in ("left", "right")}
    path = _config(tmp_path, ports, None)
    fifo = tmp_path / "pedal"
    os.mkfifo(fifo)
    path.write_text(path.read_text() + f'[operator]\ninput = "{fifo.name}"\n')
    learner = FakeLearner().start()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    log_path = tmp_path / "actor.log"
    log_file = log_path.open("wb")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "actors.main",
            "--cell",
            "cell-r",
            "--learner",
            learner.address,
            "--cell-config",
            str(path),
            "--allow-unsigned",
            "--spool-dir",
            str(tmp_path / "spool"),
            "--version-cache",
            str(tmp_path / "versions"),
            "--summary-json",
            str(tmp_path / "summary.json"),
        ],
        cwd=ROOT,
        env=env,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    try:

        def press(key: bytes) -> None:
            assert proc.poll() is None, log_path.read_text()[-3000:]
            try:  # non-blocking: an actor that has not opened the pipe yet must not hang us
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
            except OSError:
                return
            try:
                os.write(fd, key)
            finally:
                os.close(fd)

        def outcomes() -> list[str]:
            chunks = list(learner.trajectory.stored.values())
            return [c.outcome.reason for c in chunks if c.last]

        time.sleep(1.0)
        deadline = time.monotonic() + 25
        while time.monotonic() < deadline and not outcomes():
            press(b"r")  # harmless while an episode runs
            time.sleep(0.3)
            press(b"s")
            time.sleep(0.5)
        assert outcomes()[:1] == ["success"]
        first = next(c for c in learner.trajectory.stored.values() if c.last)
        assert first.outcome.success and first.cell_id == "cell-r"
        while time.monotonic() < deadline and "failure" not in outcomes():
            press(b"r")
            time.sleep(0.3)
            press(b"f")  # the operator judges this one a failure: it ends at once
            time.sleep(0.5)
        failed = [c for c in learner.trajectory.stored.values() if c.last][-1]
        assert failed.outcome.reason == "failure" and not failed.outcome.success
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log_file.close()
        learner.kill()
    out = log_path.read_text()
    assert proc.returncode == 0, out[-3000:]
    assert "ended success" in out, out[-3000:]
    for side in ("left", "right"):
        assert chains[side].register(1, ct.TORQUE_ENABLE) == 0


def test_fleet_actor_needs_sim_or_a_cell_config() -> None:
    from actors.main import main

    assert main(["--cell", "c", "--learner", "127.0.0.1:1", "--allow-unsigned"]) == 2
