"""`fleet rollout VERSION --shadow N|CELL,CELL`, then `fleet promote` (shadow -> canary ->
stable) and `fleet rollback` (ends a shadow run), driven through the `fleet` entry point
against a real Redis; every step lands in the event log with who did it and why."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import pytest
from rich.console import Console

from fleet.cli import main
from fleet.common.cell_counters import CellCounters
from fleet.control.registry import CellState, Registry
from fleet.control.status_view import render

CELLS = ("cell-0", "cell-1", "cell-2", "cell-3")


@pytest.fixture(autouse=True)
def wide_console(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", "250")  # rich folds tables to the terminal's width


@pytest.fixture
def url(redis_server: str) -> Iterator[str]:
    """A database of its own: the CLI uses the default key prefix."""
    db = redis_server.rsplit("/", 1)[0] + "/6"
    registry = Registry(db)
    registry.r.flushdb()
    for i, v in enumerate(("v1", "v2", "v3")):
        registry.add_version(
            json.dumps({"version_id": v, "sha256": "ab" * 32, "training_step": i}),
            f"/w/{v}",
            published_at=float(i + 1),
        )
    for cell_id in CELLS:
        registry.record_heartbeat(CellState(cell_id=cell_id, last_seen=time.time()))
    registry.set_stable("v1", actor="test", reason="base")
    registry.close()
    yield db
    Registry(db).r.flushdb()


@pytest.fixture
def registry_at(url: str) -> Iterator[Registry]:
    reg = Registry(url)
    yield reg
    reg.close()


def fleet(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out + out.err


def test_help_says_what_shadow_means(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as done:
        main(["rollout", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--shadow N|CELL,CELL" in text and "--canary" in text
    assert "never sent to the arms" in text and "keep acting with the stable version" in text
    with pytest.raises(SystemExit):
        main(["promote", "--help"])
    assert "shadow run becomes a canary" in " ".join(capsys.readouterr().out.split())


def test_shadow_then_promote_to_canary_then_to_stable(
    url: str, registry_at: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_at
    code, out = fleet(
        capsys, "rollout", "v2", "--shadow", "2", "--reason", "see v2 first", "--redis-url", url
    )
    assert code == 0, out
    assert "shadow" in out and "cell-0, cell-1" in out
    state = registry.rollout()
    assert (state.candidate, state.stage, state.candidate_cells) == (
        "v2",
        "shadow",
        ["cell-0", "cell-1"],
    )
    # Shadow cells keep acting with stable; they run v2 only beside it.
    assert set(registry.assignments(CELLS).values()) == {"v1"}
    assert registry.shadow_assignments(CELLS) == {
        "cell-0": "v2",
        "cell-1": "v2",
        "cell-2": None,
        "cell-3": None,
    }
    started = registry.events()[-1]
    assert (started.kind, started.reason, started.fields["stage"]) == (
        "shadow_start",
        "see v2 first",
        "shadow",
    )
    assert started.actor.endswith("(cli)") and started.fields["cells"] == "cell-0,cell-1"

    registry.record_shadow(
        version="v2", steps=100, dist_stable_sum=5.0, operator_steps=10, dist_operator_sum=2.0
    )
    code, out = fleet(capsys, "promote", "--reason", "shadow looks sane", "--redis-url", url)
    assert code == 0, out
    assert "from shadow to canary" in out and "cell-0, cell-1" in out
    state = registry.rollout()
    assert (state.candidate, state.stage, state.stable) == ("v2", "canary", "v1")
    assert state.canary_cells == state.candidate_cells == ["cell-0", "cell-1"]
    assert registry.assignments(CELLS) == {
        "cell-0": "v2",
        "cell-1": "v2",
        "cell-2": "v1",
        "cell-3": "v1",
    }
    assert set(registry.shadow_assignments(CELLS).values()) == {None}
    moved = registry.events()[-1]
    assert (moved.kind, moved.reason, moved.fields["stage"]) == (
        "shadow_to_canary",
        "shadow looks sane",
        "canary",
    )
    assert (
        moved.fields["shadow_steps"] == "100"
        and float(moved.fields["shadow_mean_dist_stable"]) == 0.05
    )

    code, out = fleet(capsys, "promote", "--reason", "canary fine", "--redis-url", url)
    assert code == 0 and "promoted v2 to stable" in out
    assert registry.rollout().stable == "v2"
    assert set(registry.assignments(CELLS).values()) == {"v2"}

    code, out = fleet(capsys, "events", "--redis-url", url)
    assert code == 0
    for kind in ("shadow_start", "shadow_to_canary", "promote"):
        assert kind in out


def test_shadow_on_named_cells_ends_with_rollback(
    url: str, registry_at: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_at
    code, out = fleet(capsys, "rollout", "v3", "--shadow", "cell-3, cell-1", "--redis-url", url)
    assert code == 0, out
    assert registry.rollout().candidate_cells == ["cell-1", "cell-3"]
    code, out = fleet(capsys, "versions", "--redis-url", url)
    assert "candidate (shadow: cell-1, cell-3)" in " ".join(out.split())

    code, out = fleet(capsys, "rollback", "--reason", "shadow run over", "--redis-url", url)
    assert code == 0 and "rolled back v3" in out
    state = registry.rollout()
    assert state.candidate is None and state.stable == "v1"
    assert set(registry.shadow_assignments(CELLS).values()) == {None}
    ended = registry.events()[-1]
    assert (ended.kind, ended.fields["version"], ended.fields["stage"], ended.reason) == (
        "rollback",
        "v3",
        "shadow",
        "shadow run over",
    )


def test_shadow_and_canary_exclude_each_other(url: str, capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--shadow", "1", "--canary", "1"], []):
        with pytest.raises(SystemExit) as done:
            main(["rollout", "v2", *args, "--redis-url", url])
        assert done.value.code == 2
        assert "--canary" in capsys.readouterr().err


def test_shadow_refusals(
    url: str, registry_at: Registry, capsys: pytest.CaptureFixture[str]
) -> None:
    registry = registry_at
    for version, spec, why in (
        ("v9", "1", "unknown version"),
        ("v1", "1", "stable already"),
        ("v2", "0", "at least one shadow cell"),
    ):
        code, out = fleet(capsys, "rollout", version, "--shadow", spec, "--redis-url", url)
        assert code == 1 and "refused" in out and why in " ".join(out.split()), out
    assert registry.rollout().candidate is None

    assert fleet(capsys, "rollout", "v2", "--canary", "cell-2", "--redis-url", url)[0] == 0
    code, out = fleet(capsys, "rollout", "v3", "--shadow", "1", "--redis-url", url)
    assert code == 1 and "already rolling out" in out
    # A candidate acting on canary cells does not go back to shadow (that is a rollback).
    code, out = fleet(capsys, "rollout", "v2", "--shadow", "1", "--redis-url", url)
    assert code == 1 and "already acts in stage canary" in " ".join(out.split())
    assert registry.rollout().stage == "canary"
    kinds = [e.kind for e in registry.events()]
    assert "shadow_start" not in kinds


def test_status_shows_shadow_version_faults_and_scores(registry: Registry) -> None:
    registry.record_heartbeat(
        CellState(
            cell_id="cell-9",
            counters=CellCounters(fault_count=3),
            version_running="v1",
            shadow_version="v2",
            last_fault="camera front timed out",
            last_seen=time.time(),
        )
    )
    registry.record_shadow(
        version="v2", steps=40, dist_stable_sum=4.0, operator_steps=0, dist_operator_sum=0.0
    )
    (cell,) = registry.cells()
    assert (cell.shadow_version, cell.counters.fault_count) == ("v2", 3)
    console = Console(width=250, record=True)
    console.print(render(registry))
    text = console.export_text()
    row = next(line for line in text.splitlines() if "cell-9" in line)
    assert "v2" in row and "3" in row and "camera front timed out" in row
    assert "shadow" in text and "recent fault" in text
    score_row = next(line for line in text.splitlines() if "0.1000" in line)
    assert "v2" in score_row and "40" in score_row
