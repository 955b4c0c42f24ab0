"""Secure by default on the real-lab path: `fleet learner` will not serve plaintext or
without a tokens file, and `fleet actor` will not run unsigned versions or send its token
over plaintext, unless the operator says so (--insecure / --allow-unsigned)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from actors.main import main as actor_main
from learner.main import main as learner_main
from protos.fleetlearn.v1 import policy_pb2, trajectory_pb2


def _learner_args(tmp_path: Path, *extra: str) -> list[str]:
    # An unreachable Redis: a refusal must come before anything is started or connected.
    return [
        "--redis-url",
        "redis://127.0.0.1:1",
        "--data-dir",
        str(tmp_path / "data"),
        "--tasks",
        "pick",
        "--cameras",
        "overhead",
        *extra,
    ]


def test_learner_refuses_plaintext_without_insecure(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        learner_main(_learner_args(tmp_path))
    assert "--tls-dir and --tokens-file missing" in str(exc.value.code)
    assert "--insecure" in str(exc.value.code)
    assert not (tmp_path / "data").exists()


def test_learner_refuses_tls_without_a_tokens_file(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        learner_main(_learner_args(tmp_path, "--tls-dir", str(tmp_path)))
    assert "--tokens-file missing" in str(exc.value.code)


@pytest.mark.parametrize("content", ["{not json", '["c1"]', '{"c1": ""}'])
def test_learner_refuses_an_unusable_tokens_file(tmp_path: Path, content: str) -> None:
    tokens = tmp_path / "tokens.json"
    tokens.write_text(content)
    args = _learner_args(tmp_path, "--tls-dir", str(tmp_path), "--tokens-file", str(tokens))
    with pytest.raises(SystemExit) as exc:
        learner_main(args)
    assert "tokens file unusable" in str(exc.value.code)


def test_actor_refuses_to_run_unsigned_versions(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR):
        assert actor_main(["--cell", "c1", "--learner", "127.0.0.1:1", "--sim"]) == 2
    assert "no --verify-key" in caplog.text and "--allow-unsigned" in caplog.text


def test_actor_never_sends_its_token_over_plaintext(caplog: pytest.LogCaptureFixture) -> None:
    args = ["--cell", "c1", "--learner", "127.0.0.1:1", "--sim", "--allow-unsigned"]
    with caplog.at_level(logging.ERROR):
        assert actor_main([*args, "--token", "s3cret-token"]) == 2
    assert "only sent over TLS" in caplog.text
    assert "s3cret-token" not in caplog.text


def test_no_message_has_a_token_field() -> None:
    # The token is call credentials: no message (and so no spool file) can carry it.
    for message in (
        trajectory_pb2.StepChunk,
        policy_pb2.WatchRequest,
        policy_pb2.FetchRequest,
        policy_pb2.Heartbeat,
    ):
        assert "token" not in message.DESCRIPTOR.fields_by_name, message
