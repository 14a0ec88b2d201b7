"""Seed a Redis with the online state a log leaves behind, without running the streaming job.

For the serving benchmark, the API tests and trying the API on its own: a simulated log is
folded through the job's own state classes (streaming/state.py, via the batch example
builder) into user and item rows, a model learned on the same log is published as a
snapshot, and co-visitation and trending are counted directly (consecutive views of a user
within FRESHREC_COVISIT_GAP_SECONDS, both ways; the most active items of the last 20k
events). Those two are simpler than the job's windows; the rows have the same layout.
"""

from __future__ import annotations

import json
from collections import Counter, defaultdict

import redis

from connectors.feast_redis import FeastRedisWriter
from connectors.schema import validate
from connectors.simulator import simulate
from features.definitions import FEATURE_VIEWS, trending_key
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
    pairs: dict[str, Counter[str]] = defaultdict(Counter)
    last: dict[str, tuple[str, int]] = {}
    for e in events:
        if e.behavior != "view":
            continue
        prev = last.get(e.user_id)
        if prev and prev[0] != e.item_id and e.ts - prev[1] <= settings.covisit_gap_seconds * 1000:
            pairs[prev[0]][e.item_id] += 1
            pairs[e.item_id][prev[0]] += 1
        last[e.user_id] = (e.item_id, e.ts)
    rows = [("user_recent", u, ts, batch.user_features(u)) for u in batch.users]
    rows += [("item_recent", i, ts, batch.item_features(i)) for i in batch.items]
    for item, c in pairs.items():
        top = c.most_common(settings.covisit_top_k)
        rows.append(("item_covisit", item, ts, {"neighbours": [i for i, _ in top],
                                                "neighbour_counts": [k for _, k in top]}))
    FeastRedisWriter(client, settings.feast_project, FEATURE_VIEWS).write(rows)
    popular = Counter(e.item_id for e in events[-20_000:]).most_common(settings.trending_size)
    client.set(trending_key(settings.feast_project), json.dumps({"ts": ts, "items": popular}))
    return sorted(batch.users)
