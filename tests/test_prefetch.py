"""Prefetch: a cell fetches the version it may soon run ahead of time, so that a promotion
is only a swap. Real gRPC on loopback, the learner's PolicyServicer on a real Redis, cells'
PolicyWatchers with the learner's public key and a version cache (tests/test_distribution.py
holds the learner and cell fixtures)."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import grpc
import pytest
import torch

from actors.policy_watch import PolicyWatcher
from actors.version_cache import VersionCache
from fleet.common import signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.registry import Registry
from learner.publisher import Publisher
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc
from tests.test_distribution import CELL, Learner, paced_cell_running_v1, run_until_loaded

# The learner and cell fixtures (re-exported: pytest finds them here).
from tests.test_distribution import learner as learner
from tests.test_distribution import make_cell as make_cell
from tests.waiting import wait_for, wait_until

OTHER = "cell-09"  # the canary cell; the cell under test runs stable


def register(learner: Learner, model: UnifiedPolicy | None = None, key: Path | None = None):
    """A signed version registered in the registry and assigned to no cell."""
    publisher = Publisher(
        learner.registry,
        learner.versions_dir,
        rollout_mode="auto",
        signing_key=key or learner.private_key_path,
    )
    return publisher.publish(model or learner.model(), training_step=1, data_seen=1)


def canary(registry: Registry, version: str) -> None:
    registry.set_candidate(
        version, stage="canary", cells=[OTHER], kind="canary", actor="test", reason="canary"
    )


def promote(registry: Registry) -> None:
    registry.clear_candidate(kind="promote", actor="test", reason="promote", promote=True)


def size_of(learner: Learner, manifest: Manifest) -> int:
    return Path(learner.registry.version(manifest.version_id).weights_path).stat().st_size


def test_registry_lists_what_each_cell_may_run_next(registry: Registry, tmp_path) -> None:
    for v in ("v0001", "v0002"):
        registry.add_version(
            Manifest(v, None, {}, 1, 1, "").to_json(), str(tmp_path / v), published_at=1.0
        )
    cells = ["a", "b", "c", "d"]
    registry.set_stable("v0001", actor="t", reason="t")
    assert registry.prefetch_assignments(cells) == {c: [] for c in cells}  # no candidate
    registry.set_pin("d", "v0001", actor="t", reason="t")
    registry.set_candidate("v0002", stage="shadow", cells=["a"], kind="k", actor="t", reason="t")
    # shadow cell a already fetches it as its shadow; pinned d does not move on a promotion
    assert registry.prefetch_assignments(cells) == {
        "a": [],
        "b": ["v0002"],
        "c": ["v0002"],
        "d": [],
    }
    registry.set_candidate("v0002", stage="canary", cells=["a"], kind="k", actor="t", reason="t")
    # a acts with the candidate: stable is what a rollback sends it back to
    assert registry.prefetch_assignments(cells) == {
        "a": ["v0001"],
        "b": ["v0002"],
        "c": ["v0002"],
        "d": [],
    }
    registry.clear_candidate(kind="k", actor="t", reason="t", promote=True)
    assert registry.prefetch_assignments(cells) == {c: [] for c in cells}


def test_candidate_is_prefetched_and_promotion_swaps_with_no_fetch(
    learner: Learner, make_cell
) -> None:
    registry = learner.registry
    v1 = learner.publish()
    cell = make_cell()
    run_until_loaded(cell, v1.version_id)
    v2 = register(learner)
    canary(registry, v2.version_id)

    # While it runs stable, the cell fetches, verifies, caches and loads the candidate.
    wait_for(lambda: cell.watcher.staged_version == v2.version_id, 20.0, "the prefetch")
    assert cell.faults == []
    assert v2.version_id in cell.watcher.prefetched
    assert learner.servicer.bytes_sent[v2.version_id] == size_of(learner, v2)
    cache = cell.watcher.cache
    assert cache is not None and cache.get(v2.sha256) is not None  # verified bytes on disk
    cell.adopt()
    assert cell.running[-1] == v1.version_id  # never run before it is assigned
    assert cell.watcher.loaded_version == v1.version_id

    # The promotion hands the loaded runner over: no fetch call, no byte sent again.
    fetches, sent = cell.watcher.fetches, sum(learner.servicer.bytes_sent.values())
    promote(registry)
    run_until_loaded(cell, v2.version_id)
    assert cell.watcher.fetches == fetches
    assert sum(learner.servicer.bytes_sent.values()) == sent
    assert cell.watcher.staged_version == ""

    # Now stable again is what the next candidate's canary cells would roll back to; this
    # cell runs stable, so it is handed the next candidate, and a rollback drops it.
    v3 = register(learner)
    canary(registry, v3.version_id)
    wait_for(lambda: cell.watcher.staged_version == v3.version_id, 20.0, "the second prefetch")
    registry.clear_candidate(kind="rollback", actor="test", reason="worse", promote=False)
    wait_for(lambda: cell.watcher.staged_version == "", 20.0, "the rolled back one dropped")
    cell.adopt()
    assert cell.running[-1] == v2.version_id


def test_bad_prefetch_is_discarded_reported_and_never_run(learner: Learner, make_cell) -> None:
    registry = learner.registry
    v1 = learner.publish()
    cell = make_cell()
    run_until_loaded(cell, v1.version_id)

    # Tampered in transit: the bytes do not hash to the signed digest.
    v2_id = learner.publisher.next_version_id()
    learner.servicer.flip.add(v2_id)
    v2 = register(learner)
    canary(registry, v2.version_id)

    def reported(version: str, words: str) -> bool:
        state = {c.cell_id: c for c in registry.cells()}.get(CELL)
        return state is not None and version in state.last_fault and words in state.last_fault

    wait_for(lambda: reported(v2_id, "do not match"), 20.0, "the sha256 fault reported")
    assert "discarded, never run" in cell.faults[-1]
    cache = cell.watcher.cache
    assert cache is not None and not cache.contains(v2.sha256)
    assert cell.watcher.staged_version == "" and v2_id not in cell.watcher.prefetched

    # Promoted anyway: the cell keeps its last good version and never runs the bad bytes.
    promote(registry)
    assert wait_until(lambda: cell.watcher.current_assignment == v2_id)
    time.sleep(0.5)  # what the watcher does with it; nothing must change
    cell.adopt()
    assert cell.running[-1] == v1.version_id
    assert cell.watcher.loaded_version == v1.version_id

    # Signed by a stranger: refused before a byte is fetched.
    stranger, _ = signing.write_key_pair(learner.versions_dir.parent / "stranger")
    v3 = register(learner, key=stranger)
    canary(registry, v3.version_id)
    wait_for(lambda: reported(v3.version_id, "signature does not verify"), 20.0, "the fault")
    assert learner.servicer.bytes_sent[v3.version_id] == 0
    assert not cache.contains(v3.sha256)
    assert cell.watcher.staged_version == ""
    cell.adopt()
    assert cell.running[-1] == v1.version_id


def test_prefetch_holds_its_bandwidth_cap(learner: Learner, tmp_path: Path) -> None:
    registry = learner.registry
    v1 = learner.publish()
    cap = 3e6  # bytes a second
    watcher = PolicyWatcher(
        learner.address,
        CELL,
        deadline_s=5.0,
        on_fault=print,
        verify_key=signing.load_public_key(learner.public_key_path),
        cache=VersionCache(tmp_path / "cache"),
        prefetch_bytes_per_s=cap,
    )
    watcher.start()
    try:
        assert wait_until(lambda: watcher.loaded_version == v1.version_id, 20.0)
        torch.manual_seed(3)
        model = UnifiedPolicy(
            policy_config("tiny", ("pick_cube",), ("overhead",), d_model=256, ff_dim=2048)
        )
        v2 = register(learner, model)
        size = size_of(learner, v2)
        assert size > 6e6
        canary(registry, v2.version_id)
        wait_for(lambda: v2.version_id in watcher.prefetched, 60.0, "the prefetch")
    finally:
        watcher.stop()
    assert watcher.prefetch_bytes == size
    sent = [(t, n) for v, t, n in learner.servicer.sent if v == v2.version_id]
    assert sum(n for _, n in sent) == size
    # However fast the link, no chunk left the learner before the cap allowed it.
    first = sent[0][0]
    before = 0
    for t, n in sent:
        assert before <= cap * (t - first) + 1024, (before, t - first)
        before += n
    assert sent[-1][0] - first >= (size - sent[-1][1]) / cap * 0.999


def test_prefetch_and_swap_delay_no_control_tick(learner: Learner, tmp_path: Path) -> None:
    """A real ControlLoop on the sim cell at 20 Hz on the wall clock keeps every tick while a
    ~50 MB candidate is prefetched (fetched, verified, cached, loaded, warmed up) beside it,
    and when the promotion swaps it in."""
    with paced_cell_running_v1(learner, tmp_path) as cell:
        loop, watcher, clock = cell.loop, cell.watcher, cell.clock
        tasks, cameras = cell.tasks, cell.cameras
        assert watcher._prefetcher is not None
        prefetcher_tid = watcher._prefetcher.native_id
        # The learner's side (building and saving the version) shares this process's GIL
        # with the loop, which a cell never does: it is done before the ticks are counted.
        torch.manual_seed(1)
        big = UnifiedPolicy(
            policy_config("tiny", tasks, cameras, d_model=512, n_heads=8, ff_dim=4096, n_layers=2)
        )
        v2 = register(learner, big)
        assert size_of(learner, v2) > 40e6
        del big

        def late_ticks(start: float, end: float) -> int:
            return sum(late for t, _, late in clock.ticks if start <= t <= end)

        # The same stretch of ticks just before, under whatever else loads this machine.
        t_base = time.time()
        time.sleep(3.0)
        t_canary = time.time()
        canary(learner.registry, v2.version_id)
        wait_for(lambda: watcher.staged_version == v2.version_id, 60.0, "the prefetch")
        assert loop.stats["version_running"] == "v0001"
        fetches = watcher.fetches
        promote(learner.registry)
        wait_for(lambda: loop.stats["version_running"] == v2.version_id, 30.0, "the swap")
        time.sleep(1.0)  # and a second of running it
        t_end = time.time()
        assert watcher.fetches == fetches
        assert loop.stats["policy_errors"] == 0
        # A cell's fetch, hash and load beside the loop cost it nothing: the prefetcher runs
        # below the loop's priority, and the ticks during the prefetch and the swap are as
        # punctual as before it (a few ticks are late on a heavily loaded test machine
        # whatever runs; a prefetch holding the loop up makes every chunk's tick late).
        loop_nice = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        assert os.getpriority(os.PRIO_PROCESS, prefetcher_tid) >= min(19, loop_nice + 10)
        during = late_ticks(t_canary, t_end)
        baseline = late_ticks(t_base, t_canary)
        scale = max(1.0, (t_end - t_canary) / (t_canary - t_base))
        assert during <= 2 * baseline * scale + 2, (during, baseline, t_end - t_canary)


def test_learner_refuses_a_paced_fetch_too_slow_to_serve(learner: Learner) -> None:
    """A paced stream holds a learner thread while it lasts: one slower than the learner
    serves gets a clear INVALID_ARGUMENT, never a thread held for hours."""
    v1 = learner.publish()
    with grpc.insecure_channel(learner.address) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        request = policy_pb2.FetchRequest(
            cell_id=CELL, version_id=v1.version_id, max_bytes_per_s=1000
        )
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.FetchWeights(request, timeout=10.0))
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_bytes_per_s" in str(refused.value.details())
    with pytest.raises(ValueError, match="prefetch_bytes_per_s"):
        PolicyWatcher(
            learner.address, CELL, deadline_s=5.0, on_fault=print, prefetch_bytes_per_s=1000
        )
