"""The offline ceiling's parts a reader of its figures relies on: the demonstrations are the
MuJoCo cell's own episodes through its ControlLoop, and the policy is evaluated the way
`fleet eval` evaluates a version, on its held-out scenes (never a demonstration's)."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.control_loop import episode_seed
from actors.recorder import EpisodeRecorder
from drivers.interfaces import Frame
from fleet.common.scenes import heldout_seed, is_heldout
from learner.store import EpisodeStore
from ops.offline_ceiling import CAMERAS, DEMO_SEED, _Sink, main, record_demos
from protos.fleetlearn.v1 import trajectory_pb2

TASK = "push_to_target"  # the expert's shortest task (about 45 ticks)


def test_expert_demonstrations_are_stored_with_their_training_scenes(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    store = EpisodeStore(tmp_path / "store")
    (demo,) = record_demos(episodes_per_task=1, tasks=(TASK,), cameras=CAMERAS, store=store)
    assert (demo.policy, demo.task, demo.success) == ("expert", TASK, True)
    assert demo.intervention_steps == demo.steps  # the operator (the expert) drove each step
    assert demo.seed == episode_seed(DEMO_SEED, 0) and not is_heldout(demo.seed)
    (ref,) = store.episodes(complete_only=True)
    data = store.read_episode(ref)
    assert data.joint_pos.shape[0] == demo.steps
    assert set(CAMERAS) <= set(data.frames)  # colour (and depth) of each camera


def test_a_fresh_model_is_evaluated_on_fleet_evals_held_out_scenes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["--data", str(tmp_path / "ceiling"), "--demos", "1", "--tasks", TASK]
    argv += ["--updates", "0", "--eval-scenes", "1", "--eval-seed-start", "7"]
    argv += ["--eval-demo-scenes", "--expert-baseline"]
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["demos"]["expert"][TASK]["successes"] == 1
    # As the learner does: the action scale measured on the demonstrations, in the config.
    scale = result["config"]["action_scale"]
    assert len(scale) == 14 and all(x >= 0.01 for x in scale)
    (point,) = result["evals"]
    assert point["seeds"] == [heldout_seed(7)]  # fleet eval's held-out scene index 7
    # The untrained policy alone, to the time limit: no success; the expert on the same
    # held-out scene succeeds.
    fresh = point["tasks"][TASK]
    assert (fresh["successes"], fresh["episodes"]) == (0, 1)
    assert fresh["ci95"][0] == 0.0 and 0.5 < fresh["ci95"][1] < 1.0
    assert result["expert_held_out"][TASK]["successes"] == 1
    # --eval-demo-scenes: the demonstration's own (training) scene, kept apart.
    assert point["demo_scenes"]["seeds"] == [episode_seed(DEMO_SEED, 0)]
    assert point["demo_scenes"]["tasks"][TASK]["episodes"] == 1


def _one_step_episode(reason: str) -> trajectory_pb2.StepChunk:
    recorder = EpisodeRecorder("c", "e", TASK, 20, 90)
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


def test_an_episode_cut_short_by_a_fault_is_not_counted_but_keeps_its_scene() -> None:
    stop = threading.Event()
    sink = _Sink(per_task=1, tasks=(TASK,), stop=stop, seed_of=lambda i: 100 + i)
    sink.submit(_one_step_episode("fault"))
    assert sink.records == [] and sink.faults == 1 and not stop.is_set()
    sink.submit(_one_step_episode("timeout"))
    # The second episode of the loop: its scene is the loop's second seed, not the first.
    assert [(r.success, r.seed) for r in sink.records] == [(False, 101)] and stop.is_set()
