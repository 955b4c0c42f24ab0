"""The edge actor's network side over real gRPC on loopback: chunk upload with acks, resend
after a learner restart, policy fetch and verification, heartbeats; and the recorder that
cuts an episode into the chunks the learner accepts."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import numpy as np
import pytest
import simplejpeg

from actors.heartbeat import HeartbeatSender
from actors.policy_watch import PolicyWatcher
from actors.recorder import EpisodeRecorder, chunk_steps_of
from actors.uplink import Uplink
from drivers.interfaces import Frame
from fleet.common.net import free_port
from fleet.common.wire import from_tensor, to_tensor
from learner.chunks import decode_chunk
from protos.fleetlearn.v1 import (
    policy_pb2,
    policy_pb2_grpc,
    trajectory_pb2,
    trajectory_pb2_grpc,
)
from tests.waiting import wait_until

CELL = "cell-01"


def make_chunk(
    episode: str, seq: int, steps: int = 3, task: str = "pick_cube"
) -> trajectory_pb2.StepChunk:
    return trajectory_pb2.StepChunk(
        cell_id=CELL,
        episode_id=episode,
        seq=seq,
        first_step=seq * steps,
        task=task,
        timestamp=to_tensor(np.arange(steps, dtype=np.float64)),
        joint_pos=to_tensor(np.zeros((steps, 14), np.float32)),
        action=to_tensor(np.zeros((steps, 14), np.float32)),
        intervention=to_tensor(np.zeros(steps, np.bool_)),
        reward=to_tensor(np.zeros(steps, np.float32)),
    )


# -- a fake learner ---------------------------------------------------------------------


class FakeTrajectory(trajectory_pb2_grpc.TrajectoryServiceServicer):
    """Stores each (cell, episode, seq) once and in seq order, acks after storing; can hold
    acks, reject a task, or fail a chunk once as a passing store error."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.stored: dict[tuple[str, str, int], trajectory_pb2.StepChunk] = {}
        self.order: list[tuple[str, str, int]] = []  # first arrivals, in arrival order
        self.next_seq: dict[tuple[str, str], int] = {}
        self.duplicates = 0
        self.hold_acks = threading.Event()
        self.fail_once: set[tuple[str, str, int]] = set()  # answer INTERNAL the first time

    def Upload(self, request_iterator, context) -> Iterator[trajectory_pb2.ChunkAck]:
        for msg in request_iterator:
            key = (msg.cell_id, msg.episode_id, msg.seq)
            ids = {"cell_id": msg.cell_id, "episode_id": msg.episode_id, "seq": msg.seq}
            if msg.task == "reject":
                yield trajectory_pb2.ChunkAck(
                    **ids,
                    durable=False,
                    code=grpc.StatusCode.INVALID_ARGUMENT.value[0],
                    message="unknown task 'reject'",
                )
                continue
            with self.lock:
                # Like the real store: seqs in order per episode, a resend is a duplicate.
                next_seq = self.next_seq.get(key[:2], 0)
                if key in self.fail_once:
                    self.fail_once.discard(key)
                    code, message = grpc.StatusCode.INTERNAL, "store hiccup; resend"
                elif msg.seq > next_seq:
                    code, message = grpc.StatusCode.FAILED_PRECONDITION, "gap"
                else:
                    code, message = grpc.StatusCode.OK, ""
                    duplicate = msg.seq < next_seq
                    if duplicate:
                        self.duplicates += 1
                    else:
                        self.stored[key] = msg
                        self.order.append(key)
                        self.next_seq[key[:2]] = next_seq + 1
            if code is not grpc.StatusCode.OK:
                yield trajectory_pb2.ChunkAck(
                    **ids, durable=False, code=code.value[0], message=message
                )
                continue
            while self.hold_acks.is_set() and context.is_active():
                time.sleep(0.01)
            if not context.is_active():
                return
            yield trajectory_pb2.ChunkAck(**ids, durable=True, duplicate=duplicate)


class FakePolicy(policy_pb2_grpc.PolicyServiceServicer):
    """Assignments set by the test, weights served in small chunks, heartbeats collected."""

    CHUNK = 1000

    def __init__(self) -> None:
        self.cond = threading.Condition()
        self.assignment = policy_pb2.Assignment(version_id="")
        self.weights: dict[str, bytes] = {}
        self.interrupt_once: set[str] = set()  # abort the first fetch after one chunk
        self.fetch_offsets: list[tuple[str, int]] = []
        self.heartbeats: list[policy_pb2.Heartbeat] = []

    def assign(self, version_id: str, sha256: str | None = None) -> None:
        data = self.weights[version_id]
        with self.cond:
            self.assignment = policy_pb2.Assignment(
                version_id=version_id,
                manifest_json="{}",
                size_bytes=len(data),
                sha256=sha256 if sha256 is not None else hashlib.sha256(data).hexdigest(),
            )
            self.cond.notify_all()

    def WatchAssignment(self, request, context) -> Iterator[policy_pb2.Assignment]:
        sent = None
        while context.is_active():
            with self.cond:
                if self.assignment is sent:
                    self.cond.wait(timeout=0.05)
                    continue
                sent = self.assignment
            yield sent

    def FetchWeights(self, request, context) -> Iterator[policy_pb2.WeightsChunk]:
        self.fetch_offsets.append((request.version_id, request.offset))
        data = self.weights.get(request.version_id)
        if data is None:
            context.abort(grpc.StatusCode.NOT_FOUND, "no such version")
        for start in range(request.offset, len(data), self.CHUNK):
            yield policy_pb2.WeightsChunk(
                offset=start, data=data[start : start + self.CHUNK], total_bytes=len(data)
            )
            if request.version_id in self.interrupt_once:
                self.interrupt_once.discard(request.version_id)
                context.abort(grpc.StatusCode.UNAVAILABLE, "link dropped")

    def ReportHeartbeat(self, request, context) -> policy_pb2.HeartbeatReply:
        self.heartbeats.append(request)
        return policy_pb2.HeartbeatReply(server_time=time.time())


class FakeLearner:
    """A gRPC server on a loopback port that can be killed and restarted on the same port."""

    def __init__(self) -> None:
        self.trajectory = FakeTrajectory()
        self.policy = FakePolicy()
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.server: grpc.Server | None = None

    def start(self) -> FakeLearner:
        server = grpc.server(
            futures.ThreadPoolExecutor(max_workers=8),
            options=[
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.http2.min_ping_interval_without_data_ms", 5000),
            ],
        )
        trajectory_pb2_grpc.add_TrajectoryServiceServicer_to_server(self.trajectory, server)
        policy_pb2_grpc.add_PolicyServiceServicer_to_server(self.policy, server)
        assert server.add_insecure_port(self.address) == self.port
        server.start()
        self.server = server
        return self

    def kill(self) -> None:
        if self.server is not None:
            self.server.stop(0).wait(5)
            self.server = None


@pytest.fixture
def learner() -> Iterator[FakeLearner]:
    fake = FakeLearner().start()
    yield fake
    fake.kill()


@pytest.fixture
def uplink(learner: FakeLearner) -> Iterator[Uplink]:
    up = Uplink(learner.address, deadline_s=5.0, max_queue=64, cell_id=CELL)
    up.start()
    yield up
    up.stop()


# -- uplink -----------------------------------------------------------------------------


def test_every_chunk_arrives_exactly_once_in_order(learner: FakeLearner, uplink: Uplink) -> None:
    expected = [(CELL, f"ep{e}", s) for e in range(3) for s in range(6)]
    for _, episode, seq in expected:
        assert uplink.submit(make_chunk(episode, seq))
    assert uplink.flush(10.0)
    assert learner.trajectory.order == expected
    assert learner.trajectory.duplicates == 0
    stats = uplink.stats
    assert stats["chunks_acked"] == 18
    assert stats["steps_acked"] == 18 * 3
    assert stats["resends"] == stats["dropped"] == stats["rejected"] == 0
    assert stats["connected"]


def test_learner_restart_mid_stream_loses_nothing(learner: FakeLearner, uplink: Uplink) -> None:
    traj = learner.trajectory
    for seq in range(5):
        uplink.submit(make_chunk("ep0", seq))
    assert uplink.flush(10.0)
    # The learner stores seq 5 but dies before acking it.
    traj.hold_acks.set()
    for seq in range(5, 8):
        uplink.submit(make_chunk("ep0", seq))
    assert wait_until(lambda: (CELL, "ep0", 5) in traj.stored)
    learner.kill()
    traj.hold_acks.clear()
    for seq in range(8, 10):  # recorded while the learner is down: queued, not blocked
        assert uplink.submit(make_chunk("ep0", seq))
    assert wait_until(lambda: not uplink.stats["connected"])
    assert uplink.pending == 5
    learner.start()
    assert uplink.flush(15.0), uplink.stats
    assert traj.order == [(CELL, "ep0", s) for s in range(10)]  # each stored once, in order
    assert traj.duplicates >= 1  # seq 5 was resent (stored but never acked) and deduped
    stats = uplink.stats
    assert stats["resends"] >= 1
    assert stats["chunks_acked"] == 10
    assert stats["steps_acked"] == 30
    assert stats["dropped"] == stats["rejected"] == 0


def test_rejected_ack_is_counted_not_retried(learner: FakeLearner, uplink: Uplink) -> None:
    assert uplink.submit(make_chunk("ep0", 0, task="reject"))
    assert uplink.submit(make_chunk("ep1", 0))
    assert uplink.flush(10.0)
    stats = uplink.stats
    assert stats["rejected"] == 1
    assert stats["chunks_acked"] == 1
    assert stats["steps_acked"] == 3
    assert list(learner.trajectory.stored) == [(CELL, "ep1", 0)]


def test_transient_rejection_resends_in_order(learner: FakeLearner, uplink: Uplink) -> None:
    learner.trajectory.fail_once.add((CELL, "ep0", 1))
    for seq in range(4):
        uplink.submit(make_chunk("ep0", seq))
    assert uplink.flush(10.0)
    assert learner.trajectory.order == [(CELL, "ep0", s) for s in range(4)]
    stats = uplink.stats
    assert stats["transient_rejects"] == 1
    assert stats["rejected"] == 0
    assert stats["chunks_acked"] == 4


def test_missing_ack_past_the_deadline_reconnects_and_resends(learner: FakeLearner) -> None:
    traj = learner.trajectory
    traj.hold_acks.set()  # a learner that stores but never answers
    up = Uplink(learner.address, deadline_s=0.5, max_queue=16, cell_id=CELL)
    up.start()
    try:
        for seq in range(3):
            up.submit(make_chunk("ep0", seq))
        assert wait_until(lambda: up.stats["resends"] >= 1, timeout_s=5.0)
        traj.hold_acks.clear()
        assert up.flush(10.0)
    finally:
        up.stop()
    assert traj.order == [(CELL, "ep0", s) for s in range(3)]
    assert traj.duplicates >= 1
    assert up.stats["chunks_acked"] == 3


def test_submit_never_blocks_and_drops_only_when_full() -> None:
    up = Uplink(f"127.0.0.1:{free_port()}", deadline_s=1.0, max_queue=8, cell_id=CELL)
    up.start()
    try:
        t0 = time.monotonic()
        results = [up.submit(make_chunk("ep0", seq)) for seq in range(9)]
        elapsed = time.monotonic() - t0
        assert results == [True] * 8 + [False]
        assert elapsed < 0.2
        assert up.stats["dropped"] == 1
        assert not up.flush(0.3)
    finally:
        t0 = time.monotonic()
        up.stop()
        assert time.monotonic() - t0 < 3.0


# -- recorder ---------------------------------------------------------------------------


def _frames(step: int) -> dict[str, Frame]:
    image = np.zeros((24, 32, 3), np.uint8)
    image[:, :, 0] = 40 + step  # a flat colour survives JPEG almost exactly
    image[:, :, 2] = 200
    return {"overhead": Frame("overhead", image, float(step)), "front": Frame("front", image, 0.0)}


def _add(rec: EpisodeRecorder, step: int, version: str = "v1") -> trajectory_pb2.StepChunk | None:
    return rec.add_step(
        stamp=0.05 * step,
        joint_pos=np.full(14, step, np.float32),
        action=np.full(14, -step, np.float32),
        intervention=step % 3 == 0,
        reward=-1.0 + 0.1 * step,
        frames=_frames(step),
        policy_version=version,
    )


def test_recorder_chunks_are_what_the_learner_accepts() -> None:
    rec = EpisodeRecorder(CELL, "ep-1", "pick_cube", chunk_steps=4, jpeg_quality=95)
    chunks = [c for step in range(10) if (c := _add(rec, step)) is not None]
    assert [chunk_steps_of(c) for c in chunks] == [4, 4]  # the 10th step is held back
    chunks.append(rec.finish(success=True, reason="success", started_at=0.0, ended_at=0.5))
    assert [c.seq for c in chunks] == [0, 1, 2]
    assert [c.first_step for c in chunks] == [0, 4, 8]
    assert [c.last for c in chunks] == [False, False, True]
    assert chunks[-1].outcome.success and chunks[-1].outcome.reason == "success"
    decoded = [decode_chunk(c, known_tasks={"pick_cube"}) for c in chunks]
    joint_pos = np.concatenate([d.joint_pos for d in decoded])
    np.testing.assert_array_equal(joint_pos[:, 0], np.arange(10))
    np.testing.assert_array_equal(
        np.concatenate([d.intervention for d in decoded]), [s % 3 == 0 for s in range(10)]
    )
    assert all(c.policy_version == "v1" for c in chunks)
    # The token travels as call credentials, never in a chunk (and so never in the spool).
    assert all("token" not in c.DESCRIPTOR.fields_by_name for c in chunks)
    last = decoded[-1].cameras["overhead"]
    assert (last.height, last.width, last.channels) == (24, 32, 3)
    image = simplejpeg.decode_jpeg(last.frames[1], colorspace="RGB")
    assert abs(int(image[5, 5, 0]) - (40 + 9)) <= 3
    assert from_tensor(chunks[-1].reward, "reward")[-1] == pytest.approx(-0.1)


def test_recorder_closes_a_chunk_when_the_version_changes() -> None:
    rec = EpisodeRecorder(CELL, "ep-2", "pick_cube", chunk_steps=20, jpeg_quality=90)
    out = [_add(rec, step, "" if step < 3 else "v7") for step in range(5)]
    assert [c is not None for c in out] == [False, False, False, True, False]
    first = out[3]
    assert first is not None
    assert first.policy_version == "" and chunk_steps_of(first) == 3
    final = rec.finish(success=False, reason="aborted", started_at=0.0, ended_at=1.0)
    assert final.policy_version == "v7" and final.first_step == 3 and chunk_steps_of(final) == 2
    with pytest.raises(RuntimeError):
        _add(rec, 5)


# -- policy watcher ---------------------------------------------------------------------


class FakeRunner:
    def __init__(self, version_id: str, data: bytes) -> None:
        self.version_id = version_id
        self.data = data


def _factory(data: bytes, assignment: policy_pb2.Assignment) -> FakeRunner:
    if data.startswith(b"broken"):
        raise ValueError("weights do not match the model architecture")
    return FakeRunner(assignment.version_id, data)


@pytest.fixture
def watcher(learner: FakeLearner) -> Iterator[tuple[PolicyWatcher, list[str]]]:
    faults: list[str] = []
    w = PolicyWatcher(
        learner.address,
        CELL,
        deadline_s=5.0,
        on_fault=faults.append,
        runner_factory=_factory,
    )
    w.start()
    yield w, faults
    w.stop()


def test_watcher_fetches_resumes_and_hands_over(learner: FakeLearner, watcher) -> None:
    w, faults = watcher
    policy = learner.policy
    policy.weights["v1"] = bytes(range(256)) * 20  # 5120 bytes, six chunks
    policy.interrupt_once.add("v1")
    policy.assign("v1")
    assert wait_until(lambda: w.loaded_version == "v1")
    assert policy.fetch_offsets == [("v1", 0), ("v1", 1000)]  # resumed, not restarted
    runner = w.take_new()
    assert runner is not None and runner.version_id == "v1"
    assert runner.data == policy.weights["v1"]
    assert w.take_new() is None
    assert w.current_assignment == "v1"
    assert faults == []


def test_watcher_keeps_last_good_version_on_bad_hash_or_load(learner: FakeLearner, watcher) -> None:
    w, faults = watcher
    policy = learner.policy
    policy.weights["v1"] = b"good" * 500
    policy.weights["v2"] = b"tampered" * 500
    policy.weights["v3"] = b"broken" * 500
    policy.weights["v4"] = b"better" * 500
    policy.assign("v1")
    assert wait_until(lambda: w.loaded_version == "v1")
    assert w.take_new().version_id == "v1"

    policy.assign("v2", sha256=hashlib.sha256(b"something else").hexdigest())
    assert wait_until(lambda: any("sha256" in f for f in faults))
    policy.assign("v3")
    assert wait_until(lambda: any("does not load" in f for f in faults))
    assert w.take_new() is None
    assert w.loaded_version == "v1"
    assert all("keeping version 'v1'" in f for f in faults)

    policy.assign("v4")
    assert wait_until(lambda: w.loaded_version == "v4")
    assert w.take_new().version_id == "v4"


# -- heartbeat --------------------------------------------------------------------------


def test_heartbeats_arrive_and_failures_never_raise(learner: FakeLearner) -> None:
    count = iter(range(1000))

    def snapshot() -> policy_pb2.Heartbeat:
        return policy_pb2.Heartbeat(cell_id=CELL, episodes=next(count))

    sender = HeartbeatSender(
        learner.address, snapshot, interval_s=0.05, deadline_s=2.0, cell_id=CELL
    )
    sender.start()
    assert wait_until(lambda: len(learner.policy.heartbeats) >= 3)
    learner.kill()
    assert wait_until(lambda: sender.failed >= 1)
    sender.stop()
    assert sender.send_now(timeout_s=0.5) is False
    beats = learner.policy.heartbeats
    assert [b.episodes for b in beats[:3]] == [0, 1, 2]
    assert beats[0].cell_id == CELL
