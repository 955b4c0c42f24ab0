"""Close episodes whose cell vanished: no chunk for a while means truncated, not lost.

A cell that dies mid-episode never sends the closing chunk, so without this the episode
would stay "in progress" forever and nobody would know its steps are all there will be.
The sweeper marks it truncated (EpisodeStore.mark_truncated); its stored steps stay
readable, and a cell that comes back and resumes the episode clears the mark with its next
chunk. Age is the store's own `updated_at` (the learner's clock at the last commit), so the
sweep is right whichever ingest server wrote the episode and survives learner restarts.

The sweep also deletes the temporary files a killed learner left in an episode (a write
cut between its temporary file and the rename) once the episode is finished or truncated:
then no write can be in progress there. Episodes already complete when the sweeper starts
are not walked, so a restart on a large store stays cheap.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from typing import Any

from learner.store import EpisodeRef, EpisodeStore

log = logging.getLogger(__name__)


class TruncationSweeper:
    """A daemon thread that marks idle incomplete episodes truncated every `interval_s`."""

    def __init__(
        self,
        store: EpisodeStore,
        *,
        truncate_after_s: float = 60.0,
        interval_s: float | None = None,
    ) -> None:
        if truncate_after_s <= 0:
            raise ValueError(f"truncate_after_s must be > 0, got {truncate_after_s}")
        self.store = store
        self.truncate_after_s = float(truncate_after_s)
        self.interval_s = (
            float(interval_s) if interval_s is not None else min(5.0, truncate_after_s / 4)
        )
        self._done: set[EpisodeRef] = set()  # complete episodes never change again
        self._watched: set[EpisodeRef] = set()  # seen in progress: cleaned when they end
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.truncated_total = 0

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="truncation-sweeper", daemon=True)
        self._thread.start()
        log.info(
            "truncation sweeper: episodes idle for %.0f s are marked truncated",
            self.truncate_after_s,
        )

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval_s + 5)
            self._thread = None

    def sweep(self, now: float | None = None) -> list[EpisodeRef]:
        """One pass; returns the episodes it marked truncated."""
        now = time.time() if now is None else now
        marked = []
        for ref in self.store.episodes(complete_only=False):
            if ref in self._done:
                continue
            attrs = self._attrs(ref)
            if attrs is None:
                continue
            if attrs.get("complete") or attrs.get("truncated"):
                self._end(ref, complete=bool(attrs.get("complete")))
                continue
            self._watched.add(ref)
            idle = now - float(attrs.get("updated_at") or attrs.get("created_at") or now)
            if idle < self.truncate_after_s:
                continue
            self.store.mark_truncated(
                ref,
                f"no chunk for {idle:.0f} s (limit {self.truncate_after_s:.0f} s): the cell "
                "vanished mid-episode",
            )
            marked.append(ref)
            self._end(ref, complete=False)
        self.truncated_total += len(marked)
        return marked

    def _end(self, ref: EpisodeRef, *, complete: bool) -> None:
        """An episode finished or truncated: clean it once if it was watched in progress."""
        if ref in self._watched:
            self._watched.discard(ref)
            self.store.remove_temp_files(ref)
        if complete:
            self._done.add(ref)

    def _attrs(self, ref: EpisodeRef) -> dict[str, Any] | None:
        """The episode's committed attributes, read straight from its zarr.json (cheap)."""
        try:
            meta = json.loads((self.store.root / ref.path / "zarr.json").read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        attrs = meta.get("attributes")
        return attrs if isinstance(attrs, dict) else None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sweep()
            except Exception:
                log.exception("truncation sweep failed; trying again in %.0f s", self.interval_s)
