"""PolicyService over real gRPC on a loopback port, backed by a real redis-server."""

from __future__ import annotations

import hashlib
import json
import threading
import time
import zlib
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import numpy as np
import pytest
from safetensors.numpy import save_file

from fleet.common.cell_auth import cell_metadata
from fleet.control.registry import Registry
from learner import policy_service
from learner.policy_service import PolicyServicer
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc

DEADLINE_S = 10.0


def publish(registry: Registry, tmp_path: Path, version_id: str, n_floats: int = 40_000) -> bytes:
    """Write a safetensors file, register it and make it stable; returns the file's bytes."""
    path = tmp_path / f"{version_id}.safetensors"
    rng = np.random.default_rng(zlib.crc32(version_id.encode()))
    save_file({"w": rng.standard_normal(n_floats).astype(np.float32)}, str(path))
    data = path.read_bytes()
    manifest = {
        "version_id": version_id,
        "sha256": hashlib.sha256(data).hexdigest(),
        "signature": "",
        "created_at": time.time(),
    }
    registry.add_version(json.dumps(manifest), str(path))
    registry.set_stable(version_id, actor="test", reason="publish")
    return data


def serve(registry: Registry, **kwargs) -> tuple[grpc.Server, PolicyServicer, str]:
    servicer = PolicyServicer(registry, **kwargs)
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    policy_service.add_to_server(server, servicer)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, servicer, f"127.0.0.1:{port}"


@pytest.fixture
def service(
    registry: Registry,
) -> Iterator[tuple[PolicyServicer, policy_pb2_grpc.PolicyServiceStub]]:
    server, servicer, address = serve(registry, chunk_bytes=16 << 10)
    channel = grpc.insecure_channel(address)
    yield servicer, policy_pb2_grpc.PolicyServiceStub(channel)
    channel.close()
    servicer.stop()
    server.stop(0).wait(5)


def fetch(stub, version_id: str, offset: int = 0, **kw) -> list[policy_pb2.WeightsChunk]:
    request = policy_pb2.FetchRequest(cell_id="c1", version_id=version_id, offset=offset, **kw)
    return list(stub.FetchWeights(request, timeout=DEADLINE_S))


def test_watch_sends_current_then_each_new_stable(service, registry, tmp_path) -> None:
    servicer, stub = service
    stream = stub.WatchAssignment(policy_pb2.WatchRequest(cell_id="c1"), timeout=DEADLINE_S)
    assert next(stream).version_id == ""  # nothing published yet, said at once

    data = publish(registry, tmp_path, "v0001")
    t0 = time.monotonic()
    first = next(stream)
    assert time.monotonic() - t0 < 1.0
    assert first.version_id == "v0001"
    assert first.size_bytes == len(data)
    assert first.sha256 == hashlib.sha256(data).hexdigest()
    assert json.loads(first.manifest_json)["version_id"] == "v0001"
    assert first.published_at > 0

    publish(registry, tmp_path, "v0002")
    t0 = time.monotonic()
    assert next(stream).version_id == "v0002"
    assert time.monotonic() - t0 < 1.0

    stream.cancel()
    deadline = time.monotonic() + 2.0
    while servicer._watchers and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not servicer._watchers  # the cancelled stream let go of its cell


def test_many_watchers_share_one_poller(service, registry, tmp_path) -> None:
    _, stub = service
    publish(registry, tmp_path, "v0001")
    streams = [
        stub.WatchAssignment(policy_pb2.WatchRequest(cell_id=f"c{i}"), timeout=DEADLINE_S)
        for i in range(8)
    ]
    assert {next(s).version_id for s in streams} == {"v0001"}
    pollers = [t for t in threading.enumerate() if t.name == "policy-assignments"]
    assert len(pollers) == 1

    publish(registry, tmp_path, "v0002")
    assert {next(s).version_id for s in streams} == {"v0002"}
    for s in streams:
        s.cancel()


def test_stop_ends_watches_with_unavailable(service, registry) -> None:
    servicer, stub = service
    stream = stub.WatchAssignment(policy_pb2.WatchRequest(cell_id="c1"), timeout=DEADLINE_S)
    next(stream)
    servicer.stop()
    with pytest.raises(grpc.RpcError) as err:
        next(stream)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_fetch_reassembles_resumes_and_serves_from_memory(service, registry, tmp_path) -> None:
    _, stub = service
    data = publish(registry, tmp_path, "v0001")
    assert len(data) > 8 * (16 << 10)  # several chunks

    chunks = fetch(stub, "v0001")
    assert len(chunks) > 1
    assert all(c.total_bytes == len(data) for c in chunks)
    assert [c.offset for c in chunks] == list(range(0, len(data), 16 << 10))
    assert b"".join(c.data for c in chunks) == data

    offset = len(data) // 3 + 7
    resumed = fetch(stub, "v0001", offset=offset, chunk_bytes=50_000)
    assert resumed[0].offset == offset
    assert data[:offset] + b"".join(c.data for c in resumed) == data

    (end,) = fetch(stub, "v0001", offset=len(data))
    assert (end.offset, end.data, end.total_bytes) == (len(data), b"", len(data))

    (tmp_path / "v0001.safetensors").unlink()  # read once: later cells are served from memory
    assert b"".join(c.data for c in fetch(stub, "v0001")) == data


def test_fetch_errors(service, registry, tmp_path) -> None:
    _, stub = service
    with pytest.raises(grpc.RpcError) as err:
        fetch(stub, "v9999")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert "v9999" in err.value.details()

    data = publish(registry, tmp_path, "v0001")
    with pytest.raises(grpc.RpcError) as err:
        fetch(stub, "v0001", offset=len(data) + 1)
    assert err.value.code() == grpc.StatusCode.OUT_OF_RANGE
    assert str(len(data)) in err.value.details()

    (tmp_path / "v0002.safetensors").write_bytes(b"not what the manifest says")
    registry.add_version(
        json.dumps({"version_id": "v0002", "sha256": "00" * 32}),
        str(tmp_path / "v0002.safetensors"),
    )
    with pytest.raises(grpc.RpcError) as err:
        fetch(stub, "v0002")
    assert err.value.code() == grpc.StatusCode.DATA_LOSS


def test_heartbeat_lands_in_redis(service, registry) -> None:
    _, stub = service
    adopted = [{"version": "v0001", "adopted_at": 123.5}]
    reply = stub.ReportHeartbeat(
        policy_pb2.Heartbeat(
            cell_id="c7",
            version_running="v0001",
            task="fold",
            episodes=4,
            steps_recorded=1200,
            steps_acked=1100,
            loop_hz=49.8,
            late_ticks=3,
            last_fault="",
            sent_at=1.0,
            versions_adopted_json=json.dumps(adopted),
            successes=2,
            interventions=15,
        ),
        timeout=DEADLINE_S,
    )
    assert abs(reply.server_time - time.time()) < 5
    (cell,) = registry.cells()
    assert cell.alive
    assert (cell.cell_id, cell.version_running, cell.task) == ("c7", "v0001", "fold")
    assert (cell.counters.episodes, cell.counters.steps_recorded, cell.counters.steps_acked) == (
        4,
        1200,
        1100,
    )
    assert (cell.counters.late_ticks, cell.counters.successes, cell.counters.interventions) == (
        3,
        2,
        15,
    )
    assert cell.counters.loop_hz == pytest.approx(49.8)
    assert cell.versions_adopted == adopted
    assert cell.last_seen == pytest.approx(reply.server_time)

    with pytest.raises(grpc.RpcError) as err:
        stub.ReportHeartbeat(
            policy_pb2.Heartbeat(cell_id="c7", versions_adopted_json="{oops"), timeout=DEADLINE_S
        )
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT


def test_tokens_guard_every_rpc(registry, tmp_path) -> None:
    server, servicer, address = serve(registry, tokens={"c1": "right"})
    try:
        with grpc.insecure_channel(address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            calls = [
                lambda md: next(
                    stub.WatchAssignment(
                        policy_pb2.WatchRequest(cell_id="c1"), timeout=DEADLINE_S, metadata=md
                    )
                ),
                lambda md: list(
                    stub.FetchWeights(
                        policy_pb2.FetchRequest(cell_id="c1", version_id="v1"),
                        timeout=DEADLINE_S,
                        metadata=md,
                    )
                ),
                lambda md: stub.ReportHeartbeat(
                    policy_pb2.Heartbeat(cell_id="c1"), timeout=DEADLINE_S, metadata=md
                ),
            ]
            refusals = [
                (cell_metadata("c1", "wrong"), grpc.StatusCode.UNAUTHENTICATED, "wrong token"),
                (cell_metadata("c1", ""), grpc.StatusCode.UNAUTHENTICATED, "no token"),
                ((), grpc.StatusCode.UNAUTHENTICATED, "no cell id"),
                (cell_metadata("c9", "right"), grpc.StatusCode.PERMISSION_DENIED, "tokens file"),
            ]
            for call in calls:
                for metadata, code, says in refusals:
                    with pytest.raises(grpc.RpcError) as err:
                        call(metadata)
                    assert err.value.code() == code, (metadata, err.value)
                    assert says in err.value.details()
            right = cell_metadata("c1", "right")
            assert calls[0](right).version_id == ""
            calls[2](right)
    finally:
        servicer.stop()
        server.stop(0).wait(5)


def test_a_fetch_ends_when_its_cell_is_revoked_mid_download(registry, tmp_path) -> None:
    tokens = {"c1": "right"}  # the servicer reads this mapping live, like a tokens file
    data = publish(registry, tmp_path, "v0001", n_floats=10_000_000)  # 40 MB
    server, servicer, address = serve(registry, tokens=tokens, chunk_bytes=16 << 10)
    try:
        with grpc.insecure_channel(address) as channel:
            stub = policy_pb2_grpc.PolicyServiceStub(channel)
            stream = stub.FetchWeights(
                policy_pb2.FetchRequest(cell_id="c1", version_id="v0001"),
                timeout=DEADLINE_S,
                metadata=cell_metadata("c1", "right"),
            )
            received = len(next(stream).data)
            del tokens["c1"]
            with pytest.raises(grpc.RpcError) as err:
                for chunk in stream:
                    received += len(chunk.data)
            assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert "revoked" in err.value.details()
            assert received < len(data)
    finally:
        servicer.stop()
        server.stop(0).wait(5)
