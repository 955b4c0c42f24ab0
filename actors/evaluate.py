"""`fleet eval`: a policy version on simulated cells, on held-out scenes, beside baselines.

Each episode runs through the cell's own `ControlLoop` (the same inference, blending and
safety gate a cell uses) on a sim cell in lockstep, so an episode is a function of the
version, the task and the scene seed alone: inference runs inline at the tick it was asked
on (no inference latency, no thread timing), the plan is re-requested at a fixed lookahead,
and on the MuJoCo backend every goal reaches the physics before it steps
(drivers/sim/sdk_cell.py). No operator takes over, nothing is uploaded, no training
happens: the "operator" of an evaluated version only holds the arms if the version cannot
act, and such an episode is a failure.

Scenes are held-out seeds (fleet/common/scenes.py): disjoint by construction from every seed a
cell trains on. Baselines run on the same scenes: `untrained` (a freshly initialised model
of the version's config), `expert` (the backend's scripted expert driving the cell), or
another version (an id, or `stable` / `latest` with a registry).

`evaluate(...)` is the importable entry point; `main` is the command. With `workers` > 1
the episodes are spread over worker processes (`python -m actors.evaluate --worker`),
which get their jobs as JSON on stdin and answer one JSON line per episode.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, Field

from actors.config import ActorConfig
from actors.control_loop import ControlLoop
from actors.inference import InlineInference
from fleet.common.config_cli import add_model_arguments, flag, parse_model
from fleet.common.evaluation import BASELINES, EpisodeRecord, EvalResult, store_evaluation
from fleet.common.policy.manifest import Manifest
from fleet.common.scenes import SIM_BACKENDS, SimBackend, heldout_seed
from fleet.common.wire import from_tensor
from protos.fleetlearn.v1 import trajectory_pb2
from protos.joint_layout import JOINT_DIM

log = logging.getLogger("eval")

CONTROL_HZ = 20.0
DEFAULT_CAMERAS = ("overhead", "front")


# -- versions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class LoadedVersion:
    """A version's manifest and checked weights; `manifest_path` is where its manifest
    file is (None when there is none to update)."""

    manifest: Manifest
    weights_path: Path
    manifest_path: Path | None = None

    @property
    def version_id(self) -> str:
        return self.manifest.version_id


def version_of_model(
    model: Any, version_id: str, directory: Path, *, training_step: int = 0
) -> LoadedVersion:
    """An in-memory model (its PolicyConfig and state) as a version `evaluate` can run:
    written as a version file pair under `directory`, since workers load weights from a
    file and every runner checks them against the manifest's SHA-256."""
    from fleet.common.policy.weights import save_version

    manifest = Manifest(
        version_id=version_id,
        parent=None,
        model_config=model.config.to_dict(),
        training_step=training_step,
        data_seen=0,
        sha256="",
    )
    weights_path, manifest_path = save_version(Path(directory), model, manifest)
    return LoadedVersion(manifest, weights_path, manifest_path)


def _from_files(manifest_path: Path, weights_path: Path | None = None) -> LoadedVersion:
    manifest = Manifest.from_json(manifest_path.read_text())
    weights = weights_path or manifest_path.with_name(f"{manifest.version_id}.safetensors")
    if not weights.is_file():
        raise FileNotFoundError(f"version {manifest.version_id}: no weights file {weights}")
    return LoadedVersion(manifest, weights, manifest_path)


def _newest_in(directory: Path) -> Path:
    manifests = []
    for path in directory.glob("*.json"):
        try:
            manifests.append((Manifest.from_json(path.read_text()).created_at, path.name, path))
        except (OSError, ValueError):
            continue
    if not manifests:
        raise FileNotFoundError(f"no version manifests (*.json) in {directory}")
    return max(manifests)[2]


def resolve_version(
    spec: str | Path | LoadedVersion,
    *,
    registry: Any = None,
    versions_dir: Path | None = None,
) -> LoadedVersion:
    """A version from `spec`: a manifest (.json) or weights (.safetensors) file, a versions
    directory (its newest version), or with a registry a version id, `stable` or `latest`.
    `versions_dir` is where the weights are when the registry's paths are not this
    machine's, and where an id or `latest` is looked up without a registry."""
    if isinstance(spec, LoadedVersion):
        return spec
    text = str(spec)
    path = Path(text)
    if path.is_file():
        if path.suffix == ".safetensors":
            return _from_files(path.with_suffix(".json"), path)
        return _from_files(path)
    if path.is_dir():
        return _from_files(_newest_in(path))
    if registry is not None:
        version_id = text
        if text == "stable":
            version_id = registry.rollout().stable or ""
            if not version_id:
                raise LookupError("the registry has no stable version yet")
        elif text == "latest":
            version_id = registry.latest_version() or ""
            if not version_id:
                raise LookupError("the registry has no versions yet")
        record = registry.version(version_id)
        if record is None:
            raise LookupError(f"unknown version {version_id!r} in the registry")
        weights = Path(record.weights_path)
        if versions_dir is not None:
            weights = Path(versions_dir) / f"{version_id}.safetensors"
        manifest_fields = {
            k: v
            for k, v in record.manifest.items()
            if k not in ("weights_path", "published_at", "evaluation")
        }
        manifest = Manifest.from_json(json.dumps(manifest_fields))
        if not weights.is_file():
            raise FileNotFoundError(
                f"version {version_id}: weights not found at {weights} (give --versions-dir "
                "where this machine sees the learner's versions)"
            )
        manifest_file = weights.with_suffix(".json")
        return LoadedVersion(manifest, weights, manifest_file if manifest_file.is_file() else None)
    if versions_dir is not None:
        directory = Path(versions_dir)
        if text == "latest":
            return _from_files(_newest_in(directory))
        if text == "stable":
            raise LookupError("`stable` is the registry's to say: give --redis-url")
        if not (directory / f"{text}.json").is_file():
            raise LookupError(f"no version {text!r} in {directory} (no {text}.json there)")
        return _from_files(directory / f"{text}.json")
    raise LookupError(
        f"cannot find version {text!r}: give a manifest or weights file, a versions "
        "directory, --versions-dir, or --redis-url"
    )


def check_signature(version: LoadedVersion, verify_key: Path) -> None:
    """Raise SignatureError unless the version carries the key's signature."""
    from fleet.common.signing import load_public_key, verify

    m = version.manifest
    verify(load_public_key(verify_key), m.version_id, m.sha256, m.signature)


# -- the sim cell side -------------------------------------------------------------------


def backend_tasks(backend: str) -> tuple[str, ...]:
    if backend == "mujoco":
        from drivers.sim.mujoco import MUJOCO_TASKS

        return tuple(MUJOCO_TASKS)
    if backend == "kinematic":
        from drivers.sim import SIM_TASKS

        return tuple(SIM_TASKS)
    raise ValueError(f"unknown sim backend {backend!r}; known: {', '.join(SIM_BACKENDS)}")


def task_time_limit(backend: str, task: str) -> float:
    """The sim seconds an episode of `task` may take on `backend` (the task's own limit)."""
    if backend == "mujoco":
        from drivers.sim.mujoco import EPISODE_TIME_S

        return float(EPISODE_TIME_S[task])
    from drivers.sim import EPISODE_TIME_S as KINEMATIC_TIME_S

    return float(KINEMATIC_TIME_S)


@contextlib.contextmanager
def sim_cell(backend: str, cell_id: str, cameras: Sequence[str]) -> Iterator[Any]:
    """A lockstep sim cell with no takeovers, closed afterwards."""
    if backend == "mujoco":
        from drivers.sim.sdk_cell import make_sdk_sim_cell

        cell: Any = make_sdk_sim_cell(
            cell_id,
            cameras=tuple(cameras),
            control_hz=CONTROL_HZ,
            realtime_factor=0.0,
            takeover_prob=0.0,
            lockstep=True,
        )
    elif backend == "kinematic":
        from drivers.sim import make_sim_cell

        cell = make_sim_cell(
            cell_id,
            cameras=tuple(cameras),
            control_hz=CONTROL_HZ,
            realtime_factor=0.0,
            takeover_prob=0.0,
        )
    else:
        raise ValueError(f"unknown sim backend {backend!r}; known: {', '.join(SIM_BACKENDS)}")
    try:
        yield cell
    finally:
        if hasattr(cell, "close"):
            cell.close()


class _HoldOperator:
    """Eval has no operator: this one never asks for control, and if the version cannot
    act (it failed to predict) it holds the arms where they were last sent."""

    def __init__(self, hardware: Any) -> None:
        self.hardware = hardware

    def wants_control(self) -> bool:
        return False

    def action(self) -> np.ndarray:
        last = self.hardware.gate.last_command
        if last is not None:
            return np.asarray(last, np.float32)
        return np.asarray(self.hardware.read_joints(), np.float32)


class _OneRunner:
    """The watcher of an evaluated policy: offers its one runner once."""

    def __init__(self, runner: Any) -> None:
        self._runner = runner

    def take_new(self) -> Any:
        runner, self._runner = self._runner, None
        return runner


class _TraceSink:
    """Takes the loop's recorded chunks instead of an uplink: keeps each episode's joint
    positions and commanded actions (for its digest, and for tests to compare)."""

    def __init__(self) -> None:
        self.joint_pos: list[np.ndarray] = []
        self.action: list[np.ndarray] = []

    def clear(self) -> None:
        self.joint_pos, self.action = [], []

    def submit(self, chunk: trajectory_pb2.StepChunk) -> bool:
        self.joint_pos.append(from_tensor(chunk.joint_pos, "joint_pos", "float32", (None, 14)))
        self.action.append(from_tensor(chunk.action, "action", "float32", (None, JOINT_DIM)))
        return True

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        empty = np.zeros((0, JOINT_DIM), np.float32)
        joints = np.concatenate(self.joint_pos) if self.joint_pos else empty
        actions = np.concatenate(self.action) if self.action else empty
        return joints, actions

    def digest(self) -> str:
        joints, actions = self.arrays()
        h = hashlib.sha256()
        h.update(np.ascontiguousarray(joints, "<f4").tobytes())
        h.update(np.ascontiguousarray(actions, "<f4").tobytes())
        return h.hexdigest()


@dataclass(frozen=True)
class PolicySpec:
    """What a worker runs: `kind` "version" (its weights file, checked against the
    manifest), "untrained" (a fresh model of the manifest's config, seeded) or "expert"."""

    name: str
    kind: str
    weights_path: str = ""
    manifest_path: str = ""
    manifest_json: str = ""
    init_seed: int = 0

    @classmethod
    def of_version(cls, version: LoadedVersion) -> PolicySpec:
        """The spec that runs `version`'s own (checked) weights, under its id."""
        return cls(
            version.version_id,
            "version",
            str(version.weights_path),
            str(version.manifest_path or ""),
            version.manifest.to_json(),
        )


def _build_runner(spec: PolicySpec) -> Any:
    import torch

    from fleet.common.policy.config import PolicyConfig
    from fleet.common.policy.model import UnifiedPolicy
    from fleet.common.policy.runtime import PolicyRunner
    from fleet.common.policy.weights import load_version

    manifest = Manifest.from_json(spec.manifest_json)
    if spec.kind == "version":
        weights = Path(spec.weights_path).read_bytes()
        return PolicyRunner(load_version(weights, manifest), spec.name)
    if spec.kind == "untrained":
        torch.manual_seed(spec.init_seed)
        with torch.device("cpu"):
            model = UnifiedPolicy(PolicyConfig.from_dict(manifest.model_config))
        return PolicyRunner(model, spec.name)
    raise ValueError(f"policy kind {spec.kind!r} has no runner")


class EpisodeRunner:
    """One lockstep sim cell; runs (policy, task, seed) jobs one after another, each in a
    control loop of its own (a policy's model is built once), so nothing of one episode (a
    plan, a tick count, a version that failed to predict) carries into the next."""

    def __init__(self, backend: str, cell: Any, cell_id: str) -> None:
        self.backend = backend
        self.cell = cell
        self.cell_id = cell_id
        self.sink = _TraceSink()
        self._runners: dict[str, Any] = {}
        self._stop = threading.Event()
        self._config = ActorConfig(
            cell_id=cell_id,
            learner_address="eval.invalid:0",  # nothing is uploaded
            control_hz=CONTROL_HZ,
            max_episode_s=max(task_time_limit(backend, t) for t in cell.scene.tasks),
        )

    def _loop(self, spec: PolicySpec) -> ControlLoop:
        if spec.kind == "expert":
            operator, watcher, lookahead = self.cell.operator, None, None
        else:
            runner = self._runners.get(spec.name)
            if runner is None:
                runner = self._runners[spec.name] = _build_runner(spec)
            operator, watcher = _HoldOperator(self.cell.hardware), _OneRunner(runner)
            # Inline inference has no latency in sim time: ask for the next chunk halfway
            # through the plan, as the loop does with an instant policy, never on wall time.
            lookahead = max(1, runner.config.chunk_len // 2)
        return ControlLoop(
            self._config,
            self.cell.hardware,
            self.cell.scene,
            operator,
            self.cell.clock,
            self.sink,
            watcher,
            inference=InlineInference(),
            shadow_inference=InlineInference(),
            lookahead=lookahead,
        )

    def run(self, spec: PolicySpec, task: str, seed: int) -> EpisodeRecord:
        self.sink.clear()
        outcome = self._loop(spec).run_episode(
            task, seed, self._stop, max_episode_s=task_time_limit(self.backend, task)
        )
        return EpisodeRecord(
            policy=spec.name,
            task=task,
            seed=seed,
            success=outcome.success,
            reason=outcome.reason,
            steps=outcome.steps,
            reward=round(outcome.reward, 6),
            intervention_steps=outcome.intervention_steps,
            trace_sha256=self.sink.digest(),
        )


Job = tuple[str, str, int]  # (policy name, task, seed)


def run_jobs(
    backend: str,
    cameras: Sequence[str],
    policies: Sequence[PolicySpec],
    jobs: Sequence[Job],
    on_record: Callable[[EpisodeRecord], None],
    *,
    cell_id: str = "eval-0",
    on_trace: Callable[[EpisodeRecord, np.ndarray, np.ndarray], None] | None = None,
) -> None:
    """Run `jobs` on one lockstep cell of `backend`, reporting each episode as it ends."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the same arithmetic on every run and every machine load
    by_name = {p.name: p for p in policies}
    with contextlib.ExitStack() as stack:
        stack.callback(torch.set_num_threads, threads)
        cell = stack.enter_context(sim_cell(backend, cell_id, cameras))
        runner = EpisodeRunner(backend, cell, cell_id)
        for name, task, seed in jobs:
            record = runner.run(by_name[name], task, seed)
            log.info(
                "cell %s: %s on %s scene %d: %s after %d steps (progress %.3f)",
                cell_id,
                name,
                task,
                seed,
                record.reason,
                record.steps,
                record.reward,
            )
            if on_trace is not None:
                on_trace(record, *runner.sink.arrays())
            on_record(record)


# -- orchestration -----------------------------------------------------------------------


def _policies(
    version: LoadedVersion,
    baselines: Sequence[str | LoadedVersion],
    untrained_seed: int,
) -> list[PolicySpec]:
    manifest_json = version.manifest.to_json()
    out = [PolicySpec.of_version(version)]
    for base in baselines:
        if isinstance(base, LoadedVersion):
            out.append(PolicySpec.of_version(base))
        elif base == "untrained":
            out.append(
                PolicySpec(
                    "untrained", "untrained", manifest_json=manifest_json, init_seed=untrained_seed
                )
            )
        elif base == "expert":
            out.append(PolicySpec("expert", "expert", manifest_json=manifest_json))
        else:
            raise ValueError(f"unknown baseline {base!r}; known: {', '.join(BASELINES)}")
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise ValueError(f"a policy appears twice among the version and baselines: {names}")
    return out


def resolve_baselines(
    baselines: Sequence[str | LoadedVersion], *, registry: Any = None, versions_dir: Path | None
) -> list[str | LoadedVersion]:
    """Baseline names kept as they are, versions loaded; LookupError names a bad one."""
    out: list[str | LoadedVersion] = []
    for b in baselines:
        if isinstance(b, LoadedVersion) or b in BASELINES:
            out.append(b)
            continue
        try:
            out.append(resolve_version(b, registry=registry, versions_dir=versions_dir))
        except (LookupError, OSError, ValueError) as exc:
            raise LookupError(
                f"baseline {b!r} is neither {' nor '.join(BASELINES)} nor a version: {exc}"
            ) from None
    return out


def eval_tasks(
    version: LoadedVersion, backend: str, tasks: Sequence[str] | None
) -> tuple[str, ...]:
    """The tasks to run: those asked for (default: every task the version and the backend
    share); each must be known to both."""
    known = backend_tasks(backend)
    policy_tasks = tuple(version.manifest.model_config.get("tasks", ()))
    if not tasks:
        chosen = tuple(t for t in policy_tasks if t in known)
        if not chosen:
            raise ValueError(
                f"version {version.version_id} knows tasks {list(policy_tasks)}, the "
                f"{backend} backend {list(known)}: none in common"
            )
        return chosen
    for t in tasks:
        if t not in known:
            raise ValueError(f"task {t!r} is not a {backend} task; known: {', '.join(known)}")
        if t not in policy_tasks:
            raise ValueError(
                f"version {version.version_id} was not trained for task {t!r}; it knows "
                f"{', '.join(policy_tasks)}"
            )
    return tuple(tasks)


def _split(jobs: Sequence[Job], workers: int) -> list[list[Job]]:
    return [list(jobs[i::workers]) for i in range(workers) if jobs[i::workers]]


def _worker_process(
    index: int,
    backend: str,
    cameras: Sequence[str],
    policies: Sequence[PolicySpec],
    jobs: Sequence[Job],
    on_record: Callable[[EpisodeRecord], None],
) -> None:
    spec = {
        "backend": backend,
        "cameras": list(cameras),
        "policies": [asdict(p) for p in policies],
        "jobs": [list(j) for j in jobs],
        "cell_id": f"eval-{index}",
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "actors.evaluate", "--worker"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        proc.stdin.write(json.dumps(spec))
        proc.stdin.close()
        for line in proc.stdout:
            if line.startswith("{"):
                on_record(EpisodeRecord(**json.loads(line)))
    finally:
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"eval worker {index} exited with status {proc.returncode}")


def evaluate(
    version_source: str | Path | LoadedVersion,
    tasks: Sequence[str] | None = None,
    episodes: int = 10,
    seed_start: int = 0,
    backend: str = "mujoco",
    baselines: Sequence[str | LoadedVersion] = ("untrained", "expert"),
    workers: int = 1,
    *,
    registry: Any = None,
    versions_dir: Path | None = None,
    untrained_seed: int = 0,
    progress: Callable[[EpisodeRecord], None] | None = None,
    on_trace: Callable[[EpisodeRecord, np.ndarray, np.ndarray], None] | None = None,
) -> EvalResult:
    """Run the version and its baselines on `episodes` held-out scenes per task (scene
    indices seed_start .., the same for every policy). Baselines: "untrained", "expert",
    or versions (a LoadedVersion, or with a registry an id / "stable" / "latest").
    `progress` is called after each episode; `on_trace` (in-process runs only, workers=1)
    gets each episode's joint positions and commanded actions, step by step. Nothing is
    stored here: `fleet.common.evaluation.store_evaluation(result.summary(), ...)` keeps a result
    with its version (as `fleet eval` does)."""
    if episodes < 1:
        raise ValueError(f"episodes must be >= 1, got {episodes}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if on_trace is not None and workers != 1:
        raise ValueError("on_trace needs workers=1 (traces stay in the worker processes)")
    version = resolve_version(version_source, registry=registry, versions_dir=versions_dir)
    base_specs = resolve_baselines(baselines, registry=registry, versions_dir=versions_dir)
    chosen = eval_tasks(version, backend, tasks)
    policies = _policies(version, base_specs, untrained_seed)
    cameras = tuple(version.manifest.model_config.get("cameras", DEFAULT_CAMERAS))
    seeds = tuple(heldout_seed(seed_start + i) for i in range(episodes))
    jobs: list[Job] = [(p.name, t, s) for t in chosen for s in seeds for p in policies]
    result = EvalResult(
        version=version.version_id,
        backend=backend,
        tasks=chosen,
        episodes_per_task=episodes,
        seed_start=seed_start,
        seeds=seeds,
        baselines=tuple(p.name for p in policies[1:]),
    )
    lock = threading.Lock()

    def take(record: EpisodeRecord) -> None:
        with lock:
            result.records.append(record)
        if progress is not None:
            progress(record)

    t0 = time.monotonic()
    if workers == 1:
        run_jobs(backend, cameras, policies, jobs, take, on_trace=on_trace)
    else:
        errors: list[BaseException] = []

        def work(i: int, part: list[Job]) -> None:
            try:
                _worker_process(i, backend, cameras, policies, part, take)
            except BaseException as exc:
                errors.append(exc)

        threads = [
            threading.Thread(target=work, args=(i, part), name=f"eval-worker-{i}")
            for i, part in enumerate(_split(jobs, workers))
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
    order = {job: i for i, job in enumerate(jobs)}
    result.records.sort(key=lambda r: order[(r.policy, r.task, r.seed)])
    result.duration_s = time.monotonic() - t0
    return result


# -- command -----------------------------------------------------------------------------


class EvalOptions(BaseModel):
    """`fleet eval`'s arguments (fleet/common/config_cli.py generates them)."""

    version: str | None = flag(
        None,
        "VERSION id, stable or latest (with --redis-url or --versions-dir), or a version's "
        "manifest (.json) / weights (.safetensors) file, or a versions directory",
        positional=True,
    )
    redis_url: str | None = Field(None, description="Redis holding the fleet registry")
    redis_prefix: str = Field("fleet:", description="registry key prefix")
    versions_dir: Path | None = Field(
        None,
        description="directory of <version>.safetensors/.json files (the learner's versions)",
    )
    tasks: str = Field("", description="comma-separated tasks (default: all shared)")
    episodes: int = Field(10, description="held-out scenes per task")
    seed_start: int = Field(
        0,
        description="first held-out scene index (seeds are fleet.common.scenes.heldout_seed(i), "
        "never a training seed)",
    )
    backend: SimBackend = Field("mujoco", description="sim backend")
    baselines: str = Field(
        "untrained,expert",
        description="comma-separated: untrained, expert, or versions (id, stable, latest); "
        "'' = none",
    )
    workers: int = Field(1, description="parallel worker processes")
    verify_key: Path | None = Field(None, description="require the learner's signature (PEM)")
    no_store: bool = Field(
        False,
        description="do not store the result with the version (manifest file and registry)",
    )
    worker: bool = flag(False, hidden=True)  # a worker process of a parent `fleet eval`


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet eval",
        description="Run a policy version on simulated cells, through the cell's own control "
        "loop, on held-out scenes (never one the fleet trains on), beside baselines on the "
        "same scenes; print successes with 95%% Wilson intervals and mean progress per task, "
        "store the result with the version, and end with one JSON line.",
    )
    add_model_arguments(p, EvalOptions)
    return p


def _worker_main() -> int:
    spec = json.loads(sys.stdin.read())
    out = sys.stdout

    def emit(record: EpisodeRecord) -> None:
        out.write(json.dumps(asdict(record)) + "\n")
        out.flush()

    run_jobs(
        spec["backend"],
        spec["cameras"],
        [PolicySpec(**p) for p in spec["policies"]],
        [(str(n), str(t), int(s)) for n, t, s in spec["jobs"]],
        emit,
        cell_id=spec["cell_id"],
    )
    return 0


def _table(result: EvalResult) -> Any:
    from rich.table import Table

    scores = result.scores
    policies = [result.version, *result.baselines]
    table = Table(
        title=f"fleet eval {result.version}: {result.backend}, {result.episodes_per_task} "
        f"held-out scenes per task (indices {result.seed_start}.."
        f"{result.seed_start + result.episodes_per_task - 1})"
    )
    table.add_column("task")
    for p in policies:
        table.add_column(f"{p} success [95% CI]", justify="right")
        table.add_column(f"{p} progress", justify="right")
    for task in result.tasks:
        row = [task]
        for p in policies:
            s = scores.get(p, {}).get(task)
            if s is None:
                row += ["-", "-"]
                continue
            row.append(f"{s.successes}/{s.episodes} [{s.ci95[0]:.2f}, {s.ci95[1]:.2f}]")
            row.append(f"{s.mean_progress:.3f}")
        table.add_row(*row)
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_model(build_parser(), EvalOptions, argv)
    if args.worker:
        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        return _worker_main()
    if not args.version:
        build_parser().error("say which VERSION to evaluate")
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from fleet.common.logs import setup_logging

    setup_logging()
    console = Console(stderr=True)
    registry = None
    if args.redis_url:
        from fleet.control.registry import Registry

        registry = Registry(args.redis_url, prefix=args.redis_prefix)
    try:
        try:
            version = resolve_version(
                args.version, registry=registry, versions_dir=args.versions_dir
            )
            if args.verify_key is not None:
                check_signature(version, args.verify_key)
            tasks = [t for t in args.tasks.split(",") if t]
            baselines = resolve_baselines(
                [b for b in args.baselines.split(",") if b],
                registry=registry,
                versions_dir=args.versions_dir,
            )
            chosen = eval_tasks(version, args.backend, tasks)
        except (LookupError, OSError, ValueError) as exc:
            console.print(f"[red]fleet eval:[/red] {exc}")
            return 2
        total = args.episodes * len(chosen) * (1 + len(baselines))
        with Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        ) as bar:
            job = bar.add_task(f"eval {version.version_id} ({args.backend})", total=total)
            try:
                result = evaluate(
                    version,
                    chosen,
                    args.episodes,
                    args.seed_start,
                    args.backend,
                    baselines,
                    args.workers,
                    registry=registry,
                    versions_dir=args.versions_dir,
                    progress=lambda _record: bar.advance(job),
                )
            except (LookupError, OSError, ValueError) as exc:
                console.print(f"[red]fleet eval:[/red] {exc}")
                return 2
        Console().print(_table(result))
        if not args.no_store:
            try:
                stored = store_where(version, registry)
                store_evaluation(
                    result.summary(),
                    manifest_path=version.manifest_path,
                    registry=registry if "registry" in stored else None,
                )
                if stored:
                    log.info(
                        "evaluation of %s stored in the %s",
                        version.version_id,
                        " and ".join(stored),
                    )
            except Exception as exc:  # the result still goes out below; say what was lost
                log.error("evaluation of %s could not be stored: %s", version.version_id, exc)
        print(result.to_json(), flush=True)
        return 0
    finally:
        if registry is not None:
            registry.close()


def store_where(version: LoadedVersion, registry: Any) -> list[str]:
    """Where a result of `version` is kept: its manifest file, the registry, or both."""
    out = []
    if version.manifest_path is not None:
        out.append("manifest file")
    if registry is not None and registry.version(version.version_id) is not None:
        out.append("registry")
    return out


if __name__ == "__main__":
    raise SystemExit(main())
