"""The feature job runs unchanged on a Flink cluster: submitted by `freshrec deploy --submit`
to a standalone JobManager + TaskManager (streaming/standalone.py, the docker-compose path
without docker), its features equal counts computed independently; a second submission
after a cancel runs in the same TaskManager (flink-python in lib/); and at parallelism 2 it
writes the features it writes at parallelism 1 (no operator's work sits on one key). So does
the catalogue job, submitted alone (`--job catalogue_job`), its SQL operators and its Java
entity operators alike."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from kafka import TopicPartition

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import consumer
from connectors.schema import BehaviorEvent
from features.definitions import FEATURE_VIEWS
from features.dsl import load, trending_key
from features.store import feature_store
from freshrec.config import Settings
from jobs.topics import examples_topic, feature_log_topic
from streaming.standalone import StandaloneCluster, start_standalone_cluster
from streaming.state import Spec
from tests.conftest import wait_until
from tests.expected import item_features, user_features
from tests.test_pipeline import generated, produce


@pytest.fixture(scope="module")
def cluster(workdir: Path) -> Iterator[StandaloneCluster]:
    c = start_standalone_cluster(workdir / "flink-cluster", slots=2)
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
    c.raise_if_exited()
    try:
        return int(rest(c, "/overview")["taskmanagers"])
    except OSError:  # urllib's HTTPError and URLError are OSErrors
        return 0


def submit(c: StandaloneCluster, s: Settings, job: str | None = None) -> str:
    done = subprocess.run([sys.executable, "-m", "freshrec.cli", "deploy", "--submit",
                           *(["--job", job] if job else [])], capture_output=True,
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
    sinks_settled(s)
    rest(cluster, f"/jobs/{job}?mode=cancel", "PATCH")
    wait_until(lambda: rest(cluster, f"/jobs/{job}")["state"] == "CANCELED", 60, "the cancel")
    submit(cluster, s)
    second = generated("cl2-", 100, seed=22)
    produce(s, second)
    users2 = sorted({e.user_id for e in second})
    want2 = [user_features(second, u, Spec.of(s))["views"] for u in users2]
    wait_until(lambda: [(r or {}).get("views") for r in reader.read([("user_recent", u) for u in users2])] == want2,
               90, "the resubmitted job's features")


def sinks_settled(s: Settings, quiet_s: float = 1.5) -> None:
    """Wait until the feature job's Kafka topics stop growing for ``quiet_s``. A cancel while
    its Kafka sinks have sends in flight can take the TaskManager down: the Kafka connector's
    writer (2.0, on Flink 2.3) fails in its cleanup ("Producer is closed forcefully"), and Flink
    treats that as fatal. Seen once in a CI replica; this test is about resuming, not that."""
    c = consumer(s.kafka_bootstrap)
    try:
        parts = [TopicPartition(t, p) for t in (examples_topic(s), feature_log_topic(s), s.dlq_topic)
                 for p in c.partitions_for_topic(t) or ()]
        last, since = None, time.monotonic()

        def quiet() -> bool:
            nonlocal last, since
            now = c.end_offsets(parts)
            if now != last:
                last, since = now, time.monotonic()
            return time.monotonic() - since >= quiet_s

        wait_until(quiet, 60, "the job's Kafka topics to stop growing")
    finally:
        c.close()


def cancel_running(c: StandaloneCluster) -> None:
    for job in rest(c, "/jobs")["jobs"]:
        if job["status"] == "RUNNING":
            rest(c, f"/jobs/{job['id']}?mode=cancel", "PATCH")
            wait_until(lambda j=job["id"]: rest(c, f"/jobs/{j}")["state"] == "CANCELED", 60, "the cancel")


def features(s: Settings, users: list[str], items: list[str], categories: list[str]) -> dict[str, object]:
    """Everything the feature job wrote for these entities, as serving reads it."""
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    client = redis.Redis.from_url(s.redis_url)
    rows = reader.read([("user_recent", u) for u in users] + [(v, i) for v in ("item_recent", "item_covisit")
                                                              for i in items])
    lists = client.mget([trending_key(s.feast_project, c) for c in ["", *categories]])
    return {"rows": rows, "trending": [json.loads(raw)["items"] if raw else None for raw in lists]}


def test_parallelism_two_writes_the_features_of_parallelism_one(cluster: StandaloneCluster,
                                                                 make_settings: Callable[[str], Settings]) -> None:
    wait_until(lambda: taskmanagers(cluster) == 1, 120, "a TaskManager to register")
    cancel_running(cluster)  # two slots: this test's jobs, one at a time
    one, two = (make_settings(f"clp{p}").replace(flink_jobmanager=cluster.address, flink_mode="cluster",
                                                 features="features.none", parallelism=p) for p in (1, 2))
    two = two.replace(events_topic=one.events_topic, dlq_topic=one.dlq_topic)  # one log, two projects
    events = generated("clp-", 400, seed=23, n_categories=12)  # trending's keys: a category's items share one
    produce(one, events)
    users, items = sorted({e.user_id for e in events}), sorted({e.item_id for e in events})
    categories = sorted({e.category_id for e in events if e.category_id})
    assert len(categories) > 1

    submit(cluster, one)
    spec = Spec.of(one)
    want = [user_features(events, u, spec)["views"] for u in users] + [
        item_features(events, i, spec)["events"] for i in items]

    def counted() -> bool:
        rows = features(one, users, items, categories)["rows"]
        return [(r or {}).get("views") for r in rows[:len(users)]] + [
            (r or {}).get("events") for r in rows[len(users):len(users) + len(items)]] == want

    wait_until(counted, 90, "parallelism 1's features to count every event")
    # co-visitation and the trending lists follow on their flush ticks: wait until they hold still
    previous: list[dict[str, object]] = [{}]

    def still() -> dict[str, object] | None:
        now = features(one, users, items, categories)
        same, previous[0] = now == previous[0], now
        return now if same and all(now["trending"]) else None

    expected = wait_until(still, 60, "parallelism 1's features to settle", every=2.0)
    cancel_running(cluster)

    job = submit(cluster, two)
    vertices = {v["name"]: v["parallelism"] for v in rest(cluster, f"/jobs/{job}")["vertices"]}
    assert set(vertices.values()) == {2}, vertices
    try:
        wait_until(lambda: features(two, users, items, categories) == expected, 120,
                   "parallelism 2's features to equal parallelism 1's")
    except AssertionError:
        assert features(two, users, items, categories) == expected  # pytest shows where they differ
    # and the work spread: both subtasks of every operator had records (a constant key sends all
    # to one), but the global trending list's merge, which gets a row per shard and tick
    spread_over_subtasks(cluster, job, lambda name, counts: name != "trending")
    cancel_running(cluster)


def records_per_subtask(c: StandaloneCluster, job: str) -> dict[str, list[int]]:
    """Each operator's records read, per subtask (sources left out). Flink's REST metrics lag a
    few seconds."""
    vertices = [v for v in rest(c, f"/jobs/{job}")["vertices"] if not v["name"].startswith("Source:")]
    return {v["name"]: [t["metrics"]["read-records"] for t in rest(c, f"/jobs/{job}/vertices/{v['id']}")["subtasks"]]
            for v in vertices}


def spread_over_subtasks(c: StandaloneCluster, job: str, applies: Callable[[str, list[int]], bool]) -> None:
    """Both subtasks of every operator that ``applies`` read records."""
    def lopsided() -> dict[str, list[int]]:
        return {name: counts for name, counts in records_per_subtask(c, job).items()
                if applies(name, counts) and min(counts) == 0}

    try:
        # REST metrics come from the TaskManagers every 10 s; a subtask's may lag behind another's
        wait_until(lambda: not lopsided(), 60, "records in both subtasks of every operator", every=2.0)
    except AssertionError:
        assert not lopsided()  # pytest shows the operators whose records sat in one subtask


def catalogue_values(s: Settings, events: list[BehaviorEvent]) -> dict[str, dict[str, list[Any]]]:
    """Every definition's online value for every entity of the events, read through Feast as
    the API reads them."""
    store = feature_store(s)
    defs = load(s.features)
    out = {}
    for kind in {d.entity_kind for d in defs}:
        keys = sorted({tuple(getattr(e, k) for k in kind.join_keys) for e in events
                       if all(getattr(e, k) for k in kind.join_keys)})
        names = [d.name for d in defs if d.entity_kind == kind]
        got = store.get_online_features(features=[f"{n}:{n}" for n in names],
                                        entity_rows=[dict(zip(kind.join_keys, k, strict=True)) for k in keys])
        out[kind.name] = got.to_dict()
    return out


def test_catalogue_job_at_parallelism_two_writes_what_parallelism_one_writes(
        cluster: StandaloneCluster, make_settings: Callable[[str], Settings]) -> None:
    """The default catalogue, SQL operators and Java entity operators alike, keyed by entity: two
    subtasks of each write what one writes, and both have work."""
    wait_until(lambda: taskmanagers(cluster) == 1, 120, "a TaskManager to register")
    cancel_running(cluster)
    # The default idle timeout: the catalogue job starts slower than a short one allows, and a
    # partition still unread would count as idle (the watermark would pass its events).
    one, two = (make_settings(f"clc{p}").replace(flink_jobmanager=cluster.address, flink_mode="cluster",
                                                 features="features.catalog", parallelism=p, idle_timeout_ms=30_000)
                for p in (1, 2))
    two = two.replace(events_topic=one.events_topic, dlq_topic=one.dlq_topic)  # one log, two projects
    # 40 categories: the category kind's operators key by (category, pane), and with 6 every key
    # sometimes hashed to one subtask (its pane, an hour of event time, follows the clock)
    events = generated("clc-", 400, seed=24, n_categories=40)
    produce(one, events)
    views = Counter((e.user_id, "user") for e in events if e.behavior == "view")
    views.update((e.item_id, "item") for e in events if e.behavior == "view")

    submit(cluster, one, job="catalogue_job")

    def counted() -> dict[str, dict[str, list[Any]]] | None:
        now = catalogue_values(one, events)
        got = [(v or 0) for v in now["user"]["user_views_1h"]] + [(v or 0) for v in now["item"]["item_views_1h"]]
        want = [views[(u, "user")] for u in now["user"]["user_id"]] + [views[(i, "item")]
                                                                       for i in now["item"]["item_id"]]
        return now if got == want else None

    wait_until(counted, 120, "parallelism 1's view counts to count every event")
    # the Python operators' rows (distinct counts, last-N, co-visitation) follow on their own
    # flushes: wait until everything holds still
    previous: list[object] = [None]

    def still() -> dict[str, dict[str, list[Any]]] | None:
        now = catalogue_values(one, events)
        same, previous[0] = now == previous[0], now
        return now if same else None

    expected = wait_until(still, 60, "parallelism 1's values to settle", every=2.0)
    assert any(expected["item"]["item_covisited_1d"]) and all(expected["user"]["user_last_categories"])
    cancel_running(cluster)

    job = submit(cluster, two, job="catalogue_job")
    vertices = {v["name"]: v["parallelism"] for v in rest(cluster, f"/jobs/{job}")["vertices"]}
    assert set(vertices.values()) == {2}, vertices
    try:
        wait_until(lambda: catalogue_values(two, events) == expected, 120,
                   "parallelism 2's values to equal parallelism 1's")
    except AssertionError:
        assert catalogue_values(two, events) == expected  # pytest shows where they differ
    # Operators that saw a few records may by chance have them all in one subtask; a constant
    # key would send one a stream's every record.
    spread_over_subtasks(cluster, job, lambda name, counts: sum(counts) >= 50)
    cancel_running(cluster)
