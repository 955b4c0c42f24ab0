"""The default sim cell runs the real driver code paths (dynamixel_sdk over pty servo
peers, pyrealsense2's software device), and every injected fault ends in a safe state with
an error naming the part, never a crash of the actor."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from drivers.calibration import default_calibration
from drivers.cell import CellFault
from drivers.dynamixel import control_table as ct
from drivers.dynamixel.leader import LeaderArms
from drivers.sim.sdk_cell import SdkSimCell, make_sdk_sim_cell
from drivers.sim.servo_peer import ServoPeer
from drivers.teleop import TeleopOperator


@pytest.fixture
def cell() -> Iterator[SdkSimCell]:
    c = make_sdk_sim_cell("cell-sdk", seed=3, realtime_factor=0.0, watchdog=False)
    try:
        yield c
    finally:
        c.close()


def _drive(cell: SdkSimCell, task: str, seed: int, limit_s: float = 10.0) -> bool:
    cell.scene.reset(task, seed)
    cell.operator.force(True)  # type: ignore[attr-defined]
    start = tick = cell.clock.now()
    while cell.clock.now() - start < limit_s:
        cell.hardware.observe()
        cell.hardware.command(cell.operator.action())
        tick += 1 / cell.control_hz
        cell.clock.sleep_until(tick)
        if cell.scene.success():
            return True
    return False


def test_experts_succeed_through_the_sdk_paths(cell: SdkSimCell) -> None:
    wins = {task: sum(_drive(cell, task, 500 + s) for s in range(3)) for task in cell.scene.tasks}
    assert wins == {task: 3 for task in cell.scene.tasks}
    obs = cell.hardware.observe()
    for name in ("overhead", "front"):
        frame = obs.frames[name]
        assert frame.color.shape == (96, 128, 3) and frame.depth is not None
        assert frame.depth.dtype == np.uint16 and np.median(frame.depth[frame.depth > 0]) > 500


def test_missing_servo_is_named_and_the_cell_holds(cell: SdkSimCell) -> None:
    cell.hardware.observe()
    cell.peers["right"].set_fault(3, missing=True)
    with pytest.raises(CellFault, match=r"servo ID 3 \(right_elbow\).*holding position"):
        cell.hardware.observe()
    # The other arm was told to hold: its goal registers equal its present position.
    left = cell.peers["left"]
    for sid in range(1, 8):
        goal, present = (
            left.register(sid, ct.GOAL_POSITION),
            left.register(sid, ct.PRESENT_POSITION),
        )
        assert abs(goal - present) <= 2
    assert cell.hardware.current_fault is not None and not cell.hardware.current_fault.torque_off
    assert cell.hardware.bus_stats()["bus_failed"] >= 1  # what the edge exports as metrics
    cell.peers["right"].clear_faults()
    cell.hardware.enable()
    cell.hardware.hold()
    assert cell.hardware.fault == "" and cell.hardware.current_fault is None
    cell.hardware.observe()  # back in service


def test_servo_hardware_error_turns_torque_off(cell: SdkSimCell) -> None:
    cell.hardware.observe()
    cell.peers["left"].set_fault(2, hardware_error=0x20)  # overload
    with pytest.raises(CellFault, match=r"servo ID 2 \(left_shoulder\).*torque off") as err:
        cell.hardware.observe()
    assert err.value.torque_off
    for side in ("left", "right"):
        peer = cell.peers[side]
        answering = [s for s in range(1, 8) if not (side == "left" and s == 2)]
        assert all(peer.register(s, ct.TORQUE_ENABLE) == 0 for s in answering)


def test_watchdog_holds_when_commands_stop() -> None:
    c = make_sdk_sim_cell("cell-wd", seed=1, realtime_factor=1.0, control_hz=20.0)
    try:
        c.scene.reset(c.scene.tasks[0], 1)
        c.hardware.command(c.hardware.observe().joint_pos + np.float32(0.05))
        time.sleep(0.4)  # no command for 8 ticks
        assert c.hardware.watchdog_holds >= 1
    finally:
        c.close()


def test_leader_arms_drive_the_cell_while_takeover_is_held() -> None:
    cal = default_calibration(leaders=True)
    with ServoPeer(range(1, 8), shaft_ticks={1: 2048 + 300}) as lp, ServoPeer(range(1, 8)) as rp:
        leaders = LeaderArms.open({"left": lp.port, "right": rp.port}, cal)
        pedal = threading.Event()
        op = TeleopOperator(leaders, pedal.is_set)
        try:
            assert not op.wants_control()
            pedal.set()
            assert op.wants_control()
            action = op.action()
            assert action.shape == (14,)
            assert action[0] == pytest.approx(300 * ct.RAD_PER_TICK)
            rp.move_shaft(3, 2048 - 400)  # the operator bends the right elbow
            assert op.action()[9] == pytest.approx(-400 * ct.RAD_PER_TICK)
        finally:
            op.close()


class _Sink:
    def __init__(self) -> None:
        self.chunks: list = []

    def submit(self, chunk) -> bool:
        self.chunks.append(chunk)
        return True


def test_actor_survives_a_fault_reports_it_and_resumes(cell: SdkSimCell) -> None:
    faults: list[str] = []
    sink = _Sink()
    # One long episode: the fault must land inside it, never in the reset between two.
    cfg = ActorConfig(cell_id="cell-sdk", learner_address="127.0.0.1:1", max_episode_s=60.0)
    loop = ControlLoop(
        cfg,
        cell.hardware,
        cell.scene,
        cell.operator,
        cell.clock,
        sink,
        None,
        on_fault=faults.append,
    )
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,))
    runner.start()
    try:
        deadline = time.monotonic() + 15
        while loop.stats["steps_recorded"] < 5 and time.monotonic() < deadline:
            time.sleep(0.05)  # the episode is under way
        cell.peers["left"].set_fault(5, missing=True)
        deadline = time.monotonic() + 10
        while not faults and time.monotonic() < deadline:
            time.sleep(0.05)
        assert faults and "servo ID 5 (left_wrist_angle)" in faults[0]
        assert runner.is_alive()
        cell.peers["left"].clear_faults()
        before = loop.stats["steps_recorded"]
        deadline = time.monotonic() + 15
        while loop.stats["steps_recorded"] <= before + 20 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert loop.stats["steps_recorded"] > before + 20, "the loop did not resume"
    finally:
        stop.set()
        runner.join(30)
    assert not runner.is_alive()
    reasons = [c.outcome.reason for c in sink.chunks if c.last]
    assert "fault" in reasons


def test_fleet_calibrate_writes_the_cell_file_from_a_real_bus(tmp_path) -> None:
    import subprocess
    import sys

    from drivers.calibration import CellCalibration

    out = tmp_path / "cell-5.json"
    # The arm sits 100 ticks off on its waist: home is recorded there.
    with ServoPeer(range(1, 8), shaft_ticks={1: 2048 + 100, 7: 2560}) as peer:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet.cli",
                "calibrate",
                "--cell",
                "cell-5",
                "--port",
                f"left={peer.port}",
                "--out",
                str(out),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        assert proc.stdin is not None and proc.stdout is not None
        answers = {"home": None, "open the": 2560, "close the": 1536}
        for _ in range(3):
            line = proc.stdout.readline()
            while "[Enter]" not in line:
                assert line, "fleet calibrate ended before asking"
                line = proc.stdout.readline()
            for key, ticks in answers.items():
                if key in line and ticks is not None:
                    peer.move_shaft(7, ticks)
            proc.stdin.write("\n")
            proc.stdin.flush()
        rest, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, rest
    cal = CellCalibration.load(out)
    assert cal.arm("left").joints[0].homing_offset == -100
