"""The systemd units in ops/systemd stay true to the commands they start: every flag they
pass exists on that command, and each unit restarts as its README promises."""

from __future__ import annotations

import argparse
import configparser
import re
from pathlib import Path

import pytest

UNITS = Path(__file__).resolve().parents[1] / "ops" / "systemd"


def _unit(name: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    text = (UNITS / name).read_text().replace("\\\n", " ")
    parser.read_string(text)
    return parser


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for action in parser._actions for s in action.option_strings}


def _learner_parser() -> argparse.ArgumentParser:
    from learner.main import build_parser

    return build_parser()


def _actor_parser() -> argparse.ArgumentParser:
    from actors.main import build_parser

    return build_parser()


def _dashboard_parser() -> argparse.ArgumentParser:
    from fleet.control.dashboard.server import add_dashboard_arguments

    p = argparse.ArgumentParser()
    add_dashboard_arguments(p)
    return p


@pytest.mark.parametrize(
    ("unit", "command", "parser", "restart"),
    [
        ("fleet-actor@.service", "actor", _actor_parser, "on-failure"),
        ("fleet-learner.service", "learner", _learner_parser, "always"),
        ("fleet-dashboard.service", "dashboard", _dashboard_parser, "always"),
    ],
)
def test_unit_runs_its_command_with_flags_it_has(unit, command, parser, restart) -> None:
    service = _unit(unit)["Service"]
    exec_start = service["ExecStart"]
    assert f"/.venv/bin/fleet {command} " in exec_start
    used = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", exec_start))
    unknown = used - _flags(parser())
    assert not unknown, f"{unit} passes flags `fleet {command}` lacks: {sorted(unknown)}"
    assert service["Restart"] == restart
    assert float(service["RestartSec"]) > 0
    assert _unit(unit)["Install"]["WantedBy"] == "multi-user.target"


def test_actor_unit_makes_the_console_pipe_the_config_names() -> None:
    service = _unit("fleet-actor@.service")["Service"]
    assert (
        "mkfifo" in service["ExecStartPre"]
        and "/run/fleetlearn/%i/console" in (service["ExecStartPre"])
    )
    assert service["RuntimeDirectory"] == "fleetlearn/%i"
    assert service["RuntimeDirectoryPreserve"] == "yes"
    assert "dialout" in service["SupplementaryGroups"]  # the servo buses' serial ports
    assert "--token-file" in service["ExecStart"] and "--token " not in service["ExecStart"]
