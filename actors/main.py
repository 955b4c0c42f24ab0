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

from actors.config import ActorConfig
from actors.edge import run_actor
from fleet.logs import setup_logging
from fleet.metrics import add_metrics_arguments
from fleet.supervision import stop_with_supervisor

log = logging.getLogger("actor")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet actor",
        description="Run a cell's edge actor: control loop, policy, trajectory upload.",
    )
    p.add_argument("--cell", required=True, help="this cell's id, e.g. cell-01")
    p.add_argument("--learner", required=True, help="learner gateway address host:port")
    p.add_argument(
        "--token",
        default="",
        help="this cell's credential, sent as call credentials over TLS (prefer --token-file)",
    )
    p.add_argument(
        "--token-file",
        type=Path,
        default=None,
        help="read the credential from this file instead (kept out of the process list)",
    )
    p.add_argument(
        "--tls-dir",
        type=Path,
        default=None,
        help="TLS to the learner: ca.pem, and <cell>.pem/<cell>.key for mutual TLS "
        "(default: plaintext)",
    )
    p.add_argument("--sim", action="store_true", help="drive the simulated cell")
    p.add_argument(
        "--cell-config",
        type=Path,
        default=None,
        help="drive a real cell described by this TOML file (ops/cell.example.toml); it "
        "sets the cell's arms, cameras, control rate, episode limit, tasks and JPEG quality "
        "(the sim-only and cell flags here are then ignored); --cell must match its cell.id",
    )
    p.add_argument("--seed", type=int, default=0, help="sim seed (episode layouts)")
    p.add_argument("--cameras", default="overhead,front", help="comma-separated camera names")
    p.add_argument("--height", type=int, default=96)
    p.add_argument("--width", type=int, default=128)
    p.add_argument(
        "--control-hz", type=float, default=20.0, help="sim only (a real cell: its config)"
    )
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
    p.add_argument(
        "--takeover-stall-s",
        type=float,
        default=0.0,
        help="sim only: the simulated operator also takes over when the task's progress has "
        "not improved for this many sim seconds (0 = never; DAgger-style corrections)",
    )
    p.add_argument(
        "--sim-backend",
        choices=["mujoco", "kinematic"],
        default="mujoco",
        help="sim only: mujoco = physics cell behind the real dynamixel_sdk and pyrealsense2 "
        "paths; kinematic = the light stand-in without SDKs (fast tests)",
    )
    p.add_argument(
        "--max-episode-s",
        type=float,
        default=None,
        help="sim only: episode time limit (default: 10 s mujoco, 8 s kinematic; a real "
        "cell: its config)",
    )
    p.add_argument(
        "--verify-key",
        type=Path,
        default=None,
        help="learner's Ed25519 public key (PEM); versions must carry its signature "
        "(required unless --allow-unsigned)",
    )
    p.add_argument(
        "--allow-unsigned",
        action="store_true",
        help="run versions without checking their signature (no --verify-key; tests only)",
    )
    p.add_argument(
        "--version-cache",
        type=Path,
        default=None,
        help="directory caching verified versions (default: ~/.cache/fleetlearn/<cell>/versions)",
    )
    p.add_argument(
        "--version-cache-mb", type=int, default=2048, help="bound on the version cache, MB"
    )
    p.add_argument(
        "--prefetch-mbps",
        type=float,
        default=25.0,
        help="bandwidth cap, MB/s, for fetching versions this cell may soon run ahead of "
        "time (the rollout's candidate), so a promotion is a swap; 0 = no prefetch, else >= 0.066",
    )
    p.add_argument(
        "--spool-dir",
        type=Path,
        default=None,
        help="durable spool of chunks not yet acked by the learner "
        "(default: ~/.local/share/fleetlearn/<cell>/spool; fleet up: <run>/spool/<cell>)",
    )
    p.add_argument("--spool-quota-mb", type=int, default=2048, help="disk quota of the spool, MB")
    p.add_argument(
        "--jpeg-quality",
        type=int,
        default=90,
        help="JPEG quality of uploaded frames, 1-100 (a real cell: its config)",
    )
    add_metrics_arguments(p)
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
    if args.verify_key is None and not args.allow_unsigned:
        log.error(
            "cell %s: no --verify-key; a cell runs only versions signed by the learner's key "
            "(--allow-unsigned runs unsigned ones, for tests only)",
            args.cell,
        )
        return 2
    from fleet.tls import TLSConfigError, use_client_tls

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
        )
        from fleet.metrics import serve_metrics

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
