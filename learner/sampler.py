"""Training batches from the growing episode store, and the sample-to-insert rate limiter.

Completed episodes become sampleable as soon as ingest marks them complete. Batches are
task-balanced so a task with many cells does not crowd out the others in the one unified
model. The limiter throttles the trainer only; ingest never waits on it, so a slow learner
can never stall a cell (unlike Reverb's limiter, which blocks inserts).

An episode that cannot be read or decoded is quarantined (marked in the store, counted,
never sampled again) and the batch is drawn again without it: one bad episode must never
stop training (see EpisodeSampler.sample).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import simplejpeg
import torch

from fleet.common.policy.config import PolicyConfig
from fleet.common.policy.model import resize_images
from learner.store import EpisodeData, EpisodeRef, EpisodeStore
from protos.joint_layout import JOINT_NAMES

log = logging.getLogger(__name__)


@dataclass
class SamplerConfig:
    """Sampling knobs; the defaults suit the tiny model on a CPU."""

    batch_size: int = 32
    chunk_len: int = 10
    intervention_weight: float = 2.0
    # At most this many sampled steps per stored step: beyond it the trainer waits for data.
    max_samples_per_insert: float = 64.0
    # Training starts once this many steps are stored.
    min_steps: int = 200
    refresh_interval_s: float = 2.0
    # Encoded frames kept in memory, most recently sampled episodes first; an episode whose
    # frames were dropped is read from the store again when it is next sampled. Bounds the
    # sampler's memory however much data the store holds (joint columns are always kept).
    frame_cache_mb: int = 2048
    # Frames are read from the store and cached this many rows of an episode at a time: a
    # long episode costs what its sampled blocks hold, never all of it at once.
    frame_block_rows: int = 512
    # (height, width) of the batch's frames: the model's input size (for_model sets it).
    # Frames of another size, from cells with other camera modes, are resized to it as the
    # model would; empty: the size of the first indexed episode.
    image_size: tuple[int, ...] = ()
    # The model's joint range (for_model sets it; empty: no check).
    # A step whose joints, or any target of its chunk, lie beyond it by more than
    # joint_margin of the joint's span is not trained on: one miscalibrated arm (a joint read
    # a turn off) or a glitching read must not teach the fleet's model its numbers.
    joint_lower: tuple[float, ...] = ()
    joint_upper: tuple[float, ...] = ()
    joint_margin: float = 0.25
    # AWR-style outcome weighting (off until it shows a gain): weight *= clip(exp(A / beta))
    # with A = the episode's return (success = 1.0) minus its task's mean return.
    # Which steps the policy drove (not the operator) are trained on: "successful" = only
    # those of episodes it finished alone with success; "all" = every one. Imitating its own
    # failed attempts would teach the policy its mistakes; the operator's steps (demos,
    # interventions) are always trained on (HG-DAgger / intervention-weighted regression).
    policy_steps: str = "successful"
    advantage_weighting: bool = False
    advantage_beta: float = 1.0
    advantage_max_weight: float = 20.0
    # Relative share of each task in a batch, by name; a task not named gets 1.0, and 0
    # leaves a task out of training (its episodes stay in the store). Empty: tasks with
    # episodes share every batch equally, whatever their count of episodes.
    task_weights: tuple[tuple[str, float], ...] = ()
    # Chunk targets past the end of an episode that ended in success: masked out (False), or
    # trained as holding its last action (True: the arm stays where the task was done).
    # Cells end an episode the tick it succeeds, so masked, nothing in the data says to stop
    # at the goal. Measured (README "How well it learns"): on demonstrations alone holding
    # lifted every task (held out 24/11/33 -> 43/27/43 of 50); in a 60-minute fleet run it
    # lifted handover_bar and push_to_target but place_cube fell (17 -> 8 of 50: the policy
    # let go of the cube where it had just grasped it); with 100 opening demonstrations a
    # task as well (--first-version-demos) the fleet's held-out figures rose on every task
    # (36/17/21 -> 50/40/44 of 50), so `fleet up` holds on MuJoCo cells. The learner's
    # default stays off: a lab's own tasks were not measured. Episodes cut short (time
    # limit, abort) are always masked: what came next is unknown.
    hold_after_success: bool = False

    def for_model(self, model: PolicyConfig) -> SamplerConfig:
        """These knobs with what the model decides: its chunk length, input size and joint
        range (the one place they are taken from a PolicyConfig)."""
        return dataclasses.replace(
            self,
            chunk_len=model.chunk_len,
            image_size=tuple(model.image_size),
            joint_lower=tuple(model.joint_lower),
            joint_upper=tuple(model.joint_upper),
        )


def parse_task_weights(pairs: Sequence[str]) -> tuple[tuple[str, float], ...]:
    """Command-line TASK=WEIGHT pairs as SamplerConfig.task_weights, refused before anything
    starts (the caller checks the names against the model's tasks)."""
    out: list[tuple[str, float]] = []
    for pair in pairs:
        task, sep, value = pair.partition("=")
        try:
            weight = float(value)
        except ValueError:
            weight = float("nan")
        if not sep or not task or not (math.isfinite(weight) and weight >= 0.0):
            raise ValueError(f"task weight {pair!r}: want TASK=WEIGHT with WEIGHT a number >= 0")
        out.append((task, weight))
    return tuple(out)


def episode_succeeded(attrs: dict) -> bool:
    """Whether a finished episode's outcome (sent with its last chunk) says it succeeded."""
    return bool((attrs.get("outcome") or {}).get("success"))


def episode_return(attrs: dict) -> float:
    """An episode's outcome as a number: its "return" if the cell sent one, else success."""
    outcome = attrs.get("outcome") or {}
    if "return" in outcome:
        return float(outcome["return"])
    return 1.0 if episode_succeeded(attrs) else 0.0


def advantage_weight(ret: float, task_mean: float, beta: float, max_weight: float) -> float:
    """exp((ret - task_mean) / beta), clipped to [0, max_weight] (AWR / MARWIL)."""
    return float(min(math.exp(min((ret - task_mean) / beta, 50.0)), max_weight))


# Decodes a list of JPEG byte strings into RGB arrays, in order (in-process or a Ray pool).
Decoder = Callable[[list[bytes]], list[np.ndarray]]


def decode_jpegs(jpegs: list[bytes]) -> list[np.ndarray]:
    """In-process decoding: the default on a 2-core machine (see learner/decode_pool.py)."""
    return [simplejpeg.decode_jpeg(j, colorspace="RGB") for j in jpegs]


def steps_in_range(
    joint_pos: np.ndarray,
    action: np.ndarray,
    steps: np.ndarray,
    lower: np.ndarray,
    upper: np.ndarray,
    margin: float,
    chunk_len: int,
) -> tuple[np.ndarray, str | None]:
    """Per step of `steps`: are its joints and the targets of its chunk (the next
    `chunk_len` actions) within [lower, upper] widened by `margin` of each joint's span?
    And, if any is not, the first offending value in words."""
    span = upper - lower
    lo, hi = lower - margin * span, upper + margin * span
    joints_ok = ((joint_pos >= lo) & (joint_pos <= hi)).all(1)
    action_bad = ~((action >= lo) & (action <= hi)).all(1)
    before = np.concatenate([[0], np.cumsum(action_bad)])  # bad actions before each index
    ends = np.minimum(steps + chunk_len, len(action))
    ok = joints_ok[steps] & (before[ends] - before[steps] == 0)
    if ok.all():
        return ok, None
    for name, rows in (("joint", joint_pos), ("target", action)):
        outside = (rows < lo) | (rows > hi)
        if outside.any():
            t, j = (int(x) for x in np.argwhere(outside)[0])
            worst = (
                f"{JOINT_NAMES[j]} {name} {float(rows[t, j]):.3f} at step {t}, outside "
                f"{lo[j]:.2f}..{hi[j]:.2f} (the model's range and {margin:.0%} of it)"
            )
            return ok, worst
    return ok, "out of range"  # not reached: a step is only refused for a value outside


def trainable_steps(data: EpisodeData, policy_steps: str) -> np.ndarray:
    """Indices of an episode's steps worth imitating (see SamplerConfig.policy_steps)."""
    n = int(data.joint_pos.shape[0])
    if policy_steps == "all":
        return np.arange(n)
    operator = np.asarray(data.intervention[:n], dtype=bool)
    if episode_succeeded(data.attrs) and not operator.any():
        return np.arange(n)
    return np.flatnonzero(operator)


def trained_on(attrs: dict, policy_steps: str = "successful") -> bool:
    """Whether the sampler imitates any step of a finished episode, from its attributes
    alone (the rule of `trainable_steps`: operator steps always, the policy's own only
    from an episode it finished alone with success). Retention keeps these."""
    if policy_steps == "all":
        return True
    if int(attrs.get("intervention_steps", 0)) > 0:
        return True
    return episode_succeeded(attrs)


@dataclass
class _Episode:
    data: EpisodeData
    task: str
    n_steps: int
    ret: float = 0.0
    steps: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    succeeded: bool = False


@dataclass
class RateLimiter:
    """Bounds sampled steps per inserted step; only the consumer (trainer) is throttled."""

    max_samples_per_insert: float
    min_inserted: int
    sampled: int = 0
    inserted: int = 0

    def may_sample(self, n: int) -> bool:
        if self.inserted < self.min_inserted:
            return False
        return (self.sampled + n) <= self.max_samples_per_insert * self.inserted

    def ratio(self) -> float:
        return self.sampled / self.inserted if self.inserted else 0.0


@dataclass
class EpisodeSampler:
    """Reads complete episodes from the store as it grows and draws task-balanced batches."""

    store: EpisodeStore
    cameras: Sequence[str]
    tasks: Sequence[str]
    config: SamplerConfig = field(default_factory=SamplerConfig)
    seed: int = 0
    decoder: Decoder = decode_jpegs

    def __post_init__(self) -> None:
        if self.config.policy_steps not in ("successful", "all"):
            raise ValueError(
                f"policy_steps must be 'successful' or 'all', not {self.config.policy_steps!r}"
            )
        for task, w in self.config.task_weights:
            if task not in self.tasks or not (math.isfinite(w) and w >= 0.0):
                raise ValueError(
                    f"task weight {task}={w}: the task must be one of {list(self.tasks)}"
                    " and the weight a finite number >= 0"
                )
        self._task_weight = dict(self.config.task_weights)
        self._rng = np.random.default_rng(self.seed)
        self._episodes: dict[EpisodeRef, _Episode] = {}
        # (episode, block) -> each camera's frames of that block of rows.
        self._frames: OrderedDict[tuple[EpisodeRef, int], dict[str, list[bytes]]] = OrderedDict()
        self._frame_bytes = 0
        self.frame_reads = 0  # blocks of frames read from the store
        self._by_task: dict[str, list[EpisodeRef]] = {}
        self._last_refresh = 0.0
        self.limiter = RateLimiter(self.config.max_samples_per_insert, self.config.min_steps)
        self._task_ids = {t: i for i, t in enumerate(self.tasks)}
        self.quarantined = 0  # episodes the store holds in quarantine, as this sampler saw
        self.last_quarantined = ""  # "cell/episode: reason" of the newest one
        # Episodes set aside (not quarantined) because they lack a camera the model sees.
        self.without_cameras = 0
        self.last_without_cameras = ""  # "cell/episode: lacks ...; has ..." of the newest one
        self._camera_mismatches_logged: set[tuple[tuple[str, ...], tuple[str, ...]]] = set()
        # Steps not trained on because a joint or target is outside the model's range.
        self.out_of_range_steps = 0
        self.last_out_of_range = ""  # "cell/episode: joint value, range, step" of the newest
        self._out_of_range_logged: set[tuple[str, str]] = set()

    @property
    def steps_available(self) -> int:
        return self.limiter.inserted

    @property
    def episodes_available(self) -> int:
        return len(self._episodes)

    def position(self) -> dict[str, object]:
        """What a checkpoint needs to resume: indexed episodes, limiter counts, rng state."""
        return {
            "episodes": sorted(
                [ref.cell_id, ref.episode_id, ep.n_steps] for ref, ep in self._episodes.items()
            ),
            "sampled": self.limiter.sampled,
            "inserted": self.limiter.inserted,
            "rng": self._rng.bit_generator.state,
        }

    def restore_position(self, position: dict[str, object]) -> None:
        """Continue the limiter and rng where a checkpoint left them.

        Episodes are re-read from the store on the next refresh (the store is the source of
        truth); the limiter's sampled count continues, so a restart does not reset the
        replay ratio and overfit stale data.
        """
        self.limiter.sampled = int(position["sampled"])  # type: ignore[call-overload]
        self._rng.bit_generator.state = position["rng"]
        self.refresh(force=True)
        log.info(
            "sampler resumed: %d episodes indexed (%d at checkpoint), %d sampled / %d inserted",
            len(self._episodes),
            len(position["episodes"]),  # type: ignore[arg-type]
            self.limiter.sampled,
            self.limiter.inserted,
        )

    def refresh(self, force: bool = False) -> int:
        """Load episodes completed since the last refresh; returns how many were added."""
        now = time.monotonic()
        if not force and now - self._last_refresh < self.config.refresh_interval_s:
            return 0
        self._last_refresh = now
        added = 0
        for ref in self.store.episodes(complete_only=True):
            if ref in self._episodes:
                continue
            # Frames are read when the episode is first sampled: not at all for one the
            # trainer will never sample (a failed autonomous attempt, an unknown task).
            try:
                data = self.store.read_episode(ref, frames=False)
            except Exception as exc:
                self._episodes[ref] = _Episode(_empty(ref), "", 0)
                self._quarantine(ref, f"cannot be read: {type(exc).__name__}: {exc}")
                continue
            if data.attrs.get("quarantined"):
                self._episodes[ref] = _Episode(data, "", 0)
                self.quarantined += 1
                continue
            task = str(data.attrs.get("task", ""))
            n = int(data.joint_pos.shape[0])
            if task not in self._task_ids or n == 0:
                log.warning(
                    "episode %s/%s: task %r not trained or empty, skipped",
                    ref.cell_id,
                    ref.episode_id,
                    task,
                )
                self._episodes[ref] = _Episode(data, task, 0)
                continue
            declared = data.attrs.get("cameras") or {}
            if declared and any(cam not in declared for cam in self.cameras):
                self._episodes[ref] = _Episode(data, task, 0)
                self._set_aside(ref, sorted(declared))
                continue
            steps = self._within_joint_range(
                ref, data, trainable_steps(data, self.config.policy_steps)
            )
            attrs = dict(data.attrs)
            self._episodes[ref] = _Episode(
                data, task, n, episode_return(attrs), steps, episode_succeeded(attrs)
            )
            if len(steps) == 0:
                log.info(
                    "episode %s/%s (%s): the policy failed alone, nothing to imitate",
                    ref.cell_id,
                    ref.episode_id,
                    task,
                )
                continue
            self._by_task.setdefault(task, []).append(ref)
            self.limiter.inserted += len(steps)
            added += 1
        return added

    def _cache_frames(self, key: tuple[EpisodeRef, int], frames: dict[str, list[bytes]]) -> None:
        self._frames[key] = frames
        self._frame_bytes += sum(len(f) for column in frames.values() for f in column)
        budget = self.config.frame_cache_mb << 20
        while self._frame_bytes > budget and len(self._frames) > 1:
            _, dropped = self._frames.popitem(last=False)
            self._frame_bytes -= sum(len(f) for column in dropped.values() for f in column)

    def frames_at(self, ref: EpisodeRef, t: int) -> tuple[dict[str, list[bytes]], int]:
        """The encoded frames per camera of the block of rows holding step `t`, and the
        block's first row: from memory, else read from the store."""
        rows = max(1, self.config.frame_block_rows)
        first = t // rows * rows
        key = (ref, first)
        frames = self._frames.get(key)
        if frames is not None:
            self._frames.move_to_end(key)
            return frames, first
        frames = self.store.read_frames(ref, first, first + rows, self.cameras)
        self.frame_reads += 1
        self._cache_frames(key, frames)
        return frames, first

    @property
    def frame_cache_bytes(self) -> int:
        return self._frame_bytes

    def episode_weight(self, ref: EpisodeRef) -> float:
        """The outcome weight of one episode (1.0 unless advantage weighting is on)."""
        cfg = self.config
        if not cfg.advantage_weighting:
            return 1.0
        ep = self._episodes[ref]
        refs = self._by_task.get(ep.task, [])
        mean = float(np.mean([self._episodes[r].ret for r in refs])) if refs else ep.ret
        return advantage_weight(ep.ret, mean, cfg.advantage_beta, cfg.advantage_max_weight)

    def demonstrations_by_task(self) -> dict[str, int]:
        """Indexed episodes of each model task that the operator drove from the first step
        to the last (demonstrations: whole episodes from the start pose, not takeovers)."""
        counts = dict.fromkeys(self.tasks, 0)
        for task, refs in self._by_task.items():
            for ref in refs:
                ep = self._episodes[ref]
                if int(ep.data.attrs.get("intervention_steps", 0)) >= ep.n_steps:
                    counts[task] += 1
        return counts

    def tasks_without_episodes(self) -> list[str]:
        """The model's tasks that no complete episode in the index has yet."""
        return [t for t in self.tasks if not self._by_task.get(t)]

    def _weighted_tasks(self) -> list[str]:
        """Tasks with episodes that task_weights does not leave out, in name order."""
        return [t for t in sorted(self._by_task) if self._task_weight.get(t, 1.0) > 0.0]

    def ready(self) -> bool:
        """True when the limiter allows one more batch (refreshing the index if due) and a
        task the batches draw from has an episode."""
        self.refresh()
        return bool(self._weighted_tasks()) and self.limiter.may_sample(self.config.batch_size)

    def sample(self) -> dict[str, np.ndarray]:
        """One task-balanced batch in the layout UnifiedPolicy.bc_loss expects.

        An episode whose frames cannot be read or decoded is quarantined and the batch drawn
        again without it; one without a camera the model sees is set aside (not marked: the
        model's cameras may be what is wrong); any other error is raised (the trainer's
        supervisor restarts)."""
        while True:
            try:
                return self._draw()
            except _WithoutCamera as bad:
                self._drop(bad.ref)
                self._set_aside(bad.ref, bad.has)
                if not self._by_task:
                    raise RuntimeError(
                        f"no episode left to sample from: {self.without_cameras} lack a camera "
                        f"the model sees ({self.last_without_cameras})"
                    ) from bad
            except _Unreadable as bad:
                for ref in bad.refs:
                    self._quarantine(ref, bad.reason)
                if not self._by_task:
                    raise RuntimeError("every episode left to sample from was quarantined") from bad

    def _within_joint_range(
        self, ref: EpisodeRef, data: EpisodeData, steps: np.ndarray
    ) -> np.ndarray:
        """`steps` less those whose joints or chunk targets leave the model's joint range
        (SamplerConfig.joint_lower/upper, widened by joint_margin), counted and named."""
        cfg = self.config
        if not cfg.joint_lower or not len(steps):
            return steps
        ok, worst = steps_in_range(
            np.asarray(data.joint_pos),
            np.asarray(data.action),
            steps,
            np.asarray(cfg.joint_lower, np.float64),
            np.asarray(cfg.joint_upper, np.float64),
            cfg.joint_margin,
            cfg.chunk_len,
        )
        if worst is None:
            return steps
        self.out_of_range_steps += int((~ok).sum())
        self.last_out_of_range = f"{ref.cell_id}/{ref.episode_id}: {worst}"[:500]
        joint = worst.split(" ", 1)[0]
        if (ref.cell_id, joint) not in self._out_of_range_logged:
            self._out_of_range_logged.add((ref.cell_id, joint))
            log.warning(
                "cell %s episode %s: %d of %d steps not trained on, %s (check the cell's "
                "calibration; further episodes of this cell like it are counted, not logged)",
                ref.cell_id,
                ref.episode_id,
                int((~ok).sum()),
                len(steps),
                worst,
            )
        return steps[ok]

    def _set_aside(self, ref: EpisodeRef, has: Sequence[str]) -> None:
        """Count an episode recorded without one of the model's cameras and say why, once
        per kind of mismatch in the log. Nothing is written to the store: started with the
        wrong --cameras, a learner would otherwise take every episode out of training for
        good, and the right cameras must find them all again after a restart."""
        lacks = tuple(cam for cam in self.cameras if cam not in has)
        self.without_cameras += 1
        self.last_without_cameras = (
            f"{ref.cell_id}/{ref.episode_id}: lacks camera {', '.join(lacks)}; "
            f"has {', '.join(has) or 'none'}"
        )[:500]
        key = (lacks, tuple(has))
        if key not in self._camera_mismatches_logged:
            self._camera_mismatches_logged.add(key)
            log.warning(
                "episode %s/%s (and any other like it) not trained on: it was recorded without "
                "camera %s that the model sees (it has %s); check the learner's --cameras "
                "against the cells' cameras",
                ref.cell_id,
                ref.episode_id,
                ", ".join(lacks),
                ", ".join(has) or "none",
            )

    def _drop(self, ref: EpisodeRef) -> None:
        """Take an indexed episode out of sampling (its frames out of memory too)."""
        ep = self._episodes.get(ref)
        if ep is not None and ref in self._by_task.get(ep.task, []):
            self._by_task[ep.task].remove(ref)
            if not self._by_task[ep.task]:
                del self._by_task[ep.task]
            self.limiter.inserted -= len(ep.steps)
            self._episodes[ref] = _Episode(ep.data, ep.task, 0)
        for key in [key for key in self._frames if key[0] == ref]:
            dropped = self._frames.pop(key)
            self._frame_bytes -= sum(len(f) for column in dropped.values() for f in column)

    def _quarantine(self, ref: EpisodeRef, reason: str) -> None:
        """Take an episode out of sampling for good, and mark it so in the store."""
        self._drop(ref)
        self.quarantined += 1
        self.last_quarantined = f"{ref.cell_id}/{ref.episode_id}: {reason}"[:500]
        try:
            self.store.quarantine(ref, reason)
        except Exception as exc:  # still out of this sampler; a restart will meet it again
            log.error("episode %s/%s: quarantine not recorded: %s", *_ids(ref), exc)

    def _frames_at(self, ref: EpisodeRef, t: int) -> tuple[dict[str, list[bytes]], int]:
        try:
            return self.frames_at(ref, t)
        except Exception as exc:
            raise _Unreadable([ref], f"frames cannot be read: {type(exc).__name__}: {exc}") from exc

    def _first_frame_size(self, ref: EpisodeRef) -> tuple[int, int]:
        """The batch size when the model's is not given: what the episode's first camera
        declares, else what its first frame decodes to."""
        size = _declared_size(self._episodes[ref].data.attrs, self.cameras[0])
        if size is not None:
            return size
        frames, _ = self._frames_at(ref, 0)
        if self.cameras[0] not in frames:
            raise _WithoutCamera(ref, sorted(frames))
        try:
            img = simplejpeg.decode_jpeg(frames[self.cameras[0]][0], colorspace="RGB")
        except (ValueError, RuntimeError, IndexError) as exc:
            raise _Unreadable([ref], f"frames do not decode: {type(exc).__name__}: {exc}") from exc
        return int(img.shape[0]), int(img.shape[1])

    def _decode_batch(
        self,
        jpegs: list[bytes],
        rows: list[EpisodeRef],
        sizes: list[tuple[int, int] | None],
        out: tuple[int, int],
    ) -> list[np.ndarray]:
        """Decode the batch's frames and bring each to `out` (resized as the model would).

        A frame must decode to the size its own episode declares (`sizes`, None: any size):
        one that does not blames that episode only (each is tried on its own when the batch
        as a whole fails). A cell whose cameras run another mode than the others' is not a
        fault: its frames are resized like everyone's."""
        n_cam = len(self.cameras)
        try:
            images = self.decoder(jpegs)
            if all(_fits(img, size) for img, size in zip(images, sizes, strict=True)):
                return _resized(images, out)
            error = "a frame decodes to another size than its episode's cameras declare"
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
        per_frame = [r for r in rows for _ in range(n_cam)]
        for ref in dict.fromkeys(rows):
            mine = [i for i, r in enumerate(per_frame) if r == ref]
            try:
                decoded = decode_jpegs([jpegs[i] for i in mine])
                for i, img in zip(mine, decoded, strict=True):
                    size = sizes[i]
                    if not _fits(img, size):
                        got = f"{img.shape[1]}x{img.shape[0]}" if img.ndim >= 2 else "no image"
                        want = f"{size[1]}x{size[0]}" if size else "an RGB image"
                        raise ValueError(f"a frame is {got}, not {want}")
            except Exception as exc:  # the first bad episode; a redraw finds any other
                reason = f"frames do not decode: {type(exc).__name__}: {exc}"
                raise _Unreadable([ref], reason) from exc
        # Every frame decodes here: the decoder itself failed (a decode worker died).
        log.warning("decoding a batch failed (%s); decoded it in-process instead", error)
        return _resized(decode_jpegs(jpegs), out)

    def action_scale(
        self, joint_lower: Sequence[float], joint_upper: Sequence[float], floor: float = 0.01
    ) -> tuple[float, ...]:
        """Per joint, the RMS of a chunk's offsets (action[t + k] - joint_pos[t], k < chunk_len)
        in joint-limit-normalised units over every sampled step of the episodes indexed now:
        PolicyConfig.action_scale from the data. Joint columns only, no frame is read. A
        joint that never moves gets `floor`, so its scale cannot blow its errors up."""
        lower, upper = np.asarray(joint_lower, np.float64), np.asarray(joint_upper, np.float64)
        k = self.config.chunk_len
        total, count = np.zeros(lower.shape), 0
        for refs in self._by_task.values():
            for ref in refs:
                ep = self._episodes[ref]
                steps = np.asarray(ep.steps, np.int64)
                if not steps.size:
                    continue
                joints = np.asarray(ep.data.joint_pos[:], np.float64)
                action = np.asarray(ep.data.action[:], np.float64)
                for dk in range(k):
                    idx = np.minimum(steps + dk, ep.n_steps - 1)
                    offset = (action[idx] - joints[steps]) * 2.0 / (upper - lower)
                    total += (offset**2).sum(0)
                    count += len(steps)
        if not count:
            raise RuntimeError("no complete episodes to measure the action scale on")
        return tuple(float(max(floor, x)) for x in np.sqrt(total / count))

    def _draw(self) -> dict[str, np.ndarray]:
        cfg = self.config
        tasks = self._weighted_tasks()
        if not tasks:
            raise RuntimeError(
                "no complete episodes to sample from yet"
                + (
                    f" (task weights {self._task_weight} leave out {sorted(self._by_task)})"
                    if self._by_task
                    else ""
                )
            )
        shares = np.array([self._task_weight.get(t, 1.0) for t in tasks])
        shares /= shares.sum()
        b, k = cfg.batch_size, cfg.chunk_len
        if cfg.image_size:
            h, w = int(cfg.image_size[0]), int(cfg.image_size[1])
        else:
            h, w = self._first_frame_size(self._by_task[tasks[0]][0])
        rows: list[EpisodeRef] = []
        sizes: list[tuple[int, int] | None] = []  # per frame, what its episode declares
        images = np.zeros((b, len(self.cameras), h, w, 3), np.uint8)
        joint_pos = np.zeros((b, 14), np.float32)
        actions = np.zeros((b, k, 14), np.float32)
        mask = np.zeros((b, k), np.float32)
        weight = np.ones((b,), np.float32)
        task_id = np.zeros((b,), np.int64)
        jpegs: list[bytes] = []
        task_weights: dict[EpisodeRef, float] = {}
        for i in range(b):
            if self._task_weight:
                task = tasks[int(self._rng.choice(len(tasks), p=shares))]
            else:
                task = tasks[int(self._rng.integers(len(tasks)))]
            refs = self._by_task[task]
            ref = refs[int(self._rng.integers(len(refs)))]
            ep = self._episodes[ref]
            t = int(ep.steps[int(self._rng.integers(len(ep.steps)))])
            data = ep.data
            frames, first = self._frames_at(ref, t)
            if any(cam not in frames for cam in self.cameras):
                raise _WithoutCamera(ref, sorted(frames))
            try:
                jpegs.extend(bytes(frames[cam][t - first]) for cam in self.cameras)
            except (KeyError, IndexError) as exc:
                raise _Unreadable([ref], f"missing frames: {exc!r}") from exc
            sizes.extend(_declared_size(data.attrs, cam) for cam in self.cameras)
            rows.append(ref)
            joint_pos[i] = data.joint_pos[t]
            end = min(t + k, ep.n_steps)
            actions[i, : end - t] = data.action[t:end]
            actions[i, end - t :] = data.action[end - 1]
            mask[i, : k if ep.succeeded and cfg.hold_after_success else end - t] = 1.0
            if bool(data.intervention[t]):
                weight[i] = cfg.intervention_weight
            if cfg.advantage_weighting:
                if ref not in task_weights:
                    task_weights[ref] = self.episode_weight(ref)
                weight[i] *= task_weights[ref]
            task_id[i] = self._task_ids[task]
        n_cam = len(self.cameras)
        for j, img in enumerate(self._decode_batch(jpegs, rows, sizes, (h, w))):
            images[j // n_cam, j % n_cam] = img
        self.limiter.sampled += b
        return {
            "images": images,
            "joint_pos": joint_pos,
            "task_id": task_id,
            "actions": actions,
            "action_mask": mask,
            "weight": weight,
        }


class _WithoutCamera(Exception):
    """An episode recorded without a camera the model sees (it has `has`)."""

    def __init__(self, ref: EpisodeRef, has: list[str]) -> None:
        super().__init__(f"{ref.cell_id}/{ref.episode_id} has cameras {has}")
        self.ref = ref
        self.has = has


class _Unreadable(Exception):
    """Episodes whose stored data the sampler cannot turn into training input."""

    def __init__(self, refs: list[EpisodeRef], reason: str) -> None:
        super().__init__(reason)
        self.refs = refs
        self.reason = reason


def _empty(ref: EpisodeRef) -> EpisodeData:
    """Stand-in data for an episode that could not be read at all."""
    rows = np.zeros((0, 14), np.float32)
    none = np.zeros(0, np.float32)
    return EpisodeData(ref, {}, none, rows, rows, none.astype(bool), none)


def _ids(ref: EpisodeRef) -> tuple[str, str]:
    return ref.cell_id, ref.episode_id


def _declared_size(attrs: dict[str, Any], camera: str) -> tuple[int, int] | None:
    """(height, width) an episode's attributes declare for `camera`, None if they do not."""
    declared = (attrs.get("cameras") or {}).get(camera)
    if not declared:
        return None
    try:
        return int(declared["height"]), int(declared["width"])
    except (KeyError, TypeError, ValueError):
        return None


def _fits(img: np.ndarray, size: tuple[int, int] | None) -> bool:
    """An RGB frame of the declared size (any size when none is declared)."""
    if img.ndim != 3 or img.shape[2] != 3:
        return False
    return size is None or (int(img.shape[0]), int(img.shape[1])) == size


def _resized(images: list[np.ndarray], out: tuple[int, int]) -> list[np.ndarray]:
    """Every frame at `out`: those of another size resized by the model's own resize
    (fleet.common.policy.model.resize_images), one call per source size."""
    by_shape: dict[tuple[int, ...], list[int]] = {}
    for i, img in enumerate(images):
        if (int(img.shape[0]), int(img.shape[1])) != out:
            by_shape.setdefault(img.shape, []).append(i)
    result = list(images)
    for idx in by_shape.values():
        x = torch.from_numpy(np.stack([images[i] for i in idx])).permute(0, 3, 1, 2).float()
        y = resize_images(x, out).round_().clamp_(0, 255).to(torch.uint8)
        for i, img in zip(idx, y.permute(0, 2, 3, 1).numpy(), strict=True):
            result[i] = img
    return result
