"""The wall clock the control loop uses on hardware (sim clocks live in drivers/sim)."""

from __future__ import annotations

import time


class WallClock:
    """Monotonic wall time; sleep_until never sleeps backwards."""

    def now(self) -> float:
        return time.monotonic()

    def sleep_until(self, t: float) -> None:
        delay = t - time.monotonic()
        if delay > 0:
            time.sleep(delay)
