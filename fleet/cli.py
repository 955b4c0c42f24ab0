"""The `fleet` command: run a simulated fleet, run each piece for a real lab, inspect state.

`fleet learner` and `fleet actor` hand over to the learner's and the actor's own entry
points in a fresh interpreter, so this module imports neither (a cell has no Ray). A cell
installs only `.[edge]`: `fleet --help`, `fleet actor`, `fleet calibrate` and `fleet doctor`
work there; the central commands say which extra they need instead of a traceback.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time

from rich.console import Console
from rich.live import Live

# What each central command imports that a cell's `.[edge]` install lacks.
_ROLLOUT = ("versions", "rollout", "promote", "rollback", "pin", "unpin", "events")
NEEDS_LEARNER: dict[str, tuple[str, ...]] = {
    "up": ("redis", "ray", "zarr"),
    "status": ("redis",),
    "dashboard": ("redis", "fastapi", "uvicorn"),
    "learner": ("redis", "ray", "zarr"),
    "export": ("zarr",),
    "episode": ("zarr",),
    **dict.fromkeys(_ROLLOUT, ("redis",)),
}

_HELP_ANYWHERE = frozenset(("status", "dashboard", *_ROLLOUT))  # their --help imports nothing


def _missing(modules: tuple[str, ...]) -> list[str]:
    missing = []
    for name in modules:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def _needs_learner(command: str) -> int | None:
    """Exit code 2 with a message when `command` needs the `.[learner]` extra that this
    install lacks; None when it can run."""
    missing = _missing(NEEDS_LEARNER.get(command, ()))
    if not missing:
        return None
    print(
        f"fleet {command} runs on the central machines and needs the learner extra "
        f"(missing here: {', '.join(missing)}). Install it with: pip install -e '.[learner]' "
        "(a cell's `.[edge]` install runs `fleet actor`, `fleet calibrate` and `fleet doctor`).",
        file=sys.stderr,
    )
    return 2


def _exec_module(module: str, argv: list[str]) -> int:
    os.execv(sys.executable, [sys.executable, "-m", module, *argv])
    return 0  # not reached


def cmd_status(args: argparse.Namespace) -> int:
    from fleet.control.connection import redis_url
    from fleet.control.registry import Registry
    from fleet.control.status_view import render

    try:
        url = redis_url(args)
    except ValueError as exc:
        print(f"fleet status: {exc}", file=sys.stderr)
        return 2
    registry = Registry(url)
    console = Console()
    if not args.watch:
        console.print(render(registry))
        return 0
    with Live(render(registry), console=console, refresh_per_second=1) as live:
        try:
            while True:
                time.sleep(1.0)
                live.update(render(registry))
        except KeyboardInterrupt:
            return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet", description="Fleet learning for dual-arm robot cells."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    up = sub.add_parser(
        "up",
        help="run a whole simulated fleet on this machine",
        description="Start Redis, the learner on Ray and N simulated cells.",
        add_help=not _missing(NEEDS_LEARNER["up"]),
    )
    if not _missing(NEEDS_LEARNER["up"]):  # else `fleet up` says which extra it needs
        from fleet.control.up import add_up_arguments

        add_up_arguments(up)

    status = sub.add_parser(
        "status",
        help="print the fleet's live state from Redis",
        description="Print cells, learner and success counts from Redis.",
    )
    from fleet.control.connection import add_redis_arguments

    add_redis_arguments(status)
    status.add_argument("--watch", action="store_true", help="keep refreshing")

    from fleet.control.dashboard.server import add_dashboard_arguments

    dashboard = sub.add_parser(
        "dashboard",
        help="serve the web dashboard (fleet, learning, rollout, episodes)",
        description="Serve the web dashboard over Redis and the episode store.",
    )
    add_dashboard_arguments(dashboard)

    from fleet.control.rollout_cli import add_rollout_commands

    add_rollout_commands(sub)  # versions, rollout, promote, rollback, pin, unpin, events

    sub.add_parser(
        "learner", help="run the central learner (see `fleet learner --help`)", add_help=False
    )
    sub.add_parser(
        "calibrate",
        help="calibrate a cell's arms into its file (see `fleet calibrate --help`)",
        add_help=False,
    )
    sub.add_parser(
        "actor", help="run a cell's edge actor (see `fleet actor --help`)", add_help=False
    )
    sub.add_parser(
        "eval",
        help="run a version on simulated cells on held-out scenes (see `fleet eval --help`)",
        add_help=False,
    )
    sub.add_parser(
        "doctor",
        help="check a real cell before its first run (see `fleet doctor --help`)",
        add_help=False,
    )
    sub.add_parser(
        "export",
        help="write stored episodes as a LeRobot v3 dataset (see `fleet export --help`)",
        add_help=False,
    )
    sub.add_parser(
        "episode",
        help="write one stored episode as a Rerun recording (see `fleet episode --help`)",
        add_help=False,
    )
    sub.add_parser(
        "store",
        help="episode store disk use and retention: du, gc (see `fleet store --help`)",
        add_help=False,
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    wants_help = "-h" in argv[1:] or "--help" in argv[1:]
    if argv and argv[0] in NEEDS_LEARNER and not (wants_help and argv[0] in _HELP_ANYWHERE):
        code = _needs_learner(argv[0])
        if code is not None:
            return code
    if argv and argv[0] == "learner":
        return _exec_module("learner.main", argv[1:])
    if argv and argv[0] == "actor":
        return _exec_module("actors.main", argv[1:])
    if argv and argv[0] == "eval":  # runs sim cells: drivers, actors
        return _exec_module("actors.evaluate", argv[1:])
    if argv and argv[0] == "doctor":
        return _exec_module("actors.doctor", argv[1:])
    if argv and argv[0] == "calibrate":
        return _exec_module("actors.calibrate", argv[1:])
    if argv and argv[0] == "export":  # the store is learner-side: zarr, pyarrow, av
        return _exec_module("learner.export", argv[1:])
    if argv and argv[0] == "episode":
        return _exec_module("learner.export", argv)
    if argv and argv[0] == "store":  # disk use and retention of the learner's store
        return _exec_module("learner.retention", argv[1:])
    args = build_parser().parse_args(argv)
    if args.command == "up":
        from fleet.common.config_cli import model_from_namespace
        from fleet.control.up import UpOptions, run_up

        return run_up(model_from_namespace(UpOptions, args))
    if args.command == "status":
        return cmd_status(args)
    if args.command == "dashboard":
        from fleet.common.config_cli import model_from_namespace
        from fleet.common.supervision import stop_with_supervisor
        from fleet.control.dashboard.server import DashboardOptions, run_dashboard

        stop_with_supervisor()  # under `fleet up`: its death is a SIGTERM here
        return run_dashboard(model_from_namespace(DashboardOptions, args))
    from fleet.control.rollout_cli import COMMANDS, run_rollout_command

    if args.command in COMMANDS:
        return run_rollout_command(args)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
