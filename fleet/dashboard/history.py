"""Learning curves for the dashboard: samples the learner's stats from Redis at a fixed
interval and keeps a bounded time series in memory.

The trainer publishes only its latest stats (one Redis hash); charts need a history, so the
dashboard samples them. Data throughput is derived from the store totals between samples,
and success rate per (version, task) is taken from the registry's outcome counters.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import deque
from typing import Any

from fleet.registry import Registry

log = logging.getLogger(__name__)


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


class LearningHistory:
    """A bounded series of learner samples: {"t", "loss", "updates", "updates_per_s",
    "replay_ratio", "steps_per_s", "store_steps", "success": {version: {task: rate}}}."""

    def __init__(self, registry: Registry, *, interval_s: float = 2.0, maxlen: int = 3600) -> None:
        self.registry = registry
        self.interval_s = float(interval_s)
        self._points: deque[dict[str, Any]] = deque(maxlen=maxlen)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_steps: tuple[float, int] | None = None

    def sample(self) -> dict[str, Any]:
        """Take one sample now and append it."""
        now = time.time()
        stats = self.registry.learner_stats()
        totals = self.registry.store_totals()
        steps = int(totals.get("steps", 0))
        steps_per_s = None
        if self._last_steps is not None and now > self._last_steps[0]:
            steps_per_s = max(0.0, (steps - self._last_steps[1]) / (now - self._last_steps[0]))
        self._last_steps = (now, steps)
        success: dict[str, dict[str, float]] = {}
        episodes: dict[str, dict[str, int]] = {}
        for version, tasks in self.registry.success_counts().items():
            for task, c in tasks.items():
                if c["episodes"]:
                    success.setdefault(version, {})[task] = c["successes"] / c["episodes"]
                    episodes.setdefault(version, {})[task] = c["episodes"]
        point = {
            "t": now,
            "loss": _num(stats.get("loss")),
            "updates": _num(stats.get("updates")),
            "updates_per_s": _num(stats.get("updates_per_s")),
            "replay_ratio": _num(stats.get("replay_ratio")),
            "steps_per_s": steps_per_s,
            "store_steps": steps,
            "success": success,
            "episodes": episodes,
        }
        with self._lock:
            self._points.append(point)
        return point

    def points(self, since: float = 0.0) -> list[dict[str, Any]]:
        with self._lock:
            return [p for p in self._points if p["t"] > since]

    def start(self) -> None:
        if self._thread is not None:
            return
        self._thread = threading.Thread(target=self._run, name="learning-history", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5.0)
            self._thread = None

    def _run(self) -> None:
        failing = False
        while not self._stop.is_set():
            try:
                self.sample()
                if failing:
                    log.info("learning history: Redis answers again")
                failing = False
            except Exception as exc:  # Redis down for a moment: keep the old points
                if not failing:
                    log.warning("learning history: cannot sample learner stats: %s", exc)
                failing = True
            self._stop.wait(self.interval_s)
