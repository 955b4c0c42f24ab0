"""Several ingest servers on one address: the kernel spreads cells' connections over them."""

from __future__ import annotations

from pathlib import Path

import grpc

from learner.gateway import Gateway
from learner.store import EpisodeRef
from protos.fleetlearn.v1 import trajectory_pb2_grpc
from tests.test_ingest import TASKS, make_msg

CONNECTIONS = 16


def test_two_servers_on_one_address_both_take_streams(tmp_path: Path, redis_server: str) -> None:
    first = Gateway(tmp_path / "store", redis_server, TASKS, reuse_port=True)
    port = first.start()
    second = Gateway(tmp_path / "store", redis_server, TASKS, port=port, reuse_port=True)
    try:
        assert second.start() == port
        for i in range(CONNECTIONS):
            # A private subchannel pool: each "cell" gets its own TCP connection.
            with grpc.insecure_channel(
                f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
            ) as ch:
                stub = trajectory_pb2_grpc.TrajectoryServiceStub(ch)
                msgs = [make_msg(s, episode=f"e{i}", last=s == 2) for s in range(3)]
                acks = list(stub.Upload(iter(msgs), timeout=5))
            assert [a.durable for a in acks] == [True, True, True]
        taken = [first.stats()["chunks_acked"], second.stats()["chunks_acked"]]
        # Each episode's stream stayed on one server: 3 chunks each, none split.
        assert sum(taken) == 3 * CONNECTIONS
        assert all(n % 3 == 0 for n in taken)
        assert min(taken) > 0, f"one server took every connection: {taken}"
        assert len(first.store.episodes()) == CONNECTIONS
        data = first.store.read_episode(EpisodeRef("c1", "e5"), frames=False)
        assert data.attrs["complete"] and data.joint_pos.shape[0] == 18
    finally:
        second.stop(0.5)
        first.stop(0.5)
