"""The offline ceiling's parts a reader of its figures relies on: the episodes it counts are
the MuJoCo cell's own, through its ControlLoop, and its intervals are right."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.recorder import EpisodeRecorder
from drivers.interfaces import Frame
from drivers.sim.mujoco import EPISODE_TIME_S
from fleet.policy.config import policy_config
from fleet.policy.model import UnifiedPolicy
from fleet.policy.runtime import PolicyRunner
from learner.store import EpisodeStore
from ops.offline_ceiling import CAMERAS, DEMO_SEED, EVAL_SEED, _Sink, run_episodes, wilson
from protos.fleetlearn.v1 import trajectory_pb2

TASK = "push_to_target"  # the expert's shortest task (about 45 ticks)


def test_wilson_interval_matches_the_textbook_values() -> None:
    low, high = wilson(0, 10)
    assert low == 0.0 and high == pytest.approx(0.2775, abs=1e-3)
    low, high = wilson(10, 10)
    assert high == 1.0 and low == pytest.approx(0.7225, abs=1e-3)
    low, high = wilson(8, 10)
    assert (low, high) == (pytest.approx(0.4902, abs=1e-3), pytest.approx(0.9433, abs=1e-3))


def test_expert_demonstrations_are_stored_and_a_fresh_policy_solves_nothing(
    tmp_path: Path,
) -> None:
    torch.set_num_threads(1)
    store = EpisodeStore(tmp_path / "store")
    demos = run_episodes(
        seed=DEMO_SEED,
        episodes_per_task=1,
        tasks=(TASK,),
        cameras=CAMERAS,
        runner=None,
        store=store,
    )
    assert [(o.task, o.success, o.intervened) for o in demos] == [(TASK, True, True)]
    (ref,) = store.episodes(complete_only=True)
    data = store.read_episode(ref)
    assert data.joint_pos.shape[0] == demos[0].steps
    assert set(CAMERAS) <= set(data.frames)  # colour (and depth) of each camera
    torch.manual_seed(0)
    untrained = PolicyRunner(
        UnifiedPolicy(policy_config("tiny", ("handover_bar", "place_cube", TASK), CAMERAS)), "u0"
    )
    held_out = run_episodes(
        seed=EVAL_SEED, episodes_per_task=1, tasks=(TASK,), cameras=CAMERAS, runner=untrained
    )
    # The policy alone, to the time limit, and it holds still: no success, no operator.
    assert [(o.success, o.intervened) for o in held_out] == [(False, False)]
    assert held_out[0].steps == round(EPISODE_TIME_S[TASK] * 20)  # 20 Hz, the task's limit


def _one_step_episode(reason: str) -> trajectory_pb2.StepChunk:
    recorder = EpisodeRecorder("c", "e", TASK, 20, 90, "")
    frame = Frame("overhead", np.zeros((8, 8, 3), np.uint8), 0.0)
    recorder.add_step(
        stamp=0.0,
        joint_pos=np.zeros(14, np.float32),
        action=np.zeros(14, np.float32),
        intervention=False,
        reward=0.0,
        frames={"overhead": frame},
        policy_version="u0",
    )
    return recorder.finish(success=False, reason=reason, started_at=0.0, ended_at=0.05)


def test_an_episode_cut_short_by_a_fault_is_not_counted() -> None:
    stop = threading.Event()
    sink = _Sink(per_task=1, tasks=(TASK,), stop=stop)
    sink.submit(_one_step_episode("fault"))
    assert sink.outcomes == [] and sink.faults == 1 and not stop.is_set()
    sink.submit(_one_step_episode("timeout"))
    assert [o.success for o in sink.outcomes] == [False] and stop.is_set()
