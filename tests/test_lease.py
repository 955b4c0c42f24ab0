"""The learner's lease: alive while the holding process lives, gone the instant it is
killed, never held by two learners at once; once gone, nothing is acked or published."""

from __future__ import annotations

import os
import pickle
import signal
import subprocess
import sys
import time
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.lease import Lease, LeaseHeld, hold_lease
from fleet.control.registry import Registry
from learner import ingest
from learner.ingest import IngestServicer
from learner.publisher import LearnerGone, Publisher
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2_grpc
from tests.test_store import make_msg

HOLDER = """
import sys, time
from pathlib import Path
from fleet.control.lease import hold_lease
hold_lease(Path(sys.argv[1]))
print("HELD", flush=True)
time.sleep(600)
"""


def test_lease_lives_and_dies_with_its_holder(tmp_path: Path) -> None:
    path = tmp_path / "learner.lease"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "HELD"
        # A worker's copy travels by pickle (Ray) and probes the same file.
        lease = pickle.loads(pickle.dumps(Lease(path)))
        assert lease.alive() and lease.alive()
        with pytest.raises(LeaseHeld, match=f"pid {holder.pid}"):
            hold_lease(path, timeout_s=0.2)
        holder.send_signal(signal.SIGKILL)
        holder.wait(10)
        assert not lease.alive()
        assert not lease.alive(), "once gone, a lease stays gone"
        # The probe let go of the file: the next learner takes the lease at once.
        fd = hold_lease(path, timeout_s=1.0)
        try:
            assert Lease(path).alive(), "the new holder is alive to new probes"
            assert not lease.alive(), "an old probe does not come back to life"
        finally:
            os.close(fd)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)


def test_nothing_is_acked_or_published_once_the_lease_is_gone(
    tmp_path: Path, redis_server: str
) -> None:

    alive = [True]
    # The publisher: refuses before writing a file or touching the registry.
    registry = Registry(redis_server, prefix=f"lease{time.time_ns()}:")
    publisher = Publisher(registry, tmp_path / "versions", alive=lambda: alive[0])
    model = UnifiedPolicy(policy_config("tiny", ("pick",), ("overhead",), chunk_len=10))
    assert publisher.publish(model, training_step=1, data_seen=1).version_id == "v0001"
    alive[0] = False
    with pytest.raises(LearnerGone):
        publisher.publish(model, training_step=2, data_seen=2)
    assert [v.version_id for v in registry.versions()] == ["v0001"]
    assert sorted(p.name for p in (tmp_path / "versions").iterdir()) == [
        "v0001.json",
        "v0001.safetensors",
    ]
    # Ingest: the stream ends UNAVAILABLE instead of acking, with a message to act on.
    alive[0] = True
    store = EpisodeStore(tmp_path / "store")
    server = grpc.server(futures.ThreadPoolExecutor(4))
    ingest.add_to_server(server, IngestServicer(store, known_tasks=None, alive=lambda: alive[0]))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
            (ack,) = stub.Upload(iter([make_msg(0)]), timeout=30)
            assert ack.durable
            alive[0] = False
            with pytest.raises(grpc.RpcError) as err:
                list(stub.Upload(iter([make_msg(1)]), timeout=30))
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "learner process behind this server has died" in str(err.value.details())
    finally:
        server.stop(0).wait(5)
