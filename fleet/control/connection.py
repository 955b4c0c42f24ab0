"""Where a running fleet is, for the commands that inspect and steer it.

`fleet up` writes `<run dir>/connection.json` once its pieces are up: the Redis URL (with
its password), the learner's address, the dashboard URL and operator token, the store. The
file holds secrets, so it is created 0600 (owner only) and written atomically. `fleet status`
and the rollout commands take `--run DIR` (or the file itself) instead of `--redis-url`.
"""

from __future__ import annotations

import argparse
import json
import os
import stat
from pathlib import Path
from typing import Any

CONNECTION_FILE = "connection.json"
#: A Redis URL with a password has no place on a command line (any local user can read argv):
#: `fleet up` hands it to the learner and the dashboard in this variable instead.
REDIS_URL_ENV = "FLEET_REDIS_URL"


def write_connection(run_dir: Path, **details: Any) -> Path:
    """Write `details` to `<run_dir>/connection.json`, readable by its owner only."""
    path = run_dir / CONNECTION_FILE
    tmp = path.with_name(f".{CONNECTION_FILE}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(details, f, indent=2)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o600)  # O_CREAT's mode only applies to a new file
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def read_connection(where: Path) -> dict[str, Any]:
    """The details `fleet up` wrote, from a run directory or the file itself. Refuses a file
    others can read: its password and token would be everyone's."""
    path = where / CONNECTION_FILE if where.is_dir() else where
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        raise ValueError(
            f"no {CONNECTION_FILE} at {path}: is that the run directory `fleet up` printed?"
        ) from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ValueError(f"{path} is readable by others (mode {oct(mode & 0o777)}); chmod 600 it")
    return json.loads(path.read_text())


def add_redis_arguments(p: argparse.ArgumentParser) -> None:
    """--redis-url URL or --run DIR: one of them names the fleet's Redis."""
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--redis-url", help="Redis holding the fleet registry")
    where.add_argument(
        "--run",
        type=Path,
        metavar="DIR",
        help=f"a `fleet up` run directory (or its {CONNECTION_FILE}): connect to that fleet",
    )


def redis_url(args: argparse.Namespace) -> str:
    """The Redis URL from --redis-url, or from the run directory's connection file."""
    if getattr(args, "redis_url", None):
        return str(args.redis_url)
    details = read_connection(Path(args.run))
    if not details.get("redis_url"):
        raise ValueError(f"{args.run}: the connection file names no redis_url")
    return str(details["redis_url"])


def redis_url_or_env(url: str | None) -> str:
    """`url` if given, else $FLEET_REDIS_URL; SystemExit naming both when neither is set."""
    found = url or os.environ.get(REDIS_URL_ENV)
    if not found:
        raise SystemExit(f"no Redis: give --redis-url URL or set {REDIS_URL_ENV}")
    return found
