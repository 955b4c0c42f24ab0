"""The control loop's thread under SCHED_FIFO (the cell config's `realtime_priority`).

What a cell relies on: the loop's thread, and only it, runs real-time; the threads it starts
(inference workers, each episode's recorder) stay ordinary, or a busy one would starve the
cell; the thread is ordinary again after the run; where the OS refuses, the cell still runs
and the log says how to allow it."""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import pytest

from actors.config import ActorConfig
from actors.doctor import OK, WARN, check_realtime
from actors.edge import run_actor
from actors.thread_priority import ordinary_this_thread, realtime_allowed, realtime_this_thread
from drivers.sim import make_sim_cell
from tests.waiting import wait_for

pytestmark = pytest.mark.skipif(not hasattr(os, "sched_setscheduler"), reason="Linux only")

PRIORITY = 10


def _policy(tid: int) -> int:
    return os.sched_getscheduler(tid) & ~os.SCHED_RESET_ON_FORK


def _in_thread(fn: Any) -> Any:
    """Run `fn` on a thread of its own (never make pytest's own thread real-time)."""
    out: list[Any] = []
    thread = threading.Thread(target=lambda: out.append(fn()))
    thread.start()
    thread.join(30)
    return out[0]


def test_threads_the_loop_starts_stay_ordinary() -> None:
    allowed, reason = realtime_allowed(PRIORITY)

    def body() -> dict[str, Any]:
        granted = realtime_this_thread(PRIORITY, cell_id="cell-rt")
        seen: dict[str, Any] = {"granted": granted, "self": _policy(0)}
        child = threading.Thread(target=lambda: seen.setdefault("child", _policy(0)))
        child.start()
        child.join()
        if granted:
            ordinary_this_thread()
        seen["after"] = _policy(0)
        return seen

    seen = _in_thread(body)
    assert seen["granted"] == allowed, reason
    assert seen["self"] == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    assert seen["child"] == os.SCHED_OTHER
    assert seen["after"] == os.SCHED_OTHER


def test_a_refusal_is_a_warning_that_says_how_to_allow_it(monkeypatch, caplog) -> None:
    def refuse(*_: Any) -> None:
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(os, "sched_setscheduler", refuse)
    with caplog.at_level(logging.WARNING, logger="actors.thread_priority"):
        assert _in_thread(lambda: realtime_this_thread(PRIORITY, cell_id="cell-rt")) is False
    text = caplog.text
    assert "cell-rt" in text and "LimitRTPRIO" in text and "not permitted" in text
    row = check_realtime(PRIORITY)
    assert row.status == WARN and "LimitRTPRIO" in row.detail
    assert check_realtime(0).status == OK
    with pytest.raises(ValueError, match=r"1\.\.99"):
        realtime_this_thread(100, cell_id="cell-rt")


def test_run_actor_runs_only_the_loop_thread_real_time(tmp_path, caplog) -> None:
    """A whole actor (kinematic sim cell, paced at 20 Hz, no learner reachable): while it
    runs, its loop thread is FIFO where allowed and its inference and recorder threads are
    not; afterwards the thread is ordinary and the summary says what the loop ran as."""
    allowed, _ = realtime_allowed(PRIORITY)
    cell = make_sim_cell(
        "cell-rt", seed=1, cameras=("overhead",), height=48, width=64, realtime_factor=1.0
    )
    config = ActorConfig(
        cell_id="cell-rt",
        learner_address="127.0.0.1:9",  # nothing listens: the cell records and keeps going
        rpc_deadline_s=1.0,
        heartbeat_interval_s=0.2,
        realtime_priority=PRIORITY,
    )
    stop = threading.Event()
    out: dict[str, Any] = {}

    def actor() -> None:
        out["summary"] = run_actor(config, cell, stop, drain_timeout_s=0.5)
        out["after"] = _policy(0)

    runner = threading.Thread(target=actor, name="actor-under-test")
    started: dict[str, int] = {}
    t0 = cell.clock.now()
    try:
        with caplog.at_level(logging.INFO, logger="actors.thread_priority"):
            runner.start()

            def loop_threads_up() -> bool:
                for th in threading.enumerate():
                    if th.name.startswith(("recorder-", "inference-")) and th.native_id:
                        started[th.name] = _policy(th.native_id)
                return any(n.startswith("recorder-") for n in started) and any(
                    n.startswith("inference-") for n in started
                )

            wait_for(loop_threads_up, 30.0, "the loop's recorder and inference threads")
            # Sim time moves only when the loop ticks: stop after ten ticks, not at once (on a
            # loaded machine the threads can be up before the loop's first step).
            wait_for(lambda: cell.clock.now() >= t0 + 0.5, 60.0, "the loop to run ten ticks")
            assert runner.native_id is not None
            loop_policy = _policy(runner.native_id)
    finally:
        stop.set()
        runner.join(60)
    assert not runner.is_alive()
    assert loop_policy == (os.SCHED_FIFO if allowed else os.SCHED_OTHER)
    assert started and set(started.values()) == {os.SCHED_OTHER}, started
    assert out["after"] == os.SCHED_OTHER
    assert out["summary"]["realtime_priority"] == (PRIORITY if allowed else 0)
    assert out["summary"]["steps_recorded"] > 0
    if not allowed:
        assert "LimitRTPRIO" in caplog.text
