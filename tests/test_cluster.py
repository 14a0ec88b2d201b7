"""The feature job runs unchanged on a Flink cluster: submitted by `freshrec deploy --submit`
to a standalone JobManager + TaskManager (streaming/standalone.py, the docker-compose path
without docker), its features equal counts computed independently; a second submission
after a cancel runs in the same TaskManager (flink-python in lib/)."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from connectors.feast_redis import FeastRedisReader
from features.definitions import FEATURE_VIEWS
from freshrec.config import Settings
from streaming.standalone import StandaloneCluster, start_standalone_cluster
from streaming.state import Spec
from tests.conftest import wait_until
from tests.expected import user_features
from tests.test_pipeline import generated, produce


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[StandaloneCluster]:
    c = start_standalone_cluster(workdir / "flink-cluster")
    yield c
    c.stop()


def rest(c: StandaloneCluster, path: str, method: str = "GET") -> dict:
    req = urllib.request.Request(f"http://{c.address}{path}", method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        body = r.read()
    return json.loads(body) if body else {}


def taskmanagers(c: StandaloneCluster) -> int:
    """TaskManagers registered; 0 while the JobManager's REST endpoint is still starting (it
    answers 503 until its leader is elected)."""
    try:
        return int(rest(c, "/overview")["taskmanagers"])
    except OSError:  # urllib's HTTPError and URLError are OSErrors
        return 0


def submit(c: StandaloneCluster, s: Settings) -> str:
    done = subprocess.run([sys.executable, "-m", "freshrec.cli", "deploy", "--submit"], capture_output=True,
                          text=True, timeout=240, env={**c.env, **s.to_env()})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert "flink run --jobmanager" in done.stdout  # the plan it printed is the command it ran
    return done.stdout.split("Job has been submitted with JobID ")[1].split()[0]


def test_job_runs_unchanged_on_a_cluster(cluster: StandaloneCluster,
                                         make_settings: Callable[[str], Settings]) -> None:
    wait_until(lambda: taskmanagers(cluster) == 1, 120, "a TaskManager to register")
    # The feature job alone (one slot): the catalogue job is submitted the same way, through run().
    s = make_settings("cluster").replace(flink_jobmanager=cluster.address, flink_mode="cluster",
                                         features="features.none")
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    first = generated("cl1-", 200, seed=21)
    job = submit(cluster, s)
    produce(s, first)
    users = sorted({e.user_id for e in first})
    want = [user_features(first, u, Spec.of(s))["views"] for u in users]
    wait_until(lambda: [(r or {}).get("views") for r in reader.read([("user_recent", u) for u in users])] == want,
               90, "the cluster job's features")

    # cancelled and submitted again: the second job in the same TaskManager resumes from the
    # retained checkpoint and carries on
    wait_until(lambda: list((s.state_dir / "checkpoints").glob("*/*/chk-*/_metadata")), 60, "a checkpoint")
    rest(cluster, f"/jobs/{job}?mode=cancel", "PATCH")
    wait_until(lambda: rest(cluster, f"/jobs/{job}")["state"] == "CANCELED", 60, "the cancel")
    submit(cluster, s)
    second = generated("cl2-", 100, seed=22)
    produce(s, second)
    users2 = sorted({e.user_id for e in second})
    want2 = [user_features(second, u, Spec.of(s))["views"] for u in users2]
    wait_until(lambda: [(r or {}).get("views") for r in reader.read([("user_recent", u) for u in users2])] == want2,
               90, "the resubmitted job's features")
