"""What the outage and chaos tests share: a learner gateway in a subprocess that can be
SIGKILLed and restarted, sim cells running the real edge actor in threads, a ground-truth
ledger of every chunk the cells recorded, and a step-by-step comparison of that ledger
with the episode store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

import actors.edge
from actors.config import ActorConfig
from actors.uplink import Uplink
from drivers.sim import make_sim_cell
from fleet.common.wire import from_tensor
from learner.store import EpisodeRef, EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2

REPO = Path(__file__).resolve().parents[1]


class GatewayProcess:
    """tests/gateway_proc.py on a fixed port, so cells find it again after a restart."""

    def __init__(self, port: int, store: Path, redis_url: str, log_path: Path) -> None:
        self.port = port
        self.store = store
        self.redis_url = redis_url
        self.log_path = log_path
        self.proc: subprocess.Popen[str] | None = None
        self.starts = 0

    def start(self, timeout_s: float = 30.0) -> float:
        """Start and wait until it serves; returns the seconds that took."""
        t0 = time.monotonic()
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "gateway_proc.py"),
                "--port",
                str(self.port),
                "--store",
                str(self.store),
                "--redis-url",
                self.redis_url,
            ],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=REPO,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.startswith("READY"):
            self.proc.kill()
            raise RuntimeError(f"gateway did not start: {line!r}; see {self.log_path}")
        self.starts += 1
        assert time.monotonic() - t0 < timeout_s
        return time.monotonic() - t0

    def kill(self) -> None:
        """SIGKILL: no clean shutdown, mid-write if it was writing."""
        if self.proc is not None:
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=10)
            self.proc = None

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None


@dataclass
class Ledger:
    """Every chunk a cell's uplink accepted, as bytes, keyed (cell, episode, seq)."""

    lock: threading.Lock = field(default_factory=threading.Lock)
    chunks: dict[tuple[str, str, int], bytes] = field(default_factory=dict)
    uplinks: dict[str, Uplink] = field(default_factory=dict)

    def install(self, monkeypatch: Any) -> None:
        """Make actors.edge build uplinks that write to this ledger."""
        ledger = self

        class LedgerUplink(Uplink):
            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                with ledger.lock:
                    ledger.uplinks[self.cell_id] = self

            def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
                data = chunk.SerializeToString()  # test-side cost, not the actor's
                ok = super().submit(chunk)
                if ok:
                    with ledger.lock:
                        key = (chunk.cell_id, chunk.episode_id, chunk.seq)
                        assert key not in ledger.chunks, f"cell recorded {key} twice"
                        ledger.chunks[key] = data
                return ok

        monkeypatch.setattr(actors.edge, "Uplink", LedgerUplink)

    def episodes(self) -> dict[tuple[str, str], list[trajectory_pb2.StepChunk]]:
        out: dict[tuple[str, str], list[trajectory_pb2.StepChunk]] = defaultdict(list)
        with self.lock:
            items = sorted(self.chunks.items())
        for (cell, episode, _), data in items:
            out[(cell, episode)].append(trajectory_pb2.StepChunk.FromString(data))
        return out

    def pending(self) -> int:
        with self.lock:
            ups = list(self.uplinks.values())
        return sum(u.pending for u in ups)

    def spooled(self) -> tuple[int, int]:
        with self.lock:
            ups = list(self.uplinks.values())
        stats = [u.stats for u in ups]
        return sum(s["spool_chunks"] for s in stats), sum(s["spool_bytes"] for s in stats)


class Cells:
    """N sim cells, each the real edge actor (run_actor) in a thread of this process."""

    def __init__(self, n: int, address: str, spool_root: Path, **sim: Any) -> None:
        from actors.edge import run_actor

        self.stop_event = threading.Event()
        self.summaries: dict[str, dict[str, Any]] = {}
        self.threads: list[threading.Thread] = []
        for i in range(1, n + 1):
            cell_id = f"cell-{i:02d}"
            cell = make_sim_cell(
                cell_id,
                seed=i,
                cameras=sim.get("cameras", ("overhead",)),
                height=sim.get("height", 48),
                width=sim.get("width", 64),
                control_hz=sim.get("control_hz", 20.0),
                realtime_factor=sim.get("realtime_factor", 1.0),
                takeover_prob=0.5,
            )
            config = ActorConfig(
                cell_id=cell_id,
                learner_address=address,
                control_hz=sim.get("control_hz", 20.0),
                chunk_steps=sim.get("chunk_steps", 10),
                max_episode_s=sim.get("max_episode_s", 2.0),
                seed=i,
                rpc_deadline_s=3.0,
                spool_dir=str(spool_root / cell_id),
                spool_quota_bytes=256 << 20,
            )

            def body(config: ActorConfig = config, cell: Any = cell) -> None:
                self.summaries[config.cell_id] = run_actor(
                    config, cell, self.stop_event, drain_timeout_s=40.0
                )

            self.threads.append(threading.Thread(target=body, name=cell_id, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def stop(self, timeout_s: float = 60.0) -> None:
        self.stop_event.set()
        for t in self.threads:
            t.join(timeout=timeout_s)
        assert not any(t.is_alive() for t in self.threads), "a cell did not stop"


def compare_store(store_root: Path, ledger: Ledger) -> dict[str, int]:
    """Every recorded step is in the store exactly once and bit for bit; nothing else is."""
    store = EpisodeStore(store_root)
    expected = ledger.episodes()
    stored = {(r.cell_id, r.episode_id) for r in store.episodes(complete_only=False)}
    assert stored == set(expected), (
        f"lost episodes {sorted(set(expected) - stored)[:5]}, "
        f"extra episodes {sorted(stored - set(expected))[:5]}"
    )
    steps = 0
    for (cell, episode), chunks in expected.items():
        assert [c.seq for c in chunks] == list(range(len(chunks))), f"{episode}: ledger gap"
        data = store.read_episode(EpisodeRef(cell, episode), frames=True)
        where = f"cell {cell} episode {episode}"
        n = sum(int(c.timestamp.shape[0]) for c in chunks)
        assert int(data.attrs["n_steps"]) == n, f"{where}: {data.attrs['n_steps']} != {n} steps"
        for name in ("timestamp", "joint_pos", "action", "intervention", "reward"):
            want = np.concatenate([from_tensor(getattr(c, name), name) for c in chunks])
            got = getattr(data, name)
            assert got.shape == want.shape and np.array_equal(got, want), f"{where}: {name}"
        for cam in chunks[0].cameras:
            want_frames = [
                f for c in chunks for cc in c.cameras if cc.camera == cam.camera for f in cc.frames
            ]
            assert data.frames[cam.camera] == want_frames, f"{where}: camera {cam.camera}"
        assert bool(data.attrs.get("complete")) == chunks[-1].last, f"{where}: complete?"
        steps += n
    return {"episodes": len(expected), "steps": steps}
