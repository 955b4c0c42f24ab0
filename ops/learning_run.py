"""The learning run: `fleet up` on the sim fleet, and the unified model's success rate per task
over time.

Why a script and not a test: it takes minutes to tens of minutes. It starts its own Redis on a
free loopback port (so it can read the registry while the fleet runs), runs `fleet up` against
it, and every --interval seconds prints, per task, the autonomous success rate (episodes that
succeeded with no operator intervention / episodes) of the policy versions that ran in the last
window, from the registry's per-version outcome counters. Episodes of version "none" (the
scripted expert's demonstrations before any version exists) are left out: the curve is the
policy's, starting with the first, barely trained, version.

The simulated operators intervene the way a watching person does (DAgger style): never at
random (--takeover-prob 0), but when the policy has made no progress on the task for
--takeover-stall-s. So an episode is autonomous exactly when the policy did it alone, and
autonomous successes / episodes is the fleet's real success rate, not one capped by random
takeovers. Their corrections are the training data the policy lacks.

When the fleet has stopped, the versions it published are evaluated as `fleet eval` does
(actors.evaluate.evaluate: lockstep MuJoCo cells through their ControlLoop, no takeovers, on
its held-out scenes, never a training seed), and each result is stored with its version
(manifest file and registry, as `fleet eval` stores it): --eval-versions of them, spread
over the run, --eval-scenes scenes a task each. The curve
(window rates as lines, held-out results as dots with 95 % intervals) goes to --png, its
numbers to --json; --replot JSON redraws a saved run.

Last line: one JSON object {"curve": [...], "per_version": ..., "held_out": [...], ...}.
Run: .venv/bin/python ops/learning_run.py --cells 2 --duration 1800 [--interval 300]
     [--sim-backend kinematic|mujoco] [--png docs/learning_run.png --json docs/learning_run.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Run as the README says (`python ops/learning_run.py`), the script's own folder heads
# sys.path, not the repository: ops.curve_png would not import.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fleet.common.registry_records import OutcomeCounts, VersionRecord
from fleet.control.registry import Registry
from ops.curve_png import EvalPoint, draw_success_curve

log = logging.getLogger(__name__)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _totals(registry: Registry) -> dict[str, dict[str, OutcomeCounts]]:
    """task -> version -> counters, from the registry's outcome counters."""
    out: dict[str, dict[str, OutcomeCounts]] = {}
    for version, tasks in registry.success_counts().items():
        for task, counters in tasks.items():
            out.setdefault(task, {})[version] = counters
    return out


def _window(
    now: dict[str, dict[str, OutcomeCounts]], before: dict[str, dict[str, OutcomeCounts]]
) -> dict[str, dict[str, float | int | str]]:
    """Per task: episodes, autonomous successes and their rate since the previous poll."""
    out: dict[str, dict[str, float | int | str]] = {}
    for task, versions in now.items():
        eps = auto = intervened = 0
        latest = ""
        for version, c in versions.items():
            if version in ("", "none"):
                continue  # the scripted expert's demonstrations before any version exists
            prev = before.get(task, {}).get(version, OutcomeCounts())
            d_eps = c.episodes - prev.episodes
            eps += d_eps
            auto += c.autonomous_successes - prev.autonomous_successes
            intervened += c.intervened_episodes - prev.intervened_episodes
            if d_eps > 0 and version > latest:
                latest = version
        out[task] = {
            "episodes": eps,
            "autonomous_successes": auto,
            "intervened_episodes": intervened,
            "rate": auto / eps if eps else float("nan"),
            "newest_version": latest,
        }
    return out


def held_out(
    data_dir: Path,
    versions: list[VersionRecord],
    started_at: float,
    count: int,
    scenes: int,
    tasks: list[str],
    registry: Registry | None = None,
) -> list[dict[str, object]]:
    """`count` published versions, evenly spread and always the last, run by `fleet eval`'s
    evaluate() on its held-out scenes; each result is stored with its version."""
    from actors.evaluate import evaluate, resolve_version, store_where
    from fleet.common.evaluation import store_evaluation

    if not versions or count < 1 or scenes < 1:
        return []
    picks = sorted({round(i * (len(versions) - 1) / max(1, count - 1)) for i in range(count)})
    if count == 1:
        picks = [len(versions) - 1]
    points: list[dict[str, object]] = []
    for i in picks:
        v = versions[i]
        vid = v.version_id
        version = resolve_version(vid, registry=registry, versions_dir=data_dir / "versions")
        log.info("held-out evaluation of version %s: %d scenes a task", vid, scenes)
        # The fleet has stopped: every core can run scenes.
        result = evaluate(version, tasks, scenes, 0, "mujoco", baselines=(), workers=2)
        stored = store_where(version, registry)
        store_evaluation(
            result.summary(),
            manifest_path=version.manifest_path,
            registry=registry if "registry" in stored else None,
        )
        log.info("evaluation of %s stored in the %s", vid, " and ".join(stored) or "(nowhere)")
        points.append(
            {
                "version": vid,
                "t_s": round(v.published_at - started_at, 1),
                "training_step": version.manifest.training_step,
                "seeds": list(result.seeds),
                "tasks": {t: s.to_dict() for t, s in result.scores[vid].items()},
            }
        )
        print(json.dumps({"held_out": points[-1]}), flush=True)
    return points


def draw(result: dict, png: Path) -> Path:
    """The run's curve: window rates per task as lines, held-out results as dots."""
    lines: dict[str, list[tuple[float, float | None]]] = {}
    for point in result.get("curve", []):
        for task, v in point["tasks"].items():
            rate = v["rate"] if v["episodes"] else None
            lines.setdefault(task, []).append((float(point["t_s"]) / 60.0, rate))
    evals: dict[str, list[EvalPoint]] = {}
    for point in result.get("held_out", []):
        for task, v in point["tasks"].items():
            low, high = v["ci95"] if "ci95" in v else (v["low"], v["high"])  # older runs
            evals.setdefault(task, []).append(
                EvalPoint(
                    float(point["t_s"]) / 60.0,
                    v["successes"] / max(1, v["episodes"]),
                    float(low),
                    float(high),
                )
            )
    args = result.get("args", {})
    title = (
        f"fleet up: {args.get('cells', '?')} {args.get('sim_backend', '')} cells, "
        f"autonomous success per {float(args.get('interval', 0)) / 60:.0f} min window"
    )
    return draw_success_curve(lines, png, title=title, evals=evals)


def save(result: dict, json_path: Path | None, png: Path | None) -> None:
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=1, default=str))
    if png is not None and result.get("curve"):
        draw(result, png)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--cells", type=int, default=3)
    ap.add_argument("--duration", type=float, default=1800.0, help="seconds of `fleet up`")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds per curve point")
    ap.add_argument("--data-dir", type=Path, default=None)
    ap.add_argument("--sim-backend", choices=["mujoco", "kinematic"], default="mujoco")
    ap.add_argument("--takeover-prob", type=float, default=0.0)
    ap.add_argument("--takeover-stall-s", type=float, default=2.0)
    ap.add_argument("--extra", default="", help="more `fleet up` arguments, space separated")
    ap.add_argument("--png", type=Path, default=None, help="write the curve here (PNG)")
    ap.add_argument("--json", type=Path, default=None, help="write the run's numbers here")
    ap.add_argument(
        "--eval-versions", type=int, default=3, help="published versions run held out (0: none)"
    )
    ap.add_argument("--eval-scenes", type=int, default=10, help="held-out scenes a task")
    ap.add_argument("--replot", type=Path, default=None, help="redraw --png from this JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.replot is not None:
        if args.png is None:
            ap.error("--replot needs --png")
        print(draw(json.loads(args.replot.read_text()), args.png))
        return 0

    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="learning-run-"))
    data_dir.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    redis = subprocess.Popen(
        [
            shutil.which("redis-server") or "/usr/bin/redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    fleet_cmd = [
        sys.executable, "-m", "fleet.cli", "up", "--cells", str(args.cells),
        "--duration", str(args.duration), "--redis-url", url, "--data-dir", str(data_dir),
        "--no-live", "--insecure", "--rollout", "immediate", "--dashboard-port", "-1",
        "--sim-backend", args.sim_backend, "--takeover-prob", str(args.takeover_prob),
        "--takeover-stall-s", str(args.takeover_stall_s),
        *args.extra.split(),
    ]  # fmt: skip
    curve: list[dict[str, object]] = []
    fleet = None
    registry: Registry | None = None
    try:
        time.sleep(0.5)
        registry = Registry(url)
        log.info("fleet up: %s (logs in %s)", " ".join(fleet_cmd), data_dir)
        with open(data_dir / "learning_run_fleet.log", "wb") as out:
            fleet = subprocess.Popen(fleet_cmd, stdout=out, stderr=subprocess.STDOUT)
            started = time.monotonic()
            started_at = time.time()
            before: dict[str, dict[str, dict[str, int]]] = {}
            while fleet.poll() is None:
                time.sleep(min(args.interval, 5.0))
                elapsed = time.monotonic() - started
                if curve and elapsed - float(curve[-1]["t_s"]) < args.interval:  # type: ignore[arg-type]
                    continue
                if not curve and elapsed < args.interval:
                    continue
                now = _totals(registry)
                point = {"t_s": round(elapsed, 1), "tasks": _window(now, before)}
                before = now
                curve.append(point)
                line = ", ".join(
                    f"{t}: {v['autonomous_successes']}/{v['episodes']} ({v['newest_version']})"
                    for t, v in sorted(point["tasks"].items())  # type: ignore[union-attr]
                )
                print(f"t={elapsed:6.0f}s  {line}", flush=True)
            final = {
                task: {v: (c.autonomous_successes, c.episodes) for v, c in sorted(versions.items())}
                for task, versions in _totals(registry).items()
            }
            stats = registry.learner_stats()
            versions = registry.versions()
        tasks = sorted({t for p in curve for t in p["tasks"]})  # type: ignore[attr-defined]
        result: dict = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "curve": curve,
            "per_version": final,
            "learner": stats,
            "versions": [
                {
                    "version": v.version_id,
                    "t_s": round(v.published_at - started_at, 1),
                }
                for v in versions
            ],
        }
        save(result, args.json, args.png)  # the curve is kept even if the evaluation fails
        if args.sim_backend == "mujoco":  # while Redis runs: results are stored in it too
            result["held_out"] = held_out(
                data_dir,
                versions,
                started_at,
                args.eval_versions,
                args.eval_scenes,
                tasks,
                registry,
            )
            save(result, args.json, args.png)
    finally:
        if fleet is not None and fleet.poll() is None:
            fleet.terminate()
            fleet.wait(60)
        if registry is not None:
            registry.close()
        redis.terminate()
        redis.wait(10)
    print(json.dumps(result, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
