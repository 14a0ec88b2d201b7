"""End to end: broker -> PyFlink feature job -> Redis (Feast layout) -> Feast and the API."""

from __future__ import annotations

import dataclasses
import json
import time

import redis
from fastapi.testclient import TestClient

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer
from connectors.schema import BehaviorEvent, validate
from connectors.simulator import simulate
from features.dsl import trending_key
from features.store import feature_store
from freshrec.config import Settings
from serving.app import create_app
from streaming.state import Ev, Neighbours, RecentViews, Spec
from tests.conftest import wait_until
from tests.expected import item_features, user_features


def produce(settings: Settings, events: list[BehaviorEvent]) -> None:
    with EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic) as p:
        for e in events:
            p.send_valid(e)


def generated(prefix: str, n: int, seed: int, n_users: int = 25, n_categories: int = 4) -> list[BehaviorEvent]:
    out = []
    start = int(time.time() * 1000) - 600_000  # recent, so later tests' events are not "late"
    for raw in simulate(n, n_users=n_users, n_items=60, n_categories=n_categories, seed=seed, events_per_second=2.0,
                        start_ms=start):
        raw.update(user_id=f"{prefix}u{raw['user_id']}", item_id=f"{prefix}i{raw['item_id']}",
                   event_id=f"{prefix}{raw['event_id']}")
        out.append(validate(raw))
    return out


def test_features_match_independent_counts(shared: Settings, reader: FeastRedisReader) -> None:
    # A short window so that some events fall out of it.
    events = generated("e2e-", 800, seed=3)
    assert events[-1].ts - events[0].ts > shared.window_seconds * 1000 / 4
    produce(shared, events)
    users = sorted({e.user_id for e in events})
    items = sorted({e.item_id for e in events})
    spec = Spec.of(shared)
    want_users = {u: user_features(events, u, spec) for u in users}
    want_items = {i: item_features(events, i, spec) for i in items}

    def settled() -> bool:
        got = reader.read([("user_recent", u) for u in users] + [("item_recent", i) for i in items])
        got_users = [{k: g[k] for k in want_users[u]} if g else None for u, g in zip(users, got, strict=False)]
        got_items = [{k: g[k] for k in want_items[i]} if g else None for i, g in zip(items, got[len(users):],
                                                                                     strict=True)]
        return got_users == [want_users[u] for u in users] and got_items == [want_items[i] for i in items]

    wait_until(settled, 120, "the job's user and item features to equal the independent counts")

    # Co-visitation: the job's batched pair records against the state classes fed pair by pair.
    views: dict[str, RecentViews] = {}
    neighbours: dict[str, Neighbours] = {}
    for e in sorted(events, key=lambda e: (e.ts, e.event_id)):
        if e.behavior == "view":
            ev = Ev.of(e)
            for a, b, at, gap in views.setdefault(e.user_id, RecentViews()).add(ev, spec):
                neighbours.setdefault(a, Neighbours()).add(b, at, spec, gap)
    assert max(len(v.views) for v in views.values()) < shared.covisit_max_views  # no cut: order-free
    want_covisit = [neighbours[i].features(spec) for i in sorted(neighbours)]
    wait_until(lambda: [{k: (r or {}).get(k) for k in w} for r, w in
                        zip(reader.read([("item_covisit", i) for i in sorted(neighbours)]), want_covisit,
                            strict=True)] == want_covisit, 60,
               "the job's co-visitation neighbours to equal the state fed pair by pair")

    # The same values through Feast's own online read.
    store = feature_store(shared)
    some = users[:5]
    got = store.get_online_features(
        ["user_recent:views", "user_recent:buys", "user_recent:last_viewed_items"],
        [{"user_id": u} for u in some]).to_dict()
    assert got["views"] == [want_users[u]["views"] for u in some]
    assert got["buys"] == [want_users[u]["buys"] for u in some]
    assert got["last_viewed_items"] == [want_users[u]["last_viewed_items"] for u in some]


def test_recommendations_follow_covisitation(shared: Settings) -> None:
    base = int(time.time() * 1000) - 300_000
    history = []
    # Five users view A then B a minute apart: B becomes A's co-visitation neighbour.
    for u in range(5):
        for j, item in enumerate(("rec-A", "rec-B")):
            history.append(validate({"event_id": f"rec-{u}-{j}", "user_id": f"rec-u{u}", "item_id": item,
                                     "behavior": "view", "ts": base + u * 1000 + j * 60_000}))
    produce(shared, history)
    api = TestClient(create_app(shared))

    before = api.get("/recommendations", params={"user_id": "rec-new", "k": 50}).json()
    assert before["known_user"] is False  # unknown users still get an answer (trending)
    assert all("covisit" not in "".join(i["sources"]) for i in before["items"])

    produce(shared, [validate({"event_id": "rec-new-1", "user_id": "rec-new", "item_id": "rec-A",
                               "behavior": "view", "ts": base + 200_000})])

    def recommends_b() -> dict | None:
        body = api.get("/recommendations", params={"user_id": "rec-new", "k": 5}).json()
        top = {i["item_id"]: i for i in body["items"]}
        return body if "rec-B" in top and "covisit:rec-A" in top["rec-B"]["sources"] else None

    body = wait_until(recommends_b, 60, "rec-B to be recommended after viewing rec-A")
    assert body["known_user"] is True
    assert body["features"]["user_recent"] == base + 200_000
    assert body["items"][0]["item_id"] == "rec-B"


def test_the_job_keeps_a_trending_list_per_category(shared: Settings) -> None:
    base = int(time.time() * 1000) - 10_000  # after the earlier tests' events: not late
    plan = {("ct-a", "ct-i1"): 3, ("ct-a", "ct-i2"): 1, ("ct-a", "ct-i3"): 2, ("ct-b", "ct-i4"): 2}
    produce(shared, [validate({"event_id": f"{item}-{n}", "user_id": f"ct-u{n}", "item_id": item,
                               "category_id": category, "behavior": "view", "ts": base + 1000 * n})
                     for (category, item), count in plan.items() for n in range(count)])
    client = redis.Redis.from_url(shared.redis_url)

    def lists() -> dict[str, list[list[object]] | None]:
        raw = {c: client.get(trending_key(shared.feast_project, c)) for c in ("ct-a", "ct-b")}
        return {c: json.loads(v)["items"] if v else None for c, v in raw.items()}

    want = {"ct-a": [["ct-i1", 3], ["ct-i3", 2], ["ct-i2", 1]], "ct-b": [["ct-i4", 2]]}
    wait_until(lambda: lists() == want, 60, f"the job's per-category trending lists to be {want}")


def test_api_rejects_bad_requests(shared: Settings) -> None:
    api = TestClient(create_app(dataclasses.replace(shared)))
    assert api.get("/healthz").json() == {"status": "ok"}
    assert api.get("/recommendations", params={"user_id": "x", "k": 0}).status_code == 422
    assert api.get("/recommendations").status_code == 422
    assert "/recommendations" in api.get("/openapi.json").json()["paths"]
