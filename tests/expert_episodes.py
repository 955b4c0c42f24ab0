"""Record scripted-expert episodes from the sim cell straight into an episode store (tests only)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import simplejpeg

from drivers.sim import make_sim_cell
from learner.chunks import CameraColumn, DecodedChunk
from learner.store import EpisodeStore

CAMERAS = ("overhead", "front")


def record_expert_episodes(
    store: EpisodeStore,
    *,
    task: str,
    episodes: int,
    cell_id: str = "cell-t",
    seed: int = 0,
    chunk_steps: int = 40,
    max_steps: int = 160,
    scene_seeds: Sequence[int] | None = None,
    policy_first: int = 0,
) -> int:
    """Drive the sim cell with its expert for `episodes` episodes; returns steps stored.

    Episode `e` plays the scene `seed * 1000 + e`, or `scene_seeds[e]` when given (so a test
    can replay exactly the scenes a ControlLoop will later reset to). `policy_first` > 0
    stores the first that many steps as a policy version's (v0001) and the rest as an
    operator's takeover: a takeover episode, not a demonstration.
    """
    if scene_seeds is not None and len(scene_seeds) < episodes:
        raise ValueError(f"{episodes} episodes need as many scene seeds, got {len(scene_seeds)}")
    cell = make_sim_cell(cell_id, seed=seed, cameras=CAMERAS, realtime_factor=0.0)
    period = 1.0 / cell.control_hz
    total = 0
    for e in range(episodes):
        cell.scene.reset(task, seed * 1000 + e if scene_seeds is None else int(scene_seeds[e]))
        rows: dict[str, list] = {k: [] for k in ("t", "q", "a", "r", *CAMERAS)}
        t = cell.clock.now()
        success = False
        for _ in range(max_steps):
            obs = cell.hardware.observe()
            sent = cell.hardware.command(cell.operator.action())
            rows["t"].append(obs.stamp)
            rows["q"].append(obs.joint_pos)
            rows["a"].append(sent)
            rows["r"].append(cell.scene.reward())
            for cam in CAMERAS:
                rows[cam].append(
                    simplejpeg.encode_jpeg(
                        np.ascontiguousarray(obs.frames[cam].color), quality=90, colorspace="RGB"
                    )
                )
            t += period
            cell.clock.sleep_until(t)
            if cell.scene.success():
                success = True
                break
        n = len(rows["t"])
        starts = list(range(0, n, chunk_steps))
        for seq, s in enumerate(starts):
            e_ = min(s + chunk_steps, n)
            last = seq == len(starts) - 1
            store.append(
                DecodedChunk(
                    cell_id=cell_id,
                    episode_id=f"ep-{seed}-{e:04d}",
                    seq=seq,
                    first_step=s,
                    task=task,
                    policy_version="v0001" if policy_first else "",
                    timestamp=np.asarray(rows["t"][s:e_], np.float64),
                    joint_pos=np.asarray(rows["q"][s:e_], np.float32),
                    action=np.asarray(rows["a"][s:e_], np.float32),
                    intervention=np.arange(s, e_) >= policy_first,
                    reward=np.asarray(rows["r"][s:e_], np.float32),
                    cameras={
                        cam: CameraColumn(cam, "jpeg", 96, 128, 3, rows[cam][s:e_])
                        for cam in CAMERAS
                    },
                    last=last,
                    outcome={
                        "success": success,
                        "reason": "success" if success else "timeout",
                        "started_at": rows["t"][0],
                        "ended_at": rows["t"][-1],
                    }
                    if last
                    else None,
                )
            )
        total += n
    return total
