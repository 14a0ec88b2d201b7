"""Per-entity feature state, in event time, independent of arrival order.

Each state keeps the events of one entity inside a sliding event-time window ending at the
newest event seen, ``(newest - window, newest]``. Values are updated on every arriving event
(no waiting for a watermark, so features are fresh within milliseconds), and the value after
a set of events does not depend on the order they arrived in: replaying a log, restoring a
checkpoint or receiving events out of order all end at the same numbers. Events are
de-duplicated by ``event_id`` while they are in the window.

These classes are plain Python so that the Flink job and a batch run share one
implementation.

>>> u = UserState()
>>> for ts, item in [(1000, "a"), (3000, "b"), (2000, "c")]:
...     _ = u.add(Ev(f"e{ts}", "u1", item, "view", ts, "cat1"), window_ms=10_000, last_n=2)
>>> f = u.features(top_k=1)
>>> f["last_viewed_items"], f["views"], f["top_categories"]
(['b', 'c'], 3, ['cat1'])
"""

from __future__ import annotations

from bisect import bisect_left
from collections import Counter
from typing import NamedTuple

from connectors.schema import BEHAVIORS


class Ev(NamedTuple):
    """The slim event the job carries between operators."""

    event_id: str
    user_id: str
    item_id: str
    behavior: str
    ts: int
    category_id: str


def _insert(window: list, entry: tuple) -> bool:
    i = bisect_left(window, entry)
    if i < len(window) and window[i] == entry:
        return False
    window.insert(i, entry)
    return True


def _evict(window: list, horizon: int) -> list:
    """Entries with ts <= horizon leave the window."""
    cut = bisect_left(window, (horizon + 1,))
    return window[cut:] if cut else window


class WindowState:
    """Sorted ``(ts, event_id, ...)`` entries within the window ending at the newest ts."""

    __slots__ = ("newest", "window")

    def __init__(self) -> None:
        self.newest = 0
        self.window: list[tuple] = []

    def insert(self, entry: tuple, window_ms: int) -> bool:
        ts = entry[0]
        newest = max(self.newest, ts)
        changed = ts > newest - window_ms and _insert(self.window, entry)
        if newest > self.newest:
            self.newest = newest
            self.window = _evict(self.window, newest - window_ms)
            changed = True
        return changed


class UserState(WindowState):
    """Recent behavior counts, last-N viewed items and top categories of one user."""

    __slots__ = ("views",)

    def __init__(self) -> None:
        super().__init__()
        self.views: list[tuple[int, str, str]] = []  # the last N views ever: (ts, event_id, item)

    def add(self, ev: Ev, window_ms: int, last_n: int) -> bool:
        """Fold one event in; False when it changes nothing (a duplicate or too old)."""
        changed = self.insert((ev.ts, ev.event_id, ev.behavior, ev.category_id), window_ms)
        if ev.behavior == "view":
            view = (ev.ts, ev.event_id, ev.item_id)
            if (len(self.views) < last_n or view > self.views[0]) and _insert(self.views, view):
                del self.views[:-last_n]
                changed = True
        return changed

    def features(self, top_k: int) -> dict[str, object]:
        counts = Counter(e[2] for e in self.window)
        cats = Counter(e[3] for e in self.window if e[3])
        out: dict[str, object] = {f"{b}s": counts.get(b, 0) for b in BEHAVIORS}
        out["last_viewed_items"] = [item for _, _, item in reversed(self.views)]
        out["top_categories"] = [c for c, _ in sorted(cats.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]]
        return out


class ItemState(WindowState):
    """Recent views, carts, buys and the buy rate of one item."""

    __slots__ = ()

    def add(self, ev: Ev, window_ms: int) -> bool:
        return self.insert((ev.ts, ev.event_id, ev.behavior), window_ms)

    def features(self) -> dict[str, object]:
        counts = Counter(e[2] for e in self.window)
        views, buys = counts.get("view", 0), counts.get("buy", 0)
        return {
            "views": views,
            "carts": counts.get("cart", 0),
            "buys": buys,
            "events": len(self.window),
            "buy_rate": buys / views if views else 0.0,
        }


class RecentViews:
    """A user's views kept long enough to pair each new view with those near it in time."""

    __slots__ = ("views", "newest")

    def __init__(self) -> None:
        self.views: list[tuple[int, str, str]] = []  # (ts, event_id, item)
        self.newest = 0

    def add(self, ev: Ev, gap_ms: int, keep_ms: int, max_views: int) -> list[tuple[str, str, int, str]]:
        """Record a view; return the new co-visit pairs ``(item, other, ts, pair_id)``, both ways."""
        view = (ev.ts, ev.event_id, ev.item_id)
        if not _insert(self.views, view):
            return []
        pairs = []
        for ts, eid, item in self.views:
            if item != ev.item_id and abs(ts - ev.ts) <= gap_ms:
                pair_id = "|".join(sorted((eid, ev.event_id)))
                at = max(ts, ev.ts)
                pairs.append((ev.item_id, item, at, pair_id))
                pairs.append((item, ev.item_id, at, pair_id))
        self.newest = max(self.newest, ev.ts)
        # Keep views a late event could still pair with, bounded so a bot cannot grow state.
        self.views = _evict(self.views, self.newest - keep_ms)[-max_views:]
        return pairs


class Neighbours(WindowState):
    """Co-visitation counts of one item with others, within the window."""

    __slots__ = ()

    def add(self, other: str, ts: int, pair_id: str, window_ms: int) -> bool:
        return self.insert((ts, pair_id, other), window_ms)

    def features(self, top_k: int) -> dict[str, object]:
        counts = Counter(e[2] for e in self.window)
        top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:top_k]
        return {"neighbours": [i for i, _ in top], "neighbour_counts": [c for _, c in top]}


class Trending:
    """Items ranked by their events in the window, as of each item's newest event."""

    __slots__ = ("scores", "newest")

    def __init__(self) -> None:
        self.scores: dict[str, tuple[int, int]] = {}  # item -> (events in window, newest ts)
        self.newest = 0

    def update(self, item: str, events: int, ts: int) -> None:
        prev = self.scores.get(item)
        if prev is None or ts >= prev[1]:
            self.scores[item] = (events, ts)
        self.newest = max(self.newest, ts)

    def top(self, k: int, window_ms: int) -> list[tuple[str, int]]:
        horizon = self.newest - window_ms
        stale = [i for i, (_, ts) in self.scores.items() if ts <= horizon]
        for item in stale:
            del self.scores[item]
        ranked = sorted(self.scores.items(), key=lambda kv: (-kv[1][0], kv[0]))[:k]
        return [(item, score) for item, (score, _) in ranked]
