"""Lineage across crashes: a trainer process SIGKILLed at random moments (mid-update,
mid-checkpoint, mid-publish) and restarted never publishes a training step twice, skips
none, and every version names as parent the version its weights descend from."""

from __future__ import annotations

import itertools
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fleet.common.policy.manifest import Manifest
from fleet.control.registry import Registry
from learner.checkpoint import load_checkpoint
from learner.store import EpisodeStore
from tests.expert_episodes import record_expert_episodes
from tests.waiting import wait_for

pytestmark = pytest.mark.timeout(600)

REPO = Path(__file__).resolve().parents[1]
KILLS = 5
PUBLISH_EVERY = 3


def _start(data: Path, redis_url: str, prefix: str, log: Path) -> subprocess.Popen[str]:
    with log.open("a") as err:
        proc = subprocess.Popen(
            [
                sys.executable,
                str(REPO / "tests" / "trainer_proc.py"),
                "--data",
                str(data),
                "--redis-url",
                redis_url,
                "--prefix",
                prefix,
                "--publish-every",
                str(PUBLISH_EVERY),
            ],
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
            cwd=REPO,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith("READY"):
        proc.kill()
        proc.wait(10)
        raise AssertionError(f"trainer did not start: {line!r}; see {log}")
    return proc


def test_sigkilled_trainer_never_republishes_a_step_and_parents_are_true(
    tmp_path: Path, redis_server: str
) -> None:
    rng = random.Random()
    seed = rng.randrange(1 << 30)
    rng.seed(seed)
    store = EpisodeStore(tmp_path / "store")
    record_expert_episodes(store, task="touch_target", episodes=1, seed=1)
    record_expert_episodes(store, task="pick_cube", episodes=1, seed=2)
    prefix = f"lin{time.time_ns()}:"
    registry = Registry(redis_server, prefix=prefix)
    registry.set_rollout_mode("immediate")
    log = tmp_path / "trainer.log"
    killed_after = []
    for _ in range(KILLS):
        proc = _start(tmp_path, redis_server, prefix, log)
        try:
            before = len(registry.versions())
            wait_for(lambda n=before: len(registry.versions()) > n, 180, "a new version")
            delay = rng.uniform(0.0, 1.5)  # lands mid-update, mid-checkpoint or mid-publish
            time.sleep(delay)
            killed_after.append(round(delay, 2))
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)
    proc = _start(tmp_path, redis_server, prefix, log)
    try:
        before = len(registry.versions())
        wait_for(lambda: len(registry.versions()) > before + 1, 180, "two more versions")
    finally:
        proc.terminate()
        assert proc.wait(60) == 0, f"clean stop failed; see {log}"

    versions = registry.versions()
    where = f"(seed {seed}, kills {killed_after} s after a version; log {log})"
    ids = [v.version_id for v in versions]
    steps = [int(v.manifest["training_step"]) for v in versions]
    assert len(set(ids)) == len(ids), f"a version id was published twice {where}: {ids}"
    # Every PUBLISH_EVERY-th step exactly once, in order: none twice, none skipped.
    assert steps == [PUBLISH_EVERY * (i + 1) for i in range(len(steps))], f"{steps} {where}"
    # Each parent is the version before it in the one lineage the weights went through.
    assert versions[0].parent is None
    for parent, child in itertools.pairwise(versions):
        assert child.parent == parent.version_id, f"{child.version_id} {where}"
    # The registry agrees with the weights on disk and with the checkpoint's lineage.
    for v in versions:
        path = tmp_path / "versions" / f"{v.version_id}.json"
        manifest = Manifest.from_json(path.read_text())
        assert manifest.sha256 == v.manifest["sha256"] and manifest.parent == v.parent
    state = load_checkpoint(tmp_path / "checkpoints")
    assert state is not None
    assert state["trainer"]["versions"] == ids, where
    assert state["trainer"]["pending_version"] is None
    assert state["trainer"]["updates"] >= steps[-1]
    print(f"\nlineage {where}: {len(ids)} versions, steps {steps[0]}..{steps[-1]}")
    json.dumps([v.to_json() for v in versions])  # plain data, as the dashboard serves it
