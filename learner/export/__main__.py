"""`fleet export` and `fleet episode`: the store's episodes for other tools.

python -m learner.export --format lerobot --store DIR --out DIR
python -m learner.export episode EP --rerun --store DIR --out FILE.rrd
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from fleet.common.logs import setup_logging

log = logging.getLogger("export")


def export_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet export",
        description="Write the store's complete episodes as a LeRobot v3.0 dataset (depth "
        "cameras as LeRobot depth maps). Atomic: the dataset appears at --out only when "
        "complete; an interrupted export resumes from OUT.partial when run again.",
    )
    p.add_argument("--format", choices=["lerobot"], default="lerobot")
    p.add_argument("--store", type=Path, required=True, help="episode store (<data-dir>/store)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory (new or empty)")
    p.add_argument("--fps", type=int, default=None, help="default: the recorded control rate")
    p.add_argument("--cells", default=None, help="comma-separated cell ids (default: all)")
    p.add_argument("--robot-type", default="aloha")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def episode_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fleet episode", description="Write one stored episode for a viewer."
    )
    p.add_argument("episode", help="episode id, or cell/episode")
    p.add_argument("--rerun", action="store_true", required=True, help="write a Rerun .rrd")
    p.add_argument("--store", type=Path, required=True, help="episode store (<data-dir>/store)")
    p.add_argument("--out", type=Path, required=True, help="the .rrd file to write")
    p.add_argument("--cell", default=None, help="the cell, when episode ids repeat across cells")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    setup_logging()
    if argv and argv[0] == "episode":
        args = episode_parser().parse_args(argv[1:])
        from learner.export.rerun_episode import write_rerun

        try:
            path = write_rerun(args.store, args.episode, args.out, cell=args.cell)
        except KeyError as exc:
            log.error("%s", exc.args[0])
            return 1
        print(path)
        return 0
    args = export_parser().parse_args(argv)
    from learner.export.lerobot import export_lerobot

    cells = None if args.cells is None else [c for c in args.cells.split(",") if c]
    try:
        result = export_lerobot(
            args.store,
            args.out,
            fps=args.fps,
            cells=cells,
            robot_type=args.robot_type,
            progress=not args.no_progress,
        )
    except (FileExistsError, ValueError) as exc:
        log.error("%s", exc)
        return 1
    resumed = f" ({result.resumed} resumed)" if result.resumed else ""
    print(
        f"{result.episodes} episodes{resumed}, {result.frames} frames, cameras "
        f"{','.join(result.cameras)} at {result.fps} fps -> {result.out}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
