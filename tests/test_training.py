"""Online learning end to end: job -> examples topic -> trainer -> Redis versions -> API.

Real broker, Redis and PyFlink job (the session's); the trainer runs in a thread.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest
import redis
from fastapi.testclient import TestClient

from connectors.kafka import consumer
from connectors.schema import validate
from freshrec import cli
from freshrec.config import Settings
from jobs.topics import examples_topic
from online_learning.examples import Example
from online_learning.params import decode
from online_learning.publish import ParameterStore
from online_learning.recommender import OnlineRecommender
from online_learning.trainer import Trainer
from serving.app import create_app
from serving.models import ServedModels
from tests.conftest import wait_until
from tests.test_pipeline import generated, produce


def examples_of(settings: Settings, prefix: str, want: int, timeout: float = 90) -> list[dict]:
    c = consumer(settings.kafka_bootstrap, examples_topic(settings), group=None)
    got: list[dict] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and len(got) < want:
            for records in c.poll(timeout_ms=500).values():
                got += [e for e in (json.loads(r.value) for r in records) if e["user_id"].startswith(prefix)]
    finally:
        c.close()
    return got


def test_job_emits_examples_with_features_from_before_the_event(shared: Settings) -> None:
    now = int(time.time() * 1000) - 60_000
    ev = [validate({"user_id": "tx-u", "item_id": item, "behavior": b, "ts": now + n * 1000, "event_id": f"tx{n}"})
          for n, (item, b) in enumerate([("tx-a", "view"), ("tx-b", "view"), ("tx-a", "buy"), ("tx-b", "view")])]
    produce(shared, ev)
    got = examples_of(shared, "tx-", want=4 + 2 * 4)
    positives = sorted((e for e in got if e["label"] == 1), key=lambda e: e["ts"])
    assert [(e["item_id"], e["behavior"]) for e in positives] == [("tx-a", "view"), ("tx-b", "view"), ("tx-a", "buy"),
                                                                  ("tx-b", "view")]
    first, second, buy, again = positives
    assert first["user"] is None and first["item"] is None  # a new user, a new item
    # as of just before the second view: one view, of tx-a; nothing of tx-b yet
    assert second["user"]["views"] == 1 and second["user"]["last_viewed_items"] == ["tx-a"]
    # the ranking service's definitions (features/catalog.py ranking), from before it too
    assert (second["user"]["user_views_1h"], second["user"]["user_distinct_items_1h"]) == (1, 1)
    # the buy is attributed to the view of tx-a: the features are those of that moment
    assert buy["user"] is None and buy["item"] is None
    # the item's co-visitation row as of before the event: the pair of its first view, not this one's
    assert again["item"]["views"] == 1
    assert again["item"]["item_views_1h"] == 1 and again["item"]["item_buy_rate_1h"] == pytest.approx(0.2 / 21)
    assert again["user"]["user_engagement_1d"] == 1 + 1 + 8  # view, view, buy
    # (views 1 s apart: the pair counts 1 / (1 + 1 s / the proximity setting))
    near = float(f"{1 / (1 + 1_000 / (shared.covisit_proximity_seconds * 1000)):.6g}")
    assert (again["item"]["neighbours"], again["item"]["neighbour_counts"]) == (["tx-a"], [near])
    negatives = [e for e in got if e["label"] == 0]
    assert negatives and all(e["behavior"] == "negative" for e in negatives)
    for n in negatives:
        twin = next(p for p in positives if p["ts"] == n["ts"])
        assert n["item_id"] != twin["item_id"] and n["user"] == twin["user"]


LOG: list[str] = []


@pytest.fixture(scope="module")
def trainer(shared: Settings) -> Iterator[Trainer]:
    """A trainer over the shared job's examples, publishing into the shared project."""
    settings = shared.replace(publish_interval_ms=100, snapshot_interval_seconds=2, min_count=1)
    t = Trainer(settings, log=LOG.append)
    thread = threading.Thread(target=t.run, kwargs={"stop_after_idle_s": 600}, daemon=True)
    thread.start()
    yield t
    t.stopping.set()
    thread.join(30)


def test_trainer_publishes_versions_the_api_follows_and_rollback(shared: Settings, trainer: Trainer,
                                                                 monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    produce(shared, generated("tr-", 600, seed=11))
    store = trainer.store
    wait_until(lambda: len(store.snapshots()) >= 1 and store.head() > store.snapshots()[0], 120,
               "a snapshot and deltas after it")
    app = create_app(shared)
    with TestClient(app) as client:
        wait_until(lambda: client.get("/model").json()["version"] > 0, 10, "the API to load a version")
        body = client.get("/recommendations", params={"user_id": "tr-u3", "k": 5}).json()
        assert body["model_version"] and body["scorer"] == f"online-v{body['model_version']}"
        assert 0 < len(body["items"]) <= 5

        # event -> new parameters visible in the API: a new item, viewed, gets a row
        probe = validate({"user_id": "tr-u1", "item_id": "tr-probe", "behavior": "view",
                          "ts": int(time.time() * 1000), "event_id": "tr-probe-1"})
        before = client.get("/model").json()["version"]
        sent = time.monotonic()
        produce(shared, [probe])
        models: ServedModels = app.state.models
        wait_until(lambda: client.get("/model", params={"item_id": "tr-probe"}).json()["item"]["embedding"],
                   30, "the probe item's parameters to reach the API")
        assert models.recommender.embedding.items.get("tr-probe") >= 0
        assert client.get("/model").json()["version"] > before
        print(f"event -> parameters in the API: {time.monotonic() - sent:.2f} s")

        # rollback, one command: an old snapshot becomes the newest version; API and trainer follow it
        for key, value in shared.to_env().items():
            monkeypatch.setenv(key, value)
        old = store.snapshots()[0]
        assert cli.main(["model", "rollback", "--to", str(old)]) == 0
        new = int(capsys.readouterr().out.split(" as version ")[1].split(";")[0])
        assert store.get(new).meta["rollback_of"] == old
        wait_until(lambda: client.get("/model").json()["version"] >= new, 10, "the API to serve the rollback")
        wait_until(lambda: trainer.version >= new, 10, "the trainer to follow the rollback")
        assert cli.main(["model", "rollback", "--to", "999999999"]) == 2
        assert "not a stored snapshot" in capsys.readouterr().err
        assert cli.main(["model", "list"]) == 0
        assert f"rollback of {old}" in capsys.readouterr().out


def test_gate_refuses_broken_parameters_and_says_why(shared: Settings, trainer: Trainer) -> None:
    produce(shared, generated("gate-", 200, seed=12))
    store = trainer.store
    before = store.head()
    weights = trainer.rec.ranker.model._weights
    weights["i_views"] = float("nan")
    wait_until(lambda: any("refused to publish" in m and "NaN" in m for m in LOG), 30, "a refusal with its reason")
    # Deltas that did not touch the poisoned weight may have gone out before the refusal; nothing
    # with a NaN did, and after a refusal nothing goes out at all (every later publish is refused).
    head = store.head()
    time.sleep(5 * trainer.settings.publish_interval_ms / 1000)
    assert store.head() == head
    for v in range(before + 1, head + 1):
        for blob in store.get(v).blobs.values():
            assert all(np.isfinite(a).all() for a in decode(blob)[1].values() if a.dtype.kind == "f"), v
    # NaN spreads through learning (gradients, FTRL's z and n): the way out is a rollback, which
    # the trainer loads and learns on from; what it publishes next builds on the rollback.
    back = trainer.store.rollback(trainer.store.snapshots()[-1])
    wait_until(lambda: trainer.store.head() > back, 30, "publishing to resume after the rollback")
    after = trainer.store.get(back + 1)
    assert after.kind == "snapshot" or after.base == back
    assert all(np.isfinite(a).all() for blob in after.blobs.values() for a in decode(blob)[1].values()
               if a.dtype.kind == "f")
    assert not np.isnan(trainer.rec.ranker.parameters()).any()


def test_restarted_trainer_resumes_exactly_where_published(shared: Settings, trainer: Trainer) -> None:
    store = trainer.store
    wait_until(lambda: store.head() > 0, 120, "published versions")
    published = trainer.learned
    trainer.stopping.set()  # it publishes a last snapshot and stops
    assert trainer.stopped.wait(30), "the trainer did not stop"
    assert store.head() == trainer.version and store.get(store.head()).kind == "snapshot"
    # A new trainer on the same store rebuilds the published state and reads on from its offsets.
    twin = Trainer(trainer.settings, log=lambda m: None)
    head = store.get(twin.version)
    assert twin.version == trainer.version and head.meta["examples"] >= published
    assert {str(p): o for p, o in twin.offsets.items()} == head.meta["offsets"] == \
        {str(p): o for p, o in trainer.offsets.items()}
    served = ServedModels(ParameterStore(redis.Redis.from_url(shared.redis_url), shared.feast_project))
    assert served.refresh() == twin.version
    user = {"views": 2, "last_viewed_items": ["tr-i1", "tr-i2"]}
    cands = [(f"tr-i{i}", {"views": i}) for i in range(20)]
    for model in (trainer.rec, served.recommender):
        assert np.array_equal(twin.rec.score_many(user, cands, "tr-u1"), model.score_many(user, cands, "tr-u1"))


def test_parameter_chain_skips_equal_snapshots_and_heals_gaps(redis_server) -> None:  # noqa: ANN001
    client = redis.Redis(port=redis_server.port)
    store = ParameterStore(client, "chain_test")
    s1 = store.publish("snapshot", {"m": b"s1"}, 0)
    d2 = store.publish("delta", {"m": b"d2"}, s1)
    d3 = store.publish("delta", {"m": b"d3"}, d2)
    s4 = store.publish("snapshot", {"m": b"s4"}, d3)  # equal to the state at d3
    d5 = store.publish("delta", {"m": b"d5"}, s4)
    assert [v.version for v in store.catch_up(0)] == [s4, d5]  # a new reader starts at the newest snapshot
    at_d2 = store.catch_up(d2)
    assert [(v.version, v.blobs) for v in at_d2] == [(d3, {"m": b"d3"}), (s4, {}), (d5, {"m": b"d5"})]
    client.delete(f"chain_test:model:v:{d3}")  # an expired delta: a reader at d2 must start over
    assert [v.version for v in store.catch_up(d2)] == [s4, d5]
    back = store.rollback(s1)  # base 0: everyone loads it, even a reader that is up to date
    assert [(v.version, v.blobs) for v in store.catch_up(d5)] == [(back, {"m": b"s1"})]
    assert store.head() == back and store.get(back).meta["rollback_of"] == s1


def test_api_applies_an_announced_version_without_waiting_for_its_poll(redis_server) -> None:  # noqa: ANN001
    store = ParameterStore(redis.Redis(port=redis_server.port), "announce_test")
    rec = OnlineRecommender.default(min_count=1)
    first = store.publish("snapshot", rec.snapshot(), 0)
    served = ServedModels(store, poll_ms=60_000)  # polling alone would see the next version in a minute
    served.start()
    try:
        wait_until(lambda: served.version == first, 10, "the first snapshot")
        wait_until(lambda: store.client.pubsub_numsub(store.channel)[0][1] >= 1, 10, "the API's subscription",
                   every=0.01)
        rec.learn_one(Example(user_id="u", item_id="i", ts=1, label=1, behavior="view", user=None, item=None))
        sent = time.monotonic()
        delta = store.publish("delta", rec.state_delta(), first)
        wait_until(lambda: served.version == delta, 10, "the announced delta", every=0.01)
        assert time.monotonic() - sent < 2
        assert served.knows("i")["embedding"]
    finally:
        served.stop()


def test_warm_start_from_a_log_publishes_a_snapshot_readers_load(redis_server, tmp_path, monkeypatch,  # noqa: ANN001
                                                                  capsys) -> None:  # noqa: ANN001
    log = tmp_path / "history.jsonl"
    rows = [{"user_id": f"w{n % 7}", "item_id": f"wi{n % 11}", "behavior": "view", "ts": 1_700_000_000_000 + n * 1000}
            for n in range(400)]
    log.write_text("\n".join(json.dumps(r) for r in rows) + "\n{broken\n")
    monkeypatch.setenv("FRESHREC_REDIS_URL", f"redis://127.0.0.1:{redis_server.port}/0")
    monkeypatch.setenv("FRESHREC_FEAST_PROJECT", "warm_test")
    monkeypatch.setenv("FRESHREC_STATE_DIR", str(tmp_path / "state"))
    assert cli.main(["train", "--source", str(log), "--quiet"]) == 0
    out = capsys.readouterr()
    assert "from 400 events" in out.out and "refused 1 rows" in out.err
    store = ParameterStore(redis.Redis(port=redis_server.port), "warm_test")
    served = ServedModels(store)
    assert served.refresh() == store.head() and store.get(store.head()).meta["warm_start"] == 400
    assert served.knows("wi3")["embedding"] and served.knows("wi3")["ranker"]
    assert cli.main(["train", "--source", str(tmp_path / "missing.csv")]) == 2
