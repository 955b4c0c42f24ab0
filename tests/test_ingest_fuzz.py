"""Thousands of malformed and hostile chunks over a real gRPC socket.

The learner must answer each with a specific status, keep serving, and leave the store
exactly as it was: a bad or hostile cell must never cost the lab its data.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fleet.common.cell_auth import cell_metadata
from learner import ingest
from learner.admission import Admission, StreamLimits
from learner.chunks import decode_chunk
from learner.ingest import IngestServicer
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2, trajectory_pb2_grpc
from tests.test_ingest import TASKS, TOKENS, make_msg

AS_C1 = cell_metadata("c1", TOKENS["c1"])

MAX_BYTES = 16 << 10
MAX_STEPS = 64
Code = grpc.StatusCode
Msg = trajectory_pb2.StepChunk


def _snapshot(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, object]]:
    root = tmp_path_factory.mktemp("fuzzstore")
    store = EpisodeStore(root)
    # A stored episode (2 chunks, still open) that hostile resends and gaps aim at.
    for seq in range(2):
        store.append(decode_chunk(make_msg(seq, episode="base"), known_tasks=TASKS))
    # One stream per example, thousands in seconds: far above a cell's call rate, which
    # tests/test_gateway_hostile.py checks; here only the chunks are under test.
    admission = Admission(TOKENS, StreamLimits(calls_per_s=1e6, call_burst=1e6))
    servicer = IngestServicer(
        store, known_tasks=TASKS, admission=admission, max_steps=MAX_STEPS, max_bytes=MAX_BYTES
    )
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    before = _snapshot(root)
    try:
        yield root, channel
        assert _snapshot(root) == before, "a rejected chunk changed the store"
        assert servicer.stats["steps_stored"] == 0
    finally:
        channel.close()
        # grpcio 1.85 never signals a stopped server once a request failed to deserialize
        # (the call still answers INTERNAL and the server keeps serving); bound the wait.
        server.stop(0).wait(5)


# Each mutation breaks one thing about a good chunk and names the status it must get.
Mutation = Callable[[Msg, st.DataObject], Code]


def _set_tensor_dtype(msg: Msg, data: st.DataObject) -> Code:
    field = data.draw(st.sampled_from(["timestamp", "joint_pos", "action", "reward"]))
    getattr(msg, field).dtype = data.draw(st.sampled_from(["int8", "float16", "complex", "", "?"]))
    return Code.INVALID_ARGUMENT


def _set_tensor_shape(msg: Msg, data: st.DataObject) -> Code:
    field = data.draw(st.sampled_from(["joint_pos", "action", "intervention", "reward"]))
    shape = data.draw(st.lists(st.integers(0, 40), min_size=0, max_size=4))
    tensor = getattr(msg, field)
    if list(shape) == list(tensor.shape):
        shape = [*shape, 2]
    del tensor.shape[:]
    tensor.shape.extend(shape)
    return Code.INVALID_ARGUMENT


def _garble_bytes(msg: Msg, data: st.DataObject) -> Code:
    field = data.draw(st.sampled_from(["timestamp", "joint_pos", "action", "reward"]))
    tensor = getattr(msg, field)
    tensor.data = data.draw(st.binary(max_size=64).filter(lambda b: len(b) != len(tensor.data)))
    return Code.INVALID_ARGUMENT


def _non_finite(msg: Msg, data: st.DataObject) -> Code:
    field = data.draw(st.sampled_from(["timestamp", "joint_pos", "action", "reward"]))
    tensor = getattr(msg, field)
    arr = np.frombuffer(tensor.data, dtype=np.dtype(tensor.dtype).newbyteorder("<")).copy()
    arr[data.draw(st.integers(0, arr.size - 1))] = data.draw(
        st.sampled_from([np.nan, np.inf, -np.inf])
    )
    tensor.data = arr.tobytes()
    return Code.INVALID_ARGUMENT


def _oversize_bytes(msg: Msg, data: st.DataObject) -> Code:
    n = len(msg.cameras[0].frames)
    big = b"\xff\xd8" + b"\0" * (MAX_BYTES // n + 1)
    del msg.cameras[0].frames[:]
    msg.cameras[0].frames.extend([big] * n)
    return Code.RESOURCE_EXHAUSTED


def _too_many_steps(msg: Msg, data: st.DataObject) -> Code:
    n = data.draw(st.integers(MAX_STEPS + 1, MAX_STEPS * 3))
    big = make_msg(0, n=n)
    big.cameras[0].frames[:] = [b"\xff\xd8"] * n  # small frames: over the step limit only
    big.episode_id = msg.episode_id
    msg.CopyFrom(big)
    return Code.RESOURCE_EXHAUSTED


def _seq_gap(msg: Msg, data: st.DataObject) -> Code:
    msg.seq = data.draw(st.integers(3, 2**40))
    msg.episode_id = data.draw(st.sampled_from(["base", "fresh"]))
    return Code.FAILED_PRECONDITION


def _seq_repeat(msg: Msg, data: st.DataObject) -> Code:
    seq = data.draw(st.integers(0, 1))
    msg.CopyFrom(make_msg(seq, episode="base"))
    return Code.OK  # acked again as a duplicate, stored once


def _other_cells_id(msg: Msg, data: st.DataObject) -> Code:
    msg.cell_id = data.draw(st.sampled_from(["c2", "c3", "cell-99"]))
    return Code.PERMISSION_DENIED  # the stream is authenticated as c1


def _hostile_id(msg: Msg, data: st.DataObject) -> Code:
    msg.episode_id = data.draw(
        st.one_of(
            st.sampled_from(
                ["", "..", "../../etc", "zarr.json", ".hidden", "-rf", "a/b", "a" * 200]
            ),
            st.text(min_size=1, max_size=20).filter(lambda s: not s.isascii() or "/" in s),
        )
    )
    return Code.INVALID_ARGUMENT


def _unknown_task(msg: Msg, data: st.DataObject) -> Code:
    msg.task = data.draw(st.text(max_size=30).filter(lambda t: t not in TASKS))
    return Code.INVALID_ARGUMENT


def _bad_camera(msg: Msg, data: st.DataObject) -> Code:
    cam = msg.cameras[0]
    kind = data.draw(st.sampled_from(["encoding", "size", "count", "magic", "channels"]))
    if kind == "encoding":
        cam.encoding = data.draw(st.sampled_from(["gif", "", "JPEG", "x" * 50]))
    elif kind == "size":
        cam.height = data.draw(st.sampled_from([0, 9000, 2**31 - 1]))
    elif kind == "count":
        cam.frames.append(cam.frames[0])
    elif kind == "magic":
        cam.frames[0] = data.draw(
            st.binary(min_size=1, max_size=32).filter(lambda b: b[:2] != b"\xff\xd8")
        )
    else:
        cam.channels = data.draw(st.sampled_from([0, 2, 5, 1000]))
    return Code.INVALID_ARGUMENT


def _bad_outcome(msg: Msg, data: st.DataObject) -> Code:
    if data.draw(st.booleans()):
        msg.last = True  # closing chunk without an outcome
    else:
        msg.outcome.success = True  # outcome on a chunk that is not last
    return Code.INVALID_ARGUMENT


MUTATIONS: list[Mutation] = [
    _set_tensor_dtype,
    _set_tensor_shape,
    _garble_bytes,
    _non_finite,
    _oversize_bytes,
    _too_many_steps,
    _seq_gap,
    _seq_repeat,
    _other_cells_id,
    _hostile_id,
    _unknown_task,
    _bad_camera,
    _bad_outcome,
]


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(data=st.data())
def test_hostile_chunks_get_a_specific_status_and_change_nothing(
    served: tuple[Path, grpc.Channel], data: st.DataObject
) -> None:
    _, channel = served
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
    mutations = data.draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=1))
    msg = make_msg(0, episode=data.draw(st.sampled_from(["fresh", "base"])))
    if msg.episode_id == "base":
        msg.seq = 2  # the next chunk the base episode expects: only the mutation spoils it
        msg.first_step = 12
    expected = mutations[0](msg, data)
    # A good chunk after the bad one shows the stream is still usable.
    probe = make_msg(1, episode="base")
    acks = list(stub.Upload(iter([msg, probe]), timeout=10, metadata=AS_C1))
    assert len(acks) == 2
    ack = acks[0]
    if expected == Code.OK:
        assert ack.durable and ack.duplicate, ack
    else:
        assert not ack.durable, (mutations[0].__name__, ack)
        assert ack.code == expected.value[0], (mutations[0].__name__, ack.code, ack.message)
        assert ack.message, "a rejection says what is wrong"
    assert acks[1].durable and acks[1].duplicate


def test_undecodable_bytes_do_not_take_the_server_down(served: tuple[Path, grpc.Channel]) -> None:
    _, channel = served
    raw = channel.stream_stream(
        "/fleetlearn.v1.TrajectoryService/Upload",
        request_serializer=None,
        response_deserializer=None,
    )
    rng = np.random.default_rng(0)
    for _ in range(50):
        junk = rng.integers(0, 256, int(rng.integers(1, 200)), dtype=np.uint8).tobytes()
        try:
            list(raw(iter([junk]), timeout=5, metadata=AS_C1))
        except grpc.RpcError as exc:  # junk that happens to parse is refused as a chunk
            assert exc.code() == Code.INVALID_ARGUMENT, exc
            assert "not a valid fleetlearn.v1.StepChunk protobuf" in exc.details()
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
    (ack,) = stub.Upload(iter([make_msg(0, episode="base")]), timeout=5, metadata=AS_C1)
    assert ack.durable and ack.duplicate
