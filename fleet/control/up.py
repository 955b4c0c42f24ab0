"""`fleet up`: a whole simulated fleet on one machine, then a clean stop.

Order matters for "not one step lost": cells stop first and drain until every recorded
step is acked durable, then the learner stops and reports what its store holds, then
Redis. Every child runs in its own process group so nothing (Ray included) outlives us.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field
from rich.console import Console
from rich.live import Live

from fleet.common.config_cli import add_model_arguments, flag
from fleet.common.net import free_port
from fleet.common.scenes import SimBackend
from fleet.common.supervision import supervised_env
from fleet.control.connection import REDIS_URL_ENV, write_connection
from fleet.control.redis_server import RedisServer
from fleet.control.registry import Registry
from fleet.control.status_view import render

log = logging.getLogger(__name__)

# The learner's first update waits this long at most for an episode of every task (the
# action scale; learner/trainer.py): a sim cell's round robin gives each one early.
UP_ACTION_SCALE_WAIT_S = 120.0

# Each sim backend's tasks (drivers/sim/mujoco/tasks.py, drivers/sim/tasks.py). Repeated
# here because fleet/ imports nothing from drivers/ (a control plane needs no driver stack);
# tests/test_cli.py checks they match.
SIM_TASKS = {
    "mujoco": ("handover_bar", "place_cube", "push_to_target"),
    "kinematic": ("pick_cube", "touch_target"),
}
SIM_CAMERAS = ("overhead", "front")
# The model each backend's fleet trains by default (fleet/common/policy/config.py PRESETS):
# the kinematic stand-in's flat frames need no more than tiny; the MuJoCo cells' small
# objects need small (README "How well it learns").
SIM_PRESETS = {"mujoco": "small", "kinematic": "tiny"}
# How each backend's fleet learns by default (README "How well it learns"): on the MuJoCo
# cells the operators give 100 demonstrations a task (about 9 minutes on two cells) before
# the first version, and chunk targets past a successful episode's end hold its last
# action. With both, the last version of a 60-minute run solved 50 / 40 / 44 of 50 held-out
# scenes (handover_bar / place_cube / push_to_target), against 36 / 17 / 21 without either.
# The kinematic stand-in learns without them (unmeasured with them), so its first version
# comes within a minute.
SIM_FIRST_VERSION_DEMOS = {"mujoco": 100, "kinematic": 0}
SIM_AFTER_SUCCESS = {"mujoco": "hold", "kinematic": "mask"}


class UpOptions(BaseModel):
    """`fleet up`'s flags (fleet/common/config_cli.py generates them)."""

    cells: int = Field(2, description="number of simulated cells")
    duration: float | None = Field(
        None, description="stop after this many seconds (default: run until Ctrl-C)"
    )
    summary_json: Path | None = Field(None, description="write the run's counts here at the end")
    rollout: Literal["auto", "immediate", "manual"] = Field(
        "auto",
        description="auto: canary cells, then a fraction, then the fleet, rolled back when "
        "credibly worse; immediate: every cell takes each new version as it is published; "
        "manual: versions are registered and nothing moves until an operator acts",
    )
    sim_gate: int = flag(
        0,
        "auto rollout: each new version must pass `fleet eval` against stable on N held-out "
        "scenes a task (sim backend of the cells) before its canary (0 = off)",
        metavar="N",
    )
    redis_url: str | None = Field(
        None, description="use this Redis instead of starting a private one"
    )
    data_dir: Path | None = Field(None, description="run directory (default: var/runs/<timestamp>)")
    publish_every: int = Field(150, description="publish a new version every N trainer updates")
    min_steps: int = Field(200, description="stored steps before training starts")
    preset: str | None = Field(
        None, description="model preset (default: small on MuJoCo cells, tiny on kinematic)"
    )
    lr: float | None = Field(None, description="learning rate (default: fleet learner's)")
    batch_size: int | None = Field(
        None, description="samples per update (default: fleet learner's)"
    )
    policy_set: list[str] = flag(
        default_factory=list,
        help="model settings over the preset's (fleet learner --policy-set)",
        metavar="KEY=VALUE",
    )
    task_weight: list[str] = flag(
        default_factory=list,
        help="each task's share of a batch (fleet learner --task-weight)",
        metavar="TASK=WEIGHT",
    )
    after_success: Literal["hold", "mask"] | None = Field(
        None,
        description="chunk targets past a successful episode's end: hold its last action "
        "(fleet learner --hold-after-success) or mask them (default: hold on MuJoCo cells, "
        "mask on kinematic)",
    )
    first_version_demos: int | None = flag(
        None,
        "fleet learner --first-version-demos: the operators demonstrate N episodes of every "
        "task before the first version; 0: the first version after --publish-every updates "
        "(default: 100 on MuJoCo cells, 0 on kinematic)",
        metavar="N",
        ge=0,
    )
    realtime_factor: float = Field(1.0, description="sim seconds per wall second in each cell")
    drain_timeout: float = Field(
        60.0, description="seconds a stopping cell may take to get its last steps acked"
    )
    sim_backend: SimBackend = Field(  # the keys of SIM_TASKS
        "mujoco",
        description="mujoco: physics cells behind dynamixel_sdk and pyrealsense2 (default); "
        "kinematic: the light stand-in without SDKs",
    )
    takeover_prob: float = Field(
        0.5, description="chance a sim cell's operator takes over an episode at a random moment"
    )
    takeover_stall_s: float = Field(
        0.0,
        description="a sim cell's operator also takes over when the task has made no progress "
        "for this many sim seconds (0 = never)",
    )
    no_live: bool = Field(False, description="print no live table")
    dashboard_port: int = Field(
        0, description="web dashboard port (0: a free port; -1: no dashboard)"
    )
    insecure: bool = Field(
        False,
        description="plaintext gRPC without tokens (default: mutual TLS and a token per cell)",
    )


def add_up_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p, UpOptions)


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float) -> None:
        """SIGTERM, wait, then SIGKILL the whole process group (Ray workers included)."""
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop within %.0f s; killing it", self.name, timeout_s)
        self.kill_group()

    def kill_group(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            log.error("%s (pid %d) survived SIGKILL", self.name, self.proc.pid)


@dataclass
class _Fleet:
    run_dir: Path
    children: list[_Child] = field(default_factory=list)

    def spawn(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> _Child:
        """Start `argv` logging to logs/<name>.log; `env` adds variables (secrets go here,
        never in argv)."""
        log_path = self.run_dir / "logs" / f"{name}.log"
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                # the child stops if fleet up dies (fleet/common/supervision.py)
                env={**supervised_env(), **(env or {})},
            )
        child = _Child(name, proc, log_path)
        self.children.append(child)
        return child


def _wait_learner_ready(registry: Registry, learner: _Child, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not learner.alive():
            raise RuntimeError(f"the learner exited during start-up; see {learner.log_path}")
        if registry.learner_stats().get("state") == "ready":
            return
        time.sleep(0.25)
    raise RuntimeError(f"the learner was not ready after {timeout_s:.0f} s; see {learner.log_path}")


def _summary(registry: Registry, cell_files: dict[str, Path]) -> dict[str, Any]:
    cells: dict[str, Any] = {}
    for cell_id, path in cell_files.items():
        data = json.loads(path.read_text()) if path.exists() else {}
        cells[cell_id] = {
            "steps_sent": int(data.get("steps_sent", 0)),
            "episodes": int(data.get("episodes", 0)),
            # cut short by a stop or a fault; still stored (as far as they got)
            "episodes_aborted": int(data.get("episodes_aborted", 0)),
            "faults": data.get("faults", []),
            "versions_adopted": list(data.get("versions_adopted", [])),
            "adoptions": list(data.get("adoptions", [])),
            "dropped": int(data.get("dropped", 0)),
            "summary_written": path.exists(),
        }
    stats = registry.learner_stats()
    versions = registry.versions()
    return {
        "cells": cells,
        "store": {
            "steps": int(float(stats.get("store_steps", -1))),
            "episodes": int(float(stats.get("store_episodes", -1))),
        },
        "versions_published": [v.version_id for v in versions],
        "published_at": {v.version_id: v.published_at for v in versions},
        "updates": int(float(stats.get("updates", 0))),
        "learner_state": stats.get("state", ""),
    }


def run_up(args: UpOptions) -> int:
    from fleet.common.logs import setup_logging

    setup_logging()
    console = Console()
    run_dir: Path = (args.data_dir or Path("var/runs") / time.strftime("%Y%m%d-%H%M%S")).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    fleet = _Fleet(run_dir)
    redis: RedisServer | None = None
    interrupted = False

    def on_sigterm(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_sigterm)
    cell_files = {
        f"cell-{i:02d}": run_dir / "cells" / f"cell-{i:02d}.json" for i in range(1, args.cells + 1)
    }
    learner: _Child | None = None
    cells: list[_Child] = []
    dashboard: _Child | None = None
    summary: dict[str, Any] | None = None
    try:
        if args.redis_url:
            url = args.redis_url
        else:
            redis = RedisServer(port=free_port(), password=secrets.token_hex(16)).start()
            url = redis.url
        registry = Registry(url)
        port = free_port()
        console.print(f"fleet up: run directory {run_dir}, learner on 127.0.0.1:{port}")
        signing_key, verify_key = _signing_keys(run_dir)
        learner_security, cell_security = _transport_security(
            run_dir, list(cell_files), insecure=args.insecure
        )
        metrics_ports = {name: free_port() for name in ["learner", *cell_files]}
        write_prometheus_targets(run_dir, metrics_ports)
        learner = fleet.spawn(
            "learner",
            [
                sys.executable,
                "-m",
                "learner.main",
                "--data-dir",
                str(run_dir),
                "--port",
                str(port),
                "--tasks",
                ",".join(SIM_TASKS[args.sim_backend]),
                "--cameras",
                ",".join(SIM_CAMERAS),
                "--preset",
                args.preset or SIM_PRESETS[args.sim_backend],
                *(["--policy-set", *args.policy_set] if args.policy_set else []),
                *(["--task-weight", *args.task_weight] if args.task_weight else []),
                *(
                    ["--hold-after-success"]
                    if (args.after_success or SIM_AFTER_SUCCESS[args.sim_backend]) == "hold"
                    else []
                ),
                "--first-version-demos",
                str(
                    SIM_FIRST_VERSION_DEMOS[args.sim_backend]
                    if args.first_version_demos is None
                    else args.first_version_demos
                ),
                *(["--lr", str(args.lr)] if args.lr is not None else []),
                *(["--batch-size", str(args.batch_size)] if args.batch_size is not None else []),
                "--publish-every",
                str(args.publish_every),
                "--min-steps",
                str(args.min_steps),
                # Its cells play every task in turn: the first round gives each an episode.
                "--action-scale-wait-s",
                str(UP_ACTION_SCALE_WAIT_S),
                "--rollout",
                args.rollout,
                "--sim-gate",
                str(args.sim_gate),
                "--sim-gate-backend",
                args.sim_backend,
                "--signing-key",
                str(signing_key),
                "--metrics-port",
                str(metrics_ports["learner"]),
                "--metrics-host",
                "127.0.0.1",
                *learner_security,
            ],
            env={REDIS_URL_ENV: url},
        )
        _wait_learner_ready(registry, learner, timeout_s=180)
        dashboard_url, token = "", ""
        if args.dashboard_port >= 0:
            dashboard, dashboard_url, token = _start_dashboard(
                fleet, console, url, run_dir, args.dashboard_port
            )
        connection = write_connection(
            run_dir,
            redis_url=url,
            learner=f"127.0.0.1:{port}",
            dashboard_url=dashboard_url,
            operator_token=token,
            store=str(run_dir / "store"),
            rollout=args.rollout,
        )
        console.print(
            f"fleet up: connection details (Redis URL with its password, operator token) in "
            f"{connection} (owner-only); e.g. fleet status --run {run_dir}"
        )
        for i, (cell_id, path) in enumerate(cell_files.items(), start=1):
            cells.append(
                fleet.spawn(
                    cell_id,
                    [
                        sys.executable,
                        "-m",
                        "actors.main",
                        "--cell",
                        cell_id,
                        "--sim",
                        "--sim-backend",
                        args.sim_backend,
                        "--takeover-prob",
                        str(args.takeover_prob),
                        "--takeover-stall-s",
                        str(args.takeover_stall_s),
                        "--learner",
                        f"127.0.0.1:{port}",
                        "--seed",
                        str(i),
                        "--cameras",
                        ",".join(SIM_CAMERAS),
                        "--realtime-factor",
                        str(args.realtime_factor),
                        "--summary-json",
                        str(path),
                        "--verify-key",
                        str(verify_key),
                        "--version-cache",
                        str(run_dir / "cells" / cell_id / "versions"),
                        "--spool-dir",
                        str(run_dir / "spool" / cell_id),
                        "--metrics-port",
                        str(metrics_ports[cell_id]),
                        "--metrics-host",
                        "127.0.0.1",
                        *cell_security[cell_id],
                    ],
                )
            )
        deadline = None if args.duration is None else time.monotonic() + args.duration
        with Live(
            render(registry),
            console=console,
            refresh_per_second=1,
            transient=False,
            auto_refresh=False,
        ) as live:
            while deadline is None or time.monotonic() < deadline:
                time.sleep(1.0)
                dead = [c.name for c in [learner, *cells] if not c.alive()]
                if dead:
                    raise RuntimeError(f"{', '.join(dead)} exited early; see {run_dir}/logs")
                if not args.no_live:
                    live.update(render(registry), refresh=True)
    except KeyboardInterrupt:
        interrupted = True
        console.print("fleet up: stopping (Ctrl-C)")
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        console.print("fleet up: stopping cells (draining their last steps)")
        for c in cells:
            if c.alive():
                c.proc.send_signal(signal.SIGTERM)
        for c in cells:
            c.stop(args.drain_timeout)
        if learner is not None:
            console.print("fleet up: stopping the learner")
            learner.stop(60.0)
        if dashboard is not None:
            dashboard.stop(10.0)
        try:
            if learner is not None and redis_alive(redis, args.redis_url):
                summary = _summary(Registry(redis.url if redis else args.redis_url), cell_files)
        finally:
            if redis is not None:
                redis.stop()
    if summary is not None:
        if args.summary_json is not None:
            args.summary_json.parent.mkdir(parents=True, exist_ok=True)
            args.summary_json.write_text(json.dumps(summary, indent=2))
        sent = sum(c["steps_sent"] for c in summary["cells"].values())
        console.print(
            f"fleet up: {len(summary['versions_published'])} versions published, "
            f"{summary['updates']} updates; cells sent {sent} steps, "
            f"store holds {summary['store']['steps']} steps in "
            f"{summary['store']['episodes']} episodes"
        )
    return 130 if interrupted and args.duration is None else 0


def write_prometheus_targets(run_dir: Path, ports: dict[str, int]) -> Path:
    """Prometheus file_sd targets for this run (ops/prometheus/prometheus.yml reads them)."""
    groups = [
        {
            "targets": [f"127.0.0.1:{port}"],
            # the cell label comes with the edge's own samples; a target label would clash
            "labels": {"role": "learner" if name == "learner" else "edge"},
        }
        for name, port in ports.items()
    ]
    path = run_dir / "prometheus" / "targets.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(groups, indent=2))
    return path


def _signing_keys(run_dir: Path) -> tuple[Path, Path]:
    """The run's policy signing key pair (made once per run directory): the learner signs
    every version with the private key, each cell checks with the public one."""
    from fleet.common.signing import PRIVATE_KEY_NAME, PUBLIC_KEY_NAME, write_key_pair

    keys = run_dir / "keys"
    private, public = keys / PRIVATE_KEY_NAME, keys / PUBLIC_KEY_NAME
    if not (private.exists() and public.exists()):
        private, public = write_key_pair(keys)
    return private, public


def _transport_security(
    run_dir: Path, cells: list[str], *, insecure: bool
) -> tuple[list[str], dict[str, list[str]]]:
    """The learner's and each cell's TLS/token arguments: a lab CA, a learner certificate
    and one client certificate per cell (ops/make_certs.py) plus a random token per cell,
    all kept in the run directory (0700). `insecure` gives plaintext without tokens."""
    if insecure:
        return ["--insecure"], {cell: [] for cell in cells}
    tls_dir = run_dir / "tls"
    make_certs = Path(__file__).resolve().parents[2] / "ops" / "make_certs.py"
    subprocess.run(
        [
            sys.executable,
            str(make_certs),
            "--out",
            str(tls_dir),
            "--learner-host",
            "127.0.0.1",
            "--cells",
            ",".join(cells),
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    tokens_file = tls_dir / "tokens.json"
    tokens = {cell: secrets.token_urlsafe(24) for cell in cells}
    fd = os.open(tokens_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(tokens, f)
    learner = ["--tls-dir", str(tls_dir), "--mtls", "--tokens-file", str(tokens_file)]
    per_cell = {}
    for cell, token in tokens.items():
        # A file, not --token: argv is readable by every user of the machine.
        fd = os.open(tls_dir / f"{cell}.token", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)
        per_cell[cell] = ["--tls-dir", str(tls_dir), "--token-file", str(tls_dir / f"{cell}.token")]
    return learner, per_cell


def _start_dashboard(
    fleet: _Fleet, console: Console, redis_url: str, run_dir: Path, port: int
) -> tuple[_Child, str, str]:
    """The web dashboard as a child process, its URL and operator token; the token goes
    through the environment (not argv, which other local users can read) and is printed
    once."""
    from fleet.control.dashboard.server import TOKEN_ENV

    port = port or free_port()
    token = os.environ.get(TOKEN_ENV) or secrets.token_urlsafe(16)
    os.environ[TOKEN_ENV] = token
    child = fleet.spawn(
        "dashboard",
        [
            sys.executable,
            "-m",
            "fleet.cli",
            "dashboard",
            "--store",
            str(run_dir / "store"),
            "--port",
            str(port),
        ],
        env={REDIS_URL_ENV: redis_url},
    )
    url = f"http://127.0.0.1:{port}/"
    console.print(f"fleet up: dashboard on {url} (operator token {token})")
    return child, url, token


def redis_alive(redis: RedisServer | None, url: str | None) -> bool:
    """True when the registry's Redis still answers (the summary is read from it)."""
    try:
        return Registry(redis.url if redis else str(url)).ping()
    except Exception:
        return False
