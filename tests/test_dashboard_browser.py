"""The dashboard page in headless Chromium (Debian's /usr/bin/chromium through Playwright;
no browser download): each view shows the live Redis and store data, updates without a
reload, and operator actions are refused without the token."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fleet.common.cell_counters import CellCounters
from fleet.control.dashboard.app import create_app
from fleet.control.registry import CellState
from tests.dashboard_world import TOKEN, ServerThread, World, build_world

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    assert CHROMIUM.exists(), "install Debian's chromium (apt-get install -y chromium)"
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def world(registry, tmp_path) -> World:
    return build_world(registry, tmp_path / "store")


@pytest.fixture
def page(browser: Browser, world: World) -> Iterator[Page]:
    app = create_app(world.registry, world.store_root, operator_token=TOKEN, sample_interval_s=0.25)
    with ServerThread(app) as server:
        context = browser.new_context(base_url=server.url, viewport={"width": 1400, "height": 900})
        pg = context.new_page()
        external: list[str] = []
        pg.on(
            "request",
            lambda r: external.append(r.url) if not r.url.startswith(server.url) else None,
        )
        yield pg
        context.close()
        assert external == [], f"the page fetched from outside the app: {external}"


def test_fleet_view_shows_live_cells_and_updates_without_reload(page: Page, world: World) -> None:
    page.goto("/?poll=300#fleet")
    row = page.locator('#fleet-table tr[data-cell="cell-01"]')
    expect(row.locator(".version")).to_have_text("v0002")
    expect(row.locator(".hz")).to_have_text("49.8")
    expect(row.locator(".episodes")).to_have_text("7")
    expect(row.locator(".spool")).to_have_text("2 chunks, 3.5 MB")
    expect(page.locator('#fleet-table tr[data-cell="cell-02"] .fault')).to_have_text(
        "signature check failed for v0004"
    )
    stale = page.locator('#fleet-table tr[data-cell="cell-03"]')
    expect(stale).to_have_class("stale")
    expect(stale.locator(".status")).to_have_text("STALE")
    # A new heartbeat arrives: the page shows it without being reloaded.
    page.evaluate("window.__marker = 1")
    world.registry.record_heartbeat(
        CellState(
            cell_id="cell-01",
            counters=CellCounters(episodes=8, loop_hz=50.0),
            version_running="v0003",
            task="pick_cube",
            last_seen=time.time(),
        )
    )
    expect(row.locator(".version")).to_have_text("v0003", timeout=10_000)
    expect(row.locator(".episodes")).to_have_text("8")
    assert page.evaluate("window.__marker") == 1


def test_learning_view_draws_charts_from_the_sampled_stats(page: Page, world: World) -> None:
    page.goto("/?poll=300#learning")
    expect(page.locator("#learner-summary")).to_contain_text("321")
    expect(page.locator("#learner-summary")).to_contain_text("0.0421")
    # Data the trainer could not use from some cell, counted where people look.
    cameras = page.locator("#learner-summary .card").filter(has_text="without the model's cameras")
    expect(cameras.locator(".value")).to_have_text("7")
    joints = page.locator("#learner-summary .card").filter(has_text="outside the joint range")
    expect(joints.locator(".value")).to_have_text("4321")
    for chart in ("loss", "ups", "throughput", "replay", "success"):
        expect(page.locator(f"#chart-{chart} .main-svg").first).to_be_visible()
    expect(page.locator("#chart-success .legendtext").first).to_be_visible(timeout=10_000)
    traces = page.evaluate(
        "document.getElementById('chart-success').data.map(t => [t.name, t.y[t.y.length - 1]])"
    )
    assert dict(traces) == {"pick_cube @ v0002": 0.5, "touch_target @ v0003": 1.0}
    world.registry.set_learner_stats(loss=0.5, updates=999)
    expect(page.locator("#learner-summary")).to_contain_text("999", timeout=10_000)
    # the loss chart's trace holds the new value among its points
    page.wait_for_function(
        "document.getElementById('chart-loss').data[0].y.includes(0.5)", timeout=10_000
    )


def test_rollout_view_shows_state_and_refuses_actions_without_the_token(
    page: Page, world: World
) -> None:
    page.goto("/?poll=300#rollout")
    expect(page.locator("#rollout-stable")).to_have_text("v0002")
    expect(page.locator("#rollout-candidate")).to_have_text("v0003")
    expect(page.locator("#rollout-stage")).to_have_text("canary")
    expect(page.locator("#rollout-canary")).to_have_text("cell-02")
    expect(page.locator('#assign-table tr[data-cell="cell-02"]')).to_contain_text("v0003")
    expect(page.locator("#decisions-table")).to_contain_text("rollout-controller")
    expect(page.locator("#decisions-table")).to_contain_text("p_worse=0.991")
    expect(page.locator("#events-table .kind")).to_have_text(
        ["rollout_start", "rollback", "set_stable"]
    )
    page.click("#btn-promote")
    expect(page.locator("#action-result")).to_contain_text("refused (HTTP 401)")
    page.fill("#token", "wrong")
    page.click("#btn-rollback")
    expect(page.locator("#action-result")).to_contain_text("refused (HTTP 403)")
    assert world.registry.rollout().stable == "v0002"
    assert world.registry.rollout().candidate == "v0003"


def test_promote_with_the_token_from_the_page(page: Page, world: World) -> None:
    page.goto("/?poll=300#rollout")
    expect(page.locator("#rollout-candidate")).to_have_text("v0003")
    page.fill("#token", TOKEN)
    page.click("#btn-promote")
    expect(page.locator("#action-result")).to_have_text("promote: done (v0003)")
    expect(page.locator("#rollout-stable")).to_have_text("v0003")
    expect(page.locator("#rollout-candidate")).to_have_text("-")
    expect(page.locator("#events-table .kind").first).to_have_text("promote")
    assert world.registry.rollout().stable == "v0003"


def test_rollback_with_the_token_from_the_page(page: Page, world: World) -> None:
    page.goto("/?poll=300#rollout")
    expect(page.locator("#rollout-candidate")).to_have_text("v0003")
    page.fill("#token", TOKEN)
    page.click("#btn-rollback")
    expect(page.locator("#action-result")).to_have_text("rollback: done (v0003)")
    expect(page.locator("#rollout-candidate")).to_have_text("-")
    expect(page.locator('#assign-table tr[data-cell="cell-02"]')).to_contain_text("v0002")
    state = world.registry.rollout()
    assert state.stable == "v0002" and state.candidate is None


def test_episodes_view_filters_and_plays_back(page: Page, world: World) -> None:
    page.goto("/?poll=300#episodes")
    rows = page.locator("#episodes-table tbody tr")
    expect(rows).to_have_count(world.episodes)
    page.select_option("#f-task", "touch_target")
    expect(rows).to_have_count(1)
    expect(rows.first).to_have_attribute("data-cell", "cell-02")
    page.select_option("#f-task", "")
    page.select_option("#f-cell", "cell-01")
    expect(rows).to_have_count(2)
    rows.first.click()
    expect(page.locator("#player-title")).to_contain_text("cell-01")
    expect(page.locator("#player-flag")).to_have_text("operator intervening")
    img = page.locator('#player-frames img[data-camera="overhead"]')
    page.wait_for_function(
        "document.querySelector('#player-frames img[data-camera=overhead]').naturalWidth === 128"
    )
    n_traces = page.evaluate("document.getElementById('chart-joints').data.length")
    assert n_traces == 15  # 14 joints and the intervention flags
    first_src = img.get_attribute("src")
    page.click("#btn-play")
    page.wait_for_function("document.getElementById('player-step').value !== '0'", timeout=10_000)
    page.click("#btn-play")
    assert img.get_attribute("src") != first_src


def test_fleet_eval_results_show_in_the_rollout_table_and_on_the_success_chart(
    page: Page, world: World
) -> None:
    import json

    summary = {
        "version": "v0002",
        "backend": "kinematic",
        "baselines": ["expert"],
        "evaluated_at": time.time(),
        "scores": {
            "v0002": {
                "pick_cube": {
                    "successes": 7,
                    "episodes": 10,
                    "success_rate": 0.7,
                    "ci95": [0.3968, 0.8922],
                    "mean_progress": 0.81,
                }
            },
            "expert": {
                "pick_cube": {
                    "successes": 10,
                    "episodes": 10,
                    "success_rate": 1.0,
                    "ci95": [0.7225, 1.0],
                    "mean_progress": 1.0,
                }
            },
        },
    }
    world.registry.set_evaluation("v0002", json.dumps(summary))
    page.goto("/?poll=300#rollout")
    row = page.locator('#eval-table tr[data-version="v0002"]')
    expect(row.locator(".eval-success")).to_have_text("7/10")
    expect(row).to_contain_text("expert 10/10")
    page.goto("/?poll=250#learning")  # a new query: a fresh load, not only a new hash
    page.wait_for_function(
        "(document.getElementById('chart-success').data || [])"
        ".some(t => t.name === 'eval: pick_cube')",
        timeout=10_000,
    )
    point = page.evaluate(
        "document.getElementById('chart-success').data.find(t => t.name === 'eval: pick_cube').y"
    )
    assert point == [0.7]


@pytest.mark.parametrize("view", ["fleet", "learning", "rollout", "episodes"])
def test_loading_a_view_logs_no_console_error_and_no_failed_request(page: Page, view: str) -> None:
    """A person opening the dashboard sees a clean console: every request it makes
    succeeds (the favicon included) and no script error is logged."""
    errors: list[str] = []
    failed: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("requestfailed", lambda r: failed.append(f"{r.url}: {r.failure}"))

    def on_response(r) -> None:  # type: ignore[no-untyped-def]
        if r.status >= 400:
            failed.append(f"{r.url}: HTTP {r.status}")

    page.on("response", on_response)
    page.goto(f"/?poll=300#{view}", wait_until="networkidle")
    page.locator("nav a", has_text=view.capitalize()).click()
    # A few polls later (each view refreshes every 300 ms), still nothing went wrong.
    page.wait_for_function("document.getElementById('updated').textContent !== 'connecting…'")
    polls = page.evaluate("performance.getEntriesByType('resource').length")
    page.wait_for_function(
        f"performance.getEntriesByType('resource').length >= {polls + 3}", timeout=10_000
    )
    assert failed == [], f"failed requests on the {view} view: {failed}"
    assert errors == [], f"console errors on the {view} view: {errors}"
