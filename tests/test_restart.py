"""A feature job killed mid-stream resumes from its checkpoint and ends where an uninterrupted run ends."""

from __future__ import annotations

import signal
import time

import redis

from connectors.feast_redis import FeastRedisReader
from features.definitions import FEATURE_VIEWS
from streaming.flink import checkpoint_root, latest_checkpoint
from streaming.state import Spec
from tests.conftest import JobProcess, wait_until
from tests.expected import user_features
from tests.test_pipeline import generated, produce


def snapshot(reader: FeastRedisReader, users: list[str], items: list[str]) -> list:
    rows = reader.read([("user_recent", u) for u in users] + [("item_recent", i) for i in items]
                       + [("item_covisit", i) for i in items])
    return rows


def test_killed_job_resumes_from_checkpoint(make_settings, shared, reader) -> None:  # noqa: ANN001
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

    job = JobProcess(s)
    try:
        produce(s, events[:600])
        wait_until(lambda: latest_checkpoint(checkpoint_root(s, f"freshrec-features-{s.feast_project}")), 90,
                   "a completed checkpoint")
        job.check_alive()
        produce(s, events[600:900])  # mid-stream: some of these are processed, none checkpointed yet
        time.sleep(0.3)
        job.kill(signal.SIGKILL)
        produce(s, events[900:])
        job = JobProcess(s)  # resumes from the newest retained checkpoint
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
        assert "resuming from checkpoint" in job.log.read_text()
        time.sleep(2)  # and they stay equal: both jobs are done, not passing each other mid-way
        assert snapshot(own, users, items) == snapshot(reader, users, items)
    finally:
        job.kill(signal.SIGKILL)
