"""`fleet actor`: one cell's edge actor until SIGINT/SIGTERM, then drain and report.

With --sim the cell is the simulated one from drivers/sim; the actor code is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path

from actors.config import ActorConfig
from actors.edge import run_actor
from fleet.logs import setup_logging

log = logging.getLogger("actor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet actor",
        description="Run a cell's edge actor: control loop, policy, trajectory upload.",
    )
    p.add_argument("--cell", required=True, help="this cell's id, e.g. cell-01")
    p.add_argument("--learner", required=True, help="learner gateway address host:port")
    p.add_argument("--token", default="", help="this cell's credential")
    p.add_argument("--sim", action="store_true", help="drive the simulated cell")
    p.add_argument("--seed", type=int, default=0, help="sim seed (episode layouts)")
    p.add_argument("--cameras", default="overhead,front", help="comma-separated camera names")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--control-hz", type=float, default=20.0)
    p.add_argument(
        "--realtime-factor",
        type=float,
        default=1.0,
        help="sim only: sim seconds per wall second (0 = as fast as possible)",
    )
    p.add_argument(
        "--takeover-prob",
        type=float,
        default=0.5,
        help="sim only: chance the simulated operator takes over an episode",
    )
    p.add_argument("--max-episode-s", type=float, default=8.0)
    p.add_argument(
        "--summary-json",
        type=Path,
        default=None,
        help="write the actor's final counts here on exit",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging()
    if not args.sim:
        log.error(
            "cell %s: only --sim cells are wired so far; real drivers arrive with the "
            "drivers issue",
            args.cell,
        )
        return 2
    from drivers.sim import make_sim_cell

    cameras = tuple(c for c in args.cameras.split(",") if c)
    cell = make_sim_cell(
        args.cell,
        seed=args.seed,
        cameras=cameras,
        height=args.height,
        width=args.width,
        control_hz=args.control_hz,
        realtime_factor=args.realtime_factor,
        takeover_prob=args.takeover_prob,
    )
    config = ActorConfig(
        cell_id=args.cell,
        learner_address=args.learner,
        token=args.token,
        control_hz=args.control_hz,
        max_episode_s=args.max_episode_s,
        seed=args.seed,
    )
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    summary = run_actor(config, cell, stop)
    if args.summary_json is not None:
        args.summary_json.parent.mkdir(parents=True, exist_ok=True)
        args.summary_json.write_text(json.dumps(summary, indent=2))
    log.info(
        "cell %s stopped: %d steps sent, %d episodes, versions %s",
        args.cell,
        summary.get("steps_sent", 0),
        summary.get("episodes", 0),
        summary.get("versions_adopted", []),
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
