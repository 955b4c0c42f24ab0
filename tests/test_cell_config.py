"""A real cell's TOML config: the shipped example loads, and every mistake a person can make
in it is reported with the file, the key and what was expected."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from actors.cell_config import CellConfig, CellConfigError
from drivers.calibration import default_calibration

EXAMPLE = Path(__file__).resolve().parents[1] / "ops" / "cell.example.toml"

GOOD = """
[cell]
id = "cell-07"
[arms.followers.left]
port = "/dev/ttyA"
[arms.followers.right]
port = "/dev/ttyB"
baud = 3000000
[calibration]
file = "cal/calibration.json"
[cameras.overhead]
serial = "111"
[actor]
tasks = ["transfer_cube"]
control_hz = 25
"""

LEADERS = '[arms.leaders.left]\nport = "/dev/ttyC"\n[arms.leaders.right]\nport = "/dev/ttyD"\n'


def _write(tmp_path: Path, text: str, leaders: bool = False) -> Path:
    default_calibration("cell-07", leaders=leaders).save(tmp_path / "cal" / "calibration.json")
    path = tmp_path / "cell.toml"
    path.write_text(text)
    return path


def test_the_shipped_example_loads(tmp_path: Path) -> None:
    shutil.copy(EXAMPLE, tmp_path / "cell.toml")
    default_calibration("cell-01", leaders=True).save(tmp_path / "calibration.json")
    cfg = CellConfig.load(tmp_path / "cell.toml")
    assert cfg.cell_id == "cell-01"
    assert set(cfg.followers) == {"left", "right"}
    assert cfg.leaders is not None and cfg.leaders["left"].calibration_arm == "leader_left"
    assert [c.name for c in cfg.cameras] == ["overhead", "front", "left_wrist", "right_wrist"]
    assert cfg.calibration == tmp_path / "calibration.json"  # relative to the config file
    assert cfg.control_hz == 50.0 and cfg.tasks and 1 <= cfg.jpeg_quality <= 100


def test_a_minimal_config_gets_defaults(tmp_path: Path) -> None:
    cfg = CellConfig.load(_write(tmp_path, GOOD))
    assert cfg.followers["left"].baud == 1_000_000 and cfg.followers["right"].baud == 3_000_000
    assert cfg.leaders is None
    assert cfg.cameras[0].serial == "111" and cfg.cameras[0].width == 640
    assert cfg.control_hz == 25.0 and cfg.max_episode_s == 60.0
    assert cfg.operator_input == "stdin"


@pytest.mark.parametrize(
    ("old", "new", "key", "expected"),
    [
        ('id = "cell-07"\n', "", "cell.id", "is missing"),
        ('id = "cell-07"', "id = 7", "cell.id", "a non-empty string"),
        # ids the learner would refuse with every chunk fail at start-up instead
        ('id = "cell-07"', 'id = "../cell-07"', "cell.id", "starting with a letter or digit"),
        ("[cameras.overhead]", '[cameras."over head"]', "cameras.over head", "camera name"),
        ('port = "/dev/ttyA"\n', "", "arms.followers.left.port", "is missing"),
        ("[arms.followers.right]", "[arms.followers.middle]", "arms.followers.middle", "left"),
        ("baud = 3000000", "baud = 12345", "arms.followers.right.baud", "baud rate"),
        ('port = "/dev/ttyB"', 'port = "/dev/ttyA"', "arms.followers.right.port", "unique"),
        ("control_hz = 25", 'control_hz = "fast"', "actor.control_hz", "a number"),
        ("control_hz = 25", "control_hz = 0", "actor.control_hz", "1..500"),
        ('tasks = ["transfer_cube"]', "tasks = []", "actor.tasks", "at least one"),
        ('tasks = ["transfer_cube"]', "tasks = [1]", "actor.tasks", "task names"),
        ('serial = "111"', "serial = true", "cameras.overhead.serial", "serial number"),
        ('file = "cal/calibration.json"', 'file = "nope.json"', "calibration.file", "not a file"),
        ("[actor]", "[actor]\nspeed = 2", "actor.speed", "one of"),
        # types are exact: TOML's bool is no number, a float no integer
        ("control_hz = 25", "control_hz = true", "actor.control_hz", "a number"),
        ("control_hz = 25", "jpeg_quality = 90.5", "actor.jpeg_quality", "an integer in 1..100"),
        ("baud = 3000000", "baud = true", "arms.followers.right.baud", "baud rate"),
        ('serial = "111"', 'serial = "111"\nwidth = 8', "cameras.overhead.width", "16..4096"),
        ('serial = "111"', 'serial = "111"\ndepth = 1', "cameras.overhead.depth", "true or false"),
        ('serial = "111"\n', "", "cameras.overhead.serial", "serial number"),
        ('serial = "111"', 'serial = "111"\nzoom = 2', "cameras.overhead.zoom", "'serial'"),
        ('id = "cell-07"', 'id = "  "', "cell.id", "a non-empty string"),
        ('port = "/dev/ttyA"', 'port = ""', "arms.followers.left.port", "a non-empty string"),
        (
            'port = "/dev/ttyA"',
            'port = "/dev/ttyA"\nspeed = 1',
            "arms.followers.left.speed",
            "port",
        ),
        ('tasks = ["transfer_cube"]', 'tasks = ["a", ""]', "actor.tasks", "task names"),
        ('tasks = ["transfer_cube"]', 'tasks = "a"', "actor.tasks", "task names"),
        ("[actor]", '[operator]\ninput = ""\n[actor]', "operator.input", "a non-empty string"),
        ("[calibration]", "[calibration]\nfiles = 1", "calibration.files", "'file'"),
    ],
)
def test_each_mistake_names_its_key(
    tmp_path: Path, old: str, new: str, key: str, expected: str
) -> None:
    assert old in GOOD
    path = _write(tmp_path, GOOD.replace(old, new, 1))
    with pytest.raises(CellConfigError) as err:
        CellConfig.load(path)
    msg = str(err.value)
    assert str(path) in msg and repr(key) in msg and expected in msg, msg


def test_duplicate_camera_serial_and_leader_port_are_caught(tmp_path: Path) -> None:
    text = GOOD + '[cameras.front]\nserial = "111"\n'
    with pytest.raises(CellConfigError, match=r"cameras.front.serial.*unique"):
        CellConfig.load(_write(tmp_path, text))
    text = GOOD + LEADERS.replace("/dev/ttyD", "/dev/ttyB")
    with pytest.raises(CellConfigError, match=r"arms.leaders.right.port.*/dev/ttyB"):
        CellConfig.load(_write(tmp_path, text, leaders=True))


def test_an_arm_missing_from_the_calibration_is_named(tmp_path: Path) -> None:
    text = GOOD + LEADERS
    with pytest.raises(CellConfigError, match=r"arms.leaders.left.calibration_arm.*leader_left"):
        CellConfig.load(_write(tmp_path, text, leaders=False))


def test_bad_toml_and_missing_file_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CellConfigError, match=r"no such cell config"):
        CellConfig.load(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[cell\n")
    with pytest.raises(CellConfigError, match=r"not valid TOML"):
        CellConfig.load(bad)


def test_the_first_mistake_in_reading_order_is_named(tmp_path: Path) -> None:
    """With several mistakes the message names the one a person reading the file from the
    top meets first; a table's unknown key before its fields (a misspelled key is also a
    missing one)."""
    text = GOOD.replace("control_hz = 25", "control_hz = 0") + "[nothing]\n"
    with pytest.raises(CellConfigError, match=r"unknown key 'nothing'"):
        CellConfig.load(_write(tmp_path, text))
    text = GOOD.replace('port = "/dev/ttyA"', 'prot = "/dev/ttyA"').replace("id = ", "id = 7 #")
    with pytest.raises(CellConfigError, match=r"key 'cell.id' is 7"):
        CellConfig.load(_write(tmp_path, text))
    text = GOOD.replace('port = "/dev/ttyA"', 'prot = "/dev/ttyA"')
    with pytest.raises(CellConfigError, match=r"unknown key 'arms.followers.left.prot'"):
        CellConfig.load(_write(tmp_path, text))


def test_a_bare_number_serial_and_an_operator_fifo_are_read(tmp_path: Path) -> None:
    text = GOOD.replace('serial = "111"', "serial = 111") + '[operator]\ninput = "pedal"\n'
    cfg = CellConfig.load(_write(tmp_path, text))
    assert cfg.cameras[0].serial == "111"
    assert cfg.operator_input == str(tmp_path / "pedal")
