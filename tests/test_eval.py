"""`fleet eval`: held-out scenes, baselines on the same scenes, episodes that replay step for
step, results kept with the version, and the rollout's sim gate."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.console import Console

from actors.control_loop import episode_seed
from actors.evaluate import (
    CONTROL_HZ,
    EpisodeRunner,
    PolicySpec,
    evaluate,
    resolve_version,
    run_jobs,
    sim_cell,
)
from fleet.common.evaluation import EvalResult, wilson_interval
from fleet.common.policy.config import policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.weights import save_version
from fleet.common.scenes import heldout_seed, is_heldout, training_seed
from fleet.control.dashboard.app import create_app
from fleet.control.registry import CellState
from fleet.control.rollout_cli import _versions_table
from learner.rollout_controller import ControllerConfig, RolloutController
from learner.sim_gate import SimGate

KINEMATIC_TASKS = ("pick_cube", "touch_target")
CAMERAS = ("overhead", "front")


def make_version(directory: Path, version_id: str, tasks: tuple[str, ...], seed: int) -> Path:
    """A version whose actions depend on what it sees: random weights, not the (near-still)
    initialisation, so replaying a scene exercises the whole observe-infer-act path."""
    torch.manual_seed(seed)
    model = UnifiedPolicy(policy_config("tiny", tasks, CAMERAS))
    with torch.no_grad():
        for p in model.parameters():
            if p.dtype.is_floating_point:
                p.normal_(0.0, 0.2)
    manifest = Manifest(
        version_id=version_id,
        parent=None,
        model_config=model.config.to_dict(),
        training_step=0,
        data_seen=0,
        sha256="",
    )
    _, manifest_path = save_version(directory, model, manifest)
    return manifest_path


@pytest.fixture(scope="module")
def version(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_version(tmp_path_factory.mktemp("versions"), "v0001", KINEMATIC_TASKS, seed=1)


def test_expert_scores_every_scene_and_an_untrained_model_about_none(version: Path) -> None:
    result = evaluate(version, episodes=3, backend="kinematic", baselines=("untrained", "expert"))
    scores = result.scores
    assert result.tasks == KINEMATIC_TASKS
    for task in KINEMATIC_TASKS:
        assert scores["expert"][task].successes == 3, scores["expert"][task]
        assert scores["expert"][task].mean_progress == 1.0
    assert sum(s.successes for s in scores["untrained"].values()) <= 1
    # Every policy ran the same held-out scenes.
    scenes = {p: sorted((r.task, r.seed) for r in result.records if r.policy == p) for p in scores}
    assert scenes["v0001"] == scenes["untrained"] == scenes["expert"]
    assert all(is_heldout(r.seed) for r in result.records)
    assert result.seeds == tuple(heldout_seed(i) for i in range(3))
    # The JSON line carries the same numbers back.
    again = EvalResult.from_json(result.to_json())
    assert again.scores == scores and again.summary() == result.summary()


def test_wilson_interval_is_the_textbook_one() -> None:
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def _traces(version: Path, backend: str, tasks: tuple[str, ...], episodes: int, base: tuple):
    out: dict[tuple[str, str, int], tuple[np.ndarray, np.ndarray]] = {}
    result = evaluate(
        version,
        tasks=tasks,
        episodes=episodes,
        backend=backend,
        baselines=base,
        on_trace=lambda r, joints, actions: out.__setitem__(
            (r.policy, r.task, r.seed), (joints, actions)
        ),
    )
    return result, out


def test_the_same_version_and_scene_give_the_same_episode_step_for_step(version: Path) -> None:
    first, a = _traces(version, "kinematic", KINEMATIC_TASKS, 2, ("expert",))
    second, b = _traces(version, "kinematic", KINEMATIC_TASKS, 2, ("expert",))
    assert a.keys() == b.keys() and len(a) == 8
    for key, (joints, actions) in a.items():
        assert len(joints) > 0
        np.testing.assert_array_equal(joints, b[key][0], err_msg=f"joints of {key}")
        np.testing.assert_array_equal(actions, b[key][1], err_msg=f"actions of {key}")
    assert [r.trace_sha256 for r in first.records] == [r.trace_sha256 for r in second.records]
    # The version really acts on what it sees: two scenes, two different trajectories.
    s0, s1 = heldout_seed(0), heldout_seed(1)
    assert not np.array_equal(a[("v0001", "pick_cube", s0)][1], a[("v0001", "pick_cube", s1)][1])


def test_worker_processes_give_the_same_episodes(version: Path) -> None:
    alone = evaluate(version, episodes=2, backend="kinematic", baselines=("expert",))
    spread = evaluate(version, episodes=2, backend="kinematic", baselines=("expert",), workers=2)
    assert [(r.policy, r.task, r.seed, r.trace_sha256) for r in alone.records] == [
        (r.policy, r.task, r.seed, r.trace_sha256) for r in spread.records
    ]


def test_an_episode_does_not_depend_on_how_long_its_cell_has_run(version: Path) -> None:
    """A cell's sim clock runs on across episodes, so fleet eval's later scenes start on an
    older clock: the same scene must play the same on a cell that has run for months as on
    a new one. Every tick must take the same whole number of substeps; the loop's running
    sum of periods once gave a tick an extra one (just past 2048 s, where the clock's float
    spacing doubles, within the first 30 ticks)."""
    spec = PolicySpec.of_version(resolve_version(version))
    expert = PolicySpec("expert", "expert", manifest_json=spec.manifest_json)
    digests = []
    for age_s in (0.0, 200.0, 2048.69, 3 * 86400.0, 90 * 86400.0):
        with sim_cell("kinematic", "eval-0", CAMERAS) as cell:
            world = cell.world
            world.steps += round(age_s / world.dt)  # what that much running leaves
            per_tick = round(1.0 / (CONTROL_HZ * world.dt))
            taken: list[int] = []
            sleep_until = cell.clock.sleep_until

            def timed(t: float, sleep_until=sleep_until, world=world, taken=taken) -> None:
                before = world.steps
                sleep_until(t)
                taken.append(world.steps - before)

            cell.clock.sleep_until = timed
            runner = EpisodeRunner("kinematic", cell, "eval-0")
            digests.append(
                [
                    runner.run(p, task, heldout_seed(3)).trace_sha256
                    for task in KINEMATIC_TASKS
                    for p in (spec, expert)
                ]
            )
            assert taken and set(taken) == {per_tick}, (age_s, sorted(set(taken)))
    assert all(d == digests[0] for d in digests[1:]), digests


def test_a_mujoco_episode_replays_step_for_step(tmp_path: Path) -> None:
    """The MuJoCo cell behind the real SDKs: goals cross a pty to a servo process, so only
    lockstep makes them land before the physics steps, on every run."""
    manifest_path = make_version(tmp_path, "v0001", ("push_to_target",), seed=2)
    policies = [
        PolicySpec(
            "v0001",
            "version",
            str(manifest_path.with_suffix(".safetensors")),
            str(manifest_path),
            manifest_path.read_text(),
        ),
        PolicySpec("expert", "expert", manifest_json=manifest_path.read_text()),
    ]
    jobs = [
        ("expert", "push_to_target", heldout_seed(5)),
        ("v0001", "push_to_target", heldout_seed(5)),
    ]
    runs = []
    for _ in range(2):
        traces: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        records = []
        run_jobs(
            "mujoco",
            CAMERAS,
            policies,
            jobs,
            records.append,
            on_trace=lambda r, j, a, into=traces: into.__setitem__(r.policy, (j, a)),
        )
        runs.append((records, traces))
    (rec1, tr1), (rec2, tr2) = runs
    assert rec1[0].success and rec1[0].policy == "expert"  # the expert solves the scene
    assert [r.steps for r in rec1] == [r.steps for r in rec2]
    for name in ("expert", "v0001"):
        np.testing.assert_array_equal(tr1[name][0], tr2[name][0], err_msg=f"{name} joints")
        np.testing.assert_array_equal(tr1[name][1], tr2[name][1], err_msg=f"{name} actions")


@settings(max_examples=500, deadline=None)  # deadline: a loaded machine is not a failure
@given(
    cell_seed=st.integers(min_value=0, max_value=2**64 - 1),
    index=st.integers(min_value=0, max_value=10**9),
    heldout_index=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_held_out_seeds_never_equal_a_training_seed(
    cell_seed: int, index: int, heldout_index: int
) -> None:
    train = training_seed(cell_seed, index)
    held = heldout_seed(heldout_index)
    assert train != held
    assert not is_heldout(train) and is_heldout(held)
    assert 0 <= train < 2**32 and 0 <= held < 2**32
    assert episode_seed(cell_seed, index) == train  # what a cell's control loop draws


def _fleet(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "COLUMNS": "200"},
    )


def _register(registry, manifest_path: Path) -> None:
    registry.add_version(manifest_path.read_text(), str(manifest_path.with_suffix(".safetensors")))


def test_the_result_is_stored_with_the_version_and_shown(
    registry, redis_server: str, tmp_path: Path
) -> None:
    manifest_path = make_version(tmp_path, "v0001", KINEMATIC_TASKS, seed=1)
    published = Manifest.from_json(manifest_path.read_text())
    _register(registry, manifest_path)
    out = _fleet(
        "eval",
        "v0001",
        "--redis-url",
        redis_server,
        "--redis-prefix",
        registry.prefix,
        "--backend",
        "kinematic",
        "--episodes",
        "2",
        "--baselines",
        "expert",
    )
    assert out.returncode == 0, out.stderr[-3000:]
    printed = json.loads(out.stdout.strip().splitlines()[-1])
    assert "held-out scenes per task" in out.stdout  # the table came before the JSON line
    scores = printed["scores"]
    assert scores["expert"]["pick_cube"]["successes"] == 2
    record = registry.version("v0001")
    assert record.evaluation["scores"] == scores
    on_disk = Manifest.from_json(manifest_path.read_text())
    assert on_disk.evaluation["scores"] == scores
    assert (on_disk.sha256, on_disk.signature) == (published.sha256, published.signature)
    assert any(e.kind == "evaluation" and e.fields["version"] == "v0001" for e in registry.events())
    console = Console(record=True, width=250)
    console.print(_versions_table(registry))
    v0001 = scores["v0001"]
    shown = f"pick_cube {v0001['pick_cube']['successes']}/2"
    assert shown in console.export_text()
    app = create_app(registry, None, sample_interval_s=0.1)
    with TestClient(app) as client:
        rollout = client.get("/api/rollout").json()
        assert rollout["versions"][0]["evaluation"]["scores"] == scores
        points = client.get("/api/learning").json()["evaluations"]
        assert points[0]["version"] == "v0001"
        assert points[0]["success"]["pick_cube"] == v0001["pick_cube"]["success_rate"]


def _gate_world(registry, tmp_path: Path) -> None:
    """Stable v0001 and a new v0002 with the same weights, one live cell, auto rollout."""
    first = make_version(tmp_path, "v0001", KINEMATIC_TASKS, seed=1)
    _register(registry, first)
    second = Manifest.from_json(first.read_text())
    second.version_id, second.parent = "v0002", "v0001"
    weights = first.with_suffix(".safetensors")
    (tmp_path / "v0002.safetensors").write_bytes(weights.read_bytes())
    (tmp_path / "v0002.json").write_text(second.to_json())
    registry.add_version(second.to_json(), str(tmp_path / "v0002.safetensors"))
    registry.set_rollout_mode("auto")
    registry.set_stable("v0001", actor="test", reason="first version")
    registry.record_heartbeat(CellState("cell-01"))


def test_sim_gate_lets_a_version_as_good_as_stable_through(
    registry, redis_server: str, tmp_path: Path
) -> None:
    _gate_world(registry, tmp_path)
    gate = SimGate(2, redis_url=redis_server, prefix=registry.prefix, backend="kinematic")
    controller = RolloutController(registry, ControllerConfig(), sim_gate=gate)
    assert controller.step() == "start"
    assert registry.rollout().candidate == "v0002"
    [passed] = [e for e in registry.events() if e.kind == "sim_gate_pass"]
    assert passed.fields["version"] == "v0002" and passed.fields["decision"] != "rollback"
    assert passed.fields["task.pick_cube"].startswith("cand 0/2 stable 0/2")  # the same scenes
    assert registry.version("v0002").evaluation["baselines"] == ["v0001"]


def _summary(candidate: tuple[int, int], stable: tuple[int, int]) -> dict:
    def per_task(s: int, n: int) -> dict:
        return {t: {"successes": s, "episodes": n} for t in KINEMATIC_TASKS}

    return {
        "backend": "kinematic",
        "scores": {"v0002": per_task(*candidate), "v0001": per_task(*stable)},
    }


def test_sim_gate_blocks_a_worse_version_and_never_proposes_it_again(
    registry, tmp_path: Path
) -> None:
    """The gate's rule on given outcomes (a trained stable is the learning branch's): the
    candidate solves 2 of 10 held-out scenes a task where stable solves 9 of 10."""
    _gate_world(registry, tmp_path)
    asked = []

    def outcomes(candidate: str, stable: str) -> dict:
        asked.append((candidate, stable))
        return _summary((2, 10), (9, 10))

    gate = SimGate(10, redis_url="unused", prefix=registry.prefix, runner=outcomes)
    controller = RolloutController(registry, ControllerConfig(), sim_gate=gate)
    assert controller.step() == "blocked"
    assert asked == [("v0002", "v0001")]
    assert registry.rollout().candidate is None
    assert "v0002" in registry.rolled_back()
    [blocked] = [e for e in registry.events() if e.kind == "sim_gate_block"]
    assert blocked.fields["version"] == "v0002" and "credibly worse" in blocked.reason
    assert blocked.fields["task.pick_cube"].startswith("cand 2/10 stable 9/10")
    assert controller.step() is None and len(asked) == 1  # not evaluated or proposed again


def test_sim_gate_passes_equal_outcomes_given_the_same_numbers(registry, tmp_path: Path) -> None:
    _gate_world(registry, tmp_path)
    gate = SimGate(
        10,
        redis_url="unused",
        prefix=registry.prefix,
        runner=lambda c, s: _summary((8, 10), (8, 10)),
    )
    assert RolloutController(registry, ControllerConfig(), sim_gate=gate).step() == "start"


def test_a_sim_gate_that_cannot_evaluate_keeps_the_version_from_canary(
    registry, redis_server: str, tmp_path: Path
) -> None:
    _gate_world(registry, tmp_path)
    (tmp_path / "v0002.safetensors").unlink()  # the candidate's weights are gone
    gate = SimGate(2, redis_url=redis_server, prefix=registry.prefix, backend="kinematic")
    controller = RolloutController(registry, ControllerConfig(), sim_gate=gate)
    assert controller.step() == "gate_error"
    assert registry.rollout().candidate is None
    [error] = [e for e in registry.events() if e.kind == "sim_gate_error"]
    assert error.fields["version"] == "v0002" and "weights not found" in error.reason
    assert controller.step() is None  # not evaluated again at once


def test_a_version_that_cannot_act_fails_every_scene_and_no_operator_rescues_it(
    tmp_path: Path,
) -> None:
    torch.manual_seed(3)
    model = UnifiedPolicy(policy_config("tiny", KINEMATIC_TASKS, CAMERAS))
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))  # every prediction is non-finite: the loop refuses it
    manifest = Manifest(
        version_id="v0009",
        parent=None,
        model_config=model.config.to_dict(),
        training_step=0,
        data_seen=0,
        sha256="",
    )
    _, path = save_version(tmp_path, model, manifest)
    result = evaluate(path, tasks=["touch_target"], episodes=2, backend="kinematic", baselines=())
    assert [r.success for r in result.records] == [False, False]
    assert all(r.reason == "timeout" and r.intervention_steps == r.steps for r in result.records)
    assert result.scores["v0009"]["touch_target"].successes == 0
