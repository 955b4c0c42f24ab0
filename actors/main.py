"""`fleet actor`: one cell's edge actor until SIGINT/SIGTERM, then drain and report.

With --sim the cell is the simulated one from drivers/sim; with --cell-config it is a real
cell (actors/real_cell.py) described by a TOML file (ops/cell.example.toml). The actor
code is the same.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import threading
from pathlib import Path
from typing import Any

from actors.config import ActorConfig, ActorOptions
from actors.edge import run_actor
from fleet.common.config_cli import add_model_arguments, parse_model
from fleet.common.logs import setup_logging
from fleet.common.supervision import stop_with_supervisor

log = logging.getLogger("actor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet actor",
        description="Run a cell's edge actor: control loop, policy, trajectory upload.",
    )
    add_model_arguments(p, ActorOptions)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parse_model(build_parser(), ActorOptions, argv)
    setup_logging()
    if args.verify_key is None and not args.allow_unsigned:
        log.error(
            "cell %s: no --verify-key; a cell runs only versions signed by the learner's key "
            "(--allow-unsigned runs unsigned ones, for tests only)",
            args.cell,
        )
        return 2
    from fleet.common.tls import TLSConfigError, use_client_tls

    token = args.token_file.read_text().strip() if args.token_file else args.token
    try:  # the token becomes call credentials of every channel; never logged or spooled
        use_client_tls(args.tls_dir, args.cell, token)
    except TLSConfigError as exc:
        log.error("%s", exc)
        return 2
    real = None
    if args.cell_config is not None:
        from actors.cell_config import CellConfig, CellConfigError

        if args.sim:
            log.error("cell %s: give --sim or --cell-config, not both", args.cell)
            return 2
        try:
            real = CellConfig.load(args.cell_config)
        except CellConfigError as exc:
            log.error("cell %s: %s", args.cell, exc)
            return 2
        if real.cell_id != args.cell:
            log.error(
                "cell %s: %s is the config of cell %r; run it with --cell %s",
                args.cell,
                real.source,
                real.cell_id,
                real.cell_id,
            )
            return 2
    elif not args.sim:
        log.error(
            "cell %s: say which cell to drive: --sim (a simulated cell) or --cell-config PATH "
            "(a real cell from its TOML config, see ops/cell.example.toml)",
            args.cell,
        )
        return 2
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop_with_supervisor()  # under `fleet up`: its death is a SIGTERM here
    cameras = tuple(c for c in args.cameras.split(",") if c)
    cell_args = dict(
        seed=args.seed,
        cameras=cameras,
        height=args.height,
        width=args.width,
        control_hz=args.control_hz,
        realtime_factor=args.realtime_factor,
        takeover_prob=args.takeover_prob,
        takeover_stall_s=args.takeover_stall_s,
    )
    control_hz, jpeg_quality = args.control_hz, args.jpeg_quality
    realtime_priority = args.realtime_priority
    tasks: tuple[str, ...] = ()  # empty: the scene's own tasks (sim)
    if real is not None:
        from actors.real_cell import make_real_cell

        try:
            cell: Any = make_real_cell(real, stop=stop)  # the console's waits end on stop
        except Exception as exc:
            log.error("cell %s: could not open the real cell: %s", args.cell, exc)
            return 2
        max_episode_s = real.max_episode_s
        control_hz, jpeg_quality, tasks = real.control_hz, real.jpeg_quality, real.tasks
        realtime_priority = real.realtime_priority
    elif args.sim_backend == "mujoco":
        from drivers.sim.sdk_cell import make_sdk_sim_cell

        cell = make_sdk_sim_cell(args.cell, **cell_args)
        max_episode_s = 10.0
    else:
        from drivers.sim import make_sim_cell

        cell = make_sim_cell(args.cell, **cell_args)
        max_episode_s = 8.0
    if args.max_episode_s is not None and real is None:
        max_episode_s = args.max_episode_s
    # From here on the cell is open: whatever fails, it is closed (a real cell's torque off).
    try:
        config = ActorConfig(
            cell_id=args.cell,
            learner_address=args.learner,
            control_hz=control_hz,
            max_episode_s=max_episode_s,
            tasks=tasks,
            seed=args.seed,
            verify_key=str(args.verify_key) if args.verify_key else "",
            version_cache_dir=str(
                args.version_cache or Path.home() / ".cache" / "fleetlearn" / args.cell / "versions"
            ),
            version_cache_max_bytes=args.version_cache_mb << 20,
            prefetch_bytes_per_s=args.prefetch_mbps * 1e6,
            spool_dir=str(
                args.spool_dir
                or Path.home() / ".local" / "share" / "fleetlearn" / args.cell / "spool"
            ),
            spool_quota_bytes=args.spool_quota_mb << 20,
            jpeg_quality=jpeg_quality,
            realtime_priority=realtime_priority,
        )
        from fleet.common.metrics import serve_metrics

        metrics_server = serve_metrics(args.metrics_port, host=args.metrics_host)
        try:
            summary = run_actor(config, cell, stop)
        finally:
            if metrics_server is not None:
                metrics_server.stop()
    finally:
        if hasattr(cell, "close"):
            cell.close()  # torque off on a real cell; stops the simulated servo chains
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
