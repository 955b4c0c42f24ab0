"""One logging format for every process of the fleet, so logs from cells and the learner line up."""

from __future__ import annotations

import logging
import os

FORMAT = "%(asctime)s %(levelname)s %(processName)s %(name)s: %(message)s"


def setup_logging(level: str | None = None) -> None:
    """Configure the root logger once per process (level from FLEET_LOG_LEVEL by default)."""
    chosen = (level or os.environ.get("FLEET_LOG_LEVEL", "INFO")).upper()
    root = logging.getLogger()
    if not root.handlers:
        logging.basicConfig(level=chosen, format=FORMAT)
    root.setLevel(chosen)
