"""The demo a newcomer runs: its own traffic on the embedded stack, as `freshrec up --demo`
sends it, leaves room for an app's events to change recommendations.

A shorter run of what bench/demo.py measures for 5 minutes (docs/benchmarks/demo.md): here
the workload runs for a minute, and what must hold is asserted, not how fast.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from connectors.embedded import free_port
from freshrec.config import Settings
from freshrec.demo import checkpoints, run, try_it
from freshrec.stack import Stack
from tests.conftest import wait_until

WORKLOAD_S = 60


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    # The user's defaults (checkpoint interval, windows, lateness), as `freshrec up` runs them.
    s = Stack.start(Settings(state_dir=tmp_path_factory.mktemp("demo") / "stack", api_port=free_port()),
                    log=lambda m: None)
    yield s
    s.stop()


def _checkpointed(web_ui: str) -> bool:
    try:
        return bool(checkpoints(web_ui)["completed"])
    except httpx.HTTPError:  # its JVM is still starting
        return False


def test_demo_traffic_leaves_room_for_an_apps_events(stack: Stack) -> None:
    # Checkpoints are judged under load, not while a job starts: the catalogue job's Python workers
    # (niced) took over 40 s to start on a busy CI machine, and a job checkpoints only once all run.
    for job, url in stack.flink_ui.items():
        wait_until(lambda url=url: _checkpointed(url), 180, f"{job}'s first checkpoint")
    said: list[str] = []
    result = run(stack.settings, stack.api_url, stack.flink_ui, WORKLOAD_S, users=20, log=said.append)
    print(result)
    assert result["events_sent"] > 10 * WORKLOAD_S, "the demo sends traffic"
    assert result["taken_in"] == 20 and result["changed"] == 20, "every new user's view changed their list"
    # A read slower than FRESHREC_REDIS_TIMEOUT_MS (50 ms) degrades the answers of the next second:
    # on a loaded CI machine that is timing, which bench/demo.py judges (0 degraded answers).
    # Here the online store must never have been unreachable.
    assert all("Timeout" in cause for cause in result["degraded_causes"]), result["degraded_causes"]
    assert result["degraded_answers"] == 0 or result["degraded_causes"], "degraded answers say why"
    assert result["feature_lag_s"] is not None and result["feature_lag_s"] < 5
    interval_s = stack.settings.checkpoint_interval_ms / 1000
    for job, ckpt in result["checkpoints"].items():
        assert ckpt["completed"] > 0, job
        assert ckpt["newest_age_s"] < 3 * interval_s + 10, f"{job}'s checkpoints fell behind: {ckpt}"

    # The "try it" line `up --demo` prints: a view changing a new user's list, and how to do it by hand.
    lines: list[str] = []
    try_it(stack.api_url, log=lines.append, after_s=0).join(30)
    assert lines and "changed their recommendations" in lines[0] and "curl -X POST" in lines[0], lines
