"""A hostile client, built only from the .proto stubs, against a real gateway over mutual TLS:
stream floods, idle streams, undecodable requests, oversize fields, bombs, revoked cells and
cross-cell writes. Each attack must get a specific status and a message a person can act on,
the server must stay up, and the other cells must not notice."""

from __future__ import annotations

import json
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import numpy as np
import pytest

from fleet.common import tls
from fleet.common.cell_auth import call_credentials
from learner.admission import StreamLimits
from learner.gateway import Gateway
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc, trajectory_pb2, trajectory_pb2_grpc
from tests.conftest import wipe_default_registry
from tests.test_ingest import TASKS, make_msg
from tests.test_ingest_frames import _jpeg_claiming, _with_frames, _zstd_bomb
from tests.waiting import wait_for

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from make_certs import make_certs

HONEST = ("c1", "c2", "c3", "c4")
EVIL = "evil"  # a cell with a valid certificate and token that turns hostile
CELLS = (*HONEST, EVIL)
DEADLINE_S = 20.0
Code = grpc.StatusCode


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("lab")
    make_certs(out, ["127.0.0.1"], [*CELLS, "stranger"])  # stranger: signed, not allowed
    return out


@dataclass
class Learner:
    gateway: Gateway
    lab: Path
    tokens_file: Path
    tokens: dict[str, str]

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gateway.port}"

    def channel(self, cell: str, token: str | None = None) -> grpc.Channel:
        """A cell's channel: its certificate, and its id and token as call credentials."""
        creds = grpc.composite_channel_credentials(
            tls.channel_credentials(self.lab, cell),
            call_credentials(cell, self.tokens.get(cell, "") if token is None else token),
        )
        return grpc.secure_channel(self.address, creds)

    def write_tokens(self, tokens: dict[str, str]) -> None:
        tmp = self.tokens_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(tokens))
        tmp.replace(self.tokens_file)  # how an operator should edit it: atomically


@contextmanager
def _serve(tmp_path: Path, lab: Path, redis_url: str, limits: StreamLimits) -> Iterator[Learner]:
    tokens = {cell: f"token-of-{cell}" for cell in CELLS}
    tokens_file = tmp_path / "tokens.json"
    tokens_file.write_text(json.dumps(tokens))
    wipe_default_registry(redis_url)  # the Gateway's registry: no other test's versions
    gateway = Gateway(
        tmp_path / "store",
        redis_url,
        TASKS,
        tls_dir=lab,
        require_client_cert=True,
        tokens_file=tokens_file,
        limits=limits,
    )
    gateway.start()
    try:
        yield Learner(gateway, lab, tokens_file, tokens)
    finally:
        gateway.stop(grace_s=1.0)
        wipe_default_registry(redis_url)


@pytest.fixture
def learner(tmp_path: Path, lab: Path, redis_server: str) -> Iterator[Learner]:
    with _serve(tmp_path, lab, redis_server, StreamLimits(idle_timeout_s=60.0)) as served:
        yield served


class IdleRequests:
    """A request stream that sends nothing until released."""

    def __init__(self) -> None:
        self.release = threading.Event()

    def __call__(self) -> Iterator[trajectory_pb2.StepChunk]:
        self.release.wait()
        return
        yield  # a generator


def _latencies(
    learner: Learner, cell: str, seconds: float, hz: float = 20.0, n: int = 5
) -> list[float]:
    """A cell recording at `hz`, sending a chunk of `n` steps as soon as it is full: each
    step's time from its recording to the chunk's durable ack."""
    sent: dict[int, float] = {}
    out: list[float] = []
    chunks = int(seconds * hz / n)
    period = n / hz

    def requests() -> Iterator[trajectory_pb2.StepChunk]:
        start = time.monotonic()
        for seq in range(chunks):
            due = start + (seq + 1) * period  # the chunk's last step is recorded now
            time.sleep(max(0.0, due - time.monotonic()))
            sent[seq] = due
            yield make_msg(seq, cell=cell, episode="ep", n=n, last=seq == chunks - 1)

    with learner.channel(cell) as channel:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
        for ack in stub.Upload(requests(), timeout=seconds + 60):
            assert ack.durable, ack.message
            now = time.monotonic()
            out += [now - (sent[ack.seq] - (n - 1 - i) / hz) for i in range(n)]
    assert len(out) == chunks * n
    return out


def test_one_cell_with_500_idle_streams_does_not_stall_the_others(learner: Learner) -> None:
    limits = learner.gateway.limits
    idle = IdleRequests()
    codes: list[Code] = []
    messages: list[str] = []
    lock = threading.Lock()
    with learner.channel(EVIL) as evil:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(evil)
        watch = policy_pb2_grpc.PolicyServiceStub(evil)
        calls = [stub.Upload(idle(), timeout=120) for _ in range(500)]
        calls += [
            watch.WatchAssignment(policy_pb2.WatchRequest(cell_id=EVIL), timeout=120)
            for _ in range(100)
        ]

        def settle(call: grpc.Call) -> None:
            try:
                for _ in call:
                    pass
            except grpc.RpcError as exc:
                with lock:
                    codes.append(exc.code())
                    messages.append(exc.details() or "")

        drains = [threading.Thread(target=settle, args=(c,), daemon=True) for c in calls]
        for t in drains:
            t.start()
        # The flood is refused at admission, fast: all but the per-cell cap.
        wait_for(lambda: len(codes) >= 600 - limits.per_cell, 60, "the flood to be refused")
        assert set(codes) == {Code.RESOURCE_EXHAUSTED}
        # Refused for the per-cell stream cap, or for opening streams faster than a cell may.
        assert all(("open streams" in m and "close one" in m) or "faster" in m for m in messages)
        assert learner.gateway.admission.open_streams() == {EVIL: limits.per_cell}

        # Meanwhile four other cells record and upload as usual.
        results: dict[str, list[float]] = {}

        def run(cell: str) -> None:
            results[cell] = _latencies(learner, cell, seconds=6.0)

        honest = [threading.Thread(target=run, args=(c,)) for c in HONEST]
        for t in honest:
            t.start()
        for t in honest:
            t.join(timeout=120)
        latencies = np.concatenate([results[c] for c in HONEST])
        p99 = float(np.percentile(latencies, 99))
        assert p99 <= 2.0, f"step-to-durable p99 {p99:.3f} s with the flood held open"

        # The attacker leaves: every stream it held is given back.
        idle.release.set()
        for call in calls:
            call.cancel()
    wait_for(lambda: learner.gateway.admission.total_open() == 0, 30, "all streams released")
    # Proof that no worker is still held: the learner's whole stream capacity opens and
    # answers at once.
    with learner.channel("c1") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        watches = [
            stub.WatchAssignment(policy_pb2.WatchRequest(cell_id="c1"), timeout=DEADLINE_S)
            for _ in range(limits.per_cell)
        ]
        assert all(next(w).version_id == "" for w in watches)
        for w in watches:
            w.cancel()
    assert learner.gateway.stats()["chunks_acked"] == sum(len(r) for r in results.values()) // 5


def test_global_cap_keeps_room_for_heartbeats(tmp_path: Path, lab: Path, redis_server: str) -> None:
    limits = StreamLimits(per_cell=4, total=8, unary_reserve=4)
    with _serve(tmp_path, lab, redis_server, limits) as learner:
        idle = IdleRequests()
        held: list[grpc.Call] = []
        channels = [learner.channel(c) for c in ("c1", "c2")]
        for channel in channels:
            stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
            held += [stub.Upload(idle(), timeout=60) for _ in range(4)]
        wait_for(lambda: learner.gateway.admission.total_open() == 8, 30, "8 streams open")
        with learner.channel("c3") as channel:
            with pytest.raises(grpc.RpcError) as err:
                stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
                list(stub.Upload(iter([make_msg(0, cell="c3")]), timeout=DEADLINE_S))
            assert err.value.code() == Code.RESOURCE_EXHAUSTED
            assert "learner has 8 open streams" in err.value.details()
            # Unary calls have workers of their own.
            policy = policy_pb2_grpc.PolicyServiceStub(channel)
            for _ in range(20):
                policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c3"), timeout=DEADLINE_S)
        idle.release.set()
        for call in held:
            call.cancel()
        for channel in channels:
            channel.close()
        wait_for(lambda: learner.gateway.admission.total_open() == 0, 30, "streams released")


def test_idle_upload_stream_is_closed_with_a_clear_status(
    tmp_path: Path, lab: Path, redis_server: str
) -> None:
    with _serve(tmp_path, lab, redis_server, StreamLimits(idle_timeout_s=1.0)) as learner:
        idle = IdleRequests()
        with learner.channel("c1") as channel:
            stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)

            def one_chunk_then_silence() -> Iterator[trajectory_pb2.StepChunk]:
                yield make_msg(0, cell="c1")
                yield from idle()

            call = stub.Upload(one_chunk_then_silence(), timeout=60)
            t0 = time.monotonic()
            with pytest.raises(grpc.RpcError) as err:
                for ack in call:
                    assert ack.durable
            assert time.monotonic() - t0 < 30
            assert err.value.code() == Code.DEADLINE_EXCEEDED
            assert "idle timeout" in err.value.details()
            idle.release.set()
        wait_for(lambda: learner.gateway.admission.total_open() == 0, 30, "stream released")


def _raw_call(channel: grpc.Channel, method: str, kind: str, junk: bytes) -> grpc.RpcError:
    """Call `method` with bytes that are not its request type; returns the error."""
    make = getattr(channel, kind)
    call = make(method, request_serializer=None, response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        if kind == "stream_stream":
            list(call(iter([junk]), timeout=DEADLINE_S))
        elif kind == "unary_stream":
            list(call(junk, timeout=DEADLINE_S))
        else:
            call(junk, timeout=DEADLINE_S)
    return err.value


@pytest.mark.parametrize(
    ("method", "kind", "type_name"),
    [
        ("/fleetlearn.v1.TrajectoryService/Upload", "stream_stream", "StepChunk"),
        ("/fleetlearn.v1.PolicyService/WatchAssignment", "unary_stream", "WatchRequest"),
        ("/fleetlearn.v1.PolicyService/FetchWeights", "unary_stream", "FetchRequest"),
        ("/fleetlearn.v1.PolicyService/ReportHeartbeat", "unary_unary", "Heartbeat"),
    ],
)
def test_undecodable_requests_get_invalid_argument(
    learner: Learner, method: str, kind: str, type_name: str
) -> None:
    # A truncated varint in field 1's length: never valid protobuf.
    with learner.channel("c1") as channel:
        error = _raw_call(channel, method, kind, b"\x0a\xff\xff\xff\xff\xff")
        assert error.code() == Code.INVALID_ARGUMENT, error
        assert f"not a valid fleetlearn.v1.{type_name} protobuf" in error.details()
        policy = policy_pb2_grpc.PolicyServiceStub(channel)  # the server is still there
        policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S)


@pytest.mark.parametrize(
    ("beat", "says"),
    [
        (policy_pb2.Heartbeat(cell_id="c1", last_fault="x" * (4 << 20)), "last_fault"),
        (policy_pb2.Heartbeat(cell_id="c1", versions_adopted_json="[" * 10_000), "nests"),
        (
            policy_pb2.Heartbeat(cell_id="c1", versions_adopted_json="[" + "{}," * 300 + "{}]"),
            "at most",
        ),
        (policy_pb2.Heartbeat(cell_id="c1", task="t" * 1000), "task"),
        (policy_pb2.Heartbeat(cell_id="c1", loop_hz=float("nan")), "loop_hz"),
        (policy_pb2.Heartbeat(cell_id="c" * 5000), "cell_id"),
    ],
)
def test_oversize_heartbeat_fields_are_refused(
    learner: Learner, beat: policy_pb2.Heartbeat, says: str
) -> None:
    with learner.channel("c1") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportHeartbeat(beat, timeout=DEADLINE_S)
        assert err.value.code() == Code.INVALID_ARGUMENT, err.value
        assert says in err.value.details()


@pytest.mark.parametrize("chunk_bytes", [1, 100, (3 << 20) + 1, 2**32 - 1])
def test_fetch_chunk_size_is_bounded(learner: Learner, chunk_bytes: int) -> None:
    with learner.channel("c1") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        request = policy_pb2.FetchRequest(cell_id="c1", version_id="v1", chunk_bytes=chunk_bytes)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.FetchWeights(request, timeout=DEADLINE_S))
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "chunk_bytes" in err.value.details()


def test_oversize_metadata_is_refused(learner: Learner) -> None:
    with learner.channel("c1", token="t" * 5000) as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            stub.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S)
        assert err.value.code() == Code.INVALID_ARGUMENT
        assert "metadata too long" in err.value.details()


def test_bombs_over_the_wire_are_refused_and_leave_nothing(learner: Learner) -> None:
    jpeg_bomb = _with_frames([_jpeg_claiming(60000, 60000)] * 6)
    zstd_bomb = _with_frames([_zstd_bomb(4 << 30)] * 6, encoding="zstd16", channels=1)
    zstd_bomb.episode_id = "e2"
    late_start = make_msg(0)
    late_start.episode_id, late_start.first_step = "e3", 40
    with learner.channel("c1") as channel:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
        acks = list(stub.Upload(iter([jpeg_bomb, zstd_bomb, late_start]), timeout=DEADLINE_S))
    assert [a.durable for a in acks] == [False, False, False]
    assert all(a.code == Code.INVALID_ARGUMENT.value[0] for a in acks)
    assert "cell c1 episode e1 seq 0: cameras[wrist]" in acks[0].message
    assert "60000x60000" in acks[0].message
    assert "cell c1 episode e2 seq 0: cameras[wrist]" in acks[1].message
    assert "first_step" in acks[2].message
    assert learner.gateway.totals() == {"steps": 0, "episodes": 0}
    assert not (learner.gateway.store.root / "episodes" / "c1").exists()


def test_cross_cell_writes_are_refused(learner: Learner) -> None:
    with learner.channel("c1") as channel:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
        (ack,) = stub.Upload(iter([make_msg(0, cell="c2")]), timeout=DEADLINE_S)
        assert not ack.durable and ack.code == Code.PERMISSION_DENIED.value[0]
        assert "authenticated as cell 'c1'" in ack.message
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        with pytest.raises(grpc.RpcError) as err:
            next(policy.WatchAssignment(policy_pb2.WatchRequest(cell_id="c2"), timeout=5))
        assert err.value.code() == Code.PERMISSION_DENIED
    # A certificate for c1 carrying c2's own id and token is refused at the door.
    creds = grpc.composite_channel_credentials(
        tls.channel_credentials(learner.lab, "c1"),
        call_credentials("c2", learner.tokens["c2"]),
    )
    with grpc.secure_channel(learner.address, creds) as forged:
        stub = trajectory_pb2_grpc.TrajectoryServiceStub(forged)
        with pytest.raises(grpc.RpcError) as err:
            list(stub.Upload(iter([make_msg(0, cell="c2")]), timeout=DEADLINE_S))
        assert err.value.code() == Code.PERMISSION_DENIED
        assert "certificate is for 'c1'" in err.value.details()
    assert learner.gateway.totals() == {"steps": 0, "episodes": 0}


def test_removing_a_cell_from_the_tokens_file_revokes_it_without_restart(
    learner: Learner,
) -> None:
    with learner.channel("c2") as channel:
        trajectory = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        # An open upload stream and an open watch, both working.
        more = threading.Event()

        def chunks() -> Iterator[trajectory_pb2.StepChunk]:
            yield make_msg(0, cell="c2")
            more.wait(30)
            yield make_msg(1, cell="c2")

        upload = trajectory.Upload(chunks(), timeout=60)
        assert next(upload).durable
        watch = policy.WatchAssignment(policy_pb2.WatchRequest(cell_id="c2"), timeout=60)
        assert next(watch).version_id == ""

        revoked_at = time.monotonic()
        learner.write_tokens({c: t for c, t in learner.tokens.items() if c != "c2"})

        def refused() -> bool:
            try:
                policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c2"), timeout=5)
            except grpc.RpcError as exc:
                return exc.code() == Code.PERMISSION_DENIED
            return False

        wait_for(refused, 10, "new calls from the revoked cell to be refused")
        with pytest.raises(grpc.RpcError) as err:
            next(watch)  # the open watch is closed too
        assert err.value.code() == Code.PERMISSION_DENIED
        assert "revoked" in err.value.details()
        more.set()
        with pytest.raises(grpc.RpcError) as err:
            next(upload)  # and the open upload refuses its next chunk
        assert err.value.code() == Code.PERMISSION_DENIED
        assert time.monotonic() - revoked_at < 10
    assert learner.gateway.totals()["steps"] == 6  # only the chunk before the revocation
    # Other cells never noticed; putting the cell back lets it in again.
    with learner.channel("c1") as channel:
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S)
    learner.write_tokens(learner.tokens)
    with learner.channel("c2") as channel:
        policy = policy_pb2_grpc.PolicyServiceStub(channel)

        def allowed() -> bool:
            try:
                policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c2"), timeout=5)
            except grpc.RpcError:
                return False
            return True

        wait_for(allowed, 10, "the restored cell to be let in again")


def test_a_broken_tokens_file_keeps_the_last_good_list(learner: Learner) -> None:
    learner.tokens_file.write_text("{not json")
    with learner.channel("c1") as channel:
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        deadline = time.monotonic() + 2.5  # past the reload interval
        while time.monotonic() < deadline:
            policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S)
            time.sleep(0.1)  # within the cell's call rate


def test_signed_certificate_outside_the_allow_list_is_refused(learner: Learner) -> None:
    with learner.channel("stranger", token="guess") as channel:
        policy = policy_pb2_grpc.PolicyServiceStub(channel)
        for call in (
            lambda: policy.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="stranger"), timeout=5),
            lambda: next(
                policy.WatchAssignment(policy_pb2.WatchRequest(cell_id="stranger"), timeout=5)
            ),
            lambda: list(
                trajectory_pb2_grpc.TrajectoryServiceStub(channel).Upload(
                    iter([make_msg(0, cell="stranger")]), timeout=5
                )
            ),
        ):
            with pytest.raises(grpc.RpcError) as err:
                call()
            assert err.value.code() == Code.PERMISSION_DENIED
            assert "not in the learner's tokens file" in err.value.details()


def test_a_stream_held_past_its_lifetime_is_cancelled(
    tmp_path: Path, lab: Path, redis_server: str
) -> None:
    with _serve(tmp_path, lab, redis_server, StreamLimits(max_stream_s=1.0)) as learner:
        with learner.channel("c1") as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            watch = stub.WatchAssignment(policy_pb2.WatchRequest(cell_id="c1"))  # no deadline
            assert next(watch).version_id == ""
            with pytest.raises(grpc.RpcError) as err:
                next(watch)
            assert err.value.code() == Code.CANCELLED
        wait_for(lambda: learner.gateway.admission.total_open() == 0, 30, "stream released")


def test_a_heartbeat_flood_is_throttled_and_others_are_served(learner: Learner) -> None:
    refused: list[str] = []
    served = 0
    lock = threading.Lock()

    def flood() -> None:
        nonlocal served
        with learner.channel(EVIL) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            for _ in range(60):
                try:
                    stub.ReportHeartbeat(policy_pb2.Heartbeat(cell_id=EVIL), timeout=DEADLINE_S)
                    with lock:
                        served += 1
                except grpc.RpcError as exc:
                    assert exc.code() == Code.RESOURCE_EXHAUSTED, exc
                    with lock:
                        refused.append(exc.details())

    flooders = [threading.Thread(target=flood) for _ in range(8)]
    for t in flooders:
        t.start()
    slowest = 0.0
    with learner.channel("c1") as channel:
        stub = policy_pb2_grpc.PolicyServiceStub(channel)
        honest = 0
        while honest < 3 or any(t.is_alive() for t in flooders):
            honest += 1
            t0 = time.monotonic()
            stub.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S)
            slowest = max(slowest, time.monotonic() - t0)
            time.sleep(0.1)
    for t in flooders:
        t.join(timeout=60)
    assert len(refused) + served == 480
    assert len(refused) >= 300, f"only {len(refused)} of 480 flood calls refused"
    assert all("faster than 20 a second" in m for m in refused)
    assert slowest < 1.0, f"an honest heartbeat took {slowest:.2f} s during the flood"
