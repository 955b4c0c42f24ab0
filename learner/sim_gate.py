"""The rollout's optional sim gate: a new version goes to canary cells only after `fleet
eval` on N held-out scenes a task shows it not credibly worse than stable.

The gate runs `fleet eval CANDIDATE --baselines STABLE` as a child process (the evaluation
drives simulated cells, which are the cell side's code: the learner does not import it) and
reads the JSON line it ends with. Candidate and stable run on the same scenes; the verdict
is the rollout's own rule (`fleet.control.rollout.decide`): blocked exactly when the rule would roll
the candidate back on these outcomes, i.e. some task with all N scenes, or the pooled
difference, is credibly worse by more than the margin. The evaluation is also stored with
the candidate (manifest and registry), like any `fleet eval`.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from fleet.common.evaluation import successes_by_task
from fleet.control.rollout import Decision, RuleConfig, TaskTally, decide

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GateVerdict:
    passed: bool
    reason: str
    numbers: dict[str, Any] = field(default_factory=dict)


def gate_decision(
    summary: Mapping[str, Any], candidate: str, stable: str, scenes: int, rule: RuleConfig
) -> tuple[GateVerdict, Decision]:
    """The verdict on one evaluation summary holding both versions' scores."""
    cand = {t: TaskTally(s, n) for t, (s, n) in successes_by_task(summary, candidate).items()}
    base = {t: TaskTally(s, n) for t, (s, n) in successes_by_task(summary, stable).items()}
    if not cand or not base:
        raise ValueError(f"evaluation lacks scores of {candidate!r} or {stable!r}")
    config = RuleConfig(
        margin=rule.margin,
        threshold=rule.threshold,
        min_episodes=scenes * len(cand),
        min_task_episodes=scenes,
        samples=rule.samples,
        seed=rule.seed,
    )
    decision = decide(base, cand, config)
    numbers = {
        **decision.numbers(),
        "sim_gate_scenes": scenes,
        "sim_gate_backend": summary.get("backend", ""),
    }
    if decision.action == "rollback":
        blocked = GateVerdict(False, f"sim gate on held-out scenes: {decision.reason}", numbers)
        return blocked, decision
    reason = (
        f"sim gate on held-out scenes: not credibly worse than {stable} "
        f"(P(success drop > {rule.margin:.2f}) = {decision.p_worse:.3f})"
    )
    return GateVerdict(True, reason, numbers), decision


EvalRunner = Callable[[str, str], Mapping[str, Any]]  # (candidate, stable) -> summary


class SimGate:
    """Runs the gate for the rollout controller; `stop()` ends an evaluation in flight."""

    def __init__(
        self,
        scenes: int,
        *,
        redis_url: str,
        prefix: str = "fleet:",
        backend: str = "mujoco",
        workers: int = 1,
        rule: RuleConfig | None = None,
        timeout_s: float = 3600.0,
        runner: EvalRunner | None = None,
    ) -> None:
        """`runner` replaces the `fleet eval` child process (for tests of the rule alone)."""
        if scenes < 1:
            raise ValueError(f"sim gate needs at least one scene per task, got {scenes}")
        self.scenes = int(scenes)
        self.redis_url = redis_url
        self.prefix = prefix
        self.backend = backend
        self.workers = int(workers)
        self.rule = rule or RuleConfig()
        self.timeout_s = float(timeout_s)
        self.runner = runner or self._run_fleet_eval
        self._stop = threading.Event()

    def stop(self) -> None:
        self._stop.set()

    def check(self, candidate: str, stable: str) -> GateVerdict:
        log.info(
            "sim gate: evaluating %s against stable %s on %d held-out scenes a task (%s)",
            candidate,
            stable,
            self.scenes,
            self.backend,
        )
        summary = self.runner(candidate, stable)
        verdict, _ = gate_decision(summary, candidate, stable, self.scenes, self.rule)
        log.info("sim gate on %s: %s", candidate, verdict.reason)
        return verdict

    def _run_fleet_eval(self, candidate: str, stable: str) -> Mapping[str, Any]:
        cmd = [
            sys.executable,
            "-m",
            "fleet.cli",
            "eval",
            candidate,
            "--baselines",
            stable,
            "--episodes",
            str(self.scenes),
            "--backend",
            self.backend,
            "--workers",
            str(self.workers),
            "--redis-url",
            self.redis_url,
            "--redis-prefix",
            self.prefix,
        ]
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True)
            waited = 0.0
            while proc.poll() is None:
                if self._stop.wait(0.5) or waited > self.timeout_s:
                    proc.kill()
                    proc.wait()
                    raise RuntimeError(f"sim gate: evaluation of {candidate} stopped")
                waited += 0.5
            out.seek(0)
            lines = [line for line in out.read().splitlines() if line.startswith("{")]
            err.seek(0)
            tail = err.read()[-2000:]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(
                f"sim gate: fleet eval of {candidate} failed (status {proc.returncode}): {tail}"
            )
        return json.loads(lines[-1])
