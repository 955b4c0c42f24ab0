"""`fleet dashboard`: serve the dashboard app with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TOKEN_ENV = "FLEET_OPERATOR_TOKEN"


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--redis-url", required=True)
    p.add_argument(
        "--store", type=Path, default=None, help="episode store directory (run dir's store/)"
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument(
        "--operator-token",
        default=None,
        help=f"token that rollout actions must present (default: ${TOKEN_ENV}; "
        "without one, promote/rollback/pin are refused)",
    )
    p.add_argument("--sample-interval", type=float, default=2.0, help="learning-curve sampling s")


def run_dashboard(args: argparse.Namespace) -> int:
    import uvicorn

    from fleet.dashboard.app import create_app
    from fleet.logs import setup_logging
    from fleet.registry import Registry

    setup_logging()
    token = args.operator_token or os.environ.get(TOKEN_ENV) or None
    app = create_app(
        Registry(args.redis_url),
        args.store,
        operator_token=token,
        sample_interval_s=args.sample_interval,
    )
    log.info(
        "dashboard on http://%s:%d (store %s, operator actions %s)",
        args.host,
        args.port,
        args.store or "none",
        "enabled" if token else "disabled",
    )
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
