"""Automatic staged rollout: each newly published version goes to canary cells, then a
fraction of the fleet, then the whole fleet while it is not credibly worse than stable, and is
rolled back as soon as it is credibly worse (the rule is `fleet.control.rollout.decide`).

With a sim gate (`fleet learner --sim-gate N`, learner/sim_gate.py) a new version first runs
`fleet eval` against stable on N held-out scenes a task, and goes to canary only if it is not
credibly worse there; a blocked version is remembered as rolled back and never proposed
again. Both outcomes land in the event log with the numbers.

It runs as a thread in the learner's driver process (it only reads and writes the registry;
no Ray actor is needed for a loop that wakes every few seconds). Each decision that changes
something lands in the event log with its numbers; "wait" decisions are logged when new
evidence arrived, at most every `wait_log_interval_s`, so the log shows progress without
flooding.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field

import redis

from fleet.common.registry_records import RolloutState
from fleet.control import rollout
from fleet.control.registry import Registry
from fleet.control.rollout import Decision, RuleConfig
from learner.sim_gate import SimGate

log = logging.getLogger(__name__)

ACTOR = "rollout-controller"
GATE_RETRY_S = 300.0  # after a sim gate evaluation failed to run, before trying it again


@dataclass
class ControllerConfig:
    canary: int = 1  # canary cells per candidate
    fraction: float = 0.5  # share of the fleet in the "fraction" stage
    poll_s: float = 2.0
    wait_log_interval_s: float = 30.0
    rule: RuleConfig = field(default_factory=RuleConfig)


class RolloutController:
    """Drives the rollout state in the registry while the rollout mode is "auto"."""

    def __init__(
        self,
        registry: Registry,
        config: ControllerConfig | None = None,
        *,
        sim_gate: SimGate | None = None,
    ) -> None:
        """`sim_gate`: evaluate each new version against stable in sim before its canary."""
        self.registry = registry
        self.config = config or ControllerConfig()
        self.sim_gate = sim_gate
        self._gate_retry_at: dict[str, float] = {}  # version -> when to try its gate again
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_wait_log = (0.0, -1)  # (when, candidate episodes)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="rollout-controller", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self.sim_gate is not None:
            self.sim_gate.stop()
        if self._thread is not None:
            self._thread.join(timeout=10.0)

    def _run(self) -> None:
        log.info(
            "rollout controller running: %d canary cell(s), fraction %.2f, margin %.2f",
            self.config.canary,
            self.config.fraction,
            self.config.rule.margin,
        )
        while not self._stop.is_set():
            try:
                self.step()
            except redis.RedisError as exc:
                log.warning("rollout controller cannot reach the registry: %s", exc)
            except Exception:
                log.exception("rollout controller step failed")
            self._stop.wait(self.config.poll_s)

    # -- one evaluation ----------------------------------------------------------------

    def step(self) -> str | None:
        """Look at the registry once and act; returns what was done (for tests and logs):
        "bootstrap", "start", "blocked" (by the sim gate), "gate_error", "advance", "promote",
        "rollback", "wait" or None."""
        state = self.registry.rollout()
        if state.mode != "auto":
            return None
        if state.candidate is None:
            return self._maybe_start(state)
        if state.stage not in ("canary", "fraction"):
            return None  # shadow runs are started and ended by an operator
        decision = rollout.evaluate(self.registry, self.config.rule)
        assert decision is not None
        if decision.action == "rollback":
            rollout.rollback(
                self.registry, actor=ACTOR, reason=decision.reason, **decision.numbers()
            )
            return "rollback"
        new_in_stage = decision.candidate_episodes - state.stage_episodes
        if decision.action == "advance" and new_in_stage >= self.config.rule.min_episodes:
            return self._advance(state, decision)
        self._log_wait(state, decision, new_in_stage)
        return "wait"

    def _maybe_start(self, state: RolloutState) -> str | None:
        latest = self.registry.latest_version()
        if latest is None:
            return None
        if state.stable is None:
            self.registry.set_stable(
                latest, actor=ACTOR, reason="first version: no stable version to compare with"
            )
            return "bootstrap"
        if latest == state.stable or latest in self.registry.rolled_back():
            return None
        stable_record = self.registry.version(state.stable)
        latest_record = self.registry.version(latest)
        if (
            stable_record
            and latest_record
            and latest_record.published_at < stable_record.published_at
        ):
            return None  # an operator promoted something newer by hand
        reason = f"newly published version; canary on {self.config.canary} cell(s)"
        if self.sim_gate is not None:
            if time.monotonic() < self._gate_retry_at.get(latest, 0.0):
                return None
            try:
                verdict = self.sim_gate.check(latest, state.stable)
            except Exception as exc:
                if self._stop.is_set():
                    return None
                # No evidence is no pass: the version waits, and is evaluated again later.
                self._gate_retry_at[latest] = time.monotonic() + GATE_RETRY_S
                log.error("sim gate could not evaluate %s: %s", latest, exc)
                self.registry.log_event(
                    "sim_gate_error", actor=ACTOR, reason=str(exc)[-500:], version=latest
                )
                return "gate_error"
            if not verdict.passed:
                self.registry.block_version(
                    latest, actor=ACTOR, reason=verdict.reason, **verdict.numbers
                )
                log.warning("version %s blocked before canary: %s", latest, verdict.reason)
                return "blocked"
            self.registry.log_event(
                "sim_gate_pass",
                actor=ACTOR,
                reason=verdict.reason,
                version=latest,
                **{k: v for k, v in verdict.numbers.items() if isinstance(v, int | float | str)},
            )
            reason += f"; {verdict.reason}"
        rollout.start_rollout(self.registry, latest, self.config.canary, actor=ACTOR, reason=reason)
        return "start"

    def _advance(self, state: RolloutState, decision: Decision) -> str:
        numbers = decision.numbers()
        if state.stage == "canary" and self.config.fraction < 1.0:
            cells = rollout.fraction_cells(self.registry, self.config.fraction)
            if set(cells) - set(state.candidate_cells):
                rollout.advance(
                    self.registry,
                    cells,
                    stage="fraction",
                    actor=ACTOR,
                    reason=f"canary {decision.reason}",
                    **numbers,
                )
                return "advance"
        rollout.promote(self.registry, actor=ACTOR, reason=decision.reason, **numbers)
        return "promote"

    def _log_wait(self, state: RolloutState, decision: Decision, new_in_stage: int) -> None:
        when, episodes = self._last_wait_log
        now = time.monotonic()
        if decision.candidate_episodes == episodes:
            return
        if now - when < self.config.wait_log_interval_s:
            return
        self._last_wait_log = (now, decision.candidate_episodes)
        self.registry.log_event(
            "rollout_evaluate",
            actor=ACTOR,
            reason=decision.reason,
            version=state.candidate,
            stage=state.stage,
            stage_episodes=new_in_stage,
            **{**decision.numbers(), "decision": "wait"},
        )
