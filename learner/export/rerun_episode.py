"""Write one stored episode as a Rerun recording (.rrd) to scrub through in the Rerun viewer.

Entities: `cameras/<name>` (the stored JPEGs as-is, no re-encoding), `joints/state/<joint>`
and `joints/action/<joint>` (one scalar series per joint, so the viewer plots them against
time), `intervention` and `reward`. Two timelines: `step` (tick index) and `time` (the
cell's clock). Columns are sent whole (`send_columns`), which is far cheaper than a log
call per value. rerun-sdk is optional (`.[rerun]`): it is imported only here.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from learner.store import EpisodeRef, EpisodeStore
from protos.joint_layout import JOINT_NAMES

log = logging.getLogger(__name__)


def find_episode(store: EpisodeStore, episode: str, cell: str | None = None) -> EpisodeRef:
    """The stored episode named `episode` (or `cell/episode`); ambiguity is an error."""
    if "/" in episode and cell is None:
        cell, episode = episode.split("/", 1)
    matches = [
        r
        for r in store.episodes(complete_only=False)
        if r.episode_id == episode and (cell is None or r.cell_id == cell)
    ]
    if not matches:
        raise KeyError(f"no episode {episode!r} in {store.root}")
    if len(matches) > 1:
        cells = ", ".join(r.cell_id for r in matches)
        raise KeyError(f"episode {episode!r} exists on cells {cells}; pass --cell")
    return matches[0]


def write_rerun(
    store_root: Path | str, episode: str, out: Path | str, *, cell: str | None = None
) -> Path:
    """Record episode `episode` of the store to `out` (.rrd); returns the path written."""
    import rerun as rr

    store = EpisodeStore(store_root)
    ref = find_episode(store, episode, cell)
    ep = store.read_episode(ref, frames=True)
    n = int(ep.joint_pos.shape[0])
    rec = rr.RecordingStream("fleetlearn_episode", recording_id=f"{ref.cell_id}/{ref.episode_id}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rec.save(out)
    attrs = ep.attrs
    rec.log(
        "episode",
        rr.TextDocument(
            "\n".join(
                f"{k}: {attrs.get(k)}"
                for k in ("cell", "episode", "task", "policy_version", "outcome", "complete")
            )
        ),
        static=True,
    )
    steps = np.arange(n, dtype=np.int64)
    index = [
        rr.TimeColumn("step", sequence=steps),
        rr.TimeColumn("time", timestamp=ep.timestamp.astype(np.float64)),
    ]
    for name, frames in sorted(ep.frames.items()):
        if not frames:
            continue
        rec.send_columns(
            f"cameras/{name}",
            indexes=index,
            columns=rr.EncodedImage.columns(blob=frames, media_type=["image/jpeg"] * n),
        )
    for group, values in (("state", ep.joint_pos), ("action", ep.action)):
        for j, joint in enumerate(JOINT_NAMES):
            rec.send_columns(
                f"joints/{group}/{joint}",
                indexes=index,
                columns=rr.Scalars.columns(scalars=values[:, j].astype(np.float64)),
            )
    rec.send_columns(
        "intervention",
        indexes=index,
        columns=rr.Scalars.columns(scalars=ep.intervention.astype(np.float64)),
    )
    rec.send_columns(
        "reward", indexes=index, columns=rr.Scalars.columns(scalars=ep.reward.astype(np.float64))
    )
    rec.flush()
    rec.disconnect()
    log.info(
        "cell %s episode %s (version %s): %d steps written to %s",
        ref.cell_id,
        ref.episode_id,
        attrs.get("policy_version") or "none",
        n,
        out,
    )
    return out
