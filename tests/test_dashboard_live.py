"""The dashboard in headless Chromium against a running `fleet up` sim fleet: what each view
shows matches Redis and the episode store while the fleet runs, and operator actions work
with the token and are refused without it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from fleet.common.net import free_port
from fleet.control.redis_server import RedisServer
from fleet.control.registry import Registry
from learner.store import EpisodeStore
from tests.test_dashboard_browser import CHROMIUM, CHROMIUM_ARGS

TOKEN = "live-operator-token"


def _eventually(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.5)


def _api(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Registry, Path]]:
    run = tmp_path_factory.mktemp("live") / "run"
    port = free_port()
    with RedisServer() as redis:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "fleet.cli",
                "up",
                "--cells",
                "2",
                "--duration",
                "240",
                "--no-live",
                "--rollout",
                "auto",
                "--publish-every",
                "40",
                "--min-steps",
                "100",
                "--preset",
                "tiny",  # the suite's model: versions come out within the run
                "--first-version-demos",
                "0",  # and no 100 opening demonstrations a task first
                "--redis-url",
                redis.url,
                "--data-dir",
                str(run),
                "--dashboard-port",
                str(port),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env={**os.environ, "FLEET_OPERATOR_TOKEN": TOKEN},
            start_new_session=True,
        )
        registry = Registry(redis.url)
        url = f"http://127.0.0.1:{port}"
        try:

            def ready() -> bool:
                try:
                    cells = _api(f"{url}/api/fleet")["cells"]
                except OSError:
                    return False
                return (
                    len(cells) == 2
                    and all(c["episodes"] >= 1 for c in cells)
                    and len(registry.versions()) >= 2
                    and bool(EpisodeStore(run / "store").episodes())
                )

            _eventually(lambda: proc.poll() is None and ready(), 200, "a running fleet")
            yield url, registry, run
        finally:
            # SIGTERM, not SIGINT: a suite run as a background job inherits SIGINT ignored.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


@pytest.fixture(scope="module")
def browser(fleet: tuple[str, Registry, Path]) -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser: Browser, fleet: tuple[str, Registry, Path]) -> Iterator[Page]:
    context = browser.new_context(base_url=fleet[0])
    yield context.new_page()
    context.close()


def test_fleet_view_matches_the_cells_in_redis(page: Page, fleet) -> None:
    _, registry, _ = fleet
    page.goto("/?poll=500#fleet")
    for cell in registry.cells():
        row = page.locator(f'#fleet-table tr[data-cell="{cell.cell_id}"]')
        expect(row).to_be_visible()

        def shows_redis(row=row, cell_id=cell.cell_id) -> bool:
            now = {c.cell_id: c for c in registry.cells()}[cell_id]
            return row.locator(".version").inner_text() == now.version_running and row.locator(
                ".episodes"
            ).inner_text() == str(now.counters.episodes)

        _eventually(shows_redis, 20, f"{cell.cell_id}'s row to match Redis")


def test_rollout_view_matches_redis_and_actions_need_the_token(page: Page, fleet) -> None:
    _, registry, _ = fleet
    page.goto("/?poll=500#rollout")
    _eventually(
        lambda: page.locator("#rollout-stable").inner_text() == (registry.rollout().stable or "-"),
        20,
        "stable to match Redis",
    )
    stable = registry.rollout().stable
    page.fill("#token", "")
    page.click("#btn-rollback")
    expect(page.locator("#action-result")).to_contain_text("refused (HTTP 401)")
    assert registry.rollout().stable == stable
    # With the token: pin cell-01 to the stable version, then unpin it.
    page.fill("#token", TOKEN)
    page.select_option("#pin-cell", "cell-01")
    page.select_option("#pin-version", stable)
    page.click("#btn-pin")
    _eventually(lambda: registry.pins().get("cell-01") == stable, 10, "the pin in Redis")
    page.click("#btn-unpin")
    _eventually(lambda: "cell-01" not in registry.pins(), 10, "the unpin in Redis")


def test_episodes_view_lists_what_the_store_holds(page: Page, fleet) -> None:
    _, _, run = fleet
    page.goto("/?poll=500#episodes")
    rows = page.locator("#episodes-table tbody tr")
    expect(rows.first).to_be_visible(timeout=20_000)
    first = (rows.first.get_attribute("data-cell"), rows.first.get_attribute("data-episode"))
    # Read after the page: the store only grows, so the listed episode must be in it
    # (in-progress ones included: the list is live).
    stored = {
        (r.cell_id, r.episode_id) for r in EpisodeStore(run / "store").episodes(complete_only=False)
    }
    assert first in stored
    rows.first.click()
    page.wait_for_function(
        "document.querySelector('#player-frames img[data-camera=overhead]')?.naturalWidth > 0"
    )
