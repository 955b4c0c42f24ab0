"""Fate-sharing: once `fleet learner` is SIGKILLed, nothing more is acked or published in its
name, and none of the processes it started (Ray's raylet, GCS, agents and workers, the
reaper) outlive it. A cell streams chunks and the trainer publishes a version every two
updates right up to the kill."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import psutil
import pytest

from fleet.common.net import free_port
from fleet.common.wire import to_tensor
from fleet.control.registry import Registry
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc
from tests.conftest import wipe_default_registry
from tests.expert_episodes import record_expert_episodes
from tests.waiting import wait_for, wait_until

pytestmark = pytest.mark.timeout(400)

REPO = Path(__file__).resolve().parents[1]
STEPS = 5
# An ack leaves the server before its receipt here; this is the most it may trail the kill
# (orphans of the old design acked for 1.5-3 s after it).
IN_FLIGHT_S = 0.5


def _chunk(seq: int) -> trajectory_pb2.StepChunk:
    return trajectory_pb2.StepChunk(
        cell_id="cell-f1",
        episode_id="ep-stream",
        seq=seq,
        first_step=seq * STEPS,
        task="pick_cube",
        timestamp=to_tensor(np.arange(seq * STEPS, (seq + 1) * STEPS, dtype=np.float64) * 0.02),
        joint_pos=to_tensor(np.zeros((STEPS, 14), np.float32)),
        action=to_tensor(np.zeros((STEPS, 14), np.float32)),
        intervention=to_tensor(np.zeros(STEPS, np.bool_)),
        reward=to_tensor(np.zeros(STEPS, np.float32)),
    )


class Streamer(threading.Thread):
    """One cell's upload stream: a chunk, its ack, the next chunk; the wall time of each ack."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.acks: list[float] = []
        self.error = ""
        self.running = threading.Event()

    def run(self) -> None:
        acked = threading.Semaphore(1)

        def requests() -> Iterator[trajectory_pb2.StepChunk]:
            seq = 0
            while True:
                if not acked.acquire(timeout=30):
                    return
                yield _chunk(seq)
                seq += 1

        with grpc.insecure_channel(f"127.0.0.1:{self.port}") as channel:
            stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
            try:
                for ack in stub.Upload(requests(), timeout=300):
                    if ack.durable:
                        self.acks.append(time.time())
                        self.running.set()
                    acked.release()
            except grpc.RpcError as exc:
                self.error = f"{exc.code().name}: {exc.details()}"


def test_killed_learner_acks_and_publishes_nothing_more_and_leaves_no_process(
    tmp_path: Path, redis_server: str
) -> None:
    data = tmp_path / "data"
    record_expert_episodes(EpisodeStore(data / "store"), task="pick_cube", episodes=1, seed=8)
    port = free_port()
    wipe_default_registry(redis_server)  # `fleet learner` uses the default prefix
    registry = Registry(redis_server)
    log = (tmp_path / "learner.log").open("w")
    learner = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "learner.main",
            "--redis-url",
            redis_server,
            "--data-dir",
            str(data),
            "--port",
            str(port),
            "--tasks",
            "pick_cube,touch_target",
            "--cameras",
            "overhead,front",
            "--min-steps",
            "1",
            "--batch-size",
            "4",
            "--publish-every",
            "2",
            "--max-samples-per-insert",
            "1000000",
            "--insecure",  # plaintext on loopback: this test is about processes, not TLS
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )
    tree: list[psutil.Process] = []
    try:
        wait_for(
            lambda: learner.poll() is None and registry.learner_stats().get("state") == "ready",
            180,
            "the learner to be ready",
        )
        streamer = Streamer(port)
        streamer.start()
        wait_for(streamer.running.is_set, 60, "acks on the upload stream")
        wait_for(lambda: len(registry.versions()) >= 2, 180, "the trainer publishing")
        flowing = len(streamer.acks)  # kill while acks are coming: three more first
        wait_for(lambda: len(streamer.acks) >= flowing + 3, 60, "acks still flowing")
        tree = psutil.Process(learner.pid).children(recursive=True)
        names = sorted({_name(p) for p in tree})
        assert any("raylet" in n for n in names) and any("Trainer" in n for n in names), names
        acks_before = len(streamer.acks)
        killed_at = time.time()
        os.kill(learner.pid, signal.SIGKILL)
        learner.wait(10)
        # Orphans of the old design acked and published for 1.5-3 s: wait out longer.
        last: dict[str, float] = {}

        def all_gone() -> bool:
            alive = [p for p in tree if _running(p)]
            for p in alive:
                last[_name(p)] = time.time() - killed_at
            return not alive

        gone = wait_until(all_gone, 10.0, poll_s=0.01)
        gone_after = time.time() - killed_at
        streamer.join(5.0)
        time.sleep(max(0.0, killed_at + 4.0 - time.time()))
        late_acks = [t - killed_at for t in streamer.acks if t > killed_at + IN_FLIGHT_S]
        late_versions = [
            (v.version_id, v.published_at - killed_at)
            for v in registry.versions()
            if v.published_at > killed_at
        ]
        late_files = [
            p.name for p in (data / "versions").glob("*.json") if p.stat().st_mtime > killed_at
        ]
        left = [f"{p.pid} {_name(p)}" for p in tree if _running(p)]
    finally:
        for p in tree:
            if _running(p):
                p.kill()
        if learner.poll() is None:
            learner.kill()
            learner.wait(10)
        log.close()
        registry.close()
        wipe_default_registry(redis_server)
    print(
        f"\nfate-sharing: {acks_before} acks before the kill, all {len(tree)} processes of "
        f"the learner gone {gone_after:.2f} s after it; stream ended with {streamer.error!r}"
        f"; last seen: {sorted(last.items(), key=lambda kv: kv[1])[-3:]}"
    )
    assert acks_before > 0
    tail = (tmp_path / "learner.log").read_text()[-3000:]
    assert gone and not left, f"outlived the learner: {left}; learner log ends:\n{tail}"
    assert not late_acks, f"acks after the kill at +{late_acks} s"
    assert not late_versions and not late_files, f"published after the kill: {late_versions}"
    assert streamer.error, "the stream should have ended with an error"


def _name(p: psutil.Process) -> str:
    try:
        return " ".join(p.cmdline())[:80] or p.name()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return "?"


def _running(p: psutil.Process) -> bool:
    """Alive and not a zombie (a zombie has exited; only its exit status is left)."""
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False
