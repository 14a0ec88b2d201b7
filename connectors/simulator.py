"""A behavior simulator for demos and tests when no log file is at hand.

Users browse in sessions: they favour a few categories, view items drawn by a Zipf-like
popularity inside a category, often come back to an item they just saw, and sometimes
add to cart, favourite or buy (about the Taobao mix: 89% views). Items in a category are
co-viewed, so co-visitation has structure to find. Seeded, so a run can be repeated.

>>> events = list(simulate(n_events=50, seed=1))
>>> len(events), {e["behavior"] for e in events} <= {"buy", "cart", "fav", "view"}
(50, True)
>>> all(a["ts"] <= b["ts"] for a, b in zip(events, events[1:]))
True
"""

from __future__ import annotations

import heapq
import random
from collections.abc import Iterator
from typing import Any

START_MS = 1_511_658_000_000  # 2017-11-26T01:00:00Z, like the Taobao slice


def simulate(
    n_events: int,
    n_users: int = 2_000,
    n_items: int = 5_000,
    n_categories: int = 50,
    start_ms: int = START_MS,
    events_per_second: float = 20.0,
    seed: int = 0,
) -> Iterator[dict[str, Any]]:
    """Yield ``n_events`` event dicts in event-time order."""
    rng = random.Random(seed)
    per_cat = max(1, n_items // n_categories)
    weights = [1.0 / (r + 1) ** 1.1 for r in range(per_cat)]  # popularity inside a category
    prefs = [rng.sample(range(n_categories), k=min(3, n_categories)) for _ in range(n_users)]
    mean_gap_ms = 1000.0 / events_per_second * n_users  # per user, so the total rate is as asked
    # Each user's next event time, in a heap: the stream comes out in time order.
    heap = [(start_ms + int(rng.expovariate(1 / mean_gap_ms)), u) for u in range(n_users)]
    heapq.heapify(heap)
    last_item: dict[int, int] = {}
    for n in range(n_events):
        ts, u = heapq.heappop(heap)
        if u in last_item and rng.random() < 0.25:
            item = last_item[u]
        else:
            cat = rng.choice(prefs[u]) if rng.random() < 0.85 else rng.randrange(n_categories)
            item = cat * per_cat + rng.choices(range(per_cat), weights)[0]
        last_item[u] = item
        r = rng.random()
        behavior = "view" if r < 0.89 else "cart" if r < 0.945 else "fav" if r < 0.975 else "buy"
        yield {
            "event_id": f"s{seed}-{n}",
            "user_id": str(u),
            "item_id": str(item),
            "category_id": str(item // per_cat),
            "behavior": behavior,
            "ts": ts,
        }
        # Sessions: quick follow-ups, then a longer pause.
        gap = rng.expovariate(1 / 20_000) if rng.random() < 0.7 else rng.expovariate(1 / mean_gap_ms)
        heapq.heappush(heap, (ts + 1 + int(gap), u))
