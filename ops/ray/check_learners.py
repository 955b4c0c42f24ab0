"""Joins the loopback cluster, builds the LearnerGroup with 2 learners, runs a few updates on
a synthetic batch, and prints which node each learner runs on and whether their weights
agree: each learner's own copy of the policy is fetched and compared with the first's (DDP
keeps them identical; a learner that missed an all-reduce would differ). Exits 1 when the
learners are not on distinct nodes or their weights differ.

Run after ops/ray/start_cluster.sh: .venv/bin/python ops/ray/check_learners.py
(it uses the cluster's token, ops/ray/env.sh's RAY_AUTH_TOKEN_PATH).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

# The cluster's token (ops/ray/env.sh), set before Ray is imported: Ray reads it then.
_REPO = Path(__file__).resolve().parents[2]
os.environ.setdefault("RAY_AUTH_MODE", "token")
os.environ.setdefault("RAY_AUTH_TOKEN_PATH", str(_REPO / "var" / "ray" / "auth_token"))

import numpy as np  # noqa: E402
import ray  # noqa: E402
from ray.rllib.core import DEFAULT_MODULE_ID  # noqa: E402

from fleet.common.policy.config import policy_config  # noqa: E402
from learner.learner_group import build_learner_group, get_state_dict, update  # noqa: E402

CAMERAS = ("overhead", "left_wrist")  # names a sim cell accepts
TASKS = ("pick_cube", "touch_target")


def _node() -> str:
    return ray.get_runtime_context().get_node_id()


def _unwrap(result: object) -> object:
    # foreach_learner yields plain values (local) or CallResult-like wrappers (remote).
    get = getattr(result, "get", None)
    return get() if callable(get) else result


def _weights(learner: object) -> dict[str, np.ndarray]:
    """This learner's own copy of the policy's weights (not the group's merged view)."""
    module = learner.module[DEFAULT_MODULE_ID]  # type: ignore[attr-defined]
    return {k: v.detach().cpu().numpy() for k, v in module.state_dict().items()}


def main() -> int:
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
    node_ids = [str(_unwrap(r)) for r in group.foreach_learner(lambda _learner: _node())]
    copies = [_unwrap(r) for r in group.foreach_learner(_weights)]
    first = copies[0]
    diff = max(
        float(np.abs(copy[k] - first[k]).max()) if copy[k].size else 0.0
        for copy in copies[1:]
        for k in first
    )
    same_keys = all(set(c) == set(first) for c in copies)
    state = get_state_dict(group)
    report = {
        "cluster_nodes": len([n for n in ray.nodes() if n["Alive"]]),
        "learner_nodes": node_ids,
        "distinct_learner_nodes": len(set(node_ids)),
        "losses": losses,
        "params": len(state),
        "learners_compared": len(copies),
        "weights_max_abs_diff": diff,
        "weights_agree": same_keys and len(copies) == 2 and diff == 0.0,
    }
    print(json.dumps(report))
    group.shutdown()
    ray.shutdown()
    return 0 if report["weights_agree"] and report["distinct_learner_nodes"] == 2 else 1


if __name__ == "__main__":
    raise SystemExit(main())
