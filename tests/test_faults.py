"""Fault tolerance of the embedded stack: the broker and Redis die mid-run, the stack restarts
them, every component carries on by itself, and ``freshrec status`` says what happened.

One whole stack of its own (``Stack.start``: broker, Redis, the feature job, the offline-store
writer, the trainer, the API as processes), driven through the same ``supervise`` the
``freshrec up`` loop calls.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pyarrow.parquet as pq
import pytest
import redis
from kafka import KafkaConsumer, TopicPartition
from kafka.structs import OffsetAndMetadata

from connectors.embedded import free_port, start_broker
from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer, log_ends, producer
from connectors.log_epoch import EpochWatch, ensure_log, read_epoch
from connectors.offline_store import OfflineWriter
from connectors.schema import BehaviorEvent
from features.definitions import FEATURE_VIEWS
from features.store import repo_dir
from freshrec.config import Settings
from freshrec.stack import STATE, Stack, forget
from jobs.topics import epoch_topic, examples_topic, feature_log_topic, offline_group, topic_plan
from online_learning.publish import ParameterStore
from serving.status import LogOffsets, collect, recent_events, render
from streaming.definitions import final_row
from streaming.state import Spec
from tests.conftest import wait_until
from tests.expected import user_features
from tests.test_pipeline import generated


def test_log_epoch_changes_only_when_the_broker_loses_its_log(tmp_path: Path) -> None:
    port = free_port()
    bootstrap = f"127.0.0.1:{port}"
    broker = start_broker(tmp_path / "b1", port)
    watch = None
    try:
        first = ensure_log(bootstrap, {"ep-events": 2}, "ep-events-epoch")
        assert ensure_log(bootstrap, {"ep-events": 2}, "ep-events-epoch") == first  # idempotent
        watch = EpochWatch(bootstrap, {"ep-events": 2}, "ep-events-epoch", every_ms=100)
        time.sleep(0.5)
        assert watch.changed() is None
        broker.kill()
        wait_until(lambda: watch.unreachable_since is not None, 20, "the watch to notice the broker is gone")
        assert watch.changed() is None  # down is not a new log
        broker = start_broker(tmp_path / "b2", port)  # memory only: comes back empty
        new = wait_until(watch.changed, 30, "the watch to see a new epoch")
        assert new != first and watch.current == new
        assert read_epoch(bootstrap, "ep-events-epoch") == new  # the watch made the log again
    finally:
        if watch is not None:
            watch.close()
        broker.stop()


def test_the_offline_store_reads_a_new_log_from_its_start_whatever_was_committed_to_it(tmp_path: Path) -> None:
    """A writer that has not yet noticed the broker lost its log commits the old log's positions
    to the new broker; the new log's first rows must not be skipped for them."""
    port = free_port()
    s = Settings(kafka_bootstrap=f"127.0.0.1:{port}", state_dir=tmp_path / "state", feast_project="offep",
                 events_topic="offep-events", dlq_topic="offep-dlq", broker_check_ms=200)
    log = feature_log_topic(s)

    def feature_rows(users: list[str]) -> None:
        p = producer(s.kafka_bootstrap)
        for u in users:
            p.send(log, final_row("user_recent", u, int(time.time() * 1000), {"views": 1}).encode())
        p.flush()
        p.close()

    broker = start_broker(tmp_path / "b1", port)
    try:
        old = ensure_log(s.kafka_bootstrap, topic_plan(s), epoch_topic(s))
        before = [f"a{k}" for k in range(5)]
        feature_rows(before)
        assert OfflineWriter(s, flush_s=0.2).run(stop_after_idle_s=1) == 5
        broker.kill()
        broker = start_broker(tmp_path / "b2", port)  # memory only: comes back empty
        ensure_log(s.kafka_bootstrap, topic_plan(s), epoch_topic(s))
        after = [f"b{k}" for k in range(8)]
        feature_rows(after)
        late = KafkaConsumer(bootstrap_servers=s.kafka_bootstrap, group_id=offline_group(s, old.id),
                             enable_auto_commit=False)
        late.commit({TopicPartition(log, 0): OffsetAndMetadata(5, "", -1)})  # the old log's position
        late.close()
        assert OfflineWriter(s, flush_s=0.2).run(stop_after_idle_s=1) == 8
        assert _offline_users(s) == set(before) | set(after)
    finally:
        broker.stop()


def test_log_ends_reads_past_the_brokers_answer_and_returns_on_a_busy_topic(broker) -> None:  # noqa: ANN001
    bootstrap = f"127.0.0.1:{broker.port}"
    ensure_log(bootstrap, {"ends-t": 1}, "ends-t-epoch")
    p = producer(bootstrap)
    for _ in range(3):  # three batches: the broker's own answer stops at the first of the last
        for _ in range(100):
            p.send("ends-t", b"x")
        p.flush()
    c = KafkaConsumer(bootstrap_servers=bootstrap)
    tp = TopicPartition("ends-t", 0)
    assert log_ends(c, [tp])[tp] == 300
    busy = threading.Event()

    def write() -> None:
        while not busy.is_set():
            p.send("ends-t", b"y")
            time.sleep(0.001)

    writer = threading.Thread(target=write)
    writer.start()
    try:
        started = time.monotonic()
        assert log_ends(c, [tp])[tp] >= 300
        assert time.monotonic() - started < 5, "log_ends waited for a log that never stops growing"
    finally:
        busy.set()
        writer.join()
        c.close()
        p.close()


def _expected(events: list[BehaviorEvent], spec: Spec) -> dict[str, dict]:
    return {u: user_features(events, u, spec) for u in sorted({e.user_id for e in events})}


def _features(reader: FeastRedisReader, want: dict[str, dict]) -> dict[str, dict | None]:
    rows = reader.read([("user_recent", u) for u in want])
    return {u: ({k: r[k] for k in want[u]} if r else None) for u, r in zip(want, rows, strict=True)}


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:  # also while it loads its data
        return False


def _jobs_running(ui: str) -> int | None:
    try:
        # While its JVM starts: no answer, then {"errors": [...]} until the dispatcher is up.
        return httpx.get(ui + "/overview", timeout=5).json().get("jobs-running")
    except httpx.HTTPError:
        return None


def _model(stack: Stack) -> dict | None:
    try:
        return httpx.get(stack.api_url + "/model", timeout=2).json()
    except httpx.HTTPError:
        return None


def _log_says(stack: Stack, name: str, text: str) -> bool:
    return text in (stack.log_dir / f"{name}.log").read_text(errors="replace")


def _offline_users(settings: Settings) -> set[str]:
    files = (repo_dir(settings) / "offline" / "user_recent").glob("date=*/part-*.parquet")
    return {u for f in files for u in pq.read_table(f, columns=["user_id"]).column("user_id").to_pylist()}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    settings = Settings(state_dir=tmp_path_factory.mktemp("faults") / "stack", feast_project="faults",
                        api_port=free_port(), checkpoint_interval_ms=1000, window_seconds=120, window_pane_seconds=10,
                        idle_timeout_ms=3000, out_of_orderness_ms=500, broker_check_ms=500,
                        gate_margin=1.0)  # the quality gate is tested elsewhere: here every version goes out
    s = Stack.start(settings, log=lambda m: None)
    yield s
    started = time.monotonic()
    s.stop()
    assert time.monotonic() - started < 40, "stopping the stack hung"
    assert not any(p.poll() is None for p in s.procs.values())


def test_stack_carries_on_through_broker_and_redis_restarts(stack: Stack) -> None:
    s = stack.settings
    spec = Spec.of(s)
    client = redis.Redis.from_url(s.redis_url)
    reader = FeastRedisReader(client, s.feast_project, FEATURE_VIEWS)
    params = ParameterStore(client, s.feast_project)
    job_pid = stack.procs["feature_job"].pid

    def produce(events: list[BehaviorEvent]) -> None:
        with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
            for e in events:
                p.send_valid(e)

    # 1. Before anything fails: features, a published model, offline rows.
    before = generated("fa-", 300, seed=21, n_users=15)
    produce(before)
    want_before = _expected(before, spec)
    wait_until(lambda: _features(reader, want_before) == want_before, 120, "the first events' features")
    wait_until(lambda: (params.get(params.head() or 0) or None) is not None, 60, "a published model")
    first_epoch = read_epoch(s.kafka_bootstrap, f"{s.events_topic}-epoch")
    assert first_epoch is not None

    # 2. The broker dies (SIGKILL) and comes back empty.
    took: dict[str, float] = {}  # for the README's report: printed, not asserted (these machines are noisy)
    t0 = time.monotonic()
    stack.services[0].kill()
    restarted = stack.supervise(log=lambda m: None)
    assert [e["component"] for e in restarted] == ["broker"]
    new_epoch = read_epoch(s.kafka_bootstrap, f"{s.events_topic}-epoch")
    assert new_epoch is not None and new_epoch != first_epoch

    after = generated("fb-", 300, seed=22, n_users=15)
    produce(after)
    want_after = _expected(after, spec)
    wait_until(lambda: _features(reader, want_after) == want_after, 180,
               "the job to read the new log from its start")
    took["broker killed -> the new log's events counted"] = time.monotonic() - t0
    assert stack.procs["feature_job"].pid == job_pid, "the job recovered by itself, not by being restarted"
    assert _log_says(stack, "feature_job", "the event log was replaced")
    assert _features(reader, want_before) == want_before  # what was counted before stays

    # The API's producer reconnects (its first try after the restart may be refused with a 503).
    api_event = {"event_id": "fb-api-1", "user_id": "fb-api-u", "item_id": "fb-api-i", "behavior": "view",
                 "ts": int(time.time() * 1000)}
    wait_until(lambda: httpx.post(f"{stack.api_url}/events", json=[api_event], timeout=30).status_code == 200,
               60, "POST /events to be accepted again")
    wait_until(lambda: (reader.read([("user_recent", "fb-api-u")])[0] or {}).get("views") == 1, 60,
               "the API's event to be counted")

    # The trainer reads the new examples topic from its start and publishes under the new epoch.
    wait_until(lambda: _log_says(stack, "trainer", "the broker lost its log"), 30, "the trainer to notice")
    wait_until(lambda: (params.get(params.head()) or None) is not None
               and params.get(params.head()).meta.get("epoch") == new_epoch.id, 60,
               "a version published with the new log's offsets")
    # The offline store writes the new log's rows too.
    wait_until(lambda: set(want_after) <= _offline_users(s), 60, "the new log's rows in the offline store")
    assert set(want_before) <= _offline_users(s)

    # 3. Redis stops while events flow, and comes back from its append-only file.
    t0 = time.monotonic()
    stack.services[1].stop()
    later = generated("fc-", 200, seed=23, n_users=10)
    produce(later)
    time.sleep(2)  # the job's sink meets the closed port, and retries
    restarted = stack.supervise(log=lambda m: None)
    assert [e["component"] for e in restarted] == ["redis"]
    wait_until(lambda: _answers(client), 30, "Redis to load its append-only file")
    want_later = _expected(later, spec)
    wait_until(lambda: _features(reader, want_later) == want_later, 120, "the job to catch up after Redis")
    took["Redis stopped (2 s down) -> events sent meanwhile counted"] = time.monotonic() - t0
    assert _features(reader, want_before) == want_before and _features(reader, want_after) == want_after
    assert _log_says(stack, "feature_job", "Redis unreachable")
    assert all(p.poll() is None for p in stack.procs.values()), "no component died of it"

    # 4. The trainer is SIGKILLed: the new one resumes at the newest published version and learns
    #    every example after that version's offsets exactly once (what the dead one had learned but
    #    not published is learned again: it never reached the published model).
    t0 = time.monotonic()
    os.killpg(stack.procs["trainer"].pid, signal.SIGKILL)
    stack.procs["trainer"].wait(10)
    resumed_at = params.head()
    resumed_from = params.get(resumed_at).meta["offsets"]
    assert [e["component"] for e in stack.supervise(log=lambda m: None)] == ["trainer"]
    produce(generated("fd-", 100, seed=24, n_users=10))
    wait_until(lambda: _log_says(stack, "trainer", f"resumed at version {resumed_at} "), 60, "the trainer to resume")
    examples = LogOffsets(s.kafka_bootstrap)
    try:
        def caught_up() -> bool:
            head = params.get(params.head())
            ends = examples.end(examples_topic(s))
            return head is not None and head.meta["offsets"] == {str(p): o for p, o in ends.items()}

        wait_until(caught_up, 90, "the restarted trainer to publish every example")
        took["trainer killed -> every example published again"] = time.monotonic() - t0
        head = params.get(params.head())
        total = sum(examples.end(examples_topic(s)).values())
        assert head.meta["examples"] == total - sum(resumed_from.values()), "an example learned twice or skipped"
    finally:
        examples.close()

    # 5. The API is SIGKILLed: its warm spare takes the port, on the current model from its first answer.
    wait_until(lambda: _log_says(stack, "api", "warm spare ready"), 60, "the API's warm spare")
    served = params.head()
    t0 = time.monotonic()
    os.killpg(stack.procs["api"].pid, signal.SIGKILL)
    stack.procs["api"].wait(10)
    assert [e["component"] for e in stack.supervise(log=lambda m: None)] == ["api"]
    first = wait_until(lambda: _model(stack), 30, "the spare to answer")
    took["API killed -> answers again"] = time.monotonic() - t0
    assert first["version"] >= served, "its first answer comes from the current model"
    assert stack.standby is not None, "and a new spare waits"

    # 6. `freshrec status` tells the story.
    doc = json.loads((s.state_dir / "stack.json").read_text())
    parts = {p.component: p for p in collect(s, doc)}
    assert all(parts[n].state == "up" for n in ("broker", "redis", "feature_job", "catalogue_job", "offline_store",
                                                "trainer", "api"))
    assert parts["broker"].figures["epoch"] == new_epoch.id
    assert parts["feature_job"].figures["checkpoint"].startswith("chk-")
    assert parts["feature_job"].figures["behind"] >= 0
    assert parts["catalogue_job"].figures["behind"] >= 0  # the default catalogue runs as a job of its own
    assert parts["trainer"].figures["published_version"] >= 1
    assert parts["api"].figures["served_version"] >= 1
    assert parts["dead letters"].figures["count"] == 0
    for job in ("feature_job", "catalogue_job"):  # each job's Flink web UI where `up` said, restarts included
        ui = parts[job].figures["web_ui"]
        assert ui == stack.flink_ui[job]
        # A job that restarted itself on the new log is back once its JVM has started (slow on a busy CI machine).
        wait_until(lambda ui=ui: _jobs_running(ui) == 1, 90, f"{job}'s web UI to show one running job")
    what = [(e["component"], e["what"]) for e in recent_events(s.state_dir)]
    assert [c for c, _ in what] == ["broker", "broker", "redis", "trainer", "api"]
    assert "warm spare" in what[4][1]
    assert "log is gone" in what[1][1] and "append-only" in what[2][1]
    text = render(list(parts.values()), recent_events(s.state_dir))
    assert "log epoch" in text and "restarted on port" in text
    print("\n".join(f"{what}: {seconds:.1f} s" for what, seconds in took.items()))


def test_supervisor_gives_up_on_a_part_that_keeps_dying(stack: Stack) -> None:
    """(Runs last on the module's stack: it leaves the offline-store writer dead.)"""
    from connectors.embedded import ServiceError
    from freshrec import stack as stack_module

    for _ in range(stack_module.RESTARTS):
        os.killpg(stack.procs["offline_store"].pid, signal.SIGKILL)
        stack.procs["offline_store"].wait(10)
        assert [e["component"] for e in stack.supervise(log=lambda m: None)] == ["offline_store"]
    os.killpg(stack.procs["offline_store"].pid, signal.SIGKILL)
    stack.procs["offline_store"].wait(10)
    with pytest.raises(ServiceError, match="offline_store exited .* not restarting it again"):
        stack.supervise(log=lambda m: None)


def test_a_new_stack_resumes_what_the_last_one_kept(stack: Stack) -> None:
    """`freshrec up` after `down` resumes: the jobs' state from their checkpoints (counts go on
    from where they were), features and model versions from Redis. (Runs last: it replaces the
    module's stack.)"""
    s = stack.settings
    first = generated("fr-", 200, seed=31, n_users=5)
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
        for e in first:
            p.send_valid(e)
    spec = Spec.of(s)
    client = redis.Redis.from_url(s.redis_url)
    reader = FeastRedisReader(client, s.feast_project, FEATURE_VIEWS)
    want = _expected(first, spec)
    wait_until(lambda: _features(reader, want) == want, 120, "the first stack's features")
    checkpoints = s.state_dir / "checkpoints"
    wait_until(lambda: len(list(checkpoints.glob("*/*/chk-*/_metadata"))) >= 2, 60, "both jobs' checkpoints")
    time.sleep(2 * s.checkpoint_interval_ms / 1000)  # one more, taken after the events were counted
    head = ParameterStore(client, s.feast_project).head()
    client.close()
    stack.stop()

    again = Stack.start(stack.settings, log=lambda m: None)
    try:
        a = again.settings
        client = redis.Redis.from_url(a.redis_url)
        reader = FeastRedisReader(client, a.feast_project, FEATURE_VIEWS)
        assert _features(reader, want) == want, "Redis kept the features"
        kept = ParameterStore(client, a.feast_project).head()  # the old trainer may publish once more as it stops
        assert kept is not None and head is not None and kept >= head, "and the model versions"
        wait_until(lambda: _log_says(again, "trainer", f"resumed at version {kept} "), 60, "the trainer to resume")
        second = generated("fr-", 100, seed=32, n_users=5)
        with EventProducer(a.kafka_bootstrap, a.events_topic, a.dlq_topic) as p:
            for e in second:
                p.send_valid(e)
        # Counted on top of the first stack's state: a job that started empty would count `second` alone.
        both = _expected(sorted(first + second, key=lambda e: e.ts), spec)
        assert both != _expected(second, spec)
        wait_until(lambda: _features(reader, both) == both, 120, "the second stack to count on top of the first")
        client.close()
    finally:
        again.stop()


def test_fresh_removes_what_a_stack_keeps(tmp_path: Path) -> None:
    for name in STATE:
        (tmp_path / name / "x").mkdir(parents=True)
    (tmp_path / "repo").mkdir()
    assert forget(tmp_path) == [tmp_path / name for name in STATE]
    assert [p.name for p in tmp_path.iterdir()] == ["repo"] and forget(tmp_path) == []
