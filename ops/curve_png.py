"""The learning curve as a PNG: success per task against minutes, drawn with Pillow.

Pillow (already needed by the LeRobot export's tooling) draws it, so the learning run needs
no plotting stack. Lines are the fleet's autonomous success rate per time window; filled
dots with whiskers are held-out evaluations (successes / scenes with a 95 % interval).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# Colour-blind-safe (Okabe-Ito), one per task in sorted order.
COLOURS = ((0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233))
SIZE = (900, 520)
MARGIN = (70, 40, 200, 60)  # left, top, right, bottom


@dataclass(frozen=True)
class EvalPoint:
    """A held-out evaluation: `rate` in [0, 1] with its 95 % interval, at `minutes`."""

    minutes: float
    rate: float
    low: float
    high: float


def draw_success_curve(
    lines: Mapping[str, Sequence[tuple[float, float | None]]],
    path: Path,
    *,
    title: str,
    evals: Mapping[str, Sequence[EvalPoint]] | None = None,
    goal: float | None = 0.8,
) -> Path:
    """Write the chart to `path` (PNG). `lines`: task -> [(minutes, rate or None)]; a None
    rate (no episode in that window) breaks the line."""
    evals = evals or {}
    tasks = sorted(set(lines) | set(evals))
    if not tasks:
        raise ValueError("nothing to draw: no task has a point")
    xs = [m for pts in lines.values() for m, _ in pts] + [
        p.minutes for pts in evals.values() for p in pts
    ]
    x_max = max(5.0, max(xs, default=5.0))
    x_max = 5.0 * int(-(-x_max // 5.0))  # whole 5-minute ticks
    img = Image.new("RGB", SIZE, "white")
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=14)
    left, top, right, bottom = MARGIN
    x0, y0, x1, y1 = left, top, SIZE[0] - right, SIZE[1] - bottom

    def px(minutes: float, rate: float) -> tuple[float, float]:
        return (
            x0 + (x1 - x0) * minutes / x_max,
            y1 - (y1 - y0) * min(max(rate, 0.0), 1.0),
        )

    for pct in range(0, 101, 20):
        _, y = px(0, pct / 100)
        d.line([(x0, y), (x1, y)], fill=(225, 225, 225))
        d.text((x0 - 8, y), f"{pct}%", fill="black", font=font, anchor="rm")
    step = 5 if x_max <= 60 else 10
    for m in range(0, int(x_max) + 1, step):
        x, _ = px(m, 0)
        d.line([(x, y1), (x, y1 + 4)], fill="black")
        d.text((x, y1 + 8), str(m), fill="black", font=font, anchor="mt")
    d.rectangle([x0, y0, x1, y1], outline="black")
    d.text(
        ((x0 + x1) / 2, SIZE[1] - 18),
        "minutes since fleet up",
        fill="black",
        font=font,
        anchor="mm",
    )
    d.text(((x0 + x1) / 2, 18), title, fill="black", font=font, anchor="mm")
    if goal is not None:
        _, y = px(0, goal)
        for xa in range(int(x0), int(x1), 12):
            d.line([(xa, y), (min(xa + 6, x1), y)], fill=(150, 150, 150), width=1)
    for i, task in enumerate(tasks):
        colour = COLOURS[i % len(COLOURS)]
        segment: list[tuple[float, float]] = []
        for minutes, rate in [*lines.get(task, ()), (float("inf"), None)]:
            if rate is None or minutes == float("inf"):
                if len(segment) > 1:
                    d.line(segment, fill=colour, width=3)
                for x, y in segment:
                    d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
                segment = []
                continue
            segment.append(px(minutes, rate))
        for p in evals.get(task, ()):
            x, y = px(p.minutes, p.rate)
            _, y_lo = px(p.minutes, p.low)
            _, y_hi = px(p.minutes, p.high)
            d.line([(x, y_lo), (x, y_hi)], fill=colour, width=2)
            d.line([(x - 5, y_lo), (x + 5, y_lo)], fill=colour, width=2)
            d.line([(x - 5, y_hi), (x + 5, y_hi)], fill=colour, width=2)
            d.ellipse([x - 7, y - 7, x + 7, y + 7], fill=colour, outline="black")
        ly = y0 + 10 + 24 * i
        d.line([(x1 + 15, ly), (x1 + 45, ly)], fill=colour, width=3)
        d.text((x1 + 52, ly), task, fill="black", font=font, anchor="lm")
    ly = y0 + 10 + 24 * len(tasks) + 10
    d.ellipse([x1 + 24, ly - 7, x1 + 38, ly + 7], fill=(120, 120, 120), outline="black")
    d.text((x1 + 52, ly), "held-out eval", fill="black", font=font, anchor="lm")
    if goal is not None:
        d.text(
            (x1 + 52, ly + 24), f"goal {goal:.0%} (dashed)", fill="black", font=font, anchor="lm"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")
    return path
