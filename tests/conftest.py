"""Session-wide real services: one Tansu broker, one Redis server, one PyFlink feature job.

Tests isolate themselves by id prefix (users and items named ``<test>-...``); tests that
need their own job (restart) get their own topics and Feast project.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from connectors.embedded import Service, start_broker, start_redis
from connectors.feast_redis import FeastRedisReader
from features.definitions import FEATURE_VIEWS
from features.store import apply
from freshrec.config import Settings
from freshrec.stack import start_job, stop_group
from jobs.topics import CATALOGUE_JOB_NAME, JOB_NAME, prepare_log

ROOT = Path(__file__).resolve().parent.parent


def wait_until(check: Callable[[], Any], timeout: float, what: str, every: float = 0.25) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}; last check returned {last!r}")


@pytest.fixture(scope="session")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("freshrec")


@pytest.fixture(scope="session")
def broker(workdir: Path) -> Iterator[Service]:
    service = start_broker(workdir / "broker")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def redis_server(workdir: Path) -> Iterator[Service]:
    service = start_redis(workdir / "redis")
    yield service
    service.stop()


@pytest.fixture(scope="session")
def make_settings(broker: Service, redis_server: Service, workdir: Path) -> Callable[[str], Settings]:
    def make(name: str) -> Settings:
        s = Settings(
            kafka_bootstrap=f"127.0.0.1:{broker.port}",
            redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
            events_topic=f"{name}-events",
            dlq_topic=f"{name}-dlq",
            feast_project=name,
            state_dir=workdir / name,
            checkpoint_interval_ms=1000,
            window_seconds=120,
            window_pane_seconds=10,
            idle_timeout_ms=3000,  # short for tests; too short makes catch-up reads look late
            out_of_orderness_ms=500,
        )
        prepare_log(s)
        apply(s)
        return s

    return make


class JobProcess:
    """A Flink job (the feature job, or ``catalogue``: the catalogue job) as its own process
    (and process group, so the JVM goes with it)."""

    def __init__(self, settings: Settings, catalogue: bool = False) -> None:
        self.settings = settings
        self.name = "catalogue_job" if catalogue else "feature_job"
        self.log = settings.state_dir / f"{self.name}.log"
        start = self.log.stat().st_size if self.log.exists() else 0  # a restarted job appends to the log
        self.proc = start_job(self.name, settings, settings.state_dir)
        # Fail fast on a job that cannot even be built, instead of timing out in the test.
        ready = f"[{CATALOGUE_JOB_NAME if catalogue else JOB_NAME}] reading"
        wait_until(lambda: self.check_alive() or ready in self.output(start), 120, f"the {self.name} to start")

    def output(self, start: int = 0) -> str:
        with self.log.open(errors="replace") as f:
            f.seek(start)
            return f.read()

    def kill(self, sig: int = signal.SIGKILL) -> None:
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass
        self.proc.wait(60)

    def stop(self) -> None:
        """SIGTERM, then SIGKILL: a JVM stuck in its shutdown hooks used to outlive pytest."""
        stop_group(self.proc.pid)
        self.proc.wait(10)

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise AssertionError(f"{self.name} exited ({self.proc.returncode}):\n{self.log.read_text()[-3000:]}")


@pytest.fixture(scope="session")
def shared(make_settings: Callable[[str], Settings]) -> Iterator[Settings]:
    """Settings of the session's feature job, already running."""
    settings = make_settings("shared")
    job = JobProcess(settings)
    yield settings
    job.stop()


@pytest.fixture(scope="session")
def reader(shared: Settings) -> FeastRedisReader:
    return FeastRedisReader(redis.Redis.from_url(shared.redis_url), shared.feast_project, FEATURE_VIEWS)
