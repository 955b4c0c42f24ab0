"""The plan executor's rules, one plan at a time: when it asks for a chunk, what it blends in,
what it counts as stale, and how a failure and a shared snapshot are handled. The control
loop runs two of these (acting and shadow); tests/test_control_loop.py and
tests/test_shadow_edge.py check them together in the loop."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from actors.blending import CrossfadeBlender
from actors.inference import InferenceResult, InlineInference, Snapshot, run_predict
from actors.plan_executor import PlanExecutor, lookahead_ticks
from drivers.interfaces import Frame, Observation
from tests.test_control_loop import FakeRunner

PERIOD = 0.05
TASK = "pick_cube"


class ManualInference:
    """Predicts when the test says so (`finish`), so a chunk can come back ticks late."""

    def __init__(self) -> None:
        self.pending: Snapshot | None = None
        self.result: InferenceResult | None = None

    def start(self) -> None:
        pass

    def stop(self) -> None:
        pass

    def submit(self, snapshot: Snapshot) -> None:
        self.pending = snapshot

    def finish(self) -> None:
        assert self.pending is not None
        self.result, self.pending = run_predict(self.pending), None

    def poll(self) -> InferenceResult | None:
        result, self.result = self.result, None
        return result

    @property
    def busy(self) -> bool:
        return self.pending is not None

    @property
    def stats(self) -> dict[str, Any]:
        return {}


def observation(tick: int) -> Observation:
    image = np.full((12, 16, 3), 128, np.uint8)
    return Observation(
        joint_pos=np.zeros(14, np.float32),
        frames={"overhead": Frame("overhead", image, tick * PERIOD)},
        stamp=tick * PERIOD,
    )


def executor(
    inference: Any = None, lookahead: int | None = None, errors: list[str] | None = None
) -> PlanExecutor:
    def on_error(runner: Any, error: str) -> None:
        if errors is None:
            raise AssertionError(f"unexpected failure of {runner.version_id}: {error}")
        errors.append(f"{runner.version_id}: {error}")
        plan.restart(None, 0)

    plan = PlanExecutor(
        inference or InlineInference(), CrossfadeBlender(), PERIOD, on_error, lookahead=lookahead
    )
    return plan


def request_ticks(plan: PlanExecutor, ticks: range) -> list[int]:
    asked = []
    for tick in ticks:
        snapshot = plan.advance(observation(tick), tick, TASK)
        if snapshot is not None:
            asked.append(snapshot.tick)
    return asked


def test_next_chunk_is_asked_for_halfway_through_the_plan() -> None:
    plan = executor()
    plan.use(FakeRunner(1, k=6))
    # An instant policy: half a 6-step chunk is the lookahead, so every third tick.
    assert request_ticks(plan, range(11)) == [0, 3, 6, 9]
    counts = plan.counts
    assert counts["calls"] == counts["blended"] == 4
    assert counts["followup"] == counts["ready_in_time"] == 3 and counts["stale"] == 0


def test_a_fixed_lookahead_asks_at_the_same_point_of_every_plan() -> None:
    """Lockstep cells (`fleet eval`) ask with a fixed number of planned ticks left."""
    plan = executor(lookahead=1)
    plan.use(FakeRunner(1, k=6))
    assert request_ticks(plan, range(12)) == [0, 5, 10]


def test_lookahead_grows_with_inference_latency_but_stays_below_a_chunk() -> None:
    assert lookahead_ticks(10, 0.0) == 5  # half a chunk
    assert lookahead_ticks(10, 3.2) == 8  # twice the latency, rounded up, plus one
    assert lookahead_ticks(10, 40.0) == 9  # never a whole chunk
    assert lookahead_ticks(0, 0.0) == 0  # no chunk seen yet


def test_a_new_runner_is_asked_at_once_and_crossfades_into_the_plan() -> None:
    plan = executor()
    plan.use(FakeRunner(1, k=10))
    assert request_ticks(plan, range(3)) == [0]
    plan.use(FakeRunner(2, k=10))
    assert request_ticks(plan, range(3, 4)) == [3]  # plan still long, but of the old version
    assert plan.version == "v2"
    first = [float(plan.target(t)[0]) for t in range(3, 9)]  # type: ignore[index]
    # A 4-tick crossfade from v1's plan to v2's, not a jump.
    np.testing.assert_allclose(first, [1.2, 1.4, 1.6, 1.8, 2.0, 2.0], rtol=1e-6)


def test_a_busy_worker_is_never_asked_and_a_replaced_runners_chunk_is_stale() -> None:
    inference = ManualInference()
    plan = executor(inference)
    plan.use(FakeRunner(1))
    assert request_ticks(plan, range(1)) == [0]
    plan.use(FakeRunner(2))
    assert request_ticks(plan, range(1, 3)) == []  # the worker is busy: nothing is queued
    inference.finish()  # v1's chunk comes back after v2 took over
    assert request_ticks(plan, range(3, 4)) == [3]  # the worker is free: v2 is asked
    assert plan.counts["stale"] == 1 and plan.counts["blended"] == 0
    assert plan.target(3) is None


def test_a_chunk_observed_before_the_plan_was_dropped_is_stale() -> None:
    inference = ManualInference()
    plan = executor(inference)
    plan.use(FakeRunner(1))
    request_ticks(plan, range(2))
    plan.drop_plan(2)  # an operator takeover at tick 2
    inference.finish()
    plan.advance(observation(3), 3, TASK)
    assert plan.counts["stale"] == 1 and plan.counts["blended"] == 0


@pytest.mark.parametrize(("hold", "first_target"), [(True, 1.0 / 3.0), (False, 1.0)])
def test_a_late_first_chunk_fades_in_from_the_held_target_only_when_one_is_given(
    hold: bool, first_target: float
) -> None:
    """Acting fades a first chunk that came 3 ticks late in from where the arm holds; the
    shadow (no hold) takes the chunk as planned, since it must not invent targets."""
    inference = ManualInference()
    plan = executor(inference)
    plan.use(FakeRunner(1, k=6))
    held = np.zeros(14, np.float32)
    assert plan.advance(observation(0), 0, TASK, hold=lambda: held) is not None
    inference.finish()  # the chunk observed at tick 0 is back at tick 3
    plan.advance(observation(3), 3, TASK, hold=(lambda: held) if hold else None)
    target = plan.target(3)
    assert target is not None and float(target[0]) == pytest.approx(first_target)
    assert plan.counts["blended"] == 1 and plan.counts["ready_in_time"] == 0


def test_a_chunk_too_late_for_a_single_tick_is_stale() -> None:
    inference = ManualInference()
    plan = executor(inference)
    plan.use(FakeRunner(1, k=3))
    plan.advance(observation(0), 0, TASK)
    inference.finish()
    plan.advance(observation(5), 5, TASK)  # it covered ticks 0..2 only
    assert plan.counts["stale"] == 1 and plan.counts["blended"] == 0


def test_a_failed_prediction_goes_to_the_caller_and_nothing_is_blended() -> None:
    errors: list[str] = []
    plan = executor(errors=errors)
    plan.use(FakeRunner(2, fail=True))
    assert request_ticks(plan, range(3)) == [0]  # the handler stopped the plan: no retry
    assert errors == ["v2: no frame from camera(s) ['front']"]
    assert plan.runner is None and plan.target(2) is None
    assert plan.counts["errors"] == 1 and plan.counts["calls"] == 1


class RecordingRunner(FakeRunner):
    def __init__(self, number: int) -> None:
        super().__init__(number)
        self.seen: list[Any] = []

    def predict(self, frames: Any, joint_pos: np.ndarray, task: str) -> np.ndarray:
        self.seen.append(frames)
        return super().predict(frames, joint_pos, task)


def test_two_plans_due_on_one_tick_share_one_snapshot() -> None:
    acting, shadow = executor(), executor()
    acting_runner, shadow_runner = RecordingRunner(1), RecordingRunner(7)
    acting.use(acting_runner)
    shadow.use(shadow_runner)
    snapshot = acting.advance(observation(0), 0, TASK)
    assert snapshot is not None
    shared = shadow.advance(observation(0), 0, TASK, share=snapshot)
    assert shared is not None and shared.runner is shadow_runner
    assert shadow_runner.seen[0] is acting_runner.seen[0]  # the very same frames
    # A snapshot of another tick is never reused: the plan takes its own.
    shadow.restart(shadow_runner, 5)
    own = shadow.advance(observation(5), 5, TASK, share=snapshot)
    assert own is not None and own.tick == 5 and shadow_runner.seen[1] is not snapshot.frames
