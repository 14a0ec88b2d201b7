"""The live page (/ui/) in headless Chromium (Debian's, driven by Playwright), against the
session's real broker, Redis and feature job: live numbers that move, a click in "try it"
that changes the list, the catalogue's values, rollback behind the admin key, and a page
that still says something useful when Redis is gone.
"""

from __future__ import annotations

import random
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from fastapi import FastAPI

from connectors.embedded import Service, free_port, start_redis
from connectors.kafka import EventProducer
from freshrec.config import Settings
from online_learning.recommender import OnlineRecommender
from serving.app import create_app
from tests.conftest import wait_until
from tests.test_serving import KEY, seeded, store_of

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: `make test` installs it (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        yield b
        b.close()


class Served:
    """An app on a real port (uvicorn in a thread), as a browser needs it."""

    def __init__(self, app: FastAPI) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=int(self.url.rsplit(":", 1)[1]),
                                                    log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        wait_until(lambda: self.server.started, 30, "the API to listen")

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


def open_page(browser: Any, url: str) -> tuple[Any, list[str]]:
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url + "/ui/")
    return page, problems


def number(page: Any, selector: str) -> float | None:
    text = page.locator(selector).first.text_content().replace(",", "").strip()
    try:
        return float(text)
    except ValueError:
        return None


def test_live_page_moves_and_a_click_changes_the_list(shared: Settings, browser: Any, tmp_path: Path) -> None:
    served = Served(create_app(shared))
    stop = threading.Event()

    def traffic() -> None:  # background behavior at event time = now, so the numbers have something to show
        rng = random.Random(41)
        with EventProducer(shared.kafka_bootstrap, shared.events_topic, shared.dlq_topic) as p:
            while not stop.is_set():
                p.send({"user_id": f"ui-u{rng.randrange(40)}", "item_id": f"ui-i{rng.randrange(60)}",
                        "category_id": f"ui-c{rng.randrange(4)}", "ts": int(time.time() * 1000),
                        "behavior": rng.choice(["view"] * 8 + ["cart", "buy"])})
                p.flush()
                time.sleep(0.02)

    sender = threading.Thread(target=traffic)
    sender.start()
    try:
        page, problems = open_page(browser, served.url)
        page.wait_for_function("() => document.querySelector('[data-k=events]').textContent.trim() !== '–'",
                               timeout=30_000)
        first = number(page, "[data-k=events]")
        wait_until(lambda: number(page, "[data-k=events]") != first, 20, "the events total to move on the page")
        assert number(page, "[data-k=events_per_s]") is not None
        job = page.locator("#components tr[data-part=feature_job] td").nth(2)
        assert job.text_content().strip() not in ("", "–"), "the feature job's lag"
        assert page.locator("#health").text_content() == "all parts up"

        # try it: a new user sees trending items; a buy (a real event) takes the item off their list.
        user = f"ui-visitor-{time.time_ns()}"
        page.fill("#user", user)

        def listed() -> int:  # trending, once the job has counted the traffic
            page.click("#try-form button[type=submit]")
            time.sleep(0.5)
            return page.locator("#recs li").count()

        wait_until(listed, 60, "recommendations for a new user on the page")
        item = page.locator("#recs li").first.get_attribute("data-item")
        page.select_option("#behavior", "buy")
        page.locator("#recs li button").first.click()
        page.wait_for_selector("#try-timing[data-ms]", timeout=10_000)
        took = int(page.locator("#try-timing").get_attribute("data-ms"))
        assert took < 2_000, page.locator("#try-timing").text_content()
        assert page.locator("#try-timing").get_attribute("data-changed") == "yes"
        assert page.locator(f"#recs li[data-item='{item}']").count() == 0, "a just-bought item is not recommended"

        # the catalogue: every view listed, and the user's newest values read through the API
        assert page.locator("#catalogue tr[data-view=user_recent]").count() == 1
        page.fill("#feature-form input[name=user_id]", user)
        page.click("#feature-form button")
        page.wait_for_function("() => document.querySelector('#catalogue tr[data-view=user_recent] td.value')"
                               ".textContent.includes('last_viewed_items')", timeout=10_000)
        values = page.locator("#catalogue tr[data-view=user_recent] td.value").text_content()
        assert f"last_bought_items: [{item}]" in values, values
        shot = tmp_path / "ui.png"
        page.screenshot(path=str(shot), full_page=True)
        assert shot.stat().st_size > 10_000
        print(f"\nscreenshot: {shot}; click -> changed list: {took} ms")
        assert not problems, problems
    finally:
        stop.set()
        sender.join(30)
        served.stop()


def test_live_page_rolls_back_behind_the_key_and_stays_up_without_redis(
        broker: Service, workdir: Path, browser: Any, tmp_path: Path) -> None:
    own = start_redis(workdir / "ui-redis")  # its own server: stopped below
    s, users = seeded(f"redis://127.0.0.1:{own.port}/0", "uipage", workdir)
    s = s.replace(kafka_bootstrap=f"127.0.0.1:{broker.port}")
    store = store_of(s)
    first = store.head()
    second = store.publish("snapshot", OnlineRecommender.default(min_count=1).snapshot(), 0, {"examples": 0})
    served = Served(create_app(s))
    try:
        page, problems = open_page(browser, served.url)
        page.wait_for_selector(f"#versions tr[data-version='{second}']", timeout=15_000)
        page.fill("#admin-key", "wrong")
        page.locator(f"#versions tr[data-version='{first}'] button").click()
        page.wait_for_function("() => document.querySelector('#rollback-result').textContent.startsWith('401')",
                               timeout=10_000)
        page.fill("#admin-key", KEY)
        page.locator(f"#versions tr[data-version='{first}'] button").click()
        page.wait_for_function("() => document.querySelector('#rollback-result').textContent.includes('again')",
                               timeout=10_000)
        back = store.head()
        assert store.get(back).meta["rollback_of"] == first
        page.wait_for_selector(f"#versions tr[data-version='{back}']", timeout=15_000)
        assert f"rollback of v{first}" in page.locator(f"#versions tr[data-version='{back}']").text_content()

        page.fill("#user", users[0])
        page.click("#try-form button[type=submit]")
        page.wait_for_function("() => !document.querySelector('#try-note').textContent.includes('degraded')"
                               " && document.querySelectorAll('#recs li').length > 0", timeout=10_000)
        own.stop()
        page.wait_for_function("() => document.querySelector('#health').textContent === 'degraded'", timeout=15_000)
        assert "Redis" in page.locator("#problem").text_content()
        page.click("#try-form button[type=submit]")
        page.wait_for_function("() => document.querySelector('#try-note').textContent.includes('degraded')",
                               timeout=10_000)
        assert page.locator("#recs li").count() > 0, "the answer from what the API holds"
        page.screenshot(path=str(tmp_path / "ui-redis-down.png"), full_page=True)
        # Only the refused key (401) and Redis down (503) may show in the console, no script error.
        assert all("Failed to load resource" in p and ("401" in p or "503" in p) for p in problems), problems
    finally:
        served.stop()
        own.stop()
