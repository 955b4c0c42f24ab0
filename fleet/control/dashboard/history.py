"""Learning curves that outlive the processes drawing them: samples of the learner's stats,
the store totals and the success counters, kept in Redis with a retention bound.

The trainer publishes only its latest stats (one Redis hash); charts need a history. Every
process that runs a `LearningHistory` (the learner and each dashboard) offers a sample each
interval, and a Redis slot key (SET NX with the interval as its expiry) lets exactly one of
them write it, so the series has no gaps while any of them runs and no duplicates when
several do. Two tiers bound the memory a run of weeks takes:

    history:fine     STREAM  a sample every `interval_s` (2 s), kept `fine_retention_s` (6 h)
    history:coarse   STREAM  a sample every `coarse_interval_s` (5 min), kept
                             `coarse_retention_s` (90 days)

Stream ids are the sample times in ms, so retention is `XADD ... MINID` and a time range is
one `XRANGE`. Data throughput is derived at read time from consecutive samples' store totals.
"""

from __future__ import annotations

import json
import logging
import math
import threading
import time
from dataclasses import dataclass
from typing import Any

from fleet.control.registry import Registry

log = logging.getLogger(__name__)

MAX_POINTS = 2000  # points one read returns at most (evenly thinned): enough for a chart


@dataclass(frozen=True)
class _Tier:
    name: str
    interval_s: float
    retention_s: float


def _num(value: Any) -> float | None:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return None
    return out if math.isfinite(out) else None


class LearningHistory:
    """Samples {"t", "loss", "updates", "updates_per_s", "replay_ratio", "store_steps",
    "store_episodes", "success": {version: {task: rate}}, "episodes": {version: {task: n}}}
    into Redis; `points()` reads them back with "steps_per_s" added."""

    def __init__(
        self,
        registry: Registry,
        *,
        interval_s: float = 2.0,
        fine_retention_s: float = 6 * 3600.0,
        coarse_interval_s: float = 300.0,
        coarse_retention_s: float = 90 * 86400.0,
    ) -> None:
        if interval_s <= 0 or coarse_interval_s < interval_s:
            raise ValueError("need 0 < interval_s <= coarse_interval_s")
        self.registry = registry
        self.interval_s = float(interval_s)
        self.tiers = (
            _Tier("fine", self.interval_s, float(fine_retention_s)),
            _Tier("coarse", float(coarse_interval_s), float(coarse_retention_s)),
        )
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _key(self, *parts: str) -> str:
        return self.registry.prefix + ":".join(("history", *parts))

    def sample(self, now: float | None = None) -> dict[str, Any] | None:
        """Offer one sample now; returns it if this process wrote it to some tier."""
        now = time.time() if now is None else now
        r = self.registry.r
        due = [
            tier
            for tier in self.tiers
            if r.set(self._key("slot", tier.name), "1", nx=True, px=_ms(tier.interval_s * 0.9))
        ]
        if not due:
            return None  # another process took this interval's sample
        point = self._snapshot(now)
        body = json.dumps(point, separators=(",", ":"))
        pipe = r.pipeline(transaction=False)
        for tier in due:
            pipe.xadd(
                self._key(tier.name),
                {"p": body},
                id=f"{_ms(now)}-*",
                minid=_ms(now - tier.retention_s),
                approximate=False,  # exact: a node of 100 old samples is no bound
            )
        try:
            pipe.execute()
        except Exception as exc:  # an id at or below the newest: a clock stepped back
            log.warning("learning history: sample at %.3f not stored: %s", now, exc)
            return None
        return point

    def _snapshot(self, now: float) -> dict[str, Any]:
        stats = self.registry.learner_stats()
        totals = self.registry.store_totals()
        success: dict[str, dict[str, float]] = {}
        episodes: dict[str, dict[str, int]] = {}
        for version, tasks in self.registry.success_counts().items():
            for task, c in tasks.items():
                if c.episodes:
                    success.setdefault(version, {})[task] = c.successes / c.episodes
                    episodes.setdefault(version, {})[task] = c.episodes
        return {
            "t": now,
            "loss": _num(stats.get("loss")),
            "updates": _num(stats.get("updates")),
            "updates_per_s": _num(stats.get("updates_per_s")),
            "replay_ratio": _num(stats.get("replay_ratio")),
            "store_steps": totals.steps,
            "store_episodes": totals.episodes,
            "success": success,
            "episodes": episodes,
        }

    def points(
        self, since: float = 0.0, until: float | None = None, *, max_points: int = MAX_POINTS
    ) -> list[dict[str, Any]]:
        """Samples with since < t <= until, oldest first: the fine tier where it still holds
        them, the coarse one before; thinned evenly to at most `max_points`."""
        r = self.registry.r
        hi = "+" if until is None else str(_ms(until))
        fine_oldest = r.xrange(self._key("fine"), count=1)
        fine_from = _entry_ms(fine_oldest[0][0]) if fine_oldest else None
        out: list[dict[str, Any]] = []
        if fine_from is None or _ms(since) < fine_from:
            coarse_hi = hi if fine_from is None else f"({fine_from}-0"
            out += _decode(r.xrange(self._key("coarse"), f"({_ms(since)}", coarse_hi))
        if fine_from is not None:
            out += _decode(r.xrange(self._key("fine"), f"({_ms(since)}", hi))
        out = [p for p in out if p["t"] > since]
        if len(out) > max_points:
            step = len(out) / max_points
            out = [out[int(i * step)] for i in range(max_points - 1)] + [out[-1]]
        previous: dict[str, Any] | None = None
        for p in out:
            p["steps_per_s"] = None
            if previous is not None and p["t"] > previous["t"]:
                gained = p["store_steps"] - previous["store_steps"]
                p["steps_per_s"] = max(0.0, gained / (p["t"] - previous["t"]))
            previous = p
        return out

    def oldest(self) -> float | None:
        """The time of the oldest sample kept in any tier."""
        times = []
        for tier in self.tiers:
            first = self.registry.r.xrange(self._key(tier.name), count=1)
            if first:
                times.append(_entry_ms(first[0][0]) / 1000.0)
        return min(times) if times else None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
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
            except Exception as exc:  # Redis down for a moment: samples resume after
                if not failing:
                    log.warning("learning history: cannot sample learner stats: %s", exc)
                failing = True
            self._stop.wait(self.interval_s)


def _ms(t: float) -> int:
    return max(0, int(t * 1000))


def _entry_ms(entry_id: str) -> int:
    return int(str(entry_id).split("-", 1)[0])


def _decode(entries: list[tuple[str, dict[str, str]]]) -> list[dict[str, Any]]:
    return [json.loads(fields["p"]) for _, fields in entries]
