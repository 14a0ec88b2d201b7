"""The offline store: the feature log lands as Parquet, Feast answers point-in-time from it, and
warm starts learn from it."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import redis

from connectors.feast_redis import FeastRedisReader
from connectors.offline_store import OfflineWriter
from connectors.schema import validate
from features.store import feature_store, repo_dir
from freshrec import cli
from freshrec.config import Settings
from online_learning.examples import BatchExamples, ExampleBuilder
from online_learning.offline_examples import offline_examples
from online_learning.publish import ParameterStore
from online_learning.trainer import warm_start
from streaming.state import Ev, Spec
from tests.conftest import wait_until
from tests.test_pipeline import generated, produce


def test_feature_log_lands_in_parquet_and_reads_point_in_time(shared: Settings, reader: FeastRedisReader) -> None:
    t0 = int(time.time() * 1000) - 200_000
    stamps = [t0, t0 + 20_000, t0 + 40_000]  # one pane apart or more: three distinct values
    produce(shared, [validate({"event_id": f"off-{k}", "user_id": "off-u", "item_id": f"off-i{k}",
                               "behavior": "view", "ts": ts}) for k, ts in enumerate(stamps)])
    wait_until(lambda: (reader.read([("user_recent", "off-u")])[0] or {}).get("views") == 3, 60,
               "the job to count off-u's three views")

    written = OfflineWriter(shared, flush_s=0.5).run(stop_after_idle_s=2)
    assert written > 0
    day = time.strftime("%Y-%m-%d", time.gmtime(t0 / 1000))
    files = list((repo_dir(shared) / "offline" / "user_recent").glob("date=*/part-*.parquet"))
    assert files and any(f.parent.name == f"date={day}" for f in files)

    # As of just before the second view: one view; at it: two; after the third: three.
    asked = [stamps[1] - 1, stamps[1], stamps[2] + 1]
    entity_df = pd.DataFrame({"user_id": ["off-u"] * 3,
                              "event_timestamp": pd.to_datetime(asked, unit="ms", utc=True)})
    got = feature_store(shared).get_historical_features(
        entity_df=entity_df, features=["user_recent:views", "user_recent:last_viewed_items"]).to_df()
    got = got.sort_values("event_timestamp")
    assert got["views"].tolist() == [1, 2, 3]
    assert [list(x) for x in got["last_viewed_items"]] == [["off-i0"], ["off-i1", "off-i0"],
                                                         ["off-i2", "off-i1", "off-i0"]]



def test_warm_start_examples_from_the_offline_store_equal_the_jobs(shared: Settings, reader: FeastRedisReader) -> None:
    """The builder over the offline store gives the examples the job's own state code gives over
    the log, where each user's and each item's events arrive in time order: same features, labels
    and negatives. (The job reads the topic's partitions side by side, so an item that several
    users' partitions name sees their events interleaved; each item here has one user.)"""
    events = [replace(e, item_id=f"{e.item_id}-{e.user_id}") for e in generated("ofx-", 120, seed=7, n_users=6)]
    produce(shared, [*events, events[40]])  # and a duplicate, which the job drops
    evs = [Ev.of(e) for e in events]
    evs.append(evs[40])
    batch = BatchExamples(ExampleBuilder(negatives=2, seed=5), Spec.of(shared))
    expected = [batch.add(ev) for ev in evs]
    for user in {e.user_id for e in events}:
        wait_until(lambda u=user: (reader.read([("user_recent", u)])[0] or {}).get("views")
                   == batch.user_features(u)["views"], 60, f"the job to count {user}'s events")
    OfflineWriter(shared, flush_s=0.5).run(stop_after_idle_s=2)

    offline = offline_examples(shared, evs, ExampleBuilder(negatives=2, seed=5))
    got = [offline.add(ev) for ev in evs]

    def without_covisit(xs: list[dict] | None) -> list[dict] | None:  # logged per flush tick, not per pair
        drop = ("neighbours", "neighbour_counts")
        return xs and [x | {"item": x["item"] and {k: v for k, v in x["item"].items() if k not in drop}} for x in xs]

    assert [without_covisit(x) for x in got] == [without_covisit(x) for x in expected]
    assert got[-1] is None and offline.missing == 0
    examples = [x for xs in got if xs for x in xs]
    assert any((x["item"] or {}).get("neighbours") for x in examples)  # the item_covisit rows joined
    assert sum(x["user"] is not None for x in examples) > 80  # from the Parquet rows, not all "new user"
    assert any(x["label"] == 0 and x["item"] for x in examples)  # negatives carry their logged features
    assert batch.builder.stats["attributed"] > 0  # a conversion learned with the features of its view

    # Published to a Redis database of its own: the shared project's trainer (tests/test_training.py)
    # would otherwise resume from this snapshot.
    apart = shared.replace(redis_url=shared.redis_url.rsplit("/", 1)[0] + "/5")
    version, meta = warm_start(apart, events, progress=False, from_offline_store=True)
    assert meta["features"] == "offline store" and meta["examples"] == len(examples)
    assert ParameterStore(redis.Redis.from_url(apart.redis_url), apart.feast_project).head() == version


def test_warm_start_from_an_empty_offline_store_says_what_to_do(make_settings: Callable[[str], Settings],
                                                                 tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    settings = make_settings("ofx_empty")
    log = tmp_path / "history.jsonl"
    log.write_text('{"user_id": "u", "item_id": "i", "behavior": "view", "ts": 1700000000000}\n')
    for name, value in (("REDIS_URL", settings.redis_url), ("FEAST_PROJECT", settings.feast_project),
                        ("STATE_DIR", str(settings.state_dir))):
        monkeypatch.setenv(f"FRESHREC_{name}", value)
    assert cli.main(["train", "--source", str(log), "--from-offline-store", "--quiet"]) == 2
    assert re.search(r"holds no user_recent rows for 2023-11-14T22:13:20\+00:00: .*\(freshrec up\)",
                     capsys.readouterr().err)
