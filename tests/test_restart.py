"""A feature job killed mid-stream, again and again, resumes from its checkpoints and ends where an
uninterrupted run ends."""

from __future__ import annotations

import random
import signal
import threading
import time

import redis

from connectors.feast_redis import FeastRedisReader
from features.definitions import FEATURE_VIEWS
from jobs.topics import feature_job_id
from streaming.flink import checkpoint_root, latest_checkpoint
from streaming.state import Spec
from tests.conftest import JobProcess, wait_until
from tests.expected import user_features
from tests.test_pipeline import generated, produce


def snapshot(reader: FeastRedisReader, users: list[str], items: list[str]) -> list:
    rows = reader.read([("user_recent", u) for u in users] + [("item_recent", i) for i in items]
                       + [("item_covisit", i) for i in items])
    return rows


def test_job_killed_three_times_ends_as_an_uninterrupted_run(make_settings, shared, reader) -> None:  # noqa: ANN001
    s = make_settings("restart")
    # Spread over 80 users the events span ~420 s ending ~180 s ago: none in the future, and the
    # span well inside the shared job's allowed lateness (600 s) however unevenly its two
    # partitions are read. (Over 25 users they spanned 880 s, up to 280 s ahead; when one
    # partition ran ahead, the shared job rightly refused the other's oldest events as late.)
    events = generated("rs-", 1200, seed=11, n_users=80)
    users = sorted({e.user_id for e in events})
    items = sorted({e.item_id for e in events})
    own = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)

    # The uninterrupted run: the session's job, over the same events.
    produce(shared, events)

    # The replay runs on its own, a little each second, while the job is killed at random points
    # three times; its last 200 events wait for the third kill, so that every kill is mid-replay.
    kills_done = threading.Event()

    def replay_log() -> None:
        for i in range(0, len(events) - 200, 25):
            produce(s, events[i:min(i + 25, len(events) - 200)])
            time.sleep(1.0)
        kills_done.wait(300)
        produce(s, events[-200:])

    replay = threading.Thread(target=replay_log)
    job = JobProcess(s)
    replay.start()
    rng = random.Random(7)
    root = checkpoint_root(s, feature_job_id(s))
    try:
        for kill in range(3):
            # Each run gets as far as a checkpoint of its own, then dies at a random moment after it.
            before = latest_checkpoint(root)
            wait_until(lambda: job.check_alive() or latest_checkpoint(root) != before, 90,  # noqa: B023
                       f"run {kill + 1} to complete a checkpoint")
            time.sleep(rng.uniform(0.0, 1.5))
            job.kill(signal.SIGKILL)
            job = JobProcess(s)  # resumes from the newest retained checkpoint
            assert job.log.read_text().count("resuming from checkpoint") == kill + 1
        kills_done.set()
        replay.join()
        expected = [user_features(events, u, Spec.of(s)) for u in users]
        wait_until(lambda: [{k: (r or {}).get(k) for k in e} for e, r in
                            zip(expected, reader.read([("user_recent", u) for u in users]), strict=True)] == expected,
                   120, "the uninterrupted run to finish")
        try:
            wait_until(lambda: snapshot(own, users, items) == snapshot(reader, users, items), 120,
                       "the restarted job's features to equal the uninterrupted run's")
        except AssertionError:
            keys = [("user_recent", u) for u in users] + [("item_recent", i) for i in items] + [
                ("item_covisit", i) for i in items]
            diff = [(k, a, b) for k, a, b in zip(keys, snapshot(own, users, items), snapshot(reader, users, items),
                                                 strict=True) if a != b]
            raise AssertionError(f"{len(diff)} of {len(keys)} rows differ, e.g. {diff[:3]}\n"
                                 f"{job.log.read_text()[-2000:]}") from None
        time.sleep(2)  # and they stay equal: both jobs are done, not passing each other mid-way
        assert snapshot(own, users, items) == snapshot(reader, users, items)
    finally:
        kills_done.set()
        replay.join()
        job.kill(signal.SIGKILL)
