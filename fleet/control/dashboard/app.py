"""The dashboard's FastAPI app: JSON views over the registry and the episode store, the
operator's rollout actions behind a token, and the static page that polls them.

Reads go straight to Redis on each request (the registry is the truth; the page polls every
few seconds). Writes are the rollout actions of `fleet.control.rollout`, refused unless the caller
presents the operator token the dashboard was started with.
"""

from __future__ import annotations

import importlib.util
import logging
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from pydantic import BaseModel, Field

from fleet.common.registry_records import Event, OutcomeCounts, VersionRecord
from fleet.control.dashboard.history import LearningHistory
from fleet.control.dashboard.store_reader import StoreReader
from fleet.control.interventions import figures
from fleet.control.registry import Registry

log = logging.getLogger(__name__)

STATIC = Path(__file__).parent / "static"
OPERATOR_HEADER = "X-Operator-Token"
STORE_USAGE_EVERY_S = 60.0  # how often /api/store walks the store's files again


def plotly_js_path() -> Path:
    """plotly.min.js as the plotly wheel ships it (served by us: labs may have no internet)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the dashboard needs the plotly package (pip install plotly)")
    path = Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"plotly is installed but {path} is missing")
    return path


class StartRollout(BaseModel):
    version: str
    canary: int | list[str] = Field(default=1)  # how many live cells, or which cells
    shadow: bool = False  # run in shadow on those cells (infer beside stable, never act)
    reason: str = ""


class Reason(BaseModel):
    reason: str = ""


class Pin(BaseModel):
    cell: str
    version: str = ""  # empty: unpin


def _is_decision(event: Event) -> bool:
    """Automatic rollout decisions, as opposed to operator actions and other events."""
    kind = event.kind.lower()
    actor = event.actor.lower()
    return (
        "decision" in event.fields
        or "auto" in kind
        or "decision" in kind
        or actor.startswith(("auto", "rollout", "controller", "canary"))
    )


def _evaluation_points(versions: list[VersionRecord]) -> list[dict[str, Any]]:
    """One point per evaluated version for the success chart: when it was evaluated and its
    held-out success rate per task."""
    out = []
    for v in versions:
        summary = v.evaluation or {}
        scores = summary.get("scores", {}).get(v.version_id, {})
        if scores:
            out.append(
                {
                    "version": v.version_id,
                    "t": summary.get("evaluated_at"),
                    "backend": summary.get("backend"),
                    "success": {t: s.get("success_rate") for t, s in scores.items()},
                }
            )
    return out


def create_app(
    registry: Registry,
    store_root: Path | str | None,
    *,
    operator_token: str | None = None,
    sample_interval_s: float = 2.0,
) -> FastAPI:
    """The dashboard app. `operator_token` None disables every rollout action."""
    history = LearningHistory(registry, interval_s=sample_interval_s)
    reader = StoreReader(store_root) if store_root is not None else None

    @asynccontextmanager
    async def lifespan(_: FastAPI):  # type: ignore[no-untyped-def]
        history.start()
        try:
            yield
        finally:
            history.stop()

    app = FastAPI(title="fleet dashboard", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.registry = registry
    app.state.history = history
    app.state.reader = reader

    def require_operator(request: Request) -> str:
        if not operator_token:
            raise HTTPException(
                403, "operator actions are disabled: start the dashboard with --operator-token"
            )
        given = request.headers.get(OPERATOR_HEADER, "")
        auth = request.headers.get("Authorization", "")
        if not given and auth.lower().startswith("bearer "):
            given = auth[7:].strip()
        if not given:
            raise HTTPException(401, "operator token required for this action")
        if not secrets.compare_digest(given.encode(), operator_token.encode()):
            raise HTTPException(403, "wrong operator token")
        return "operator@dashboard"

    def need_reader() -> StoreReader:
        if reader is None:
            raise HTTPException(404, "the dashboard was started without --store")
        return reader

    # -- pages -------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    @app.get("/static/plotly.min.js", include_in_schema=False)
    def plotly_js() -> FileResponse:
        return FileResponse(plotly_js_path(), media_type="application/javascript")

    @app.get("/static/{name}", include_in_schema=False)
    def static(name: str) -> FileResponse:
        path = STATIC / name
        if "/" in name or name.startswith(".") or not path.is_file():
            raise HTTPException(404, f"no static file {name!r}")
        return FileResponse(path)

    # -- views -------------------------------------------------------------------------

    @app.get("/api/fleet")
    def fleet() -> dict[str, Any]:
        now = time.time()
        cells = []
        outcomes = registry.cell_outcomes()
        for c in registry.cells():
            n = c.counters
            stored = outcomes.get(c.cell_id, OutcomeCounts())
            cells.append(
                {
                    "cell_id": c.cell_id,
                    "status": "alive" if c.alive else "stale",
                    "alive": c.alive,
                    "task": c.task,
                    "version_running": c.version_running,
                    "shadow_version": c.shadow_version,
                    "loop_hz": n.loop_hz,
                    "late_ticks": n.late_ticks,
                    "episodes": n.episodes,
                    "successes": n.successes,
                    # Steps an operator drove since the cell's actor started (heartbeat).
                    "intervention_steps": n.interventions,
                    # Takeovers over every episode the learner stored from this cell.
                    "takeovers": stored.takeovers,
                    "demonstrations": stored.demonstrations,
                    **figures(stored),
                    "steps_recorded": n.steps_recorded,
                    "steps_acked": n.steps_acked,
                    "unacked_steps": max(0, n.steps_recorded - n.steps_acked),
                    "spool_depth": n.spool_bytes,
                    "spool_chunks": n.spool_chunks,
                    "last_fault": c.last_fault,  # only while recent: cells clear it
                    "fault_count": n.fault_count,
                    "last_seen": c.last_seen,
                    "seconds_since_seen": (now - c.last_seen) if c.last_seen else None,
                }
            )
        return {"now": now, "heartbeat_ttl_s": registry.heartbeat_ttl_s, "cells": cells}

    @app.get("/api/learning")
    def learning(since: float = 0.0, until: float | None = None) -> dict[str, Any]:
        """Learner stats now, and the history (kept in Redis: it outlives this process)
        with since < t <= until; `oldest` is the first sample kept, for a range picker."""
        return {
            "now": time.time(),
            "stats": registry.learner_stats(),
            "store": registry.store_totals().to_json(),
            "points": history.points(since, until),
            "oldest": history.oldest(),
            "retention_s": {t.name: t.retention_s for t in history.tiers},
            "evaluations": _evaluation_points(registry.versions()),
        }

    disk: dict[str, Any] = {"at": 0.0, "body": None}

    @app.get("/api/store")
    def store_usage() -> dict[str, Any]:
        """Disk use of the episode store by cell and outcome, and bytes added per day over
        the last week (learner/retention.py, as `fleet store du`); walked at most once a
        minute, since it stats every file."""
        if reader is None:
            return {"available": False}
        now = time.time()
        if disk["body"] is None or now - disk["at"] > STORE_USAGE_EVERY_S:
            disk["body"] = {"available": True, "at": now, **reader.disk_usage(now)}
            disk["at"] = now
        return disk["body"]

    @app.get("/api/rollout")
    def rollout() -> dict[str, Any]:
        cells = registry.cells()
        events = registry.events(200)
        versions = [
            {
                "version_id": v.version_id,
                "parent": v.parent,
                "published_at": v.published_at,
                "training_step": v.training_step,
                "evaluation": v.evaluation,  # newest `fleet eval` summary, or None
            }
            for v in registry.versions()
        ]
        pins = registry.pins() if hasattr(registry, "pins") else {}
        success = registry.success_counts()
        return {
            "rollout": registry.rollout().to_json(),
            "assignments": registry.assignments([c.cell_id for c in cells]),
            "running": {c.cell_id: c.version_running for c in cells},
            "shadow_running": {c.cell_id: c.shadow_version for c in cells},
            "pins": pins,
            "versions": versions[-50:],
            "success": {
                v: {t: n.to_json() for t, n in tasks.items()} for v, tasks in success.items()
            },
            # version -> task -> takeovers/h, /episode, intervention share, human steps
            # per autonomous success (fleet/control/interventions.py)
            "interventions": {
                v: {t: figures(n) for t, n in tasks.items()} for v, tasks in success.items()
            },
            # version -> {steps, mean_dist_stable, operator_steps, mean_dist_operator}
            "shadow_scores": {v: s.to_json() for v, s in registry.shadow_scores().items()},
            "decisions": [e.to_json() for e in events if _is_decision(e)],
            "events": [e.to_json() for e in events],
            "operator_actions": bool(operator_token),
        }

    @app.get("/api/episodes")
    def episodes(
        cell: str = "", task: str = "", version: str = "", outcome: str = "", limit: int = 100
    ) -> dict[str, Any]:
        found = need_reader().episodes(
            cell=cell, task=task, version=version, outcome=outcome, limit=min(limit, 1000)
        )
        return {"episodes": [s.to_json() for s in found]}

    @app.get("/api/episodes/{cell}/{episode}")
    def episode(cell: str, episode: str) -> dict[str, Any]:
        try:
            return need_reader().playback(cell, episode)
        except KeyError as exc:
            raise HTTPException(404, str(exc)) from exc

    @app.get("/api/episodes/{cell}/{episode}/frames/{camera}/{index}")
    def frame(cell: str, episode: str, camera: str, index: int) -> Response:
        try:
            data, media = need_reader().frame(cell, episode, camera, index)
        except (KeyError, IndexError) as exc:
            raise HTTPException(404, str(exc)) from exc
        return Response(data, media_type=media, headers={"Cache-Control": "max-age=3600"})

    # -- operator actions --------------------------------------------------------------

    def act(what: str, call: Any) -> JSONResponse:
        try:
            result = call()
        except (KeyError, ValueError, RuntimeError) as exc:
            raise HTTPException(409, f"{what} refused: {exc}") from exc
        log.info("dashboard: operator %s -> %s", what, result)
        return JSONResponse({"ok": True, "action": what, "result": result})

    def rollout_module() -> Any:
        try:
            from fleet.control import rollout as ro
        except ImportError as exc:
            raise HTTPException(503, f"rollout actions unavailable: {exc}") from exc
        return ro

    @app.post("/api/rollout/start")
    def start(body: StartRollout, actor: str = Depends(require_operator)) -> JSONResponse:
        ro = rollout_module()
        reason = body.reason or "started from the dashboard"
        if body.shadow:
            return act(
                f"start shadow run of {body.version}",
                lambda: ro.start_shadow(
                    registry, body.version, body.canary, actor=actor, reason=reason
                ),
            )
        return act(
            f"start rollout of {body.version}",
            lambda: ro.start_rollout(
                registry, body.version, body.canary, actor=actor, reason=reason
            ),
        )

    @app.post("/api/rollout/promote")
    def promote(body: Reason, actor: str = Depends(require_operator)) -> JSONResponse:
        ro = rollout_module()
        reason = body.reason or "promoted from the dashboard"
        return act("promote", lambda: ro.promote(registry, actor=actor, reason=reason))

    @app.post("/api/rollout/rollback")
    def rollback(body: Reason, actor: str = Depends(require_operator)) -> JSONResponse:
        ro = rollout_module()
        reason = body.reason or "rolled back from the dashboard"
        return act("rollback", lambda: ro.rollback(registry, actor=actor, reason=reason))

    @app.post("/api/rollout/pin")
    def pin(body: Pin, actor: str = Depends(require_operator)) -> JSONResponse:
        ro = rollout_module()
        if body.version:
            return act(
                f"pin {body.cell} to {body.version}",
                lambda: ro.pin(registry, body.cell, body.version, actor=actor),
            )
        return act(f"unpin {body.cell}", lambda: ro.unpin(registry, body.cell, actor=actor))

    return app
