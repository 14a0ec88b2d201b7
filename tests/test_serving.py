"""The ranking service on a real Redis: request path, versions (pinned, canary, blue-green,
rollback), admin key, metrics, degradation when Redis stops, and a schemathesis run.

The online state is seeded from a small simulated log (freshrec/seed.py: the job's state
classes and a model learned on the same log), so no Flink job is needed here.
"""

from __future__ import annotations

import gc
import json
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings

from connectors.embedded import Service, start_redis
from connectors.feast_redis import FeastRedisReader, FeastRedisWriter
from features.definitions import FEATURE_VIEWS
from features.dsl import load_ranking, trending_key
from features.registry import ranking_views
from freshrec.config import Settings
from freshrec.seed import seed_online_state
from online_learning.publish import ParameterStore
from online_learning.recommender import OnlineRecommender
from serving.app import create_app
from serving.candidates import POLICY
from serving.models import ServedModels, in_share
from serving.request_path import RequestPath, ranking_reader
from tests.conftest import wait_until

KEY = "test-admin-key"


def seeded(redis_url: str, project: str, workdir: Path) -> tuple[Settings, list[str]]:
    s = Settings(redis_url=redis_url, feast_project=project, state_dir=workdir / project, admin_api_key=KEY,
                 model_poll_ms=20, min_count=1)
    return s, seed_online_state(s, 4_000, n_users=300, n_items=1_000, seed=3)


@pytest.fixture(scope="module")
def served(redis_server: Service, workdir: Path) -> Iterator[tuple[Settings, list[str], TestClient]]:
    s, users = seeded(f"redis://127.0.0.1:{redis_server.port}/0", "srv", workdir)
    with TestClient(create_app(s)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "the API to load the seeded model")
        yield s, users, client


def store_of(s: Settings) -> ParameterStore:
    return ParameterStore(redis.Redis.from_url(s.redis_url), s.feast_project)


def test_request_path_stages_sources_and_versions(served: tuple[Settings, list[str], TestClient]) -> None:
    s, users, client = served
    head = store_of(s).head()
    body = client.get("/recommendations", params={"user_id": users[0], "k": 10, "debug": "true"}).json()
    assert body["model_version"] == head and body["model_role"] == "live" and not body["degraded"]
    assert body["known_user"] and len(body["items"]) == 10
    assert set(body["stages_ms"]) == {"user", "candidates", "features", "score", "rank"}
    assert 10 < body["candidates"] <= POLICY.cap
    assert body["features"]["user_recent"] and body["features"]["item_recent"]
    scores = [i["score"] for i in body["items"]]
    assert scores == sorted(scores, reverse=True)
    assert all(i["sources"] for i in body["items"])
    plain = client.get("/recommendations", params={"user_id": users[0], "k": 7})
    assert "stages_ms" not in plain.json()
    assert plain.json() == client.post("/recommendations", json={"user_id": users[0], "k": 7}).json()
    assert client.get("/recommendations", params={"user_id": users[0] + "\n"}).status_code == 422


def test_candidates_include_what_trends_in_the_users_top_categories(
        served: tuple[Settings, list[str], TestClient]) -> None:
    s, users, client = served
    path = client.app.state.path  # type: ignore[attr-defined]
    r = redis.Redis.from_url(s.redis_url)

    def listed(category: str) -> list[str]:
        raw = r.get(trending_key(s.feast_project, category))
        return [i for i, _ in json.loads(raw)["items"]] if raw else []

    rows = dict(zip(users, path.reader.read([("user_recent", u) for u in users]), strict=True))
    user, row = next((u, row) for u, row in rows.items() if row and row["top_categories"])
    assert sorted(path._in_categories(row["top_categories"])) == sorted(i for c in row["top_categories"]
                                                                       for i in listed(c))
    found = {i for i, _, src in path.recommend(user, POLICY.cap).items if "category" in src}
    assert found and found <= {i for c in row["top_categories"] for i in listed(c)}


def test_context_exclusions_pages_and_recent_buys(served: tuple[Settings, list[str], TestClient]) -> None:
    s, _, client = served
    writer = FeastRedisWriter(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    now = int(time.time() * 1000)
    neighbours = [f"ctx-n{i}" for i in range(30)]
    writer.write([("item_covisit", "ctx-anchor", now, {"neighbours": neighbours,
                                                        "neighbour_counts": list(range(30, 0, -1))}),
                  ("user_recent", "ctx-buyer", now, {"views": 1, "last_viewed_items": ["ctx-anchor"],
                                                     "last_bought_items": ["ctx-n0", "ctx-n1"]}),
                  ("user_recent", "ctx-browser", now, {"views": 1, "last_viewed_items": ["ctx-anchor"]})])

    def items(user: str, **extra: object) -> list[str]:  # k=200: every candidate, whatever its score
        r = client.post("/recommendations", json={"user_id": user, "k": 200, **extra})
        assert r.status_code == 200, r.text
        return [i["item_id"] for i in r.json()["items"]]

    browsed, bought = items("ctx-browser"), items("ctx-buyer")
    assert {"ctx-n0", "ctx-n1"} <= set(browsed)  # neighbours of what they viewed ...
    assert not {"ctx-n0", "ctx-n1"} & set(bought)  # ... except what they just bought
    assert "ctx-n2" not in items("ctx-browser", exclude=["ctx-n2"])
    on_screen = client.post("/recommendations", json={"user_id": "ctx-nobody", "k": 200,
                                                      "current_item": "ctx-anchor"}).json()["items"]
    assert {i["item_id"] for i in on_screen if "covisit:ctx-anchor" in i["sources"]} == set(neighbours)
    first, second = items("ctx-browser", k=5), items("ctx-browser", k=5, page=1)
    assert len(second) == 5 and not set(first) & set(second)
    assert "ctx-anchor" not in items("ctx-nobody", current_item="ctx-anchor")


def test_item_rows_join_both_item_views_in_one_read(served: tuple[Settings, list[str], TestClient]) -> None:
    """What the ranker gets per candidate: item_recent and item_covisit, one HMGET of the item's hash."""
    s, _, _ = served
    client = redis.Redis.from_url(s.redis_url)
    now = int(time.time() * 1000)
    FeastRedisWriter(client, s.feast_project, FEATURE_VIEWS).write([
        ("item_recent", "jn-a", now, {"views": 3, "events": 4}),
        ("item_covisit", "jn-a", now - 5, {"neighbours": ["jn-b"], "neighbour_counts": [2.5]}),
        ("item_covisit", "jn-b", now, {"neighbours": ["jn-a"], "neighbour_counts": [2.5]})])
    reader = FeastRedisReader(client, s.feast_project, FEATURE_VIEWS)
    both = reader.join("item_recent+item_covisit", ["item_recent", "item_covisit"])
    a, b = reader.read([(both, "jn-a"), (both, "jn-b")])
    assert a is not None and (a["views"], a["neighbours"], a["neighbour_counts"]) == (3, ["jn-b"], [2.5])
    assert a["_event_ts_ms"] == now  # item_recent's time
    assert b is None  # no item_recent row: a new item to the ranker
    with pytest.raises(ValueError, match="user_recent is keyed by .*item_recent by"):
        reader.join("mixed", ["user_recent", "item_recent"])


def test_the_request_path_reads_the_ranking_service_with_the_built_in_rows(
        served: tuple[Settings, list[str], TestClient]) -> None:
    """The analysts' definitions the ranker weighs (features/catalog.py ranking) come in the
    user's and each candidate's one HMGET, and the served model was trained on them."""
    s, _, api = served
    path: RequestPath = api.app.state.path
    _, inputs = ranking_reader(None, s)  # type: ignore[arg-type]  # what the service names
    assert inputs.user and inputs.item
    client = redis.Redis.from_url(s.redis_url)
    now = int(time.time() * 1000)
    views = ranking_views(load_ranking(s.features))
    FeastRedisWriter(client, s.feast_project, views).write([
        ("user_recent", "rk-u", now, {"views": 2, "last_viewed_items": ["rk-a"]}),
        ("user_views_1h", "rk-u", now, {"user_views_1h": 2}),
        ("item_recent", "rk-a", now, {"views": 7}),
        ("item_views_1h", "rk-a", now, {"item_views_1h": 7}),
        ("item_buy_rate_1h", "rk-a", now, {"item_buy_rate_1h": 0.25})])
    sent: list[int] = []
    reader = FeastRedisReader(client, s.feast_project, views)  # a twin of the API's that counts round trips
    fetch = reader.fetch
    reader.fetch = lambda requests: sent.append(len(requests)) or fetch(requests)  # type: ignore[method-assign]
    (user,) = reader.read([(reader.join(path.user_view, ["user_recent", *inputs.user]), "rk-u")])
    (row,) = reader.read([(reader.join(path.item_view, ["item_recent", "item_covisit", *inputs.item]), "rk-a")])
    assert sent == [1, 1]
    for view in (path.user_view, path.item_view):  # the API's joins: the same fields (encoders are closures)
        assert [f[:2] for f in path.reader.layouts[view].fields] == [f[:2] for f in reader.layouts[view].fields]
    assert user is not None and (user["views"], user["user_views_1h"]) == (2, 2)
    assert row is not None and (row["views"], row["item_views_1h"], row["item_buy_rate_1h"]) == (7, 7, 0.25)
    ranker = api.app.state.models.recommender.ranker
    assert ranker.inputs == inputs
    assert any(ranker.model._weights.get("i." + n) for n in inputs.item)  # seeded: learned on the same log


def test_bad_input_gets_clear_4xx(served: tuple[Settings, list[str], TestClient]) -> None:
    _, users, client = served
    for params, field in [({"user_id": users[0], "k": 0}, "k"), ({"user_id": users[0], "k": 201}, "k"),
                          ({"user_id": "a b"}, "user_id"), ({"user_id": ""}, "user_id"), ({}, "user_id"),
                          ({"user_id": users[0], "page": -1}, "page")]:
        r = client.get("/recommendations", params=params)
        assert r.status_code == 422 and r.json()["detail"][0]["field"] == field, (params, r.text)
    r = client.get("/recommendations", params={"user_id": users[0], "model_version": 999_999})
    assert r.status_code == 404 and "999999 is not stored" in r.json()["detail"]


def test_pinned_canary_rollback_and_admin_key(served: tuple[Settings, list[str], TestClient]) -> None:
    s, users, client = served
    store = store_of(s)
    first = store.head()
    other = OnlineRecommender.default(min_count=1)  # an untrained model: a different version to route to
    second = store.publish("snapshot", other.snapshot(), 0, {"test": "second"})
    wait_until(lambda: client.get("/model").json()["version"] == second, 10, "the API to follow")
    pinned = client.get("/recommendations", params={"user_id": users[0], "model_version": first}).json()
    assert pinned["model_version"] == first and pinned["model_role"] == "pinned"

    assert client.put("/admin/canary", json={"version": first, "share": 0.5}).status_code == 401
    assert client.put("/admin/canary", json={"version": first, "share": 0.5},
                      headers={"X-API-Key": "wrong"}).status_code == 401
    admin = {"X-API-Key": KEY}
    assert client.put("/admin/canary", json={"version": 999_999, "share": 0.5}, headers=admin).status_code == 404
    assert client.put("/admin/canary", json={"version": first, "share": 0.5}, headers=admin).status_code == 200
    wait_until(lambda: client.get("/model").json()["canary"], 10, "the canary to load")
    for u in users[:40]:
        got = client.get("/recommendations", params={"user_id": u}).json()
        want = (first, "canary") if in_share(u, 0.5) else (second, "live")
        assert (got["model_version"], got["model_role"]) == want, u
    assert client.delete("/admin/canary", headers=admin).status_code == 204
    wait_until(lambda: client.get("/model").json()["canary"] is None, 10, "the canary to end")

    r = client.post("/admin/rollback", json={"version": first}, headers=admin)
    assert r.status_code == 200 and r.json()["of"] == first
    back = r.json()["version"]
    wait_until(lambda: client.get("/recommendations", params={"user_id": users[0]}).json()["model_version"] == back,
               10, "the API to serve the rollback")
    assert store.get(back).meta["rollback_of"] == first
    assert client.post("/admin/publish", json={"version": 424_242}, headers=admin).status_code == 404


def test_blue_green_refuses_a_version_that_cannot_score(served: tuple[Settings, list[str], TestClient]) -> None:
    s, users, client = served
    store = store_of(s)
    for u in users[:5]:  # recent requests: the warm-up set
        client.get("/recommendations", params={"user_id": u})
    serving = client.get("/model").json()["version"]
    broken = OnlineRecommender.default(min_count=1)
    broken.ranker.model._weights["u_views"] = float("nan")
    bad = store.publish("snapshot", broken.snapshot(), 0, {"test": "broken"})
    wait_until(lambda: "NaN" in (client.get("/model").json()["error"] or ""), 10, "the warm-up to refuse it")
    assert client.get("/model").json()["version"] == serving != bad
    assert client.get("/recommendations", params={"user_id": users[0]}).json()["model_version"] == serving
    store.rollback(serving)  # leave a servable head for the next tests
    wait_until(lambda: client.get("/model").json()["version"] > bad, 10, "the API to move on")


def test_a_serving_process_freezes_its_heap_once_a_model_is_in(served: tuple[Settings, list[str], TestClient]) -> None:
    """A full collection would walk every import and the model: ~110 ms, the bench's slowest
    requests. Only a process that just serves freezes (create_app(own_process=True))."""
    s, _, _ = served
    assert gc.get_freeze_count() == 0, "the test process itself must not be frozen by create_app"
    models = ServedModels(store_of(s), freeze=True)
    try:
        models.refresh()
        assert models.recommender is not None
        assert gc.get_freeze_count() > 100_000
    finally:
        gc.unfreeze()


def test_metrics_and_readiness(served: tuple[Settings, list[str], TestClient]) -> None:
    _, users, client = served
    for u in users[:5]:
        client.get("/recommendations", params={"user_id": u})
    text = client.get("/metrics").text
    version = client.get("/model").json()["version"]
    assert f"freshrec_model_version {float(version)}" in text
    for needle in ('freshrec_stage_seconds_bucket{le="0.005",stage="features"}',
                   'freshrec_requests_total{endpoint="/recommendations",status="200"}',
                   'freshrec_candidates_total{source="covisit"}', "freshrec_parameter_lag_seconds ",
                   "freshrec_feature_freshness_seconds "):
        assert needle in text, needle
    assert client.get("/readyz").json() == {"ready": True, "problems": [], "model_version": version}
    assert client.get("/healthz").json() == {"status": "ok"}


def test_redis_stopped_under_load_degrades_never_5xx(workdir: Path) -> None:
    own = start_redis(workdir / "degrade-redis")  # its own server: the session's stays up
    port = own.port
    s, users = seeded(f"redis://127.0.0.1:{port}/0", "degrade", workdir)
    results: list[tuple[float, int, bool]] = []  # (seconds, status, degraded)
    stop = threading.Event()
    with TestClient(create_app(s)) as client:
        wait_until(lambda: client.get("/readyz").status_code == 200, 30, "the API to load the model")

        def load() -> None:
            i = 0
            while not stop.is_set():
                t = time.perf_counter()
                r = client.get("/recommendations", params={"user_id": users[i % len(users)]})
                results.append((time.perf_counter() - t, r.status_code, r.json().get("degraded", False)))
                i += 1

        threads = [threading.Thread(target=load) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            wait_until(lambda: len(results) > 20, 30, "requests before the stop")
            own.stop()
            down_from = len(results)
            wait_until(lambda: len(results) > down_from + 50, 30, "requests while Redis is down")
            assert client.get("/readyz").status_code == 503
            down = results[down_from + 5:]
            own = start_redis(workdir / "degrade-redis", port=port)  # empty: memory only
            wait_until(lambda: not results[-1][2], 30, "answers without degradation once Redis is back")
        finally:
            stop.set()
            for t in threads:
                t.join(10)
            own.stop()
    assert all(status == 200 for _, status, _ in results), {s for _, s, _ in results}
    assert all(degraded for _, _, degraded in down)
    latencies = sorted(t for t, _, _ in down)
    assert latencies[int(len(latencies) * 0.9)] < 0.1, latencies[-10:]  # the breaker: nobody waits on Redis


# -- schemathesis: every operation of the OpenAPI spec, generated inputs, no 5xx ------------------------
@pytest.fixture(scope="module")
def api_app(make_settings: Callable[[str], Settings], workdir: Path) -> Iterator[FastAPI]:
    s = make_settings("fuzz").replace(admin_api_key=KEY)  # topics exist: POST /events can produce
    seed_online_state(s, 2_000, n_users=100, n_items=500, seed=5)
    app = create_app(s)
    app.state.models.refresh()  # a model loaded: the learned path, pinned versions
    yield app


def test_openapi_fuzz_finds_no_server_error(api_app: FastAPI) -> None:
    # schemathesis's pytest plugin does not run under pytest 9 yet: its strategy, driven here.
    schema = schemathesis.openapi.from_asgi("/openapi.json", api_app)
    operations = {op.ok().label for op in schema.get_all_operations()}
    seen: Counter[str] = Counter()
    statuses: Counter[tuple[str, int]] = Counter()

    @given(case=schema.as_strategy())
    @hypothesis_settings(max_examples=400, deadline=None, database=None,
                         suppress_health_check=list(HealthCheck))
    def run(case: schemathesis.Case) -> None:
        response = case.call()
        seen[case.operation.label] += 1
        statuses[(case.operation.label, response.status_code)] += 1
        assert response.status_code < 500, (case.operation.label, response.status_code, response.text[:500])

    run()
    assert set(seen) == operations, operations - set(seen)
    assert statuses[("GET /recommendations", 200)] and statuses[("PUT /admin/canary", 401)], statuses
