"""An episode whose cell vanished is closed as truncated; its stored steps stay readable."""

from __future__ import annotations

import time
from pathlib import Path

import grpc

from learner.chunks import decode_chunk
from learner.gateway import Gateway
from learner.store import EpisodeRef, EpisodeStore
from learner.truncation import TruncationSweeper
from protos.fleetlearn.v1 import trajectory_pb2_grpc
from tests.test_ingest import TASKS, make_msg


def _append(store: EpisodeStore, seq: int, *, episode: str = "e1", last: bool = False) -> None:
    store.append(decode_chunk(make_msg(seq, episode=episode, last=last), known_tasks=TASKS))


def test_idle_incomplete_episode_is_marked_truncated_and_stays_readable(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path)
    _append(store, 0, episode="vanished")
    _append(store, 1, episode="vanished")
    _append(store, 0, episode="finished", last=True)
    _append(store, 0, episode="active")
    sweeper = TruncationSweeper(store, truncate_after_s=60)

    assert sweeper.sweep() == []  # nothing idle yet
    later = time.time() + 61
    marked = sweeper.sweep(now=later)
    # "active" is idle as well at that clock; a finished episode is never touched.
    assert EpisodeRef("c1", "vanished") in marked
    assert EpisodeRef("c1", "finished") not in marked

    data = store.read_episode(EpisodeRef("c1", "vanished"))
    assert data.attrs["truncated"] and not data.attrs["complete"]
    assert "vanished mid-episode" in data.attrs["truncated_reason"]
    assert data.joint_pos.shape == (12, 14)
    assert len(data.frames["overhead"]) == 12
    assert sweeper.sweep(now=later + 100) == []  # marked once


def test_a_resumed_episode_clears_the_mark(tmp_path: Path) -> None:
    store = EpisodeStore(tmp_path)
    _append(store, 0)
    TruncationSweeper(store, truncate_after_s=1).sweep(now=time.time() + 5)
    assert store.read_episode(EpisodeRef("c1", "e1"), frames=False).attrs["truncated"]
    _append(store, 1, last=True)
    attrs = store.read_episode(EpisodeRef("c1", "e1"), frames=False).attrs
    assert attrs["complete"] and not attrs["truncated"]


def test_temp_files_of_a_killed_write_are_removed_once_the_episode_ends(tmp_path: Path) -> None:
    """A learner killed between a temporary file and its rename leaves `*.partial` behind;
    the sweeper deletes them when the episode is finished or truncated, never while a write
    could still be in progress."""
    store = EpisodeStore(tmp_path)
    _append(store, 0, episode="finishing")
    _append(store, 0, episode="vanishing")
    leftovers = {}
    for episode in ("finishing", "vanishing"):
        frame_dir = tmp_path / "episodes/c1" / episode / "cameras/overhead/c"
        leftovers[episode] = frame_dir / "1.4242-7.partial"
        leftovers[episode].write_bytes(b"half a frame chunk")
    sweeper = TruncationSweeper(store, truncate_after_s=60)

    assert sweeper.sweep() == []
    assert all(p.exists() for p in leftovers.values())  # both still in progress

    _append(store, 1, episode="finishing", last=True)
    sweeper.sweep()
    assert not leftovers["finishing"].exists()
    assert leftovers["vanishing"].exists()  # idle 0 s: a write may still come

    assert sweeper.sweep(now=time.time() + 61) == [EpisodeRef("c1", "vanishing")]
    assert not leftovers["vanishing"].exists()
    assert len(store.read_episode(EpisodeRef("c1", "finishing")).frames["overhead"]) == 12


def test_gateway_sweeper_truncates_after_the_timeout(tmp_path: Path, redis_server: str) -> None:
    gw = Gateway(tmp_path / "store", redis_server, TASKS, truncate_after_s=0.5)
    assert gw.sweeper is not None
    gw.sweeper.interval_s = 0.1
    port = gw.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = trajectory_pb2_grpc.TrajectoryServiceStub(ch)
            (ack,) = stub.Upload(iter([make_msg(0)]), timeout=5)
        assert ack.durable
        ref = EpisodeRef("c1", "e1")
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if gw.store.read_episode(ref, frames=False).attrs["truncated"]:
                break
            time.sleep(0.05)
        data = gw.store.read_episode(ref, frames=False)
        assert data.attrs["truncated"]
        assert data.joint_pos.shape[0] == 6
    finally:
        gw.stop(0.5)
