"""Seed a Redis with the online state a log leaves behind, without running the streaming job.

For the serving benchmark, the API tests and trying the API on its own: a simulated log is
folded through the job's own state classes (streaming/state.py, via the batch example
builder; the ranking service's definitions through streaming/aggregates.py) into rows in
Feast's layout, and a model learned on the same log is published as a snapshot. Trending is simpler
than the job's: the most active items of the last 20k events, overall and per category.
"""

from __future__ import annotations

import json
from collections import Counter

import redis

from connectors.feast_redis import FeastRedisWriter
from connectors.schema import validate
from connectors.simulator import simulate
from features.dsl import item, load_ranking, trending_key, user
from features.registry import ranking_views
from freshrec.config import Settings
from online_learning.publish import ParameterStore
from online_learning.trainer import learn_log


def seed_online_state(settings: Settings, n_events: int, n_users: int = 5_000, n_items: int = 20_000,
                      seed: int = 7) -> list[str]:
    """Write feature rows, trending and a published model for a simulated log; returns the users."""
    raw = simulate(n_events, n_users=n_users, n_items=n_items, n_categories=max(1, n_items // 100), seed=seed)
    events = [validate(e, min_ts_ms=0) for e in raw]
    rec, batch, n = learn_log(settings, events, progress=False)
    client = redis.Redis.from_url(settings.redis_url)
    ParameterStore(client, settings.feast_project).publish("snapshot", rec.snapshot(), 0, {"examples": n})
    ts = events[-1].ts
    ranking = load_ranking(settings.features)
    # A user's row holds the ranking service's user definitions too; each is a view of its own.
    user_views = ["user_recent", *ranking.names(user)]
    item_views = ["item_recent", *ranking.names(item)]
    rows = [(view, u, ts, row) for u in batch.users for row in [batch.user_features(u)] for view in user_views]
    rows += [(view, i, ts, row) for i in batch.items for row in [batch.item_features(i)] for view in item_views]
    rows += [("item_covisit", i, ts, batch.covisit_row(i)) for i in batch.neighbours]
    FeastRedisWriter(client, settings.feast_project, ranking_views(ranking)).write(rows)
    last = events[-20_000:]
    popular = Counter(e.item_id for e in last).most_common(settings.trending_size)
    client.set(trending_key(settings.feast_project), json.dumps({"ts": ts, "items": popular}))
    by_category: dict[str, Counter[str]] = {}
    for e in last:
        if e.category_id:
            by_category.setdefault(e.category_id, Counter())[e.item_id] += 1
    if by_category:
        client.mset({trending_key(settings.feast_project, c): json.dumps(
            {"ts": ts, "items": n.most_common(settings.category_trending_size)}) for c, n in by_category.items()})
    return sorted(batch.users)
