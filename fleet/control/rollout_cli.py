"""The `fleet` rollout commands: versions, rollout, promote, rollback, pin, unpin, events.

Kept apart from fleet/cli.py so the command tool stays a thin dispatcher; each command talks
to the registry through `fleet.control.rollout`, so the CLI, the dashboard and the automatic
controller change the rollout the same way and log the same events.
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import socket
from typing import Any

from rich.console import Console
from rich.table import Table

from fleet.control.connection import add_redis_arguments, redis_url

COMMANDS = ("versions", "rollout", "promote", "rollback", "pin", "unpin", "events")


def _who() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()} (cli)"


def _when(ts: float | None) -> str:
    if not ts:
        return "-"
    return dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


def add_rollout_commands(sub: Any) -> None:
    """Add the rollout subcommands to the `fleet` parser's subparsers."""

    def new(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_redis_arguments(p)
        return p

    new("versions", "list published versions, which is stable/candidate and their success")
    p = new(
        "rollout",
        "start a staged rollout of VERSION: on canary cells (--canary), or first in shadow "
        "(--shadow): shadow cells keep acting with the stable version and run VERSION beside "
        "it on the same observations; its actions are logged and scored against the executed "
        "ones (`fleet status`, dashboard), never sent to the arms. `fleet promote` then moves "
        "a shadow run to canary on the same cells; `fleet rollback` ends it",
    )
    p.add_argument("version")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument(
        "--canary", help="number of canary cells (live ones first), or comma-separated cell ids"
    )
    where.add_argument(
        "--shadow",
        metavar="N|CELL,CELL",
        help="run VERSION in shadow (infer beside stable, never act) on N cells (live ones "
        "first), or on comma-separated cell ids",
    )
    p.add_argument("--reason", default="started by an operator")
    p = new(
        "promote",
        "move the candidate on: a shadow run becomes a canary on its cells; a canary or "
        "fraction becomes stable on every cell",
    )
    p.add_argument("--reason", default="promoted by an operator")
    p = new("rollback", "drop the candidate (or end a shadow run): every cell returns to stable")
    p.add_argument("--reason", default="rolled back by an operator")
    p = new("pin", "pin CELL to VERSION (it ignores the rollout until unpinned)")
    p.add_argument("cell")
    p.add_argument("version")
    p = new("unpin", "return CELL to the rollout")
    p.add_argument("cell")
    p = new("events", "print the rollout event log (who did what, why, with which numbers)")
    p.add_argument("--count", type=int, default=50, help="newest N events")


def run_rollout_command(args: argparse.Namespace) -> int:
    from fleet.control import rollout
    from fleet.control.registry import Registry

    try:
        url = redis_url(args)
    except ValueError as exc:
        Console(stderr=True).print(f"fleet {args.command}: {exc}")
        return 2
    registry = Registry(url)
    console = Console()
    try:
        if args.command == "versions":
            console.print(_versions_table(registry))
        elif args.command == "rollout" and args.shadow is not None:
            cells = rollout.start_shadow(
                registry, args.version, _cells(args.shadow), actor=_who(), reason=args.reason
            )
            console.print(
                f"running {args.version} in shadow (never acting) on cells: {', '.join(cells)}"
            )
        elif args.command == "rollout":
            cells = rollout.start_rollout(
                registry, args.version, _cells(args.canary), actor=_who(), reason=args.reason
            )
            console.print(f"rolling out {args.version} on canary cells: {', '.join(cells)}")
        elif args.command == "promote":
            version = rollout.promote(registry, actor=_who(), reason=args.reason)
            state = registry.rollout()
            if state.candidate == version and state.stage == "canary":
                cells = ", ".join(state.candidate_cells)
                console.print(f"moved {version} from shadow to canary on cells: {cells}")
            else:
                console.print(f"promoted {version} to stable")
        elif args.command == "rollback":
            dropped = rollout.rollback(registry, actor=_who(), reason=args.reason)
            console.print(f"rolled back {dropped}" if dropped else "nothing was rolling out")
        elif args.command == "pin":
            rollout.pin(registry, args.cell, args.version, actor=_who())
            console.print(f"pinned {args.cell} to {args.version}")
        elif args.command == "unpin":
            rollout.unpin(registry, args.cell, actor=_who())
            console.print(f"unpinned {args.cell}")
        elif args.command == "events":
            console.print(_events_table(registry, args.count))
        else:
            return 2
    except (KeyError, ValueError, RuntimeError) as exc:
        console.print(f"[red]{args.command} refused:[/red] {exc}")
        return 1
    finally:
        registry.close()
    return 0


def _cells(spec: str) -> int | list[str]:
    """A --canary/--shadow value: a count of cells, or comma-separated cell ids."""
    spec = spec.strip()
    return int(spec) if spec.isdigit() else [c.strip() for c in spec.split(",") if c.strip()]


def _rate(n: int, episodes: int) -> str:
    return f"{n / episodes:.0%}" if episodes else "-"


def _versions_table(registry: Any) -> Table:
    state = registry.rollout()
    counts = registry.success_counts()
    rolled_back = registry.rolled_back()
    table = Table(title=f"versions (rollout mode {state.mode or '-'})")
    for column in ("version", "role", "published", "step", "episodes", "success", "autonomous"):
        table.add_column(column)
    table.add_column("eval (held-out scenes)")
    for v in registry.versions():
        vid = v.version_id
        if vid == state.stable:
            role = "stable"
        elif vid == state.candidate:
            role = f"candidate ({state.stage}: {', '.join(state.candidate_cells)})"
        elif vid in rolled_back:
            role = "rolled back"
        else:
            role = ""
        per_task = counts.get(vid, {})
        episodes = sum(c.episodes for c in per_task.values())
        successes = sum(c.successes for c in per_task.values())
        autonomous = sum(c.autonomous_successes for c in per_task.values())
        table.add_row(
            vid,
            role,
            _when(v.published_at),
            str(v.manifest.get("training_step", "")),
            str(episodes),
            _rate(successes, episodes),
            _rate(autonomous, episodes),
            _eval_cell(vid, v.evaluation),
        )
    pins = registry.pins()
    if pins:
        table.caption = "pins: " + ", ".join(f"{c}->{v}" for c, v in sorted(pins.items()))
    return table


def _eval_cell(version_id: str, summary: dict | None) -> str:
    """A version's newest `fleet eval` result: successes per task, backend, scenes."""
    if not summary:
        return "-"
    from fleet.common.evaluation import successes_by_task

    per_task = successes_by_task(summary, version_id)
    tasks = " ".join(f"{t} {s}/{n}" for t, (s, n) in sorted(per_task.items()))
    return f"{tasks} ({summary.get('backend', '?')})"


def _events_table(registry: Any, count: int) -> Table:
    table = Table(title="rollout events")
    for column in ("time", "kind", "actor", "version", "reason", "numbers"):
        table.add_column(column, overflow="fold")
    for e in registry.events(count):
        extra = {k: v for k, v in e.fields.items() if k != "version"}
        table.add_row(
            _when(e.ts),
            e.kind,
            e.actor,
            e.fields.get("version", ""),
            e.reason,
            " ".join(f"{k}={v}" for k, v in extra.items()),
        )
    return table
