"""Flags generated from a typed config: each field becomes the flag a person types, with its
type, default, choices and help, and the parsed flags come back as the model."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from fleet.common.config_cli import add_model_arguments, flag, parse_model


class _Example(BaseModel):
    cell_id: str = Field(description="this cell's id")
    rate_hz: float = Field(20.0, description="ticks a second", gt=0)
    count: int = 3
    out: Path | None = Field(None, description="where to write")
    mode: Literal["fast", "slow"] = Field("fast", description="how")
    dry_run: bool = Field(False, description="change nothing")
    extra: list[str] = flag(default_factory=list, help="KEY=VALUE pairs", metavar="KEY=VALUE")
    token: str = flag("", help="a secret", name="--secret")
    target: str | None = flag(None, help="what to act on", positional=True)
    internal: bool = flag(False, help="for our own children", hidden=True)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="example")
    add_model_arguments(p, _Example)
    return p


def test_defaults_and_types_come_from_the_model() -> None:
    got = parse_model(_parser(), _Example, ["--cell-id", "cell-01"])
    assert got == _Example(cell_id="cell-01")
    assert got.rate_hz == 20.0 and got.out is None and got.extra == [] and not got.dry_run
    argv = shlex.split(
        "thing --cell-id c --rate-hz 5 --count 7 --out o.json --mode slow --dry-run "
        "--extra a=1 b=2 --secret s --internal"
    )
    got = parse_model(_parser(), _Example, argv)
    assert got.target == "thing" and got.rate_hz == 5.0 and got.count == 7
    assert got.out == Path("o.json") and got.mode == "slow" and got.dry_run
    assert got.extra == ["a=1", "b=2"] and got.token == "s" and got.internal


@pytest.mark.parametrize(
    ("argv", "complaint"),
    [
        ([], "--cell-id"),  # required
        (["--cell-id", "c", "--count", "x"], "invalid int value"),
        (["--cell-id", "c", "--mode", "medium"], "invalid choice"),
        (["--cell-id", "c", "--rate-hz", "0"], "--rate-hz: Input should be greater than 0"),
    ],
)
def test_bad_flags_are_usage_errors_naming_the_flag(
    argv: list[str], complaint: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_model(_parser(), _Example, argv)
    assert stop.value.code == 2
    assert complaint in capsys.readouterr().err


def test_help_shows_descriptions_and_hides_hidden_flags() -> None:
    text = _parser().format_help()
    for shown in ("--cell-id", "this cell's id", "{fast,slow}", "KEY=VALUE", "--secret"):
        assert shown in text, shown
    assert "--internal" not in text and "--token" not in text


def test_a_bool_that_defaults_true_is_refused() -> None:
    class _Bad(BaseModel):
        on: bool = True

    with pytest.raises(TypeError, match="store_true"):
        add_model_arguments(argparse.ArgumentParser(), _Bad)
