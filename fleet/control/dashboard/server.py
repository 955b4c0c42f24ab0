"""`fleet dashboard`: serve the dashboard app with uvicorn."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from pydantic import BaseModel, Field

from fleet.common.config_cli import add_model_arguments
from fleet.control.connection import REDIS_URL_ENV, redis_url_or_env

log = logging.getLogger(__name__)

TOKEN_ENV = "FLEET_OPERATOR_TOKEN"


class DashboardOptions(BaseModel):
    """`fleet dashboard`'s flags (fleet/common/config_cli.py generates them)."""

    redis_url: str | None = Field(
        None, description=f"Redis holding the fleet registry (default: ${REDIS_URL_ENV})"
    )
    store: Path | None = Field(None, description="episode store directory (run dir's store/)")
    host: str = "127.0.0.1"
    port: int = 8080
    operator_token: str | None = Field(
        None,
        description=f"token that rollout actions must present (default: ${TOKEN_ENV}; "
        "without one, promote/rollback/pin are refused)",
    )
    sample_interval: float = Field(2.0, description="learning-curve sampling s")


def add_dashboard_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, DashboardOptions)


def run_dashboard(args: DashboardOptions) -> int:
    import uvicorn

    from fleet.common.logs import setup_logging
    from fleet.control.dashboard.app import create_app
    from fleet.control.registry import Registry

    setup_logging()
    token = args.operator_token or os.environ.get(TOKEN_ENV) or None
    app = create_app(
        Registry(redis_url_or_env(args.redis_url)),
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
