"""A small fleet world for the dashboard tests: real Redis state written through the
registry (heartbeats, versions, outcomes, learner stats, events) and a real episode store
filled by the sim cell's scripted expert."""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import uvicorn

from fleet.common.cell_counters import CellCounters
from fleet.common.net import free_port
from fleet.control.registry import CellState, Registry
from fleet.control.rollout import start_rollout
from learner.store import EpisodeStore
from tests.expert_episodes import record_expert_episodes

TOKEN = "let-me-operate"
VERSIONS = ("v0001", "v0002", "v0003")


@dataclass
class World:
    registry: Registry
    store_root: Path
    episodes: int


def build_world(registry: Registry, root: Path) -> World:
    """Three versions (v0002 stable, v0003 candidate), two live cells and one stale, outcome
    counters, learner stats and episodes of both sim tasks in the store."""
    store = EpisodeStore(root)
    record_expert_episodes(store, task="pick_cube", episodes=2, cell_id="cell-01", seed=1)
    record_expert_episodes(
        store, task="touch_target", episodes=1, cell_id="cell-02", seed=2, max_steps=60
    )
    for i, vid in enumerate(VERSIONS):
        registry.add_version(
            json.dumps({"version_id": vid, "parent": VERSIONS[i - 1] if i else "", "step": i}),
            f"/tmp/{vid}.safetensors",
            published_at=time.time() - 100 + i,
        )
    registry.set_stable("v0002", actor="test", reason="world")
    registry.record_heartbeat(
        CellState(
            cell_id="cell-01",
            counters=CellCounters(
                episodes=7,
                successes=5,
                interventions=3,
                loop_hz=49.8,
                steps_recorded=900,
                steps_acked=880,
                spool_bytes=3_500_000,
                spool_chunks=2,
            ),
            version_running="v0002",
            task="pick_cube",
            last_seen=time.time(),
        )
    )
    registry.record_heartbeat(
        CellState(
            cell_id="cell-02",
            counters=CellCounters(episodes=4, successes=1, loop_hz=50.1),
            version_running="v0003",
            task="touch_target",
            last_fault="signature check failed for v0004",
            last_seen=time.time(),
        )
    )
    short = Registry.from_client(registry.r, prefix=registry.prefix, heartbeat_ttl_s=0.05)
    short.record_heartbeat(
        CellState(
            cell_id="cell-03",
            counters=CellCounters(loop_hz=12.0),
            version_running="v0001",
            task="pick_cube",
            last_seen=time.time() - 30,
        )
    )
    for version, task, ok in (
        ("v0002", "pick_cube", True),
        ("v0002", "pick_cube", False),
        ("v0003", "touch_target", True),
    ):
        registry.record_episode(
            cell_id="cell-01",
            version=version,
            task=task,
            success=ok,
            steps=100,
            intervention_steps=4,
        )
    registry.set_learner_stats(
        state="ready",
        updates=321,
        loss=0.0421,
        updates_per_s=6.5,
        replay_ratio=2.25,
        latest_version="v0003",
        episodes_without_cameras=7,
        steps_out_of_range=4321,
    )
    registry.add_store_totals(steps=1000, episodes=3)
    registry.log_event(
        "rollback",
        actor="rollout-controller",
        reason="credibly worse on task pick_cube",
        version="v0001",
        decision="rollback",
        p_worse=0.991,
        candidate_episodes=34,
    )
    start_rollout(registry, "v0003", ["cell-02"], actor="operator", reason="canary by hand")
    time.sleep(0.1)  # cell-03's heartbeat expires
    return World(registry, root, episodes=3)


class ServerThread:
    """The app under uvicorn on a free loopback port, in a thread of this process."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> ServerThread:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the dashboard did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(10)
