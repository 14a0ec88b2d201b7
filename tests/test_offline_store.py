"""The offline store: the feature log lands as Parquet, and Feast answers point-in-time from it."""

from __future__ import annotations

import time

import pandas as pd

from connectors.feast_redis import FeastRedisReader
from connectors.offline_store import OfflineWriter
from connectors.schema import validate
from features.store import feature_store, repo_dir
from freshrec.config import Settings
from tests.conftest import wait_until
from tests.test_pipeline import produce


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

