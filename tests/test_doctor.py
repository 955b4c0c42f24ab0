"""`fleet doctor` on simulated cells: a healthy one passes every check; each fault a new lab
meets (missing or duplicated servo IDs, wrong model, firmware or baud, a calibration of
other follower_chains, a camera missing or without the mode, a full disk, a refused token, a learner
down, a skewed clock) fails its own row with what to do.

Servos are ServoPeer chains on ptys behind the real dynamixel_sdk; cameras are the
RealSense SDK's software device; the learner is the real PolicyServicer over mutual TLS
with a real Redis registry.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from rich.console import Console

from actors.cell_config import CellConfig
from actors.doctor import FAIL, OK, Check, DoctorOptions, render, run_doctor
from drivers.calibration import default_calibration
from drivers.dynamixel import control_table as ct
from drivers.sim.rs_software import SoftwareRealSense
from fleet.common import tls
from fleet.common.net import free_port
from learner import policy_service
from learner.policy_service import PolicyServicer
from protos.fleetlearn.v1 import policy_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from make_certs import make_certs

CELL = "cell-d"
TOKEN = "tok-d"
ROOT = Path(__file__).resolve().parents[1]
SERIALS = {"overhead": "SIM-OVERHEAD", "front": "SIM-FRONT"}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    make_certs(out, ["127.0.0.1"], [CELL])
    return out


class SkewedServicer(PolicyServicer):
    """The real policy service, whose clock runs `skew_s` ahead of this machine's."""

    skew_s = 0.0

    def ReportHeartbeat(self, request, context):  # type: ignore[no-untyped-def]
        reply = super().ReportHeartbeat(request, context)
        return policy_pb2.HeartbeatReply(server_time=reply.server_time + self.skew_s)


@pytest.fixture
def learner(lab: Path, registry) -> Iterator[SkewedServicer]:
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    servicer = SkewedServicer(registry, tokens={CELL: TOKEN})
    policy_service.add_to_server(server, servicer)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(lab, True))
    server.start()
    servicer.address = f"127.0.0.1:{port}"  # type: ignore[attr-defined]
    try:
        yield servicer
    finally:
        servicer.stop()
        server.stop(0).wait(5)


@pytest.fixture
def cameras() -> dict[str, SoftwareRealSense]:
    return {name: SoftwareRealSense(serial, 320, 240, 30) for name, serial in SERIALS.items()}


def _config(tmp_path: Path, ports: dict[str, str], camera_modes: dict[str, str]) -> CellConfig:
    default_calibration(CELL).save(tmp_path / "cal.json")
    text = f'[cell]\nid = "{CELL}"\n[calibration]\nfile = "cal.json"\n'
    for side, port in ports.items():
        text += f'[arms.followers.{side}]\nport = "{port}"\n'
    for name, mode in camera_modes.items():
        text += f'[cameras.{name}]\nserial = "{SERIALS.get(name, name)}"\n{mode}\n'
    text += '[actor]\ncontrol_hz = 50\ntasks = ["transfer_cube"]\n'
    (tmp_path / "cell.toml").write_text(text)
    return CellConfig.load(tmp_path / "cell.toml")


MODE = "width = 320\nheight = 240\nfps = 30"


def _options(tmp_path: Path, server: SkewedServicer | None, lab: Path, **kw) -> DoctorOptions:
    base: dict = {
        "learner": server.address if server is not None else "",  # type: ignore[attr-defined]
        "token": TOKEN,
        "tls_dir": lab,
        "spool_dir": tmp_path / "spool",
        "spool_quota_mb": 16,
        "timeout_s": 5.0,
    }
    return DoctorOptions(**{**base, **kw})


def _table(rows: list[Check]) -> str:
    console = Console(record=True, width=200)
    console.print(render(CELL, rows))
    return console.export_text()


def _row(rows: list[Check], part: str, check: str) -> Check:
    found = [r for r in rows if r.part.startswith(part) and r.check == check]
    assert found, f"no row {part!r} / {check!r} in:\n{_table(rows)}"
    return found[0]


def test_healthy_cell_passes_every_check(tmp_path, follower_chains, cameras, learner, lab) -> None:
    ports = {s: p.port for s, p in follower_chains.items()}
    config = _config(tmp_path, ports, {"overhead": MODE, "front": MODE + "\ndepth = true"})
    rows = run_doctor(
        config,
        _options(tmp_path, learner, lab),
        camera_devices={c.serial: c.device for c in cameras.values()},
    )
    print(_table(rows))
    assert not [r for r in rows if r.status == FAIL], _table(rows)
    for side in ("left", "right"):
        for check in ("port opens", "servo IDs", "model", "firmware", "baud", "calibration"):
            assert _row(rows, f"arm {side}", check).status == OK
        # Factory servos wait 500 us; the actor writes 0 us at connect: a note, not a fault.
        assert "500 us" in _row(rows, f"arm {side}", "return delay").detail
    assert _row(rows, "camera front", "connected").status == OK
    assert [r.status for r in rows if r.part.startswith("camera front")].count(OK) == 3
    assert _row(rows, "spool", "disk free").status == OK
    assert _row(rows, "learner", "reachable").status == OK
    assert _row(rows, "learner", "clock offset").status == OK
    assert "ready for its first run" in _table(rows)
    # It only reads: no servo got torque or a setting from the doctor.
    assert follower_chains["left"].register(1, ct.TORQUE_ENABLE) == 0
    assert follower_chains["left"].register(1, ct.RETURN_DELAY_TIME) == 250


def test_broken_cell_names_each_fault_and_what_to_do(
    tmp_path, follower_chains, cameras, learner, lab
) -> None:
    left, right = follower_chains["left"], follower_chains["right"]
    left.set_fault(5, missing=True)
    left.set_fault(1, duplicate=True)  # a new servo still at factory ID 1
    right.set_register(3, ct.MODEL_NUMBER, 1190)  # an XL330: not an X-series arm servo
    right.set_register(4, ct.FIRMWARE_VERSION, 30)
    right.set_register(2, ct.BAUD_RATE, 1)  # 57600 in EEPROM (answers at 1M in the sim)
    right.move_shaft(2, 300)  # far outside the calibrated shoulder range
    ports = {s: p.port for s, p in follower_chains.items()}
    modes = {"overhead": "width = 320\nheight = 240\nfps = 60", "front": MODE}
    config = _config(tmp_path, ports, modes)
    rows = run_doctor(
        config,
        _options(tmp_path, learner, lab, token="wrong", spool_quota_mb=1 << 40),
        camera_devices={SERIALS["overhead"]: cameras["overhead"].device},  # front unplugged
    )
    table = _table(rows)
    print(table)
    ids = [r for r in rows if r.part.startswith("arm left") and r.check == "servo IDs"]
    assert all(r.status == FAIL for r in ids) and len(ids) == 2, table
    assert any("ID 5 does not answer" in r.detail for r in ids)
    assert any("ID 1 is answered by more than one servo" in r.detail for r in ids)
    assert "Dynamixel Wizard" in ids[0].detail
    model = _row(rows, "arm right", "model")
    assert model.status == FAIL and "ID 3 is model 1190" in model.detail
    firmware = _row(rows, "arm right", "firmware")
    assert firmware.status == FAIL and "ID 4 has firmware 30" in firmware.detail
    baud = _row(rows, "arm right", "baud")
    assert baud.status == FAIL and "ID 2 holds baud 57600" in baud.detail
    cal = _row(rows, "arm right", "calibration")
    assert (
        cal.status == FAIL and "shoulder (ID 2)" in cal.detail and "fleet calibrate" in cal.detail
    )
    mode = _row(rows, "camera overhead", "stream mode")
    assert mode.status == FAIL and "320x240@30" in mode.detail
    front = _row(rows, "camera front", "connected")
    assert front.status == FAIL and "SIM-FRONT" in front.detail
    assert _row(rows, "spool", "disk free").status == FAIL
    reach = _row(rows, "learner", "reachable")
    assert reach.status == FAIL and "UNAUTHENTICATED" in reach.detail and "token" in reach.detail
    assert "FAILED" in table


def test_missing_port_and_a_learner_that_is_down(tmp_path, follower_chains, lab) -> None:
    ports = {"left": follower_chains["left"].port, "right": str(tmp_path / "ttyUSB-gone")}
    config = _config(tmp_path, ports, {})
    opts = _options(tmp_path, None, lab, learner=f"127.0.0.1:{free_port()}", timeout_s=2.0)
    rows = run_doctor(config, opts)
    print(_table(rows))
    gone = _row(rows, "arm right", "port opens")
    assert gone.status == FAIL and "ttyUSB-gone" in gone.detail and "dialout" in gone.detail
    assert _row(rows, "arm left", "port opens").status == OK
    down = _row(rows, "learner", "reachable")
    assert down.status == FAIL and "fleet learner" in down.detail


def test_clock_offset_to_the_learner_is_measured(tmp_path, follower_chains, learner, lab) -> None:
    learner.skew_s = 5.0
    ports = {s: p.port for s, p in follower_chains.items()}
    started = time.time()
    rows = run_doctor(_config(tmp_path, ports, {}), _options(tmp_path, learner, lab))
    assert time.time() - started < 60
    clock = _row(rows, "learner", "clock offset")
    assert clock.status == FAIL and "NTP" in clock.detail
    assert clock.detail.startswith("+50") or clock.detail.startswith("+49"), clock.detail


def test_fleet_doctor_command_prints_the_table_and_exits_by_the_result(
    tmp_path, follower_chains
) -> None:
    ports = {s: p.port for s, p in follower_chains.items()}
    _config(tmp_path, ports, {})
    cmd = [
        sys.executable,
        "-m",
        "fleet.cli",
        "doctor",
        "--cell-config",
        str(tmp_path / "cell.toml"),
    ]
    args = ["--spool-dir", str(tmp_path / "spool"), "--spool-quota-mb", "1"]
    ok = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "ready for its first run" in ok.stdout and "not checked" in ok.stdout
    follower_chains["right"].set_fault(6, missing=True)
    bad = subprocess.run(cmd + args, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 1 and "ID 6 does not answer" in bad.stdout
    (tmp_path / "cell.toml").write_text("[cell]\n")
    broken = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert broken.returncode == 2 and "cell.id" in broken.stdout
