"""Bad events never vanish: each lands in the DLQ with a reason naming the field."""

from __future__ import annotations

import json
import time

from fastapi.testclient import TestClient
from kafka import KafkaProducer

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer, consumer
from freshrec.config import Settings
from serving.app import create_app
from tests.conftest import wait_until


def now_ms() -> int:
    return int(time.time() * 1000)


def good(n: int, ts: int) -> dict:
    return {"event_id": f"dlq-ok-{n}", "user_id": "dlq-u1", "item_id": f"dlq-i{n}", "behavior": "view", "ts": ts}


# (payload, field the reason must name)
BAD = [
    (b"{not json", "payload"),
    (b"[1, 2, 3]", "payload"),
    (json.dumps({"item_id": "i", "behavior": "view", "ts": 1_700_000_000_000}).encode(), "user_id"),
    (json.dumps({"user_id": "u", "behavior": "view", "ts": 1_700_000_000_000}).encode(), "item_id"),
    (json.dumps({"user_id": {"a": 1}, "item_id": "i", "behavior": "view", "ts": 1_700_000_000_000}).encode(),
     "user_id"),
    (json.dumps({"user_id": "u", "item_id": "i", "behavior": "like", "ts": 1_700_000_000_000}).encode(), "behavior"),
    (json.dumps({"user_id": "u", "item_id": "i", "behavior": "view"}).encode(), "ts"),
    (json.dumps({"user_id": "u", "item_id": "i", "behavior": "view", "ts": "soon"}).encode(), "ts"),
    (json.dumps({"user_id": "u", "item_id": "i", "behavior": "view", "ts": 1_511_658}).encode(), "ts"),
    (json.dumps({"user_id": "u", "item_id": "i", "behavior": "view", "ts": 99_999_999_999_999}).encode(), "ts"),
    (json.dumps({"user_id": "u" * 500, "item_id": "i", "behavior": "view", "ts": 1_700_000_000_000}).encode(),
     "user_id"),
    (json.dumps({"user_id": "ü\x00", "item_id": "i", "behavior": "view", "ts": 1}).encode(), "user_id"),
    (b"\xff\xfe\x00garbage", "payload"),
]


def read_dlq(settings: Settings, want: int, timeout: float = 60) -> list[dict]:
    c = consumer(settings.kafka_bootstrap, settings.dlq_topic, consumer_timeout_ms=1000)
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while len(got) < want and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                got.extend(json.loads(m.value) for m in batch)
    finally:
        c.close()
    return got


def test_job_routes_malformed_events_to_dlq(shared: Settings, reader: FeastRedisReader) -> None:
    raw = KafkaProducer(bootstrap_servers=shared.kafka_bootstrap)
    t = now_ms() - 60_000
    key = b"dlq-u1"  # one partition, so the DLQ keeps the order they were sent in
    sends = [raw.send(shared.events_topic, json.dumps(good(0, t)).encode(), key=key, timestamp_ms=t)]
    for payload, _ in BAD:  # written straight to the topic, bypassing producer-side checks
        sends.append(raw.send(shared.events_topic, payload, key=key, timestamp_ms=t))
    sends.append(raw.send(shared.events_topic, json.dumps(good(1, t + 1)).encode(), key=key, timestamp_ms=t + 1))
    raw.flush()
    for f in sends:
        f.get(10)

    wait_until(lambda: (reader.read([("user_recent", "dlq-u1")])[0] or {}).get("views") == 2, 60,
               "both good events around the bad ones to be counted")
    # An event far behind the watermark is late: to the DLQ, not silently into old windows.
    time.sleep(4)  # watermarks are emitted periodically (200 ms) and idle partitions time out (3 s)
    late = good(2, t - 2 * shared.allowed_lateness_ms)
    raw.send(shared.events_topic, json.dumps(late).encode(), key=key, timestamp_ms=late["ts"]).get(10)
    raw.close()

    dead = read_dlq(shared, len(BAD) + 1)
    from_job = [d for d in dead if d["source"] == "feature_job"]
    assert len(from_job) == len(BAD) + 1
    for (payload, field), record in zip(BAD, from_job, strict=False):
        assert record["field"] == field, record
        assert record["reason"]
        assert record["payload"].encode() == payload or payload.startswith(b"\xff")  # kept whole
    assert from_job[-1]["field"] == "ts" and "late" in from_job[-1]["reason"]
    assert (reader.read([("user_recent", "dlq-u1")])[0] or {})["views"] == 2


def test_producer_and_api_refuse_bad_events(make_settings) -> None:  # noqa: ANN001
    s = make_settings("ingest")
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
        p.send({"user_id": "u", "item_id": "i", "behavior": "pv", "timestamp": 1511658000})
        p.send({"user_id": "u", "item_id": "i", "behavior": "unknown", "ts": 1_700_000_000_000})
    assert (p.stats.accepted, p.stats.rejected) == (1, 1)

    api = TestClient(create_app(s))
    ok = api.post("/events", json=[good(5, now_ms())])
    assert ok.status_code == 200 and ok.json()["accepted"] == 1
    bad = api.post("/events", json=[good(6, now_ms()), {"user_id": "u", "item_id": "i", "behavior": "view"}])
    assert bad.status_code == 422
    assert bad.json()["errors"] == [{"index": 1, "field": "ts", "reason": bad.json()["errors"][0]["reason"]}]
    assert bad.json()["accepted"] == 1
    assert api.post("/events", json={"not": "a list"}).status_code == 422

    dead = read_dlq(s, 2)
    assert [d["field"] for d in dead] == ["behavior", "ts"]
    assert {d["source"] for d in dead} == {"producer", "api"}
