"""TrajectoryService over real gRPC on a loopback port: acks mean durable, bad chunks are named."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import numpy as np
import pytest
import simplejpeg

from fleet.common.cell_auth import cell_metadata
from fleet.common.wire import to_tensor
from learner import ingest
from learner.chunks import DecodedChunk
from learner.ingest import IngestServicer
from learner.store import EpisodeRef, EpisodeStore, EpisodeSummary
from protos.fleetlearn.v1 import arrays_pb2, trajectory_pb2, trajectory_pb2_grpc

DEADLINE_S = 10.0
T = 6
TOKENS = {"c1": "secret-1", "c2": "secret-2"}
TASKS = ("pick", "place")


def make_msg(
    seq: int,
    *,
    cell: str = "c1",
    episode: str = "e1",
    last: bool = False,
    n: int = T,
) -> trajectory_pb2.StepChunk:
    """A well-formed chunk `seq` of an episode; tests then break one field of it."""
    first = seq * n
    steps = np.arange(first, first + n)
    frame = simplejpeg.encode_jpeg(np.full((8, 8, 3), seq * 20 % 256, np.uint8), quality=90)
    msg = trajectory_pb2.StepChunk(
        cell_id=cell,
        episode_id=episode,
        seq=seq,
        first_step=first,
        task="pick",
        policy_version="v0002",
        timestamp=to_tensor(steps * 0.02),
        joint_pos=to_tensor(np.tile(steps[:, None], (1, 14)).astype(np.float32)),
        action=to_tensor(np.tile(-steps[:, None], (1, 14)).astype(np.float32)),
        intervention=to_tensor(steps % 2 == 0),
        reward=to_tensor(np.zeros(n, np.float32)),
        last=last,
    )
    msg.cameras.append(
        arrays_pb2.CameraFrames(
            camera="overhead", encoding="jpeg", height=8, width=8, channels=3, frames=[frame] * n
        )
    )
    if last:
        msg.outcome.success = True
        msg.outcome.reason = "success"
        msg.outcome.ended_at = float(steps[-1] * 0.02)
    return msg


@dataclass
class Served:
    store: EpisodeStore
    servicer: IngestServicer
    stub: trajectory_pb2_grpc.TrajectoryServiceStub
    chunks_seen: list[DecodedChunk] = field(default_factory=list)
    ended: list[tuple[DecodedChunk, EpisodeSummary]] = field(default_factory=list)

    def upload(
        self, msgs: list[trajectory_pb2.StepChunk], *, as_cell: str = "c1"
    ) -> list[trajectory_pb2.ChunkAck]:
        """One stream with `as_cell`'s call credentials (metadata: plaintext test server)."""
        metadata = cell_metadata(as_cell, TOKENS[as_cell])
        return list(self.stub.Upload(iter(msgs), timeout=DEADLINE_S, metadata=metadata))


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Served]:
    store = EpisodeStore(tmp_path / "store")
    chunks_seen: list[DecodedChunk] = []
    ended: list[tuple[DecodedChunk, EpisodeSummary]] = []
    servicer = IngestServicer(
        store,
        known_tasks=TASKS,
        tokens=TOKENS,
        on_chunk=chunks_seen.append,
        on_episode_end=lambda c, d: ended.append((c, d)),
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    ingest.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    try:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
        yield Served(store, servicer, stub, chunks_seen, ended)
    finally:
        channel.close()
        server.stop(0).wait(5)


def ack_key(ack: trajectory_pb2.ChunkAck) -> tuple[str, str, int, bool, bool]:
    return ack.cell_id, ack.episode_id, ack.seq, ack.durable, ack.duplicate


def test_episode_is_acked_durable_and_stored_exactly(served: Served) -> None:
    msgs = [make_msg(0), make_msg(1), make_msg(2, last=True)]
    acks = served.upload(msgs)

    assert [ack_key(a) for a in acks] == [("c1", "e1", s, True, False) for s in range(3)]
    assert all(a.code == 0 for a in acks)
    data = served.store.read_episode(EpisodeRef("c1", "e1"))
    np.testing.assert_array_equal(data.joint_pos[:, 0], np.arange(3 * T, dtype=np.float32))
    np.testing.assert_array_equal(data.action[:, 13], -np.arange(3 * T, dtype=np.float32))
    np.testing.assert_array_equal(data.intervention, np.arange(3 * T) % 2 == 0)
    assert data.frames["overhead"][T] == msgs[1].cameras[0].frames[0]
    assert data.attrs["complete"] and data.attrs["outcome"]["success"]
    assert served.store.totals() == (3 * T, 1)

    assert [c.seq for c in served.chunks_seen] == [0, 1, 2]
    ((last, episode),) = served.ended
    assert last.seq == 2
    assert episode.steps == 3 * T and episode.intervention_steps == 9
    assert episode.intervention_steps == int(data.intervention.sum())
    assert served.servicer.stats == {
        "chunks_acked": 3,
        "duplicates": 0,
        "rejected": 0,
        "steps_stored": 3 * T,
    }


def test_resend_is_acked_durable_duplicate_and_stored_once(served: Served) -> None:
    served.upload([make_msg(0), make_msg(1)])
    # The actor lost its connection before the acks arrived and resends everything.
    acks = served.upload([make_msg(0), make_msg(1), make_msg(2, last=True), make_msg(2, last=True)])

    assert [ack_key(a) for a in acks] == [
        ("c1", "e1", 0, True, True),
        ("c1", "e1", 1, True, True),
        ("c1", "e1", 2, True, False),
        ("c1", "e1", 2, True, True),
    ]
    assert served.store.totals() == (3 * T, 1)
    assert len(served.ended) == 1  # the episode ended once, however often its end was sent
    assert served.servicer.stats["duplicates"] == 3
    assert served.servicer.stats["steps_stored"] == 3 * T


def test_gap_is_failed_precondition_and_the_stream_goes_on(served: Served) -> None:
    acks = served.upload([make_msg(0), make_msg(2), make_msg(1), make_msg(2, last=True)])

    gap = acks[1]
    assert not gap.durable and gap.seq == 2
    assert gap.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert "expected seq 1" in gap.message and "c1" in gap.message and "e1" in gap.message
    assert [a.durable for a in acks] == [True, False, True, True]
    assert served.store.totals() == (3 * T, 1)
    assert served.store.episodes() == [EpisodeRef("c1", "e1")]


def _set(field_name: str, value: np.ndarray) -> Callable[[trajectory_pb2.StepChunk], None]:
    def breaker(msg: trajectory_pb2.StepChunk) -> None:
        getattr(msg, field_name).CopyFrom(to_tensor(value))

    return breaker


def _nan_action(msg: trajectory_pb2.StepChunk) -> None:
    action = np.zeros((T, 14), np.float32)
    action[3, 5] = np.nan
    msg.action.CopyFrom(to_tensor(action))


def _attr(name: str, value: object) -> Callable[[trajectory_pb2.StepChunk], None]:
    def breaker(msg: trajectory_pb2.StepChunk) -> None:
        setattr(msg, name, value)

    return breaker


def _camera(name: str, value: object) -> Callable[[trajectory_pb2.StepChunk], None]:
    def breaker(msg: trajectory_pb2.StepChunk) -> None:
        setattr(msg.cameras[0], name, value)

    return breaker


def _drop_frame(msg: trajectory_pb2.StepChunk) -> None:
    del msg.cameras[0].frames[-1]


def _not_jpeg(msg: trajectory_pb2.StepChunk) -> None:
    msg.cameras[0].frames[2] = b"GIF89a not a jpeg"


def _outcome_not_last(msg: trajectory_pb2.StepChunk) -> None:
    msg.outcome.success = True


def _too_many_steps(msg: trajectory_pb2.StepChunk) -> None:
    msg.CopyFrom(make_msg(0, n=1001))


INVALID = grpc.StatusCode.INVALID_ARGUMENT
MALFORMED = {
    "joint_pos float64": (_set("joint_pos", np.zeros((T, 14))), INVALID, "joint_pos"),
    "joint_pos 7 wide": (_set("joint_pos", np.zeros((T, 7), np.float32)), INVALID, "joint_pos"),
    "action NaN": (_nan_action, INVALID, "action"),
    "reward one step short": (_set("reward", np.zeros(T - 1, np.float32)), INVALID, "reward"),
    "intervention as int": (_set("intervention", np.zeros(T, np.int64)), INVALID, "intervention"),
    "timestamp missing": (lambda m: m.ClearField("timestamp"), INVALID, "timestamp"),
    "frame missing": (_drop_frame, INVALID, "overhead"),
    "frame not jpeg": (_not_jpeg, INVALID, "overhead"),
    "unknown encoding": (_camera("encoding", "webp"), INVALID, "encoding"),
    "unknown task": (_attr("task", "juggle"), INVALID, "juggle"),
    "episode id escapes": (_attr("episode_id", "../../etc"), INVALID, "episode_id"),
    "episode id with slash": (_attr("episode_id", "a/b"), INVALID, "episode_id"),
    "episode id empty": (_attr("episode_id", ""), INVALID, "episode_id"),
    "outcome on a middle chunk": (_outcome_not_last, INVALID, "outcome"),
    "last without outcome": (_attr("last", True), INVALID, "outcome"),
    "too many steps": (_too_many_steps, grpc.StatusCode.RESOURCE_EXHAUSTED, "1001 steps"),
    "another cell's id": (_attr("cell_id", "c2"), grpc.StatusCode.PERMISSION_DENIED, "c2"),
    "unknown cell": (_attr("cell_id", "c9"), grpc.StatusCode.PERMISSION_DENIED, "c9"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_malformed_chunk_is_refused_with_a_named_reason(served: Served, case: str) -> None:
    breaker, code, mentions = MALFORMED[case]
    bad = make_msg(0)
    breaker(bad)

    bad_ack, good_ack = served.upload([bad, make_msg(0)])

    assert not bad_ack.durable and not bad_ack.duplicate
    assert bad_ack.code == code.value[0], bad_ack.message
    assert mentions in bad_ack.message
    if code != grpc.StatusCode.PERMISSION_DENIED:
        assert "seq 0" in bad_ack.message
    # The bad chunk left no trace, and the same stream still takes the good one.
    assert good_ack.durable and not good_ack.duplicate
    assert served.store.episodes(complete_only=False) == [EpisodeRef("c1", "e1")]
    assert served.store.totals() == (T, 1)
    assert served.servicer.stats["rejected"] == 1


def test_garbage_chunk_is_refused_and_the_server_lives(served: Served) -> None:
    acks = served.upload([trajectory_pb2.StepChunk(), trajectory_pb2.StepChunk(cell_id="c1")])
    assert [a.durable for a in acks] == [False, False]
    assert served.store.totals() == (0, 0)
    assert served.upload([make_msg(0)])[0].durable


def test_failing_callbacks_and_store_errors_do_not_break_the_stream(
    served: Served, monkeypatch: pytest.MonkeyPatch
) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("redis is down")

    served.servicer.on_chunk = explode
    served.servicer.on_episode_end = explode
    real_append = served.store.append
    calls = {"n": 0}

    def flaky_append(chunk: DecodedChunk):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        return real_append(chunk)

    monkeypatch.setattr(served.store, "append", flaky_append)
    acks = served.upload([make_msg(0), make_msg(1), make_msg(1), make_msg(2, last=True)])

    assert [a.durable for a in acks] == [True, False, True, True]
    assert acks[1].code == grpc.StatusCode.INTERNAL.value[0]
    assert served.store.read_episode(EpisodeRef("c1", "e1")).attrs["complete"]
    assert served.store.totals() == (3 * T, 1)


def test_concurrent_streams_from_two_cells(served: Served) -> None:
    results: dict[str, list[trajectory_pb2.ChunkAck]] = {}

    def cell(cell_id: str) -> None:
        msgs = [
            make_msg(s, cell=cell_id, episode=f"{cell_id}-ep{e}", last=s == 2)
            for e in range(2)
            for s in range(3)
        ]
        results[cell_id] = served.upload(msgs, as_cell=cell_id)

    threads = [threading.Thread(target=cell, args=(c,)) for c in TOKENS]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert all(a.durable and not a.duplicate for acks in results.values() for a in acks)
    assert len(served.store.episodes()) == 4
    assert served.store.totals() == (4 * 3 * T, 4)
    assert len(served.ended) == 4


def test_a_takeover_that_spans_chunks_counts_once(served: Served) -> None:
    """Takeovers are contiguous runs of intervention steps, counted across chunk boundaries
    (one chunk's last step and the next chunk's first step can belong to one takeover)."""
    flags = ([0, 0, 1, 1, 1, 1], [1, 1, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1])
    msgs = [make_msg(0), make_msg(1), make_msg(2, last=True)]
    for msg, f in zip(msgs, flags, strict=True):
        msg.intervention.CopyFrom(to_tensor(np.array(f, dtype=bool)))
    served.upload(msgs)
    ((_, summary),) = served.ended
    assert summary.intervention_steps == 8
    assert summary.takeovers == 3  # steps 2-7, step 10, step 17
    attrs = served.store.read_episode(EpisodeRef("c1", "e1")).attrs
    assert attrs["takeovers"] == 3


def test_an_episode_past_the_step_limit_is_refused_and_what_came_before_is_kept(
    served: Served,
) -> None:
    """A cell whose episode never ends cannot grow it without bound: chunks past the limit
    are refused (RESOURCE_EXHAUSTED: final, the cell does not resend them) with the limit,
    the flag that sets it and what to do; earlier steps and other episodes are untouched."""
    served.servicer.max_episode_steps = 2 * T + 1
    acks = served.upload([make_msg(0), make_msg(1), make_msg(2), make_msg(3, last=True)])
    assert [a.durable for a in acks] == [True, True, False, False]
    refused = acks[2]
    assert refused.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
    assert f"limit of {2 * T + 1} steps an episode" in refused.message
    assert "--max-episode-steps" in refused.message and "max_episode_s" in refused.message
    assert "c1" in refused.message and "e1" in refused.message
    data = served.store.read_episode(EpisodeRef("c1", "e1"))
    assert len(data.joint_pos) == 2 * T and not data.attrs.get("complete")
    # The next episode starts from zero again.
    acks = served.upload([make_msg(0, episode="e2"), make_msg(1, episode="e2", last=True)])
    assert all(a.durable for a in acks)
    assert served.store.read_episode(EpisodeRef("c1", "e2")).attrs["complete"]
