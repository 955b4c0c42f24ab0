"""Episode browsing for the dashboard: summaries, filters and playback data from the store.

The dashboard runs on the central machine, which installs the learner extra (zarr), so the
zarr-backed `learner.store.EpisodeStore` is imported lazily here: `fleet` itself never needs
zarr at import time, and a cell that imports `fleet` never pulls it in.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class EpisodeSummary:
    cell: str
    episode: str
    task: str
    version: str
    outcome: str  # "success", "failure", "truncated" or "running"
    reason: str
    n_steps: int
    started_at: float  # the cell's clock (sim time in a sim cell)
    created_at: float  # wall time the learner received the first chunk
    intervention_steps: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


def _outcome(attrs: dict[str, Any]) -> tuple[str, str]:
    if attrs.get("truncated"):
        return "truncated", str(attrs.get("truncated_reason") or "")
    outcome = attrs.get("outcome")
    if not attrs.get("complete") or not isinstance(outcome, dict):
        return "running", ""
    return ("success" if outcome.get("success") else "failure"), str(outcome.get("reason", ""))


class StoreReader:
    """Read-only view of an episode store; complete episodes' summaries are cached (they never
    change again), so refreshing the list costs one metadata read per unfinished episode."""

    def __init__(self, root: Path | str) -> None:
        from learner.store import EpisodeStore  # lazy: zarr lives in the learner extra

        self.store = EpisodeStore(root)
        self._cache: dict[tuple[str, str], EpisodeSummary] = {}
        self._frames: dict[tuple[str, str], Any] = {}  # the last few played episodes' data
        self._lock = threading.Lock()

    def _summary(self, ref: Any) -> EpisodeSummary:
        key = (ref.cell_id, ref.episode_id)
        with self._lock:
            hit = self._cache.get(key)
        if hit is not None:
            return hit
        data = self.store.read_episode(ref, frames=False)
        attrs = data.attrs
        outcome, reason = _outcome(attrs)
        summary = EpisodeSummary(
            cell=ref.cell_id,
            episode=ref.episode_id,
            task=str(attrs.get("task", "")),
            version=str(attrs.get("policy_version") or ""),
            outcome=outcome,
            reason=reason,
            n_steps=int(attrs.get("n_steps", 0)),
            started_at=float(attrs.get("started_at") or 0.0),
            created_at=float(attrs.get("created_at") or 0.0),
            intervention_steps=int(data.intervention.sum()),
        )
        if outcome in ("success", "failure"):
            with self._lock:
                self._cache[key] = summary
        return summary

    def episodes(
        self,
        *,
        cell: str = "",
        task: str = "",
        version: str = "",
        outcome: str = "",
        limit: int = 100,
    ) -> list[EpisodeSummary]:
        """Episodes matching every non-empty filter, newest first, at most `limit`."""
        out = []
        for ref in self.store.episodes(complete_only=False):
            if cell and ref.cell_id != cell:
                continue
            try:
                s = self._summary(ref)
            except (KeyError, FileNotFoundError):
                continue  # removed or half-created under us: skip it this time
            if task and s.task != task:
                continue
            if version and s.version != version:
                continue
            if outcome and s.outcome != outcome:
                continue
            out.append(s)
        out.sort(key=lambda s: (s.created_at, s.cell, s.episode), reverse=True)
        return out[: max(0, limit)]

    def disk_usage(self, now: float) -> dict[str, Any]:
        """The store's bytes and episodes in all, by cell and by outcome, and what each of
        the last days added (learner/retention.py, as `fleet store du`)."""
        from learner.retention import growth_per_day, summarise, usage  # learner extra

        episodes = usage(self.store)
        return {
            "bytes": sum(e.bytes for e in episodes),
            "episodes": len(episodes),
            "by_cell": [
                {"cell": k[0], "episodes": n, "bytes": b}
                for k, n, b in summarise(episodes, ["cell"], now)
            ],
            "by_outcome": [
                {"outcome": k[0], "episodes": n, "bytes": b}
                for k, n, b in summarise(episodes, ["outcome"], now)
            ],
            "growth_per_day": growth_per_day(episodes, now),  # oldest day first
        }

    def playback(self, cell: str, episode: str) -> dict[str, Any]:
        """Everything the player needs except the frames themselves (fetched one by one)."""
        from learner.store import EpisodeRef

        data = self.store.read_episode(EpisodeRef(cell, episode), frames=True)
        t = data.timestamp
        outcome, reason = _outcome(data.attrs)
        return {
            "cell": cell,
            "episode": episode,
            "task": data.attrs.get("task", ""),
            "version": data.attrs.get("policy_version") or "",
            "outcome": outcome,
            "reason": reason,
            "n_steps": len(t),
            "time": (t - t[0]).tolist() if len(t) else [],
            "joint_pos": data.joint_pos.T.tolist(),
            "action": data.action.T.tolist(),
            "intervention": data.intervention.astype(int).tolist(),
            "reward": data.reward.tolist(),
            "cameras": {name: len(frames) for name, frames in sorted(data.frames.items())},
        }

    def frame(self, cell: str, episode: str, camera: str, index: int) -> tuple[bytes, str]:
        """One encoded camera frame and its media type."""
        from learner.store import EpisodeRef

        key = (cell, episode)
        with self._lock:
            data = self._frames.get(key)
        if data is None:
            data = self.store.read_episode(EpisodeRef(cell, episode), frames=True)
            if data.attrs.get("complete"):
                with self._lock:
                    while len(self._frames) >= 2:
                        self._frames.pop(next(iter(self._frames)))
                    self._frames[key] = data
        frames = data.frames.get(camera)
        if frames is None:
            raise KeyError(f"episode {cell}/{episode} has no camera {camera!r}")
        if not 0 <= index < len(frames):
            raise IndexError(f"frame {index} out of range (0..{len(frames) - 1})")
        return displayable(frames[index], data.attrs.get("cameras", {}).get(camera, {}))


def _depth_to_jpeg(depth: np.ndarray) -> bytes:
    """A depth image as grey JPEG for the eye: near is bright, no reading (0) is black."""
    import simplejpeg  # learner extra, like zarr

    valid = depth > 0
    out = np.zeros(depth.shape, np.uint8)
    if valid.any():
        lo, hi = float(depth[valid].min()), float(depth[valid].max())
        scaled = (hi - depth[valid].astype(np.float64)) / max(hi - lo, 1.0)
        out[valid] = (40 + 215 * scaled).astype(np.uint8)
    return simplejpeg.encode_jpeg(
        np.ascontiguousarray(out[..., None]), quality=90, colorspace="GRAY"
    )


def displayable(frame: bytes, camera: dict[str, Any]) -> tuple[bytes, str]:
    """A stored frame as something a browser shows, and its media type. JPEG and PNG pass
    through; lossless depth (zstd16) and raw frames are rendered to JPEG here."""
    encoding = str(camera.get("encoding", "jpeg"))
    height, width = int(camera.get("height", 0)), int(camera.get("width", 0))
    channels = int(camera.get("channels", 1))
    if encoding == "jpeg":
        return frame, "image/jpeg"
    if encoding == "png16":
        return frame, "image/png"
    if encoding == "zstd16":
        from numcodecs import Zstd  # a zarr dependency

        raw = bytes(Zstd().decode(frame))
        return _depth_to_jpeg(np.frombuffer(raw, "<u2").reshape(height, width)), "image/jpeg"
    if encoding == "raw":
        import simplejpeg

        pixels = np.frombuffer(frame, np.uint8).reshape(height, width, channels)
        if channels == 3:
            return simplejpeg.encode_jpeg(pixels, colorspace="RGB"), "image/jpeg"
        return simplejpeg.encode_jpeg(pixels[..., :1].copy(), colorspace="GRAY"), "image/jpeg"
    raise KeyError(f"cannot display frames encoded as {encoding!r}")
