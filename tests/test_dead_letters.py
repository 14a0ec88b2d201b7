"""Bad events never vanish: each lands in the DLQ with a reason naming the field; good ones count once."""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from kafka import KafkaProducer

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer, consumer
from connectors.schema import BEHAVIOR_ALIASES, BEHAVIORS, MAX_ID_LENGTH, MIN_TS_MS, InvalidEvent, validate
from freshrec.config import Settings
from serving.app import create_app
from streaming.state import Spec
from tests.conftest import wait_until
from tests.expected import user_features


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

    # Too big is a refusal that names the limit, never a 503 a client would retry.
    huge = {**good(7, now_ms()), "context": "x" * 100_000}
    over = api.post("/events", json=[good(8, now_ms()), huge])
    assert over.status_code == 422 and over.json()["accepted"] == 1
    assert over.json()["errors"][0]["field"] == "payload" and "16,384" in over.json()["errors"][0]["reason"]
    body = api.post("/events", content=b"[" + b" " * s.max_body_bytes + b"]",
                    headers={"content-type": "application/json"})
    assert body.status_code == 413 and f"{s.max_body_bytes:,} bytes" in body.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it arrives
        yield b"["
        for _ in range(s.max_body_bytes // 65_536 + 1):
            yield b" " * 65_536
        yield b"]"

    assert api.post("/events", content=chunks(), headers={"content-type": "application/json"}).status_code == 413

    dead = read_dlq(s, 3)
    assert [d["field"] for d in dead] == ["behavior", "ts", "payload"]
    assert {d["source"] for d in dead} == {"producer", "api"}
    assert dead[2]["truncated"] and dead[2]["payload_bytes"] > 100_000 and '"context"' in dead[2]["payload"]


# -- a replay with 5% corrupted events, at volume ----------------------------------------------------
# Every corrupted payload carries its marker (bad-c<k>) in plain ASCII, so its DLQ record can be
# found among the other tests' whatever was done to the rest of it.

ID_FIELDS = ("user_id", "item_id")
NOT_AN_ID = st.one_of(st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                          max_size=2),
                      st.booleans(), st.floats(allow_nan=False))
NOT_A_TIME = [st.booleans(), st.lists(st.integers(), max_size=2), st.just(float("inf")), st.just(float("nan")),
              st.integers(max_value=MIN_TS_MS - 1), st.integers(min_value=int(time.time() * 1000) + 2 * 86_400_000),
              st.text(alphabet="abcxyz:-", min_size=1, max_size=20)]
KINDS = ["wrong_type", "missing", "huge", "control", "behavior", "time", "not_json", "not_object", "bad_utf8"]


@st.composite
def corrupted(draw: st.DrawFn, event: dict, kind: str, variant: int) -> tuple[bytes, str]:
    """``event`` broken in one way of ``kind`` (the caller cycles through them, so each kind and
    each way to break a time is there), and the field its reason must name."""
    marker = event["event_id"]
    if kind == "wrong_type":
        field = draw(st.sampled_from([*ID_FIELDS, "behavior"]))
        value = draw(NOT_AN_ID if field != "behavior" else st.one_of(st.integers(), st.lists(st.text(max_size=3))))
        return json.dumps({**event, field: value}).encode(), field
    if kind == "missing":
        field = draw(st.sampled_from([*ID_FIELDS, "behavior", "ts"]))
        return json.dumps({k: v for k, v in event.items() if k != field}).encode(), field
    if kind == "huge":
        field = draw(st.sampled_from(ID_FIELDS))
        size = draw(st.integers(min_value=MAX_ID_LENGTH + 1, max_value=200_000))
        return json.dumps({**event, field: "x" * size}).encode(), field
    if kind == "control":  # unicode is fine in an id; whitespace and control characters are not
        field = draw(st.sampled_from(ID_FIELDS))
        head = draw(st.text(alphabet=st.characters(categories=["L", "N"]), min_size=1, max_size=8))
        bad = draw(st.sampled_from(["\x00", "\n", "\t", " ", "\u2028", "\x7f"]))
        return json.dumps({**event, field: head + bad + head}, ensure_ascii=draw(st.booleans())).encode(), field
    if kind == "behavior":
        name = draw(st.text(min_size=1, max_size=30).filter(
            lambda b: b.strip().lower() not in BEHAVIORS and b.strip().lower() not in BEHAVIOR_ALIASES))
        return json.dumps({**event, "behavior": name}).encode(), "behavior"
    if kind == "time":
        return json.dumps({**event, "ts": draw(NOT_A_TIME[variant % len(NOT_A_TIME)])}).encode(), "ts"
    if kind == "not_json":
        cut = draw(st.integers(min_value=1, max_value=20))
        return json.dumps(event).encode()[:-cut], "payload"
    if kind == "not_object":
        return json.dumps([marker, draw(st.integers())]).encode(), "payload"
    return b'{"event_id": "' + marker.encode() + b'", ' + draw(st.binary(min_size=1, max_size=30)) + b"\xff\xfe", \
        "payload"


@settings(max_examples=1, phases=[Phase.generate], derandomize=True, deadline=None, database=None,
          suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_corrupted_replay_at_volume(shared: Settings, reader: FeastRedisReader, data: st.DataObject) -> None:
    rng = random.Random(5)
    now = now_ms()
    # 2,000 good events of 40 users within the last few minutes (inside the window), in time order.
    good = sorted(({"event_id": f"vol-g{k}", "user_id": f"vol-u{rng.randrange(40)}",
                    "item_id": f"vol-i{rng.randrange(150)}",
                    "behavior": rng.choice(("view", "view", "view", "click", "cart", "fav", "buy")),
                    "ts": now - 200_000 + rng.randrange(90_000)} for k in range(2_000)), key=lambda e: e["ts"])
    stream: list[tuple[bytes, bytes | None]] = [(json.dumps(e).encode(), e["user_id"].encode()) for e in good]
    for _ in range(10):  # out of order: moved later in the stream, their time unchanged
        i = rng.randrange(len(stream) - 300)
        stream.insert(i + rng.randrange(50, 300), stream.pop(i))
    for _ in range(15):  # duplicates: the same event again, later
        i = rng.randrange(len(stream) // 2)
        stream.insert(rng.randrange(i, len(stream)), stream[i])
    bad: dict[str, str] = {}  # marker -> the field its reason must name
    for k in range(70):
        template = {"event_id": f"bad-c{k}", "user_id": f"vol-u{k % 40}", "item_id": "vol-i0", "behavior": "view",
                    "ts": now - 150_000}
        payload, field = data.draw(corrupted(template, KINDS[k % len(KINDS)], k // len(KINDS)),
                                   label=f"corruption {k}")
        with pytest.raises(InvalidEvent) as refused:  # the producer's check agrees with the job's
            validate(payload)
        assert refused.value.field == field, (payload[:200], refused.value)
        bad[f"bad-c{k}"] = field
        stream.insert(rng.randrange(len(stream)), (payload, rng.choice([None, b"vol-u1"])))
    assert round((10 + 15 + 70 + 10) / (len(stream) + 10), 3) == 0.05  # 5% corrupted, the very late ones included

    raw = KafkaProducer(bootstrap_servers=shared.kafka_bootstrap, linger_ms=5)
    for payload, key in stream:
        raw.send(shared.events_topic, payload, key=key, timestamp_ms=now - 150_000)
    raw.flush()
    spec = Spec.of(shared)
    events = [validate(e) for e in good]
    users = sorted({e.user_id for e in events})
    want = {u: user_features(events, u, spec) for u in users}

    def counted() -> bool:
        rows = reader.read([("user_recent", u) for u in users])
        return all(r is not None and {k: r[k] for k in want[u]} == want[u] for u, r in zip(users, rows, strict=True))

    wait_until(counted, 120, "every good event to be counted, once")
    # Very late: behind the watermark by more than the allowed lateness (it has moved on by now).
    time.sleep(4)
    for k in range(10):
        late = {"event_id": f"bad-late{k}", "user_id": f"vol-u{k}", "item_id": "vol-i1", "behavior": "buy",
                "ts": now - 3 * shared.allowed_lateness_ms}
        raw.send(shared.events_topic, json.dumps(late).encode(), key=late["user_id"].encode(), timestamp_ms=late["ts"])
        bad[f"bad-late{k}"] = "ts"
    raw.flush()
    raw.close()

    found: dict[str, dict] = {}
    deadline = time.monotonic() + 90
    c = consumer(shared.kafka_bootstrap, shared.dlq_topic)
    try:
        while set(found) != set(bad) and time.monotonic() < deadline:
            for batch in c.poll(timeout_ms=500).values():
                for m in batch:
                    record = json.loads(m.value)
                    marker = re.search(r"bad-(?:c|late)\d+|vol-g\d+", record["payload"])
                    if marker and record["source"] == "feature_job":
                        assert marker[0] not in found, f"{marker[0]} reached the DLQ twice"
                        found[marker[0]] = record
    finally:
        c.close()
    assert not [m for m in found if m.startswith("vol-g")], "a good event went to the DLQ"
    assert set(found) == set(bad), f"missing from the DLQ: {sorted(set(bad) - set(found))[:5]}"
    for marker, field in bad.items():
        assert found[marker]["field"] == field and found[marker]["reason"], found[marker]
    assert all("late" in found[f"bad-late{k}"]["reason"] for k in range(10))
    assert counted()  # the late ones changed nothing
