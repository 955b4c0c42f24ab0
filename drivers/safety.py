"""The safety gate every joint command passes on its way to the arms.

It sits at the driver boundary (DESIGN: safety lives there), below the policy and the
operator, so nothing upstream can command a position outside the joint limits or a jump
larger than one tick's step, and a NaN or inf from a policy becomes a hold, not a lunge.
"""

from __future__ import annotations

import logging
import math

import numpy as np

log = logging.getLogger(__name__)

# The speed a command may move at, per arm (rad/s for the six joints, gripper travel/s):
# a calm teleoperator's. One bound for every cell, simulated or real.
ARM_SPEED = np.array([3.0, 3.0, 3.0, 3.0, 3.0, 3.0, 4.0])


def step_bound(control_hz: float, arms: int = 2) -> list[float]:
    """The per-tick step bound of every joint (left arm, then right) at `control_hz`."""
    return [float(v) for v in ARM_SPEED / control_hz] * arms


def _inward_f32(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Round float64 bounds to float32 without widening them (lo up, hi down)."""
    lo32 = lo.astype(np.float32)
    hi32 = hi.astype(np.float32)
    lo32 = np.where(lo32.astype(np.float64) < lo, np.nextafter(lo32, np.float32(np.inf)), lo32)
    hi32 = np.where(hi32.astype(np.float64) > hi, np.nextafter(hi32, np.float32(-np.inf)), hi32)
    return lo32.astype(np.float32), hi32.astype(np.float32)


class SafetyGate:
    """Clamp every command to joint limits and a max step per tick; NaN/inf holds.

    `filter(target, current)` returns a float32 command of the limits' length:

    - any non-finite element in `target` -> the whole command is a hold: the last command
      sent, or `current` (clamped into the limits) when nothing was sent yet; `held` counts
      these;
    - otherwise each joint is clamped to `[lower, upper]` and to within `max_step` of the
      reference: the last command, or `current` when there is none.

    The reference is itself inside the limits (a `current` outside them is clamped in
    first), so the two bounds always intersect and every output satisfies both, in float32
    as returned (the bounds are rounded inward, never outward).
    """

    def __init__(self, lower: np.ndarray, upper: np.ndarray, max_step: np.ndarray | float) -> None:
        lo = np.asarray(lower, dtype=np.float64).reshape(-1)
        hi = np.asarray(upper, dtype=np.float64).reshape(-1)
        if lo.shape != hi.shape or lo.size == 0:
            raise ValueError(f"lower {lo.shape} and upper {hi.shape} must be equal, non-empty")
        if not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi)) and np.all(lo <= hi)):
            raise ValueError("limits must be finite with lower <= upper")
        step = np.broadcast_to(np.asarray(max_step, dtype=np.float64), lo.shape).copy()
        if not (np.all(np.isfinite(step)) and np.all(step > 0)):
            raise ValueError("max_step must be finite and > 0 for every joint")
        # Limits as float32 (rounded inward), so a clamped float32 command never leaves them.
        self.lower, self.upper = _inward_f32(lo, hi)
        if np.any(self.lower > self.upper):
            raise ValueError("limits must each contain at least one float32 value")
        self.max_step = step
        self.held = 0
        self._last: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.lower.shape[0])

    @property
    def last_command(self) -> np.ndarray | None:
        """The last command returned since construction or `reset()` (a copy), or None."""
        return None if self._last is None else self._last.copy()

    def reset(self) -> None:
        """Forget the last command (e.g. at episode reset, after the arms were moved)."""
        self._last = None

    def _reference(self, current: np.ndarray | None) -> np.ndarray:
        if self._last is not None:
            return self._last
        if current is None:
            raise ValueError("no command was sent yet: the current position is needed")
        cur = np.asarray(current, dtype=np.float64).reshape(-1)
        if cur.shape != self.lower.shape:
            raise ValueError(f"current has shape {cur.shape}, expected ({self.dim},)")
        if not np.all(np.isfinite(cur)):
            # Nothing was commanded yet and the arm's position is unknown: there is no
            # safe value to hold, so refuse rather than guess.
            raise ValueError("current position is not finite and no command was sent yet")
        return np.clip(cur.astype(np.float32), self.lower, self.upper)

    def filter(self, target: np.ndarray, current: np.ndarray | None) -> np.ndarray:
        """The safe command for `target`; `current` (the arms' present positions) is only
        read when there is no last command, and may be None otherwise."""
        tgt = np.asarray(target, dtype=np.float64).reshape(-1)
        if tgt.shape != self.lower.shape:
            raise ValueError(f"target has shape {np.shape(target)}, expected ({self.dim},)")
        ref = self._reference(current)
        if not np.all(np.isfinite(tgt)):
            self.held += 1
            if math.log10(self.held).is_integer():  # 1st, 10th, 100th ...: no log flood
                log.warning(
                    "safety gate: non-finite command replaced by a hold (%d so far)", self.held
                )
            cmd = ref.copy()
        else:
            ref64 = ref.astype(np.float64)
            lo, hi = _inward_f32(
                np.maximum(self.lower.astype(np.float64), ref64 - self.max_step),
                np.minimum(self.upper.astype(np.float64), ref64 + self.max_step),
            )
            # ref lies in [lo, hi] (it is float32 and inside both bounds), so lo <= hi; lo
            # and hi are float32 values, so rounding the clamped value keeps it inside.
            cmd = np.clip(tgt, lo.astype(np.float64), hi.astype(np.float64)).astype(np.float32)
            # ref +- step was rounded in float64; where that rounding let the step exceed
            # max_step by a hair, walk back toward ref one float32 ulp at a time (this ends:
            # at ref the step is 0).
            over = np.abs(cmd.astype(np.float64) - ref64) > self.max_step
            while over.any():
                cmd = np.where(over, np.nextafter(cmd, ref), cmd)
                over = np.abs(cmd.astype(np.float64) - ref64) > self.max_step
        self._last = cmd
        return cmd.copy()
