"""The issue's acceptance test for staged rollout: a deliberately broken version published
in a sim fleet reaches only the canary cell, fails there, is rolled back automatically with
the reason in the event log, and the other cells never run it.

Real pieces: the learner gateway (ingest + policy service, no Ray), the publisher, the rollout
controller and four sim cells each running the real edge actor (run_actor) in a thread.
Operators never take over (takeover_prob=0), so every episode is autonomous.

Stable's track record is seeded (100 episodes at 80% autonomous success, as a stable version
that ran for a while would have): an untrained model cannot succeed in the sim, and training
one to competence would take minutes. Stable's own episodes during the test (all failures,
it is untrained) are added to that record, so the comparison is conservative.
"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from actors.config import ActorConfig
from actors.edge import run_actor
from drivers.sim import make_sim_cell
from fleet.common.policy.config import policy_config
from fleet.common.policy.model import UnifiedPolicy
from fleet.control.registry import Registry
from fleet.control.rollout import RuleConfig
from learner.gateway import Gateway
from learner.publisher import Publisher
from learner.rollout_controller import ControllerConfig, RolloutController
from learner.store import EpisodeStore
from tests.waiting import wait_for

TASK = "pick_cube"
CAMERAS = ("overhead", "front")
CELLS = ("cell-0", "cell-1", "cell-2", "cell-3")


def running(registry: Registry) -> dict[str, str]:
    return {c.cell_id: c.version_running for c in registry.cells()}


def test_broken_version_reaches_only_the_canary_and_is_rolled_back(
    redis_server: str, tmp_path: Path
) -> None:
    url = redis_server.rsplit("/", 1)[0] + "/4"  # the gateway uses the default key prefix
    registry = Registry(url)
    registry.r.flushdb()
    registry.set_rollout_mode("auto")
    gateway = Gateway(tmp_path / "store", url, [TASK])
    port = gateway.start()
    publisher = Publisher(registry, tmp_path / "versions", rollout_mode="auto")
    controller = RolloutController(
        registry,
        ControllerConfig(
            canary=1,
            poll_s=0.2,
            wait_log_interval_s=1.0,
            rule=RuleConfig(min_episodes=10, min_task_episodes=6),
        ),
    )
    config = policy_config("tiny", [TASK], CAMERAS)
    torch.manual_seed(0)
    stable = publisher.publish(UnifiedPolicy(config), training_step=100, data_seen=1000)
    assert registry.rollout().stable is None  # auto mode: the publisher never sets stable
    for i in range(100):
        registry.record_episode(
            cell_id=CELLS[i % 4],
            version=stable.version_id,
            task=TASK,
            success=i % 5 != 0,
            steps=40,
            intervention_steps=0,
        )
    controller.start()

    stop = threading.Event()
    threads = []
    for i, cell_id in enumerate(CELLS):
        cell = make_sim_cell(
            cell_id,
            seed=i,
            cameras=CAMERAS,
            height=48,
            width=64,
            realtime_factor=0.0,
            takeover_prob=0.0,
        )
        actor_config = ActorConfig(
            cell_id=cell_id,
            learner_address=f"127.0.0.1:{port}",
            tasks=(TASK,),
            max_episode_s=1.5,
            heartbeat_interval_s=0.2,
            rpc_deadline_s=5.0,
            seed=i,
        )
        thread = threading.Thread(
            target=run_actor,
            args=(actor_config, cell, stop),
            kwargs={"drain_timeout_s": 10.0},
            name=f"actor-{cell_id}",
        )
        thread.start()
        threads.append(thread)
    try:
        wait_for(
            lambda: running(registry) == dict.fromkeys(CELLS, stable.version_id),
            30,
            "every cell to run stable",
        )
        # Broken: every chunk pushes each joint the same way, so the arms run to their limits
        # and sit there in one fixed pose.
        broken_model = UnifiedPolicy(config)
        with torch.no_grad():
            broken_model.head.bias.fill_(0.5)
        broken = publisher.publish(broken_model, training_step=101, data_seen=1100)
        wait_for(
            lambda: registry.rollout().candidate == broken.version_id, 10, "the canary to start"
        )
        canary = registry.rollout().canary_cells
        assert len(canary) == 1
        wait_for(lambda: broken.version_id in registry.rolled_back(), 60, "the automatic rollback")
        wait_for(
            lambda: running(registry) == dict.fromkeys(CELLS, stable.version_id),
            20,
            "the canary to return to stable",
        )
    finally:
        stop.set()
        controller.stop()
        for thread in threads:
            thread.join(30)
        gateway.stop(1.0)

    # Its success dropped: the broken version never succeeded on the canary cell.
    counts = registry.success_counts()[broken.version_id][TASK]
    assert counts.episodes >= 6 and counts.autonomous_successes == 0
    # The event log says what happened and why, with the numbers.
    events = registry.events(500)
    (start,) = [e for e in events if e.kind == "rollout_start"]
    assert start.fields["version"] == broken.version_id and start.fields["cells"] == canary[0]
    (rollback,) = [e for e in events if e.kind == "rollback"]
    assert (
        rollback.actor == "rollout-controller" and rollback.fields["version"] == broken.version_id
    )
    assert "credibly worse" in rollback.reason and float(rollback.fields["p_worse"]) >= 0.0
    assert f"task.{TASK}" in rollback.fields
    # The other cells never ran it: neither their adoptions nor the episode store show it.
    for c in registry.cells():
        adopted = [a["version"] for a in c.versions_adopted]
        if c.cell_id in canary:
            assert broken.version_id in adopted
        else:
            assert broken.version_id not in adopted, c.cell_id
    store = EpisodeStore(tmp_path / "store")
    ran_broken = {
        ref.cell_id
        for ref in store.episodes(complete_only=False)
        if broken.version_id
        in store.read_episode(ref, frames=False).attrs.get("policy_versions", [])
    }
    assert ran_broken == set(canary)
    registry.r.flushdb()
    registry.close()
