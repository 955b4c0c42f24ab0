"""`fleet calibrate`: record a cell's homing offsets and gripper travel into its file.

Runs on the cell computer, with the arms on their buses: torque goes off, the operator moves
each arm to its home pose and opens and closes each gripper when asked, and the result is
written to the cell's calibration file (applied at connect by every later run).
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from drivers.calibration import CalibrationStep, CellCalibration, calibrate, default_calibration
from drivers.dynamixel.arm_bus import DynamixelArmBus
from fleet.common.logs import setup_logging

log = logging.getLogger("calibrate")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet calibrate",
        description="Calibrate a cell's arms (home pose, gripper open/closed) into its file.",
    )
    p.add_argument("--cell", required=True, help="the cell's id")
    p.add_argument(
        "--port",
        action="append",
        required=True,
        metavar="ARM=DEVICE",
        help="an arm and its serial port, e.g. left=/dev/ttyUSB0 (repeat per arm;"
        " leader arms as leader_left=...)",
    )
    p.add_argument("--out", type=Path, required=True, help="the cell's calibration file")
    p.add_argument("--baud", type=int, default=1_000_000)
    return p


def _ports(pairs: list[str]) -> dict[str, str]:
    ports: dict[str, str] = {}
    for pair in pairs:
        arm, sep, device = pair.partition("=")
        if not sep or not arm or not device:
            raise SystemExit(f"--port wants ARM=DEVICE, got {pair!r}")
        ports[arm] = device
    return ports


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    ports = _ports(args.port)
    base = (
        CellCalibration.load(args.out)
        if args.out.exists()
        else default_calibration(args.cell, leaders=any(a.startswith("leader_") for a in ports))
    )
    buses = {
        arm: DynamixelArmBus(arm, device, base.arm(arm), baud=args.baud)
        for arm, device in ports.items()
    }

    def prompt(step: CalibrationStep) -> None:
        print(step.message + " [Enter]", flush=True)
        if not sys.stdin.readline():
            raise SystemExit("calibration cancelled: no more input")

    try:
        cal = calibrate(buses, prompt, args.out, args.cell)
    finally:
        for bus in buses.values():
            bus.close()
    print(f"cell {args.cell}: calibration of {', '.join(sorted(ports))} written to {args.out}")
    log.info("cell %s: arms %s calibrated", cal.cell_id, sorted(cal.arms))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
