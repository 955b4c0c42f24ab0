"""A real cell from its config: the same driver classes drivers/sim/sdk_cell.py assembles
for the MuJoCo cell, on real serial ports and RealSense serials.

The follower arms tick in a servo process of their own (actors/servo_process.py), under
the config's real-time priority, fronted here by actors/servo_client.ServoProcess; the
cameras, the leader arms and the console stay in the actor's process. The scene is the
person at the cell (drivers/operator_console.py); the operator is the leader arms plus the
console's takeover toggle (or nobody, without leaders); the clock is the wall clock.
Construction is all-or-nothing: a failure half way closes every port and camera already
opened, so a retry never finds a port still held by a dead attempt.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from actors.cell_config import CellConfig
from actors.servo_client import ServoProcess
from drivers.calibration import CellCalibration
from drivers.cell import close_each
from drivers.clock import WallClock
from drivers.dynamixel.arm_bus import DynamixelArmBus
from drivers.dynamixel.leader import LeaderArms
from drivers.interfaces import Camera, Clock, Operator
from drivers.operator_console import NoTakeover, OperatorConsole
from drivers.safety import SafetyGate, step_bound
from drivers.teleop import TeleopOperator
from protos.joint_layout import ARM_SIDES, JOINT_LOWER, JOINT_UPPER

log = logging.getLogger(__name__)


@dataclass
class RealCell:
    """A cell's drivers behind the CellLike shape run_actor takes; close() makes it safe."""

    hardware: ServoProcess
    scene: OperatorConsole
    operator: Operator
    clock: Clock
    cell_id: str = ""
    control_hz: float = 50.0
    calibration: CellCalibration | None = None
    _closed: bool = False

    def close(self) -> None:
        """Torque off and close the servo process (it does both on its way out), then the
        cameras, leaders and the console (each once; one failing does not stop the rest)."""
        if self._closed:
            return
        self._closed = True
        closers: list[Callable[[], None]] = [self.hardware.close, self.scene.close]
        if isinstance(self.operator, TeleopOperator):
            closers.append(self.operator.close)
        close_each(closers, self.cell_id)
        log.info("cell %s: torque off, devices closed", self.cell_id)


def servo_spec(config: CellConfig, bus_kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """What the servo process opens: the follower ports, the calibration, the rate."""
    return {
        "cell_id": config.cell_id,
        "control_hz": config.control_hz,
        "realtime_priority": config.realtime_priority,
        "calibration": str(config.calibration),
        "arms": {
            side: {"port": arm.port, "baud": arm.baud, "calibration_arm": arm.calibration_arm}
            for side, arm in config.followers.items()
        },
        "bus": dict(bus_kwargs),
    }


def make_real_cell(
    config: CellConfig,
    *,
    stop: threading.Event | None = None,
    console_source: Any = None,
    bus_kwargs: dict[str, Any] | None = None,
    camera_devices: Mapping[str, Any] | None = None,
) -> RealCell:
    """Open the cell `config` describes. `stop` is the actor's stop event (the console's
    waits end on it); `console_source` overrides the config's operator input (tests);
    `bus_kwargs`: DynamixelArmBus options for every arm (JSON values: they also reach the
    servo process). `camera_devices` maps a serial to a RealSense device already held (a
    simulated `rs.software_device`, which the SDK does not list); other cameras are found
    by serial. The follower arms tick in a servo process of their own
    (actors/servo_process.py); leaders, cameras and the console stay in this process."""
    cal = CellCalibration.load(config.calibration)
    clock = WallClock()
    extra = dict(bus_kwargs or {})
    opened: list[Any] = []  # everything with a close(), in opening order
    try:
        gate = SafetyGate(
            JOINT_LOWER,
            JOINT_UPPER,
            max_step=step_bound(config.control_hz, len(ARM_SIDES)),
        )
        hardware = ServoProcess(servo_spec(config, extra), (), gate)
        opened.append(hardware)
        cams: list[Camera] = []
        if config.cameras:
            from drivers.realsense import RealSenseCamera  # only cells with cameras need it

            for c in config.cameras:
                cam = RealSenseCamera(
                    c.name,
                    c.serial,
                    c.height,
                    c.width,
                    c.fps,
                    depth=c.depth,
                    device=(camera_devices or {}).get(c.serial),
                    # A 50 Hz loop on 30 fps cameras: reuse a frame up to two camera
                    # periods old rather than wait for the next one every tick.
                    reuse_s=2.0 / c.fps,
                )
                cams.append(cam)
                opened.append(cam)
        hardware.cameras = tuple(cams)
        hardware.camera_names = tuple(c.name for c in cams)
        leaders: LeaderArms | None = None
        if config.leaders is not None:
            leader_arms: dict[str, DynamixelArmBus] = {}
            for side in ARM_SIDES:
                spec = config.leaders[side]
                leader_arms[side] = DynamixelArmBus(
                    f"leader_{side}",
                    spec.port,
                    cal.arm(spec.calibration_arm),
                    baud=spec.baud,
                    clock=clock,
                    gripper_current_ma=None,  # never powered: no current limit
                    **extra,
                )
                opened.append(leader_arms[side])
            leaders = LeaderArms(leader_arms)
        console = OperatorConsole(
            config.cell_id,
            config.tasks,
            console_source if console_source is not None else config.operator_input,
            stop=stop,
            can_take_over=leaders is not None,
        )
        opened.append(console)
        operator: Operator = (
            TeleopOperator(leaders, console.takeover)
            if leaders is not None
            else NoTakeover(hardware.read_joints)
        )
    except BaseException:
        for dev in reversed(opened):
            if isinstance(dev, DynamixelArmBus) and dev.torque_enabled:
                try:
                    dev.set_torque(False)
                except Exception:
                    log.exception("cell %s: torque off failed on %s", config.cell_id, dev.name)
            try:
                dev.close()
            except Exception:
                log.exception("cell %s: closing %r failed", config.cell_id, dev)
        raise
    log.info(
        "cell %s: real cell open (arms %s, leaders %s, cameras %s, %.0f Hz)",
        config.cell_id,
        ",".join(f"{s}@{config.followers[s].port}" for s in ARM_SIDES),
        "yes" if leaders is not None else "no",
        ",".join(c.name for c in config.cameras) or "none",
        config.control_hz,
    )
    return RealCell(
        hardware=hardware,
        scene=console,
        operator=operator,
        clock=clock,
        cell_id=config.cell_id,
        control_hz=config.control_hz,
        calibration=cal,
    )
