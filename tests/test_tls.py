"""TLS and cell identity on the learner's gRPC port: who may write as which cell."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from fleet.common import tls
from fleet.common.cell_auth import call_credentials
from learner import ingest, policy_service
from learner.ingest import IngestServicer
from learner.policy_service import PolicyServicer
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import policy_pb2, policy_pb2_grpc, trajectory_pb2_grpc
from tests.test_ingest import TASKS, TOKENS, make_msg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "ops"))
from make_certs import make_certs

DEADLINE_S = 5.0
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED.value[0]


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tls")
    make_certs(out, ["127.0.0.1"], ["c1", "c2", "c3"])  # c3: signed, not in TOKENS
    return out


@pytest.fixture(scope="module")
def rogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Another CA's learner and cell certificates, with the same names."""
    out = tmp_path_factory.mktemp("rogue")
    make_certs(out, ["127.0.0.1"], ["c1"])
    return out


@dataclass
class Server:
    port: int
    store: EpisodeStore

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"


def _serve(
    tmp_path: Path, lab: Path, *, mtls: bool, tokens: dict[str, str] | None, registry=None
) -> Iterator[Server]:
    store = EpisodeStore(tmp_path / "store")
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    ingest.add_to_server(server, IngestServicer(store, known_tasks=TASKS, tokens=tokens))
    policy = None
    if registry is not None:
        policy = PolicyServicer(registry, tokens=tokens)
        policy_service.add_to_server(server, policy)
    port = server.add_secure_port("127.0.0.1:0", tls.server_credentials(lab, mtls))
    server.start()
    try:
        yield Server(port, store)
    finally:
        if policy is not None:
            policy.stop()
        server.stop(0).wait()


@pytest.fixture
def mtls_server(tmp_path: Path, lab: Path) -> Iterator[Server]:
    yield from _serve(tmp_path, lab, mtls=True, tokens=TOKENS)


def _upload(channel: grpc.Channel, *msgs):
    stub = trajectory_pb2_grpc.TrajectoryServiceStub(channel)
    return list(stub.Upload(iter(msgs), timeout=DEADLINE_S))


def _cell_channel(address: str, lab: Path, cert: str | None, cell: str, token: str):
    """A TLS channel presenting `cert`'s certificate (None: none) whose calls carry `cell`
    and `token` as call credentials, the way the edge sends them."""
    creds = grpc.composite_channel_credentials(
        tls.channel_credentials(lab, cert), call_credentials(cell, token)
    )
    return grpc.secure_channel(address, creds)


def test_mutual_tls_upload_is_stored(mtls_server: Server, lab: Path) -> None:
    with _cell_channel(mtls_server.address, lab, "c1", "c1", TOKENS["c1"]) as ch:
        (ack,) = _upload(ch, make_msg(0, cell="c1"))
    assert ack.durable and ack.code == 0
    assert mtls_server.store.totals() == (6, 1)


def test_no_client_certificate_is_refused_under_mtls(mtls_server: Server, lab: Path) -> None:
    with (
        tls.secure_channel(mtls_server.address, lab, None) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        _upload(ch, make_msg(0, cell="c1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.store.totals() == (0, 0)


def test_wrong_ca_is_refused_both_ways(mtls_server: Server, lab: Path, rogue: Path) -> None:
    # A client that trusts another CA does not accept the learner...
    with (
        tls.secure_channel(mtls_server.address, rogue, None) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        _upload(ch, make_msg(0, cell="c1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # ...and a cell certificate from another CA is not accepted by the learner.
    creds = grpc.ssl_channel_credentials(
        root_certificates=(lab / "ca.pem").read_bytes(),
        private_key=(rogue / "c1.key").read_bytes(),
        certificate_chain=(rogue / "c1.pem").read_bytes(),
    )
    with grpc.secure_channel(mtls_server.address, creds) as ch, pytest.raises(grpc.RpcError) as err:
        _upload(ch, make_msg(0, cell="c1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert mtls_server.store.totals() == (0, 0)


def test_plaintext_client_cannot_talk_to_a_tls_learner(mtls_server: Server) -> None:
    with grpc.insecure_channel(mtls_server.address) as ch, pytest.raises(grpc.RpcError) as err:
        _upload(ch, make_msg(0, cell="c1"))
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE


def test_cell_a_certificate_cannot_write_as_cell_b(mtls_server: Server, lab: Path) -> None:
    # Cell A's stream cannot carry cell B's chunks...
    with _cell_channel(mtls_server.address, lab, "c1", "c1", TOKENS["c1"]) as ch:
        (ack,) = _upload(ch, make_msg(0, cell="c2"))
    assert not ack.durable
    assert ack.code == PERMISSION_DENIED
    assert "authenticated as cell 'c1'" in ack.message
    # ...and even with cell B's valid token, the certificate says who is on the line.
    with (
        _cell_channel(mtls_server.address, lab, "c1", "c2", TOKENS["c2"]) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        _upload(ch, make_msg(0, cell="c2"))
    assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "certificate is for 'c1'" in err.value.details()
    assert mtls_server.store.totals() == (0, 0)


@pytest.mark.parametrize(
    ("cert", "token", "code", "says"),
    [
        ("c1", "not-the-token", grpc.StatusCode.UNAUTHENTICATED, "wrong token"),
        ("c1", "", grpc.StatusCode.UNAUTHENTICATED, "no token"),
        # A CA-signed certificate is not enough: the tokens file is the allow-list.
        ("c3", "any", grpc.StatusCode.PERMISSION_DENIED, "not in the learner's tokens file"),
    ],
)
def test_certificate_without_its_token_is_refused(
    mtls_server: Server, lab: Path, cert: str, token: str, code: grpc.StatusCode, says: str
) -> None:
    with (
        _cell_channel(mtls_server.address, lab, cert, cert, token) as ch,
        pytest.raises(grpc.RpcError) as err,
    ):
        _upload(ch, make_msg(0, cell=cert))
    assert err.value.code() == code
    assert says in err.value.details()
    assert mtls_server.store.totals() == (0, 0)


def test_tls_without_client_certs_still_checks_tokens(tmp_path: Path, lab: Path) -> None:
    for server in _serve(tmp_path, lab, mtls=False, tokens=TOKENS):
        # Cell 1's token cannot write as cell 2.
        with _cell_channel(server.address, lab, None, "c1", TOKENS["c1"]) as ch:
            denied, ok = _upload(ch, make_msg(0, cell="c2"), make_msg(0, cell="c1"))
        assert denied.code == PERMISSION_DENIED
        assert ok.durable
        assert server.store.totals() == (6, 1)


def test_policy_service_checks_the_certificate_too(tmp_path: Path, lab: Path, registry) -> None:
    for server in _serve(tmp_path, lab, mtls=True, tokens=TOKENS, registry=registry):
        with _cell_channel(server.address, lab, "c1", "c2", TOKENS["c2"]) as ch:
            stub = policy_pb2_grpc.PolicyServiceStub(ch)
            with pytest.raises(grpc.RpcError) as err:
                stub.ReportHeartbeat(policy_pb2.Heartbeat(cell_id="c2"), timeout=DEADLINE_S)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "certificate is for 'c1'" in (err.value.details() or "")


def test_edge_channels_use_the_process_tls_settings(mtls_server: Server, lab: Path) -> None:
    from actors.uplink import open_channel

    tls.use_client_tls(lab, "c1", TOKENS["c1"])
    try:
        assert TOKENS["c1"] not in repr(tls.client_tls())  # never in a log line
        with open_channel(mtls_server.address) as ch:
            (ack,) = _upload(ch, make_msg(0, cell="c1"))
    finally:
        tls.use_client_tls(None, None)
    assert ack.durable


def test_a_token_is_never_sent_over_plaintext() -> None:
    with pytest.raises(tls.TLSConfigError, match="only sent over TLS"):
        tls.use_client_tls(None, "c1", TOKENS["c1"])


def test_missing_tls_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(tls.TLSConfigError, match=r"ca\.pem"):
        tls.use_client_tls(tmp_path, "c1")
