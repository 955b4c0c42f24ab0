"""`fleet store du` and `fleet store gc`: what the episode store holds on disk, and removing
what a lab no longer wants, by explicit policies.

The store only grows while a fleet runs for months. `du` sums each episode's files by cell,
task, policy version, outcome and age (by the learner's clock at its last write). `gc`
removes episodes older than `--keep-days`, but by default never

- one with an operator intervention (`--drop-interventions` lifts this),
- one the sampler trains on (operator steps, or an autonomous success: `sampler.trained_on`):
  a running learner samples its frames any time, and one resumed from a checkpoint re-reads
  the store and expects them (`--drop-trained` lifts this; stop the learner first),
- one still being written.

So by default it removes old failed autonomous attempts and old truncated episodes, which
no model is trained on. It is a dry run unless `--apply` is given; each removal is logged and
written to the registry's event log ("store_gc", with the episode, its size and the policy
that removed it).

    python -m learner.retention du --store DIR [--by cell,task]
    python -m learner.retention gc --store DIR --keep-days 30 [--apply --redis-url URL]
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from fleet.common.logs import setup_logging
from fleet.control.connection import redis_url
from learner.sampler import episode_succeeded, trained_on
from learner.store import EpisodeRef, EpisodeStore

log = logging.getLogger("store")

GROUPINGS = ("cell", "task", "version", "outcome", "age")
# Age buckets for `du --by age`: upper bounds in days and their labels.
AGE_BUCKETS = ((1, "<1d"), (7, "1-7d"), (30, "7-30d"), (90, "30-90d"), (float("inf"), ">90d"))


@dataclass(frozen=True)
class EpisodeUsage:
    ref: EpisodeRef
    bytes: int
    task: str
    version: str
    outcome: str  # success, failure, truncated or in progress
    ended_at: float  # learner wall time of the episode's last write
    intervention_steps: int
    trained_on: bool  # the sampler imitates some of its steps

    def age_days(self, now: float) -> float:
        return max(0.0, now - self.ended_at) / 86400.0

    def key(self, by: str, now: float) -> str:
        if by == "cell":
            return self.ref.cell_id
        if by == "age":
            age = self.age_days(now)
            return next(label for bound, label in AGE_BUCKETS if age < bound)
        return str(getattr(self, by))


def usage(store: EpisodeStore) -> list[EpisodeUsage]:
    """Every episode on disk with its size and what `du` and `gc` group and decide by."""
    out = []
    for ref in store.episodes(complete_only=False):
        attrs = store.attributes(ref)
        if attrs is None:
            continue  # removed since it was listed
        ep_dir = store.root / ref.path
        size = sum(f.stat().st_size for f in ep_dir.rglob("*") if f.is_file())
        if attrs.get("complete"):
            outcome = "success" if episode_succeeded(attrs) else "failure"
        else:
            outcome = "truncated" if attrs.get("truncated") else "in progress"
        versions = attrs.get("policy_versions") or [""]
        # The learner's wall clock at the episode's last commit: `ended_at` is the cell's
        # clock (sim time on a sim cell), no measure of how long the lab has kept it.
        ended = attrs.get("updated_at") or attrs.get("created_at") or 0
        out.append(
            EpisodeUsage(
                ref=ref,
                bytes=size,
                task=str(attrs.get("task", "")),
                version=str(versions[-1] or "none"),
                outcome=outcome,
                ended_at=float(ended),
                intervention_steps=int(attrs.get("intervention_steps", 0)),
                trained_on=outcome != "in progress" and trained_on(attrs),
            )
        )
    return out


def summarise(
    episodes: Iterable[EpisodeUsage], by: Sequence[str], now: float
) -> list[tuple[tuple[str, ...], int, int]]:
    """(group key, episodes, bytes) per group, largest first."""
    groups: dict[tuple[str, ...], list[int]] = {}
    for ep in episodes:
        row = groups.setdefault(tuple(ep.key(b, now) for b in by), [0, 0])
        row[0] += 1
        row[1] += ep.bytes
    return sorted(((k, n, b) for k, (n, b) in groups.items()), key=lambda r: -r[2])


def growth_per_day(episodes: Iterable[EpisodeUsage], now: float, days: int = 7) -> list[int]:
    """Bytes added on each of the last `days` days (oldest first), by episode end time."""
    out = [0] * days
    for ep in episodes:
        age = int(ep.age_days(now))
        if age < days:
            out[days - 1 - age] += ep.bytes
    return out


@dataclass(frozen=True)
class Policy:
    keep_days: float
    keep_interventions: bool = True
    keep_trained: bool = True  # what the sampler trains on, now or after a resume


def plan_gc(
    episodes: Iterable[EpisodeUsage],
    policy: Policy,
    now: float,
) -> list[tuple[EpisodeUsage, str]]:
    """(episode, why it goes) for each episode the policy removes."""
    out = []
    for ep in episodes:
        if ep.outcome == "in progress" or ep.age_days(now) < policy.keep_days:
            continue
        if policy.keep_interventions and ep.intervention_steps > 0:
            continue
        if policy.keep_trained and ep.trained_on:
            continue
        out.append((ep, f"older than {policy.keep_days:g} days ({ep.age_days(now):.1f})"))
    return out


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000.0
    return f"{n:.1f} TB"


def cmd_du(args: argparse.Namespace, console: Console) -> int:
    store = EpisodeStore(args.store)
    now = time.time()
    episodes = usage(store)
    by = [b for b in args.by.split(",") if b]
    unknown = sorted(set(by) - set(GROUPINGS))
    if unknown:
        console.print(f"fleet store du: unknown --by {unknown}; choose from {list(GROUPINGS)}")
        return 2
    table = Table(title=f"episode store {args.store}: disk use by {', '.join(by)}")
    for col in (*by, "episodes", "size", "share"):
        table.add_column(col, justify="right" if col in ("episodes", "size", "share") else "left")
    total = sum(ep.bytes for ep in episodes) or 1
    for key, n, size in summarise(episodes, by, now):
        table.add_row(*key, str(n), _human(size), f"{size / total:.1%}")
    table.add_section()
    table.add_row(*(["total"] + [""] * (len(by) - 1)), str(len(episodes)), _human(total), "")
    console.print(table)
    growth = growth_per_day(episodes, now)
    console.print(
        "added per day, last 7 days (oldest first): " + ", ".join(_human(b) for b in growth)
    )
    return 0


def cmd_gc(args: argparse.Namespace, console: Console) -> int:
    store = EpisodeStore(args.store)
    now = time.time()
    policy = Policy(
        keep_days=args.keep_days,
        keep_interventions=not args.drop_interventions,
        keep_trained=not args.drop_trained,
    )
    doomed = plan_gc(usage(store), policy, now)
    registry = None
    if args.apply:
        from fleet.control.registry import Registry

        try:
            registry = Registry(redis_url(args))
        except ValueError as exc:
            console.print(f"fleet store gc: {exc}")
            return 2
    verb = "removed" if args.apply else "would remove"
    freed = 0
    for ep, why in doomed:
        if args.apply:
            assert registry is not None
            try:
                size = store.remove_episode(ep.ref)
            except (KeyError, ValueError) as exc:
                log.warning("cell %s episode %s: not removed: %s", *_ids(ep.ref), exc)
                continue
            registry.log_event(
                "store_gc",
                actor="fleet store gc",
                reason=why,
                cell=ep.ref.cell_id,
                episode=ep.ref.episode_id,
                task=ep.task,
                version=ep.version,
                outcome=ep.outcome,
                bytes=size,
            )
        else:
            size = ep.bytes
        freed += size
        log.info(
            "cell %s episode %s (%s, version %s, %s): %s, %s",
            ep.ref.cell_id,
            ep.ref.episode_id,
            ep.task,
            ep.version,
            ep.outcome,
            verb,
            why,
        )
    console.print(
        f"fleet store gc: {verb} {len(doomed)} episodes, {_human(freed)}"
        + ("" if args.apply else " (dry run: add --apply to remove them)")
    )
    return 0


def _ids(ref: EpisodeRef) -> tuple[str, str]:
    return ref.cell_id, ref.episode_id


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet store", description="Disk use of the episode store, and retention."
    )
    sub = p.add_subparsers(dest="command", required=True)
    du = sub.add_parser("du", help="disk use by cell, task, version, outcome, age")
    du.add_argument("--store", type=Path, required=True, help="episode store (<data-dir>/store)")
    du.add_argument(
        "--by",
        default="cell,task,version,outcome",
        help=f"comma-separated groupings from {','.join(GROUPINGS)}",
    )
    gc = sub.add_parser(
        "gc",
        help="remove old episodes by explicit policies (a dry run unless --apply)",
        description="Remove episodes older than --keep-days, keeping every episode with an "
        "operator intervention and every episode the sampler trains on (operator steps or an "
        "autonomous success; a learner resumed from a checkpoint re-reads them): by default "
        "old failed autonomous attempts and truncated episodes go. A dry run unless --apply; each "
        "removal goes to the registry's event log.",
    )
    gc.add_argument("--store", type=Path, required=True, help="episode store (<data-dir>/store)")
    gc.add_argument("--keep-days", type=float, required=True, help="keep episodes younger")
    gc.add_argument(
        "--drop-interventions",
        action="store_true",
        help="also remove old episodes an operator intervened in (kept by default)",
    )
    gc.add_argument(
        "--drop-trained",
        action="store_true",
        help="also remove old episodes the sampler trains on (stop the learner first: a "
        "running sampler reads their frames)",
    )
    gc.add_argument("--apply", action="store_true", help="really remove (default: dry run)")
    where = gc.add_mutually_exclusive_group()
    where.add_argument("--redis-url", help="registry whose event log records each removal")
    where.add_argument("--run", type=Path, metavar="DIR", help="a `fleet up` run directory")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    setup_logging()
    console = Console()
    if args.command == "du":
        return cmd_du(args, console)
    if args.apply and not (args.redis_url or args.run):
        console.print("fleet store gc: --apply needs --redis-url or --run (removals are logged)")
        return 2
    return cmd_gc(args, console)


if __name__ == "__main__":
    raise SystemExit(main())
