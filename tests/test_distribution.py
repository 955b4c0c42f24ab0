"""Signed policy distribution end to end: real gRPC on loopback, the learner's PolicyServicer
on a real Redis, cells' PolicyWatchers with the learner's public key and a version cache.

Tampered weights, a wrong signature, a truncated download: each is rejected, the cell keeps
its last good version, and the fault reaches the registry and the `fleet status` table.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from rich.console import Console

from actors.heartbeat import HeartbeatSender
from actors.policy_watch import PolicyWatcher
from actors.version_cache import VersionCache
from fleet.common import signing
from fleet.common.policy.config import policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import save_version, sha256_hex, state_dict_to_bytes
from fleet.control.registry import Registry
from fleet.control.status_view import render
from learner import policy_service
from learner.policy_service import PolicyServicer
from learner.publisher import Publisher
from protos.fleetlearn.v1 import policy_pb2
from tests.waiting import wait_until

TASKS = ("pick_cube",)
CAMERAS = ("overhead",)
CELL = "cell-01"


class LossyServicer(PolicyServicer):
    """The real servicer behind a bad link: it can flip a byte of every chunk (tampering in
    transit) or end every fetch stream at a fixed byte (a download that is always cut).
    `sent` notes when each chunk left: (version, monotonic time, bytes)."""

    flip: set[str]
    cut_at: dict[str, int]
    sent: list[tuple[str, float, int]]

    def FetchWeights(self, request, context):  # type: ignore[override]
        for chunk in super().FetchWeights(request, context):
            version = request.version_id
            if version in self.cut_at and chunk.offset >= self.cut_at[version]:
                return
            if version in self.flip and chunk.data:
                data = bytearray(chunk.data)
                data[0] ^= 0xFF
                chunk = policy_pb2.WeightsChunk(
                    offset=chunk.offset, data=bytes(data), total_bytes=chunk.total_bytes
                )
            self.sent.append((version, time.monotonic(), len(chunk.data)))
            yield chunk


@dataclass
class Learner:
    registry: Registry
    servicer: LossyServicer
    address: str
    publisher: Publisher
    private_key_path: Path
    public_key_path: Path
    versions_dir: Path
    seed: list[int] = field(default_factory=lambda: [0])

    def model(self) -> UnifiedPolicy:
        self.seed[0] += 1
        torch.manual_seed(self.seed[0])
        return UnifiedPolicy(policy_config("tiny", TASKS, CAMERAS))

    def save_signed(self, version_id: str) -> Manifest:
        """A signed version registered in the registry but assigned to no cell yet."""
        key = signing.load_private_key(self.private_key_path)
        manifest = Manifest(version_id, None, {}, 1, 1, "")
        model = self.model()
        manifest.model_config = model.config.to_dict()
        weights, _ = save_version(
            self.versions_dir,
            model,
            manifest,
            signer=lambda v, d: signing.sign_digest(key, v, d),
        )
        self.registry.add_version(manifest.to_json(), str(weights))
        return manifest

    def publish(self, publisher: Publisher | None = None) -> Manifest:
        return (publisher or self.publisher).publish(self.model(), training_step=1, data_seen=1)


@pytest.fixture
def learner(registry: Registry, tmp_path: Path) -> Iterator[Learner]:
    private, public = signing.write_key_pair(tmp_path / "keys")
    servicer = LossyServicer(registry, poll_interval_s=0.05, chunk_bytes=64 << 10)
    servicer.flip, servicer.cut_at, servicer.sent = set(), {}, []
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    policy_service.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    versions = tmp_path / "versions"
    yield Learner(
        registry,
        servicer,
        f"127.0.0.1:{port}",
        Publisher(registry, versions, signing_key=private),
        private,
        public,
        versions,
    )
    servicer.stop()
    server.stop(0).wait(5)


@dataclass
class Cell:
    """A cell's distribution half: the watcher, a heartbeat that reports what it runs and
    its last fault (as actors/edge.py does), and the runner the control loop would hold."""

    watcher: PolicyWatcher
    heartbeat: HeartbeatSender
    faults: list[str]
    running: list[str]

    def adopt(self) -> None:
        runner = self.watcher.take_new()
        if runner is not None:
            self.running.append(runner.version_id)

    def stop(self) -> None:
        self.watcher.stop()
        self.heartbeat.stop()


@pytest.fixture
def make_cell(learner: Learner, tmp_path: Path) -> Iterator[Callable[..., Cell]]:
    cells: list[Cell] = []

    def make(cell_id: str = CELL, *, cache_dir: Path | None = None) -> Cell:
        faults: list[str] = []
        running: list[str] = []
        watcher = PolicyWatcher(
            learner.address,
            cell_id,
            deadline_s=5.0,
            on_fault=faults.append,
            verify_key=signing.load_public_key(learner.public_key_path),
            cache=VersionCache(cache_dir or tmp_path / cell_id / "cache", cell_id=cell_id),
            max_fetch_errors=2,
        )

        def snapshot() -> policy_pb2.Heartbeat:
            return policy_pb2.Heartbeat(
                cell_id=cell_id,
                version_running=running[-1] if running else "",
                last_fault=faults[-1] if faults else "",
            )

        heartbeat = HeartbeatSender(
            learner.address, snapshot, interval_s=0.05, deadline_s=5.0, cell_id=cell_id
        )
        cell = Cell(watcher, heartbeat, faults, running)
        watcher.start()
        heartbeat.start()
        cells.append(cell)
        return cell

    yield make
    for cell in cells:
        cell.stop()


def status_text(registry: Registry) -> str:
    console = Console(width=1000, record=True, file=open("/dev/null", "w"))  # noqa: SIM115
    console.print(render(registry))
    return console.export_text()


def run_until_loaded(cell: Cell, version: str) -> None:
    assert wait_until(lambda: cell.watcher.loaded_version == version), cell.faults
    cell.adopt()
    assert cell.running[-1] == version


def assert_rejected(learner: Learner, cell: Cell, version: str, words: str) -> None:
    """The cell refused `version`, still runs its last good one, and says why in the
    registry and in the status table."""
    good = cell.running[-1]

    def reported() -> bool:
        state = {c.cell_id: c for c in learner.registry.cells()}.get(CELL)
        return state is not None and version in state.last_fault and words in state.last_fault

    assert wait_until(reported), (cell.faults, learner.registry.cells())
    cell.adopt()
    assert cell.running[-1] == good
    assert cell.watcher.loaded_version == good
    state = {c.cell_id: c for c in learner.registry.cells()}[CELL]
    assert state.version_running == good
    text = status_text(learner.registry)
    assert version in text and words in text
    assert f"keeping version '{good}'" in state.last_fault


def test_signed_versions_load_and_bad_ones_are_rejected(learner: Learner, make_cell) -> None:
    registry = learner.registry
    v1 = learner.publish()
    cell = make_cell()
    run_until_loaded(cell, v1.version_id)

    # Tampered weights: someone with access to the learner's disk and the registry swaps
    # the file and writes its digest into the manifest. Only the signature catches it.
    v2 = learner.save_signed("v0002")  # registered, not yet assigned to any cell
    other = state_dict_to_bytes(learner.model())
    Path(registry.version(v2.version_id).weights_path).write_bytes(other)
    manifest = json.loads(v2.to_json())
    manifest["sha256"] = sha256_hex(other)
    registry.r.hset(registry._k("version", v2.version_id), "manifest", json.dumps(manifest))
    registry.set_stable(v2.version_id, actor="test", reason="tampered")
    assert_rejected(learner, cell, v2.version_id, "signature does not verify")

    # A wrong signature: signed with a key that is not the learner's.
    priv, _ = signing.write_key_pair(learner.versions_dir.parent / "stranger")
    v3 = learner.publish(Publisher(registry, learner.versions_dir, signing_key=priv))
    assert_rejected(learner, cell, v3.version_id, "signature does not verify")

    # Unsigned versions are refused by a cell that has the learner's key.
    v4 = learner.publish(Publisher(registry, learner.versions_dir))
    assert_rejected(learner, cell, v4.version_id, "unsigned")

    # Tampered in transit: the bytes that arrive do not hash to the signed digest.
    learner.servicer.flip.add(learner.publisher.next_version_id())
    v5 = learner.publish()
    assert_rejected(learner, cell, v5.version_id, "do not match")

    # A good version after all that is taken as usual.
    v6 = learner.publish()
    run_until_loaded(cell, v6.version_id)


def test_truncated_downloads_are_rejected(learner: Learner, make_cell) -> None:
    v1 = learner.publish()
    cell = make_cell()
    run_until_loaded(cell, v1.version_id)

    # The link cuts every fetch at the same byte: resuming gets nowhere, the cell gives up.
    learner.servicer.cut_at[learner.publisher.next_version_id()] = 128 << 10
    v2 = learner.publish()
    assert_rejected(learner, cell, v2.version_id, "fetch failed")

    # The learner's own copy is truncated: it refuses to serve it (DATA_LOSS).
    v3 = learner.save_signed("v0003")
    path = Path(learner.registry.version(v3.version_id).weights_path)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    learner.registry.set_stable(v3.version_id, actor="test", reason="truncated on disk")
    assert_rejected(learner, cell, v3.version_id, "DATA_LOSS")


def test_cache_serves_restarts_and_rollbacks_without_refetch(
    learner: Learner, make_cell, tmp_path: Path
) -> None:
    cache_dir = tmp_path / "cache"
    v1 = learner.publish()
    cell = make_cell(cache_dir=cache_dir)
    run_until_loaded(cell, v1.version_id)
    v2 = learner.publish()
    run_until_loaded(cell, v2.version_id)
    sent = sum(learner.servicer.bytes_sent.values())
    assert sent == sum(
        Path(learner.registry.version(v).weights_path).stat().st_size
        for v in (v1.version_id, v2.version_id)
    )

    # A rollback to v1 comes from the cache: no bytes sent.
    learner.registry.set_stable(v1.version_id, actor="test", reason="rollback")
    run_until_loaded(cell, v1.version_id)
    assert sum(learner.servicer.bytes_sent.values()) == sent
    cell.stop()

    # A restarted cell with the same cache runs v1 without fetching it.
    again = make_cell(cache_dir=cache_dir)
    run_until_loaded(again, v1.version_id)
    assert again.watcher.fetches == 0
    assert sum(learner.servicer.bytes_sent.values()) == sent

    # A corrupt cache entry is dropped and the version fetched again.
    again.stop()
    entry = cache_dir / f"{v1.sha256}.safetensors"
    entry.write_bytes(b"\0" * entry.stat().st_size)
    third = make_cell(cache_dir=cache_dir)
    run_until_loaded(third, v1.version_id)
    assert third.watcher.fetches >= 1
    assert third.watcher.cache is not None and third.watcher.cache.dropped == 1


def test_version_cache_is_bounded_and_content_addressed(tmp_path: Path) -> None:
    cache = VersionCache(tmp_path, max_bytes=250)
    blobs = [bytes([i]) * 100 for i in range(3)]
    for i, blob in enumerate(blobs):
        assert cache.put(blob, sha256_hex(blob))
        time.sleep(0.01)  # distinct mtimes
        if i == 1:
            assert cache.get(sha256_hex(blobs[0])) == blobs[0]  # v0 now most recently used
            time.sleep(0.01)
    assert cache.size_bytes <= 250
    assert cache.get(sha256_hex(blobs[1])) is None  # least recently used went first
    assert cache.get(sha256_hex(blobs[0])) == blobs[0]
    assert cache.get(sha256_hex(blobs[2])) == blobs[2]
    assert not cache.put(b"x" * 300, sha256_hex(b"x" * 300))  # larger than the bound
    with pytest.raises(ValueError):
        cache.put(b"abc", sha256_hex(b"abd"))


@dataclass
class PacedCell:
    """A real ControlLoop on the light sim cell at 20 Hz on the wall clock, with its watcher."""

    loop: Any
    watcher: PolicyWatcher
    clock: Any
    tasks: tuple[str, ...]
    cameras: tuple[str, ...]
    loop_thread: Any  # the thread running loop.run


@contextmanager
def paced_cell_running_v1(learner: Learner, tmp_path: Path) -> Iterator[PacedCell]:
    """Publish v0001 (a tiny model), start a wall-paced cell on `learner` and yield once it
    runs v0001; stop the loop and the watcher on the way out."""
    import threading

    from actors.config import ActorConfig
    from actors.control_loop import ControlLoop
    from drivers.sim import make_sim_cell
    from tests.bench.distribution import WallPacedSimClock

    tasks, cameras = ("pick_cube", "touch_target"), ("overhead", "front")
    torch.manual_seed(0)
    learner.publisher.publish(
        UnifiedPolicy(policy_config("tiny", tasks, cameras)), training_step=0, data_seen=0
    )
    watcher = PolicyWatcher(
        learner.address,
        CELL,
        deadline_s=10.0,
        on_fault=print,
        verify_key=signing.load_public_key(learner.public_key_path),
        cache=VersionCache(tmp_path / "cache"),
    )
    sim = make_sim_cell(
        CELL, cameras=cameras, height=48, width=64, realtime_factor=1.0, takeover_prob=0.0
    )
    clock = WallPacedSimClock(sim.clock)

    class Sink:
        def submit(self, chunk: object) -> bool:
            return True

    loop = ControlLoop(
        ActorConfig(cell_id=CELL, learner_address=learner.address, max_episode_s=30.0),
        sim.hardware,
        sim.scene,
        sim.operator,
        clock,
        Sink(),
        watcher,
    )
    stop = threading.Event()
    runner = threading.Thread(target=loop.run, args=(stop,))
    watcher.start()
    runner.start()
    try:
        assert wait_until(lambda: loop.stats["version_running"] == "v0001", 20.0)
        yield PacedCell(loop, watcher, clock, tasks, cameras, runner)
    finally:
        stop.set()
        runner.join(10)
        watcher.stop()


def test_swapping_in_a_large_version_misses_no_control_tick(
    learner: Learner, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A real ControlLoop on the sim cell at 20 Hz on the wall clock keeps its ticks while a
    ~50 MB version is fetched, verified, loaded and warmed up beside it, and swapped in.

    What makes that true holds on any machine: the hashing, loading and warm-up run on the
    watcher's thread, never the loop's (asserted exactly); the loop keeps ticking through
    the swap, with at most a few late ticks when other work loads the machine."""
    import threading

    import actors.policy_watch as policy_watch
    import fleet.common.policy.weights as weights

    heavy_threads: list[threading.Thread] = []

    def on_thread(fn: Any) -> Any:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            heavy_threads.append(threading.current_thread())
            return fn(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(weights, "model_from_bytes", on_thread(weights.model_from_bytes))
    monkeypatch.setattr(policy_watch, "warm_up", on_thread(policy_watch.warm_up))
    with paced_cell_running_v1(learner, tmp_path) as cell:
        loop, tasks, cameras = cell.loop, cell.tasks, cell.cameras
        # Building and saving the version is the learner's work, which shares this process's
        # GIL with the loop as no cell does (it made ticks late here): done before counting.
        torch.manual_seed(1)
        big = UnifiedPolicy(
            policy_config("tiny", tasks, cameras, d_model=512, n_heads=8, ff_dim=4096, n_layers=2)
        )
        Publisher(
            learner.registry,
            learner.versions_dir,
            rollout_mode="auto",
            signing_key=learner.private_key_path,
        ).publish(big, training_step=1, data_seen=1)
        del big
        heavy_threads.clear()
        time.sleep(0.5)
        t0, late0, steps0 = time.monotonic(), loop.stats["late_ticks"], loop.stats["steps_recorded"]
        learner.registry.set_stable("v0002", actor="test", reason="the cold path: no prefetch")
        assert wait_until(lambda: loop.stats["version_running"] == "v0002", 30.0)
        time.sleep(1.0)  # and a second of running it
        swap_s = time.monotonic() - t0
        late_swap = loop.stats["late_ticks"] - late0
        steps_swap = loop.stats["steps_recorded"] - steps0
        size = Path(learner.registry.version("v0002").weights_path).stat().st_size
        assert size > 40e6
        assert heavy_threads, "the swap built no model: the wrapped loader was not used"
        assert cell.loop_thread not in heavy_threads
        # The loop kept ticking through the swap: no stall. (On an idle machine no tick is
        # late at all; tests/bench/distribution.py measures the lateness itself.)
        assert steps_swap >= 0.5 * 20 * swap_s, (steps_swap, swap_s)
        assert late_swap <= 0.1 * 20 * swap_s, (late_swap, swap_s)
        assert loop.stats["policy_errors"] == 0
