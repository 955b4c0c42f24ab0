"""Learning works end to end: BC on a few expert episodes yields a policy that solves them.

A small fixed set of scripted-expert episodes goes into a real EpisodeStore; the real
learner stack trains on it (EpisodeSampler -> RLlib LearnerGroup -> BCTorchLearner), the
weights go out in the publish format (safetensors + manifest) and come back as the
PolicyRunner a cell runs, and the cell's own ControlLoop (chunk blending, safety gate, sim
physics) drives the sim cell with it, against a fresh untrained policy on the same scenes.

Evaluation replays the training scenes: this checks that the learning path (sampling,
joint normalisation, chunk alignment, image preprocessing, task ids, publish and load) is
sound end to end, not that six demonstrations generalise to new scenes. Everything is
seeded and single-threaded, so a run is deterministic on one machine; the thresholds leave
room for the run-to-run spread measured over training seeds (4-6 of 6 solved).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest
import torch

from actors.config import ActorConfig
from actors.control_loop import ControlLoop, episode_seed
from actors.inference import InlineInference
from drivers.sim import SIM_TASKS, make_sim_cell
from fleet.common.policy.config import PolicyConfig, policy_config
from fleet.common.policy.manifest import Manifest
from fleet.common.policy.model import UnifiedPolicy
from fleet.common.policy.runtime import PolicyRunner
from fleet.common.policy.weights import save_version
from learner.learner_group import build_learner_group, policy_from_learner_group, update
from learner.sampler import EpisodeSampler, SamplerConfig
from learner.store import EpisodeStore
from protos.fleetlearn.v1 import trajectory_pb2
from tests.expert_episodes import record_expert_episodes

# touch_target: the expert solves it in 11-24 ticks, and it needs vision: every episode
# starts from the same joint pose, only the target's place (seen by the camera) differs.
TASK = "touch_target"
# The overhead view shows where the target is; one camera halves the cost of an update.
POLICY_CAMERAS = ("overhead",)
SCENES = 6  # expert episodes, and the evaluation episodes (the same scenes)
EVAL_SEED = 7  # ActorConfig.seed: the ControlLoop's scene seeds derive from it
CHUNK = 10
BATCH = 32
UPDATES = 600
# The learner's default. At 1e-3 the tiny model stays image-blind for hundreds of updates
# (it cannot even fit 8 start frames that differ only in the image; 3e-4 and 1e-4 can).
LR = 3e-4
EVAL_EPISODE_S = 3.0  # 60 ticks; the expert needs at most ~1.2 s on these scenes


@dataclass
class Trained:
    config: PolicyConfig
    losses: list[float]
    weights: bytes
    manifest: Manifest


@pytest.fixture(scope="module")
def trained(ray_local: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Trained]:
    """Expert episodes -> store -> sampler -> LearnerGroup -> a published version."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic, and light on a shared machine
    root = tmp_path_factory.mktemp("learning")
    store = EpisodeStore(root / "store")
    scenes = [episode_seed(EVAL_SEED, i) for i in range(SCENES)]
    steps = record_expert_episodes(store, task=TASK, episodes=SCENES, scene_seeds=scenes)
    sampler = EpisodeSampler(
        store,
        POLICY_CAMERAS,
        SIM_TASKS,
        SamplerConfig(batch_size=BATCH, chunk_len=CHUNK, min_steps=1, max_samples_per_insert=1e9),
        seed=0,
    )
    assert sampler.refresh(force=True) == SCENES
    cfg = policy_config("tiny", SIM_TASKS, POLICY_CAMERAS, chunk_len=CHUNK)
    torch.manual_seed(0)
    group = build_learner_group(cfg, lr=LR)
    try:
        losses = [update(group, sampler.sample())["loss"] for _ in range(UPDATES)]
        model = policy_from_learner_group(group, cfg)
    finally:
        group.shutdown()
        torch.set_num_threads(threads)
    manifest = Manifest(
        version_id="v0001",
        parent=None,
        model_config=cfg.to_dict(),
        training_step=UPDATES,
        data_seen=steps,
        sha256="",
    )
    weights_path, manifest_path = save_version(root / "versions", model, manifest)
    yield Trained(
        cfg, losses, weights_path.read_bytes(), Manifest.from_json(manifest_path.read_text())
    )


class _OneVersion:
    """A policy watcher that offers one version, once."""

    def __init__(self, runner: PolicyRunner) -> None:
        self._runner: PolicyRunner | None = runner

    def take_new(self) -> PolicyRunner | None:
        runner, self._runner = self._runner, None
        return runner


class _Outcomes:
    """An uplink that keeps each episode's outcome and stops the loop after `episodes`."""

    def __init__(self, episodes: int, stop: threading.Event) -> None:
        self.episodes = episodes
        self.stop = stop
        self.success: list[bool] = []

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        if chunk.last:
            self.success.append(bool(chunk.outcome.success))
            if len(self.success) >= self.episodes:
                self.stop.set()
        return True


def closed_loop_successes(runner: PolicyRunner) -> list[bool]:
    """Each training scene once, on a sim cell driven by the cell's own control loop."""
    cell = make_sim_cell(
        "cell-eval", seed=0, cameras=POLICY_CAMERAS, realtime_factor=0.0, takeover_prob=0.0
    )
    stop = threading.Event()
    uplink = _Outcomes(SCENES, stop)
    loop = ControlLoop(
        ActorConfig(
            cell_id="cell-eval",
            learner_address="127.0.0.1:1",
            tasks=(TASK,),
            max_episode_s=EVAL_EPISODE_S,
            seed=EVAL_SEED,
        ),
        cell.hardware,
        cell.scene,
        cell.operator,
        cell.clock,
        uplink,
        _OneVersion(runner),
        inference=InlineInference(),  # deterministic: each chunk is ready on its own tick
        shadow_inference=InlineInference(),
        lookahead=CHUNK // 2,  # what the default picks for fast inference, fixed here
    )
    loop.run(stop)
    stats = loop.stats
    assert stats["interventions"] == 0, "the operator must never drive an evaluation episode"
    assert stats["policy_calls"] > 0
    return uplink.success


def test_bc_loss_drops_on_a_fixed_set_of_expert_episodes(trained: Trained) -> None:
    losses = np.asarray(trained.losses)
    assert np.all(np.isfinite(losses))
    first, last = float(losses[:20].mean()), float(losses[-20:].mean())
    # Measured: about 0.03 -> 0.002 (a 15x drop).
    assert last < 0.25 * first, f"BC loss went from {first:.4f} to only {last:.4f}"


def test_trained_policy_beats_the_untrained_one_in_closed_loop(trained: Trained) -> None:
    torch.manual_seed(0)
    untrained = PolicyRunner(UnifiedPolicy(trained.config), "untrained")
    published = PolicyRunner.from_version(trained.weights, trained.manifest)
    assert published.version_id == "v0001"
    before = closed_loop_successes(untrained)
    after = closed_loop_successes(published)
    assert len(before) == len(after) == SCENES
    # Untrained: holds still (zero-initialised head), never touches a target.
    assert sum(before) == 0, f"the untrained policy solved scenes: {before}"
    # Trained: measured 4-6 of 6 over training seeds at 500-700 updates; 6/6 here.
    assert sum(after) >= SCENES // 2, f"the trained policy solved {sum(after)}/{SCENES}: {after}"
