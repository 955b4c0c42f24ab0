"""Blending overlapping action chunks into one smooth plan, indexed by control tick.

Each chunk is stamped with the tick whose observation produced it (`start_tick`), so
`actions[i]` is the target for tick `start_tick + i`. A chunk that arrives `d` ticks late is
aligned by that stamp: its first `d` actions are already in the past and are skipped.

Two strategies share the `ChunkBlender` protocol:

- `CrossfadeBlender` (the default), real-time-chunking style: a new chunk is faded into the
  remainder of the plan being executed over `window` ticks (linear weights). Chosen because
  it bounds what a new chunk can do to the command: the extra per-tick change a swap adds is
  about |new - old| / (window + 1) (a shorter chunk fades over its own length), a version
  swap is just another crossfade, the state is one array (O(K) per tick, no per-chunk
  bookkeeping), with `max_step` it is also rate-limited to the safety gate's step, and with
  no fresh chunk the old plan simply runs on and then holds its last target.
- `TemporalEnsembler`, ACT-style: every chunk covering the tick votes with exponential weights
  w_i = exp(-m * i) (i = 0 for the oldest). Smoother against noisy single predictions, but a
  new chunk with a very different plan (a new version) steps in with weight w_new / sum(w)
  at once, so a swap's jump is not bounded by a window. Selectable now
  (`ControlLoop(blender=TemporalEnsembler())`); not yet rate-limited.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class TimedChunk:
    """A policy's chunk: `actions[i]` is the target for tick `start_tick + i`."""

    actions: np.ndarray  # (K, 14) float32
    start_tick: int
    version: str = ""
    latency_s: float = 0.0  # how long the inference took (stats only)

    @property
    def end_tick(self) -> int:
        """The first tick this chunk no longer covers."""
        return self.start_tick + len(self.actions)


class ChunkBlender(Protocol):
    def add(self, chunk: TimedChunk, now_tick: int) -> bool:
        """Blend `chunk` in from `now_tick`; False when it is entirely in the past."""
        ...

    def action(self, tick: int) -> np.ndarray | None:
        """The target for `tick`; past the plan's end its last target; None with no plan."""
        ...

    def remaining(self, tick: int) -> int:
        """Planned ticks left from `tick` on (0 once only holding)."""
        ...

    @property
    def version(self) -> str:
        """The version of the newest chunk blended in ("" with no plan)."""
        ...

    def reset(self) -> None: ...


@dataclass
class CrossfadeBlender:
    """RTC-style: fade each new chunk into the old plan's remainder over `window` ticks.

    With `max_step` (rad per tick, scalar or per joint; the cell's safety gate limit), the
    blended plan is also rate-limited from the last executed target, so even a chunk that
    arrives far too late cannot ask for more than the gate would pass."""

    window: int = 4
    max_step: float | np.ndarray | None = None
    _plan: np.ndarray | None = field(default=None, init=False, repr=False)
    _start: int = field(default=0, init=False)
    _version: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.window < 0:
            raise ValueError(f"window must be >= 0, got {self.window}")

    @property
    def version(self) -> str:
        return self._version

    def reset(self) -> None:
        self._plan, self._start, self._version = None, 0, ""

    def remaining(self, tick: int) -> int:
        if self._plan is None:
            return 0
        return max(0, self._start + len(self._plan) - tick)

    def action(self, tick: int) -> np.ndarray | None:
        if self._plan is None:
            return None
        i = min(max(tick - self._start, 0), len(self._plan) - 1)
        return self._plan[i].copy()

    def add(self, chunk: TimedChunk, now_tick: int) -> bool:
        if chunk.end_tick <= now_tick:
            return False  # too late to contribute a single step
        new = np.asarray(chunk.actions, np.float32)[now_tick - chunk.start_tick :]
        previous = self.action(now_tick - 1)
        if self._plan is None:
            blended = new.copy()
        else:
            old = np.stack([self.action(now_tick + i) for i in range(len(new))])  # type: ignore[misc]
            # The fade ends inside the chunk, so its last step is always purely the new plan.
            n = min(self.window, len(new) - 1)
            alpha = np.ones(len(new), np.float32)
            alpha[:n] = np.arange(1, n + 1, dtype=np.float32) / (n + 1)
            blended = (1.0 - alpha)[:, None] * old + alpha[:, None] * new
        if self.max_step is not None and previous is not None:
            limit = np.broadcast_to(np.asarray(self.max_step, np.float32), previous.shape)
            ref = previous
            for i in range(len(blended)):
                ref = ref + np.clip(blended[i] - ref, -limit, limit)
                blended[i] = ref
        self._plan, self._start, self._version = blended.astype(np.float32), now_tick, chunk.version
        return True


@dataclass
class TemporalEnsembler:
    """ACT-style temporal ensembling: weights exp(-m * i) over all chunks covering a tick."""

    m: float = 0.01
    max_chunks: int = 32
    _chunks: list[TimedChunk] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if not (math.isfinite(self.m) and self.max_chunks >= 1):
            raise ValueError("m must be finite and max_chunks >= 1")

    @property
    def version(self) -> str:
        return self._chunks[-1].version if self._chunks else ""

    def reset(self) -> None:
        self._chunks.clear()

    def remaining(self, tick: int) -> int:
        return max((c.end_tick - tick for c in self._chunks), default=0) if self._chunks else 0

    def add(self, chunk: TimedChunk, now_tick: int) -> bool:
        if chunk.end_tick <= now_tick:
            return False
        self._chunks = [c for c in self._chunks if c.end_tick > now_tick][-(self.max_chunks - 1) :]
        self._chunks.append(chunk)
        return True

    def action(self, tick: int) -> np.ndarray | None:
        if not self._chunks:
            return None
        covering = [c for c in self._chunks if c.start_tick <= tick < c.end_tick]
        if not covering:  # past every chunk's end: hold the newest chunk's last target
            return np.asarray(self._chunks[-1].actions[-1], np.float32).copy()
        weights = np.exp(-self.m * np.arange(len(covering), dtype=np.float64))
        acts = np.stack([c.actions[tick - c.start_tick] for c in covering]).astype(np.float64)
        return (weights[:, None] * acts).sum(0).astype(np.float32) / np.float32(weights.sum())
