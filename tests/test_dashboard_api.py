"""The dashboard's JSON API over real Redis state and a real episode store."""

from __future__ import annotations

import time
from collections.abc import Iterator

import numpy as np
import pytest
from fastapi.testclient import TestClient

from fleet.control.dashboard.app import create_app
from tests.dashboard_world import TOKEN, World, build_world


@pytest.fixture
def world(registry, tmp_path) -> World:
    return build_world(registry, tmp_path / "store")


@pytest.fixture
def client(world: World) -> Iterator[TestClient]:
    app = create_app(world.registry, world.store_root, operator_token=TOKEN, sample_interval_s=0.1)
    with TestClient(app) as c:
        yield c


def test_fleet_view_matches_heartbeats_and_marks_stale_cells(client: TestClient) -> None:
    cells = {c["cell_id"]: c for c in client.get("/api/fleet").json()["cells"]}
    assert set(cells) == {"cell-01", "cell-02", "cell-03"}
    assert cells["cell-01"]["status"] == "alive"
    assert cells["cell-01"]["version_running"] == "v0002"
    assert cells["cell-01"]["loop_hz"] == pytest.approx(49.8)
    assert cells["cell-01"]["episodes"] == 7
    assert cells["cell-01"]["unacked_steps"] == 20
    assert cells["cell-02"]["last_fault"] == "signature check failed for v0004"
    assert cells["cell-03"]["status"] == "stale"


def test_learning_history_is_sampled_over_time(client: TestClient, world: World) -> None:
    deadline = time.monotonic() + 5
    while len(client.get("/api/learning").json()["points"]) < 2:
        assert time.monotonic() < deadline, "no learning samples"
        time.sleep(0.05)
    world.registry.set_learner_stats(loss=0.01, updates=400)
    world.registry.add_store_totals(steps=500, episodes=1)
    time.sleep(0.3)
    body = client.get("/api/learning").json()
    assert body["stats"]["updates"] == 400
    last = body["points"][-1]
    assert last["loss"] == pytest.approx(0.01)
    assert last["replay_ratio"] == pytest.approx(2.25)
    assert last["success"]["v0002"]["pick_cube"] == pytest.approx(0.5)
    assert any((p["steps_per_s"] or 0) > 0 for p in body["points"])
    since = body["points"][-1]["t"]
    assert all(p["t"] > since for p in client.get(f"/api/learning?since={since}").json()["points"])


def test_learning_curve_survives_a_dashboard_restart(world: World) -> None:
    """The history lives in Redis: a new dashboard process shows the curve the old one saw."""
    first = create_app(world.registry, world.store_root, sample_interval_s=0.05)
    with TestClient(first) as client:
        for loss in (0.5, 0.25, 0.125):
            world.registry.set_learner_stats(loss=loss)
            deadline = time.monotonic() + 10
            while not any(p["loss"] == loss for p in client.get("/api/learning").json()["points"]):
                assert time.monotonic() < deadline, f"loss {loss} never sampled"
                time.sleep(0.02)
        before = client.get("/api/learning").json()["points"]
    restarted = create_app(world.registry, world.store_root, sample_interval_s=60.0)
    with TestClient(restarted) as client:
        body = client.get("/api/learning").json()
    after = [p for p in body["points"] if p["t"] <= before[-1]["t"]]
    assert [p["t"] for p in after] == [p["t"] for p in before]
    assert [p["loss"] for p in after] == [p["loss"] for p in before]
    assert {0.5, 0.25, 0.125} <= {p["loss"] for p in after}
    assert body["oldest"] == pytest.approx(before[0]["t"], abs=1e-3)


def test_rollout_view_lists_versions_decisions_and_events(client: TestClient) -> None:
    body = client.get("/api/rollout").json()
    assert body["rollout"]["stable"] == "v0002"
    assert body["rollout"]["candidate"] == "v0003"
    assert body["rollout"]["stage"] == "canary"
    assert body["rollout"]["canary_cells"] == ["cell-02"]
    assert body["assignments"] == {"cell-01": "v0002", "cell-02": "v0003", "cell-03": "v0002"}
    assert [v["version_id"] for v in body["versions"]] == ["v0001", "v0002", "v0003"]
    assert body["running"]["cell-02"] == "v0003"
    [decision] = body["decisions"]
    assert decision["actor"] == "rollout-controller" and decision["p_worse"] == "0.991"
    assert [e["kind"] for e in body["events"]] == ["set_stable", "rollback", "rollout_start"]
    assert body["success"]["v0002"]["pick_cube"]["episodes"] == 2


def test_episode_browsing_and_playback_match_the_store(client: TestClient) -> None:
    from learner.store import EpisodeRef, EpisodeStore

    listed = client.get("/api/episodes").json()["episodes"]
    assert len(listed) == 3
    picks = client.get("/api/episodes?task=pick_cube&cell=cell-01").json()["episodes"]
    assert {e["episode"] for e in picks} == {"ep-1-0000", "ep-1-0001"}
    assert client.get("/api/episodes?outcome=truncated").json()["episodes"] == []
    ep = picks[0]
    data = client.get(f"/api/episodes/cell-01/{ep['episode']}").json()
    stored = EpisodeStore(client.app.state.reader.store.root).read_episode(
        EpisodeRef("cell-01", ep["episode"])
    )
    assert data["n_steps"] == len(stored.timestamp) == ep["n_steps"]
    assert data["joint_pos"][3] == pytest.approx(stored.joint_pos[:, 3].tolist())
    assert data["intervention"] == stored.intervention.astype(int).tolist()
    assert data["cameras"] == {"front": data["n_steps"], "overhead": data["n_steps"]}
    frame = client.get(f"/api/episodes/cell-01/{ep['episode']}/frames/front/5")
    assert frame.status_code == 200 and frame.headers["content-type"] == "image/jpeg"
    assert frame.content == stored.frames["front"][5]
    assert (
        client.get(f"/api/episodes/cell-01/{ep['episode']}/frames/front/99999").status_code == 404
    )
    assert client.get("/api/episodes/cell-01/nope").status_code == 404


def test_page_and_plotly_are_served_locally(client: TestClient) -> None:
    page = client.get("/")
    assert page.status_code == 200 and '<script src="/static/plotly.min.js">' in page.text
    assert "http" not in page.text.split("<body>")[0].replace('charset="utf-8"', "")
    js = client.get("/static/plotly.min.js")
    assert js.status_code == 200 and len(js.content) > 1_000_000
    assert client.get("/static/app.js").status_code == 200
    assert client.get("/static/..%2Fapp.py").status_code == 404


@pytest.mark.parametrize("path", ["promote", "rollback"])
def test_actions_need_the_operator_token(client: TestClient, world: World, path: str) -> None:
    before = world.registry.rollout()
    missing = client.post(f"/api/rollout/{path}", json={})
    assert missing.status_code == 401 and "token" in missing.json()["detail"]
    wrong = client.post(f"/api/rollout/{path}", json={}, headers={"X-Operator-Token": "nope"})
    assert wrong.status_code == 403
    assert world.registry.rollout() == before


def test_actions_are_disabled_without_a_configured_token(world: World) -> None:
    app = create_app(world.registry, world.store_root, operator_token=None)
    with TestClient(app) as c:
        r = c.post("/api/rollout/promote", json={}, headers={"X-Operator-Token": "anything"})
    assert r.status_code == 403 and "--operator-token" in r.json()["detail"]


AUTH = {"X-Operator-Token": TOKEN}


def test_promote_with_the_token(client: TestClient, world: World) -> None:
    r = client.post("/api/rollout/promote", json={"reason": "looks good"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == "v0003"
    assert world.registry.rollout().stable == "v0003"
    assert world.registry.rollout().candidate is None
    last = world.registry.events()[-1]
    assert (last.kind, last.actor, last.reason) == (
        "promote",
        "operator@dashboard",
        "looks good",
    )
    again = client.post("/api/rollout/promote", json={}, headers=AUTH)
    assert again.status_code == 409 and "no candidate" in again.json()["detail"]


def test_rollback_with_the_token(client: TestClient, world: World) -> None:
    r = client.post("/api/rollout/rollback", json={}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert r.json()["result"] == "v0003"
    state = world.registry.rollout()
    assert state.stable == "v0002" and state.candidate is None
    assert world.registry.assignment_for("cell-02") == "v0002"
    assert world.registry.events()[-1].kind == "rollback"


def test_pin_unpin_and_start_with_the_token(client: TestClient, world: World) -> None:
    r = client.post("/api/rollout/pin", json={"cell": "cell-01", "version": "v0001"}, headers=AUTH)
    assert r.status_code == 200, r.text
    assert world.registry.assignment_for("cell-01") == "v0001"
    assert client.get("/api/rollout").json()["pins"] == {"cell-01": "v0001"}
    r = client.post("/api/rollout/pin", json={"cell": "cell-01"}, headers=AUTH)
    assert r.status_code == 200 and world.registry.assignment_for("cell-01") == "v0002"
    assert (
        client.post("/api/rollout/pin", json={"cell": "cell-01"}, headers=AUTH).status_code == 409
    )
    assert (
        client.post("/api/rollout/pin", json={"cell": "cell-01", "version": "v9"}).status_code
        == 401
    )
    client.post("/api/rollout/rollback", json={}, headers=AUTH)
    r = client.post(
        "/api/rollout/start", json={"version": "v0003", "canary": ["cell-01"]}, headers=AUTH
    )
    assert r.status_code == 200, r.text
    assert world.registry.rollout().canary_cells == ["cell-01"]
    assert world.registry.assignment_for("cell-01") == "v0003"


def test_shadow_run_scores_cells_and_actions_through_the_api(
    client: TestClient, world: World
) -> None:
    from fleet.common.cell_counters import CellCounters
    from fleet.control.registry import CellState

    registry = world.registry
    assert client.get("/api/rollout").json()["shadow_scores"] == {}
    client.post("/api/rollout/rollback", json={}, headers=AUTH)  # end v0003's canary
    r = client.post(
        "/api/rollout/start",
        json={"version": "v0003", "canary": ["cell-01"], "shadow": True, "reason": "shadow"},
        headers=AUTH,
    )
    assert r.status_code == 200, r.text
    assert r.json()["result"] == ["cell-01"]
    state = registry.rollout()
    assert (state.candidate, state.stage) == ("v0003", "shadow")
    assert registry.assignment_for("cell-01") == "v0002"  # a shadow never acts
    registry.record_heartbeat(
        CellState(
            cell_id="cell-01",
            counters=CellCounters(fault_count=2),
            version_running="v0002",
            shadow_version="v0003",
            last_seen=time.time(),
        )
    )
    registry.record_shadow(
        version="v0003", steps=50, dist_stable_sum=10.0, operator_steps=5, dist_operator_sum=1.5
    )
    body = client.get("/api/rollout").json()
    assert body["rollout"]["stage"] == "shadow"
    assert body["shadow_running"]["cell-01"] == "v0003"
    assert body["shadow_scores"] == {
        "v0003": {
            "steps": 50,
            "mean_dist_stable": pytest.approx(0.2),
            "operator_steps": 5,
            "mean_dist_operator": pytest.approx(0.3),
        }
    }
    cells = {c["cell_id"]: c for c in client.get("/api/fleet").json()["cells"]}
    assert (cells["cell-01"]["shadow_version"], cells["cell-01"]["fault_count"]) == ("v0003", 2)
    assert (cells["cell-02"]["shadow_version"], cells["cell-02"]["fault_count"]) == ("", 0)
    # Promote moves a shadow run on to canary on the same cells, never straight to stable.
    r = client.post("/api/rollout/promote", json={}, headers=AUTH)
    assert r.status_code == 200 and r.json()["result"] == "v0003"
    state = registry.rollout()
    assert (state.stable, state.stage, state.canary_cells) == (
        "v0002",
        "canary",
        ["cell-01"],
    )
    assert registry.events()[-1].kind == "shadow_to_canary"


def test_lossless_depth_frames_are_rendered_for_the_browser() -> None:
    import simplejpeg
    from numcodecs import Zstd

    from fleet.control.dashboard.store_reader import displayable

    depth = np.zeros((96, 128), "<u2")
    depth[:, 64:] = 800  # near: bright
    depth[:, 32:64] = 2000  # far: dim; columns 0..31 have no reading (black)
    stored = bytes(Zstd().encode(depth.tobytes()))
    data, media = displayable(stored, {"encoding": "zstd16", "height": 96, "width": 128})
    assert media == "image/jpeg"
    grey = simplejpeg.decode_jpeg(data, colorspace="GRAY")[..., 0].astype(int)
    assert grey.shape == (96, 128)
    assert grey[:, :28].mean() < 10 < grey[:, 36:60].mean() < grey[:, 68:].mean() - 100


def test_store_disk_use_and_growth(client: TestClient, world: World) -> None:
    body = client.get("/api/store").json()
    on_disk = sum(
        f.stat().st_size
        for ep_dir in (world.store_root / "episodes").glob("*/*")
        for f in ep_dir.rglob("*")
        if f.is_file()
    )
    assert body["available"] and body["episodes"] == world.episodes
    assert body["bytes"] == on_disk > 0
    assert {c["cell"] for c in body["by_cell"]} == {"cell-01", "cell-02"}
    assert sum(c["bytes"] for c in body["by_cell"]) == on_disk
    assert len(body["growth_per_day"]) == 7 and body["growth_per_day"][-1] == on_disk


def test_store_disk_use_without_a_store_is_not_an_error(world: World) -> None:
    with TestClient(create_app(world.registry, None)) as c:
        reply = c.get("/api/store")
    assert reply.status_code == 200 and reply.json() == {"available": False}
