"""The person at a real cell: says when the scene is reset, and how each episode ended.

A simulated cell knows its own scene; a real one does not, so a person tells the actor,
through single keys read from a stream: a TTY's stdin, or a named pipe (FIFO) that a foot
pedal or button box writes to. Keys (case-insensitive, whitespace ignored):

    r  the scene is reset and ready: the episode may start
    s  success: the episode ends as successful
    f  failure: the episode ends as not successful (reason "failure")
    t  toggle takeover: the leader arms drive the followers until pressed again

Reading happens in a daemon thread with select() and a short timeout, so nothing here ever
blocks shutdown: `reset()` returns as soon as the actor's stop event is set or the console
is closed (the control loop then sees the stop and records nothing).
"""

from __future__ import annotations

import logging
import os
import select
import stat
import threading
from collections.abc import Callable, Sequence
from typing import IO

import numpy as np

log = logging.getLogger(__name__)

POLL_S = 0.1  # how often waits and the reader look at the stop events
REMIND_S = 30.0  # repeat the set-up request this often while nobody pressed r


class OperatorConsole:
    """TaskScene of a real cell, plus the takeover toggle (`takeover` for TeleopOperator).

    `source` is "stdin", a path (a FIFO or any readable file) or an open file/fd. `stop`
    is the actor's stop event; waits end when it is set.
    """

    def __init__(
        self,
        cell_id: str,
        tasks: Sequence[str],
        source: str | int | IO[str] | IO[bytes] = "stdin",
        *,
        stop: threading.Event | None = None,
        can_take_over: bool = True,
    ) -> None:
        self.cell_id = cell_id
        self.tasks: tuple[str, ...] = tuple(tasks)
        self.can_take_over = can_take_over
        self._stop = stop or threading.Event()
        self._closed = threading.Event()
        self._lock = threading.Lock()
        self._ready = threading.Event()
        self._in_episode = False
        self._outcome = ""  # "", "success" or "failure"
        self._takeover = False
        self._task = ""
        self._seed = 0
        self._owned_fd: int | None = None
        if source == "stdin":
            self._fd = 0
        elif isinstance(source, int):
            self._fd = source
        elif isinstance(source, str):
            # O_RDWR on a FIFO: we are a writer too, so the pipe never reads EOF when the
            # pedal's writer restarts, and opening never waits for a writer to appear.
            is_fifo = os.path.exists(source) and stat.S_ISFIFO(os.stat(source).st_mode)
            flags = (os.O_RDWR if is_fifo else os.O_RDONLY) | os.O_NONBLOCK
            self._fd = self._owned_fd = os.open(source, flags)
        else:
            self._fd = source.fileno()
        self._reader = threading.Thread(
            target=self._read_keys, name=f"operator-console-{cell_id}", daemon=True
        )
        self._reader.start()

    # TaskScene ---------------------------------------------------------------------------

    def reset(self, task: str, seed: int) -> None:
        """Ask the operator to set up `task`; return once they press r (or on stop)."""
        with self._lock:
            self._in_episode = False
            self._outcome = ""
            self._task, self._seed = task, seed
            self._ready.clear()  # an r pressed before this request must not skip the set-up
        log.info(
            "cell %s: set up task %r (episode seed %d), then press r", self.cell_id, task, seed
        )
        waited = 0.0
        while not self._stopping():
            if self._ready.wait(POLL_S):
                with self._lock:
                    self._in_episode = True
                log.info("cell %s: scene ready, task %r starts", self.cell_id, task)
                return
            waited += POLL_S
            if waited >= REMIND_S:
                waited = 0.0
                log.info("cell %s: still waiting for r (task %r)", self.cell_id, task)

    def success(self) -> bool:
        with self._lock:
            return self._outcome == "success"

    def failed(self) -> bool:
        """Checked by the control loop: True ends the episode with reason "failure"."""
        with self._lock:
            return self._outcome == "failure"

    def reward(self) -> float:
        """1.0 on the success step (the loop ends the episode there), else 0.0."""
        return 1.0 if self.success() else 0.0

    # Takeover ----------------------------------------------------------------------------

    def takeover(self) -> bool:
        with self._lock:
            return self._takeover

    # Input -------------------------------------------------------------------------------

    def press(self, key: str) -> None:
        """One key, as if typed: the reader calls this; tests and UIs may too."""
        k = key.strip().lower()
        if not k:
            return
        with self._lock:
            if k == "r":
                if self._in_episode:
                    log.info("cell %s: r ignored, an episode is running", self.cell_id)
                else:
                    self._ready.set()
            elif k in ("s", "f"):
                if not self._in_episode:
                    log.info("cell %s: %s ignored, no episode is running", self.cell_id, k)
                elif not self._outcome:
                    self._outcome = "success" if k == "s" else "failure"
                    log.info(
                        "cell %s: operator marks task %r (seed %d) %s",
                        self.cell_id,
                        self._task,
                        self._seed,
                        self._outcome,
                    )
            elif k == "t":
                if not self.can_take_over:
                    log.warning("cell %s: t ignored, no leader arms configured", self.cell_id)
                else:
                    self._takeover = not self._takeover
                    log.info(
                        "cell %s: takeover %s", self.cell_id, "on" if self._takeover else "off"
                    )
            else:
                log.warning("cell %s: unknown key %r (r, s, f, t)", self.cell_id, k)

    def _stopping(self) -> bool:
        return self._stop.is_set() or self._closed.is_set()

    def _read_keys(self) -> None:
        while not self._stopping():
            try:
                readable, _, _ = select.select([self._fd], [], [], POLL_S)
                if not readable:
                    continue
                data = os.read(self._fd, 256)
            except BlockingIOError:
                continue
            except (OSError, ValueError) as exc:  # closed under us
                if not self._stopping():
                    log.error("cell %s: operator input failed: %s", self.cell_id, exc)
                return
            if not data:
                log.warning("cell %s: operator input ended (EOF)", self.cell_id)
                return
            for ch in data.decode("utf-8", "replace"):
                if not ch.isspace():
                    self.press(ch)

    def close(self) -> None:
        self._closed.set()
        self._reader.join(timeout=2 * POLL_S + 1.0)
        if self._owned_fd is not None:
            os.close(self._owned_fd)
            self._owned_fd = None


class NoTakeover:
    """The Operator of a cell without leader arms: it never asks for control, and when the
    loop has no policy to run its action is to hold the arms where they are."""

    def __init__(self, present: Callable[[], np.ndarray]) -> None:
        self.present = present

    def wants_control(self) -> bool:
        return False

    def action(self) -> np.ndarray:
        return np.asarray(self.present(), np.float32)
