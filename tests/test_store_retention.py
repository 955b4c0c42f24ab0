"""`fleet store du` and `fleet store gc` on a real zarr store: disk use adds up, gc is a dry
run by default, keeps intervention episodes and every episode the sampler trains on, refuses
to work unlogged, and logs every removal in the registry's event log."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import simplejpeg

from fleet.control.registry import Registry
from learner.chunks import CameraColumn, DecodedChunk
from learner.store import EpisodeRef, EpisodeStore

DAY = 86400.0


def fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def _episode(
    store: EpisodeStore,
    cell: str,
    episode: str,
    *,
    age_days: float,
    intervened: bool,
    success: bool,
) -> None:
    n = 12
    ended = time.time()
    frame = simplejpeg.encode_jpeg(np.zeros((24, 32, 3), np.uint8), colorspace="RGB")
    flags = np.zeros(n, bool)
    flags[3:6] = intervened
    store.append(
        DecodedChunk(
            cell_id=cell,
            episode_id=episode,
            seq=0,
            first_step=0,
            task="pick_cube",
            policy_version="v0003",
            timestamp=np.arange(n, dtype=np.float64) * 0.05,
            joint_pos=np.zeros((n, 14), np.float32),
            action=np.zeros((n, 14), np.float32),
            intervention=flags,
            reward=np.zeros(n, np.float32),
            cameras={"overhead": CameraColumn("overhead", "jpeg", 24, 32, 3, [frame] * n)},
            last=True,
            outcome={"success": success, "reason": "", "started_at": ended - 1, "ended_at": ended},
        )
    )
    _age(store.root / "episodes" / cell / episode / "zarr.json", age_days)


def _age(group_meta: Path, days: float) -> None:
    """Make an episode `days` old: its last write moved back on the learner's clock (the
    store stamps `updated_at` with the time of each commit)."""
    meta = json.loads(group_meta.read_text())
    meta["attributes"]["updated_at"] -= days * DAY
    group_meta.write_text(json.dumps(meta))


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    root = tmp_path / "run" / "store"
    store = EpisodeStore(root)
    # An old failed autonomous attempt: nothing in it is trained on.
    _episode(store, "cell-01", "old-failed", age_days=40, intervened=False, success=False)
    # An old rescue (operator steps) and an old autonomous success: both are trained on.
    _episode(store, "cell-01", "old-rescued", age_days=40, intervened=True, success=True)
    _episode(store, "cell-02", "old-success", age_days=50, intervened=False, success=True)
    _episode(store, "cell-02", "fresh", age_days=0.1, intervened=False, success=False)
    return root


def _disk(root: Path) -> int:
    """Bytes in the episode directories (episodes/<cell>/<episode>/...)."""
    return sum(
        f.stat().st_size
        for ep_dir in (root / "episodes").glob("*/*")
        if ep_dir.is_dir()
        for f in ep_dir.rglob("*")
        if f.is_file()
    )


def test_du_adds_up_to_the_files_on_disk(store_root: Path) -> None:
    from learner.retention import summarise, usage

    episodes = usage(EpisodeStore(store_root))
    assert len(episodes) == 4 and sum(e.bytes for e in episodes) == _disk(store_root)
    by_cell = {k[0]: n for k, n, _ in summarise(episodes, ["cell"], time.time())}
    assert by_cell == {"cell-01": 2, "cell-02": 2}
    by_age = {k[0]: n for k, n, _ in summarise(episodes, ["age"], time.time())}
    assert by_age == {"30-90d": 3, "<1d": 1}

    out = fleet("store", "du", "--store", str(store_root), "--by", "cell,outcome")
    assert out.returncode == 0, out.stderr
    assert "cell-01" in out.stdout and "success" in out.stdout and "total" in out.stdout
    assert "added per day" in out.stdout
    bad = fleet("store", "du", "--store", str(store_root), "--by", "colour")
    assert bad.returncode == 2 and "unknown --by" in bad.stdout


def test_gc_is_a_dry_run_by_default_and_needs_a_log_to_apply(store_root: Path) -> None:
    before = _disk(store_root)
    out = fleet("store", "gc", "--store", str(store_root), "--keep-days", "30")
    assert out.returncode == 0, out.stderr
    assert "would remove 1 episodes" in out.stdout and "dry run" in out.stdout
    assert _disk(store_root) == before
    out = fleet("store", "gc", "--store", str(store_root), "--keep-days", "30", "--apply")
    assert out.returncode == 2 and "--redis-url" in out.stdout
    assert _disk(store_root) == before


def test_gc_removes_by_policy_and_logs_each_removal(store_root: Path) -> None:
    from fleet.control.redis_server import RedisServer

    with RedisServer() as server:
        out = fleet(
            "store",
            "gc",
            "--store",
            str(store_root),
            "--keep-days",
            "30",
            "--apply",
            "--redis-url",
            server.url,
        )
        assert out.returncode == 0, out.stderr
        assert "removed 1 episodes" in out.stdout
        left = {r.episode_id for r in EpisodeStore(store_root).episodes()}
        # Kept: the rescue and the success the sampler trains on, the young one.
        assert left == {"old-rescued", "old-success", "fresh"}
        registry = Registry(server.url)
        (event,) = [e for e in registry.events() if e.kind == "store_gc"]
        assert (event.fields["cell"], event.fields["episode"]) == ("cell-01", "old-failed")
        assert int(event.fields["bytes"]) > 0 and "older than 30 days" in event.reason

        out = fleet(
            "store",
            "gc",
            "--store",
            str(store_root),
            "--keep-days",
            "30",
            "--drop-interventions",
            "--drop-trained",
            "--apply",
            "--redis-url",
            server.url,
        )
        assert out.returncode == 0 and "removed 2 episodes" in out.stdout
        assert [r.episode_id for r in EpisodeStore(store_root).episodes()] == ["fresh"]
        assert registry.event_counts()["store_gc"] == 3
        registry.close()
    # What is left reads back whole.
    store = EpisodeStore(store_root)
    assert store.read_episode(EpisodeRef("cell-02", "fresh")).joint_pos.shape == (12, 14)


def test_trained_on_agrees_with_the_samplers_step_rule(store_root: Path) -> None:
    """gc decides from attributes what the sampler decides from the steps: they must agree."""
    from learner.sampler import trainable_steps, trained_on

    store = EpisodeStore(store_root)
    verdicts = {}
    for ref in store.episodes():
        data = store.read_episode(ref, frames=False)
        for mode in ("successful", "all"):
            assert trained_on(data.attrs, mode) == (len(trainable_steps(data, mode)) > 0)
        verdicts[ref.episode_id] = trained_on(data.attrs)
    assert verdicts == {
        "old-failed": False,
        "old-rescued": True,
        "old-success": True,
        "fresh": False,
    }
