"""Per-entity feature state, in event time, independent of arrival order.

Windowed counts use fixed panes (``pane_ms``): the window of an entity is the ``window_ms``
of panes ending with the pane of its newest event, i.e. Flink's hopping window
``HOP(ts, pane, window)`` that contains the entity's newest event. Values are updated on
every arriving event (no waiting for a watermark, so features are fresh within
milliseconds), state stays the same small size however busy an entity is, and the value after
a set of events does not depend on the order they arrived in: replaying a log, restoring a
checkpoint or receiving events out of order all end at the same numbers.

Duplicates (same ``event_id``) are dropped by the user's state while they are within
``dedup_ms`` of the user's newest event (the job sets it to allowed lateness + out-of-orderness,
so any duplicate the job does not refuse as late is caught); everything downstream of the user
sees each event once.

These classes are plain Python so that the Flink job and a batch run share one
implementation.

>>> spec = Spec(window_ms=10_000, pane_ms=1_000, last_n=2)
>>> u = UserState()
>>> for ts, item in [(1000, "a"), (3000, "b"), (2000, "c"), (2000, "c")]:
...     _ = u.add(Ev(f"e{ts}", "u1", item, "view", ts, "cat1"), spec)
>>> f = u.features(spec)
>>> f["last_viewed_items"], f["views"], f["top_categories"]
(['b', 'c'], 3, ['cat1'])
"""

from __future__ import annotations

import heapq
import zlib
from bisect import bisect_left
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from connectors.schema import BEHAVIORS, BehaviorEvent
from freshrec.config import Settings


class Ev(NamedTuple):
    """The slim event the job carries between operators."""

    event_id: str
    user_id: str
    item_id: str
    behavior: str
    ts: int
    category_id: str

    @classmethod
    def of(cls, e: BehaviorEvent) -> Ev:
        """A validated event, slimmed (no category: "")."""
        return cls(e.event_id, e.user_id, e.item_id, e.behavior, e.ts, e.category_id or "")


class Spec(NamedTuple):
    """The knobs of every state below, in milliseconds where they are times."""

    window_ms: int = 3_600_000
    pane_ms: int = 60_000
    last_n: int = 20
    top_categories: int = 3
    dedup_ms: int = 602_000
    covisit_gap_ms: int = 1_800_000
    covisit_keep_ms: int = 2_400_000
    covisit_max_views: int = 50
    covisit_half_life_ms: int = 3650 * 86_400_000  # 0: counts never fade
    covisit_kept: int = 100
    covisit_top_k: int = 20
    covisit_proximity_ms: int = 60_000  # 0: a co-visit counts 1 however far apart its views

    @classmethod
    def of(cls, s: Settings) -> Spec:
        return cls(
            window_ms=s.window_seconds * 1000,
            pane_ms=s.window_pane_seconds * 1000,
            last_n=s.last_n,
            top_categories=s.top_categories,
            dedup_ms=s.allowed_lateness_ms + s.out_of_orderness_ms,
            covisit_gap_ms=s.covisit_gap_seconds * 1000,
            # Views a late event could still pair with.
            covisit_keep_ms=s.covisit_gap_seconds * 1000 + s.allowed_lateness_ms,
            covisit_max_views=s.covisit_max_views,
            covisit_half_life_ms=s.covisit_half_life_seconds * 1000,
            covisit_kept=s.covisit_kept,
            covisit_top_k=s.covisit_top_k,
            covisit_proximity_ms=s.covisit_proximity_seconds * 1000,
        )


def _top(totals: dict[str, int], k: int) -> list[tuple[str, int]]:
    """The k largest counts; ties broken by key, so the answer is deterministic."""
    return heapq.nsmallest(k, totals.items(), key=lambda kv: (-kv[1], kv[0]))


class PaneCounts:
    """Counts per key in the panes of one hopping window, and their running totals.

    >>> c = PaneCounts()
    >>> [c.add(ts, "view", pane_ms=10, window_ms=30) for ts in (5, 12, 35, 3)]
    [True, True, True, False]
    >>> c.totals  # the pane of ts=5 left the window when ts=35 arrived
    {'view': 2}
    """

    __slots__ = ("newest", "panes", "totals")

    def __init__(self) -> None:
        self.newest = -1  # newest pane index
        self.panes: dict[int, dict[str, int]] = {}
        self.totals: dict[str, int] = {}

    def add(self, ts: int, key: str, pane_ms: int, window_ms: int) -> bool:
        """Count one event; False when it falls before the window."""
        pane, span = ts // pane_ms, window_ms // pane_ms
        if pane <= self.newest - span:
            return False
        if pane > self.newest:
            self.newest = pane
            self._evict(pane - span)
        bucket = self.panes.setdefault(pane, {})
        bucket[key] = bucket.get(key, 0) + 1
        self.totals[key] = self.totals.get(key, 0) + 1
        return True

    def _evict(self, horizon: int) -> None:
        for pane in [p for p in self.panes if p <= horizon]:
            for key, n in self.panes.pop(pane).items():
                left = self.totals[key] - n
                if left:
                    self.totals[key] = left
                else:
                    del self.totals[key]


def _keep_newest(newest: list[tuple[int, str, str]], entry: tuple[int, str, str], n: int) -> None:
    """Insert into an ascending list that keeps only the n newest (out-of-order arrivals included)."""
    if len(newest) < n or entry > newest[0]:
        newest.insert(bisect_left(newest, entry), entry)
        del newest[:-n]


class Seen:
    """The event ids of one user within ``dedup_ms`` of their newest event.

    >>> s = Seen()
    >>> [s.first(eid, ts, dedup_ms=100) for eid, ts in [("a", 10), ("b", 20), ("a", 10)]]
    [True, True, False]
    """

    __slots__ = ("ids", "newest")

    def __init__(self) -> None:
        self.newest = 0
        self.ids: dict[str, int] = {}  # event_id -> ts

    def first(self, event_id: str, ts: int, dedup_ms: int) -> bool:
        """True the first time an event id comes; False for a duplicate."""
        if event_id in self.ids:
            return False
        if ts > self.newest:
            self.newest = ts
            horizon = ts - dedup_ms
            self.ids = {eid: t for eid, t in self.ids.items() if t >= horizon}
        if ts >= self.newest - dedup_ms:
            self.ids[event_id] = ts
        return True


class UserState:
    """Recent behavior counts, last-N viewed items and top categories of one user."""

    __slots__ = ("buys", "categories", "counts", "newest", "seen", "views")

    def __init__(self) -> None:
        self.newest = 0
        self.seen = Seen()
        self.counts = PaneCounts()
        self.categories = PaneCounts()
        self.views: list[tuple[int, str, str]] = []  # the last N views ever: (ts, event_id, item)
        self.buys: list[tuple[int, str, str]] = []  # the last N purchases, for serving to exclude

    def add(self, ev: Ev, spec: Spec) -> bool:
        """Fold one event in; False for a duplicate (then nothing downstream should see it)."""
        if not self.seen.first(ev.event_id, ev.ts, spec.dedup_ms):
            return False
        self.newest = max(self.newest, ev.ts)
        self.counts.add(ev.ts, ev.behavior, spec.pane_ms, spec.window_ms)
        if ev.category_id:
            self.categories.add(ev.ts, ev.category_id, spec.pane_ms, spec.window_ms)
        if ev.behavior in ("view", "buy"):
            _keep_newest(self.views if ev.behavior == "view" else self.buys, (ev.ts, ev.event_id, ev.item_id),
                         spec.last_n)
        return True

    def features(self, spec: Spec) -> dict[str, object]:
        totals = self.counts.totals
        out: dict[str, object] = {f"{b}s": totals.get(b, 0) for b in BEHAVIORS}
        out["last_viewed_items"] = [item for _, _, item in reversed(self.views)]
        out["last_bought_items"] = [item for _, _, item in reversed(self.buys)]
        out["top_categories"] = [c for c, _ in _top(self.categories.totals, spec.top_categories)]
        return out


class ItemState:
    """Recent views, carts, buys and the buy rate of one item, and its category.

    The category is the one of the newest event that names one (ties: the greater id), so it
    too does not depend on arrival order."""

    __slots__ = ("category", "category_ts", "counts", "newest")

    def __init__(self) -> None:
        self.newest = 0
        self.counts = PaneCounts()
        self.category, self.category_ts = "", -1

    def __setstate__(self, state: tuple[None, dict[str, object]]) -> None:
        # Keyed state pickled before the category existed: its slots start empty.
        self.category, self.category_ts = "", -1
        for name, value in state[1].items():
            setattr(self, name, value)

    def add(self, ev: Ev, spec: Spec) -> bool:
        if ev.category_id and (ev.ts > self.category_ts
                               or (ev.ts == self.category_ts and ev.category_id > self.category)):
            self.category, self.category_ts = ev.category_id, ev.ts
        self.newest = max(self.newest, ev.ts)
        return self.counts.add(ev.ts, ev.behavior, spec.pane_ms, spec.window_ms)

    def features(self) -> dict[str, object]:
        totals = self.counts.totals
        views, buys = totals.get("view", 0), totals.get("buy", 0)
        return {
            "views": views,
            "carts": totals.get("cart", 0),
            "buys": buys,
            "events": sum(totals.values()),
            "buy_rate": buys / views if views else 0.0,
            "category": self.category,
        }


class RecentViews:
    """A user's views kept long enough to pair each new view with those near it in time."""

    __slots__ = ("newest", "views")

    def __init__(self) -> None:
        self.views: list[tuple[int, str, str]] = []  # (ts, event_id, item)
        self.newest = 0

    def add(self, ev: Ev, spec: Spec) -> list[tuple[str, str, int, int]]:
        """Record a view; return the new co-visit pairs ``(item, other, ts, gap)``, both ways
        (``ts`` the later view's time, ``gap`` the milliseconds between the two views)."""
        view = (ev.ts, ev.event_id, ev.item_id)
        i = bisect_left(self.views, view)
        if i < len(self.views) and self.views[i] == view:
            return []
        self.views.insert(i, view)
        pairs = []
        for ts, _, item in self.views:
            if item != ev.item_id and abs(ts - ev.ts) <= spec.covisit_gap_ms:
                at, gap = max(ts, ev.ts), abs(ts - ev.ts)
                pairs.append((ev.item_id, item, at, gap))
                pairs.append((item, ev.item_id, at, gap))
        self.newest = max(self.newest, ev.ts)
        # Bounded, so a bot cannot grow state (the one place where order can matter).
        cut = bisect_left(self.views, (self.newest - spec.covisit_keep_ms + 1,))
        self.views = self.views[cut:][-spec.covisit_max_views:]
        return pairs


class Neighbours:
    """Co-visitation scores of one item with others, fading with event time instead of leaving
    a window.

    A pair counts ``1 / (1 + gap / covisit_proximity_ms)`` at its time (views seconds apart say
    more about each other than views half an hour apart; the gap is the pair's own, so the
    order of arrival still does not matter) and halves every ``covisit_half_life_ms`` after, so a busy item
    follows its trends while a rarely seen one keeps its history (a hard window forgot almost
    everything on a log spanning years). Scores are held relative to ``ref``, a multiple of 256
    half-lives, so they stay within float range; moving it scales them by a power of two, which
    is exact. The value after a set of pairs is the same whatever order they came in (up to the
    float sum's last bit; rows are rounded to 6 digits). Beyond ``2 * covisit_kept`` neighbours,
    the weakest go down to ``covisit_kept`` (bounded state; the one place where order can matter).

    >>> spec = Spec(covisit_half_life_ms=1_000, covisit_top_k=2)
    >>> n = Neighbours()
    >>> for other, ts in [("a", 0), ("b", 2_000), ("b", 3_000), ("a", 1_000)]:
    ...     n.add(other, ts, spec)
    >>> n.features(spec)  # as of the newest pair: a = 1/8 + 1/4, b = 1/2 + 1
    {'neighbours': ['b', 'a'], 'neighbour_counts': [1.5, 0.375]}
    """

    __slots__ = ("newest", "ref", "scores", "_top")

    SPAN = 256  # half-lives between two positions of ``ref``: 2**256 stays far from float overflow

    def __init__(self) -> None:
        self.newest = 0
        self.ref = 0
        self.scores: dict[str, float] = {}
        # (k, the k strongest, strongest first), kept up to date by add(); not pickled. A row is
        # read after most adds (the job's example, its tick; evaluate's candidates): ranking
        # all scores each time was most of evaluate's time on MovieLens.
        self._top: tuple[int, list[str]] | None = None

    def __getstate__(self) -> tuple[None, dict[str, Any]]:
        return None, {"newest": self.newest, "ref": self.ref, "scores": self.scores}

    def __setstate__(self, state: tuple[None, dict[str, Any]]) -> None:
        slots = state[1]
        self._top = None
        if "counts" in slots:  # pickled by the windowed version: its counts, as of its newest pair
            self.newest, self.ref = slots["newest"], slots["newest"]
            self.scores = {k: float(v) for k, v in slots["counts"].totals.items()}
        else:
            for name, value in slots.items():
                setattr(self, name, value)

    def add(self, other: str, ts: int, spec: Spec, gap_ms: int = 0) -> None:
        half_life = spec.covisit_half_life_ms
        if ts > self.newest:
            self.newest = ts
            if half_life:
                ref = ts - ts % (self.SPAN * half_life)
                if ref != self.ref:
                    scale = 2.0 ** ((self.ref - ref) / half_life)
                    self.scores = {k: v * scale for k, v in self.scores.items()}
                    self.ref = ref
                    self._top = None  # scores that sink below float's normal range can tie
        weight = 2.0 ** ((ts - self.ref) / half_life) if half_life else 1.0
        if gap_ms and spec.covisit_proximity_ms:
            weight /= 1.0 + gap_ms / spec.covisit_proximity_ms
        scores = self.scores
        score = scores[other] = scores.get(other, 0.0) + weight
        if self._top is not None:
            self._raise(other, score)
        if len(scores) > 2 * spec.covisit_kept:
            self.scores = dict(_top(scores, spec.covisit_kept))
            if self._top is not None and self._top[0] > spec.covisit_kept:
                self._top = None

    def _raise(self, other: str, score: float) -> None:
        """Keep the top k right after ``other``'s score rose (and only it changed)."""
        k, top = self._top  # type: ignore[misc]
        scores = self.scores
        if other in top:
            at = top.index(other)
        elif len(top) < k:  # fewer than k scores: the list holds them all
            top.append(other)
            at = len(top) - 1
        else:
            last = top[-1]
            if (-scores[last], last) <= (-score, other):
                return
            top[-1] = other
            at = k - 1
        while at and (-scores[top[at - 1]], top[at - 1]) > (-score, other):
            top[at] = top[at - 1]
            at -= 1
        top[at] = other

    def features(self, spec: Spec) -> dict[str, object]:
        half_life = spec.covisit_half_life_ms
        scale = 2.0 ** ((self.ref - self.newest) / half_life) if half_life else 1.0
        k = spec.covisit_top_k
        if self._top is None or self._top[0] != k:
            self._top = (k, [i for i, _ in _top(self.scores, k)])
        top, scores = self._top[1], self.scores
        return {"neighbours": list(top), "neighbour_counts": [float(f"{scores[i] * scale:.6g}") for i in top]}


class ScoreMap(dict):
    """Scores in memory, written through to a Flink ``MapState`` when given one.

    One per trending shard: a key's state is only touched while it is the current key, so
    memory and state cannot diverge. Reads and a rebuild's full scan stay in Python (a scan of
    the MapState crosses into Java once per item and stalled the job for seconds), and a
    restored shard reloads its state once.
    """

    def __init__(self, backing: Any = None) -> None:
        super().__init__(backing.items() if backing is not None else ())
        self.backing = backing

    def put(self, key: str, value: tuple[int, int]) -> None:
        self[key] = value
        if self.backing is not None:
            self.backing.put(key, value)

    def remove(self, key: str) -> None:
        del self[key]
        if self.backing is not None:
            self.backing.remove(key)


def _by_score(kv: tuple[str, tuple[int, int]]) -> tuple[int, str]:
    """Trending order: most events first, ties by item id."""
    return -kv[1][0], kv[0]


def _by_fewest(kv: tuple[str, tuple[int, int]]) -> tuple[int, str]:
    return kv[1][0], kv[0]


class Trending:
    """Items ranked by their events in the window, as of each item's newest event.

    Every item's score lives in ``scores`` (backed by a Flink MapState in the job: one small
    write per update instead of re-serializing every item); ``candidates`` keeps the best
    ``slack * k`` so that ranking costs no scan. A full scan (:meth:`rebuild`) runs only when a
    candidate lost score or went quiet, at most every few seconds (the job decides).

    >>> t = Trending(ScoreMap())
    >>> for item, events, ts in [("a", 3, 10), ("b", 5, 20), ("c", 1, 30), ("a", 4, 40)]:
    ...     _ = t.update(item, events, ts, k=2)
    >>> t.top(2, window_ms=100)
    [('b', 5), ('a', 4)]
    """

    __slots__ = ("candidates", "dirty", "floor", "newest", "scores")

    def __init__(self, scores: ScoreMap) -> None:
        self.scores = scores  # item -> (events in window, newest ts)
        self.candidates: dict[str, tuple[int, int]] = {}
        self.newest = 0
        self.dirty = False
        # At most the candidates' fewest events (None: unknown), so that most updates of items
        # outside them cost no scan; a candidate that gains may leave it below the true minimum.
        self.floor: int | None = None

    def update(self, item: str, events: int, ts: int, k: int, slack: int = 2, category: str = "") -> bool:
        """False for a value older than the item's last (rows may arrive out of order); a
        ``category`` is kept with the score (see :class:`CategoryTrending`)."""
        prev = self.scores.get(item)
        if prev is not None and ts < prev[1]:
            return False
        self.scores.put(item, (events, ts, category) if category else (events, ts))
        self.newest = max(self.newest, ts)
        candidates = self.candidates
        if item in candidates:
            if events < candidates[item][0]:
                self.dirty, self.floor = True, None
            candidates[item] = (events, ts)
        elif len(candidates) < slack * k:
            candidates[item] = (events, ts)
            self.floor = None
        else:
            if self.floor is None:
                self.floor = min(v[0] for v in candidates.values())
            if events > self.floor:  # then one leaves: the fewest events (ties: the smaller id)
                candidates[item] = (events, ts)
                (out, _), (_, (self.floor, _)) = heapq.nsmallest(2, candidates.items(), key=_by_fewest)
                del candidates[out]
        return True

    def remove(self, item: str) -> None:
        if item in self.scores:
            self.scores.remove(item)
        if self.candidates.pop(item, None) is not None:
            self.dirty, self.floor = True, None  # its place goes to an item outside them: a rebuild finds it

    def rebuild(self, k: int, window_ms: int, slack: int = 2) -> list[str]:
        """Scan every score: forget items gone quiet (returned), pick the candidates afresh."""
        horizon = self.newest - window_ms
        live: dict[str, tuple[int, int]] = {}
        quiet = []
        for item, value in list(self.scores.items()):
            if value[1] <= horizon:
                self.scores.remove(item)
                quiet.append(item)
            else:
                live[item] = value[:2]
        best = heapq.nsmallest(slack * k, live.items(), key=_by_score)
        self.candidates = dict(best)
        self.dirty, self.floor = False, None
        return quiet

    def needs_rebuild(self, window_ms: int) -> bool:
        horizon = self.newest - window_ms
        return self.dirty or any(ts <= horizon for _, ts in self.candidates.values())

    def top(self, k: int, window_ms: int) -> list[tuple[str, int]]:
        """Exact after :meth:`rebuild`; until the next one, an item whose candidate lost score
        may rank above one outside the candidates (the job rebuilds every few seconds)."""
        horizon = self.newest - window_ms
        live = [kv for kv in self.candidates.items() if kv[1][1] > horizon]
        ranked = sorted(live, key=_by_score)[:k]
        return [(item, score) for item, (score, _) in ranked]


TRENDING_SHARDS = 16  # the local phase's keys: fixed, so a checkpoint restores at any parallelism up to it


def trending_shard(category: str, item: str) -> int:
    """The key of trending's local phase: a category's items share one, so its list is whole
    there; items without a category spread by id. crc32, not hash(): keys survive a restart.

    >>> trending_shard("shoes", "a") == trending_shard("shoes", "b")
    True
    """
    return zlib.crc32((category or "\x00" + item).encode()) % TRENDING_SHARDS


def merge_partials(partials: Iterable[tuple[int, list[tuple[str, int, int]]]], k: int,
                   window_ms: int) -> tuple[int, list[tuple[str, int]]]:
    """Trending's global phase: the top ``k`` of the shards' lists ``(newest, [(item, events,
    ts)])``, with the newest event of all. Shards hold disjoint items, so the top of their tops
    is the top of all; an item met twice (it changed category) counts with its newest score.

    >>> merge_partials([(40, [("a", 4, 40), ("c", 1, 30)]), (20, [("b", 5, 20), ("a", 3, 10)])], 2, 100)
    (40, [('b', 5), ('a', 4)])
    """
    partials = list(partials)
    newest = max((n for n, _ in partials), default=0)
    best: dict[str, tuple[int, int]] = {}
    for _, entries in partials:
        for item, events, ts in entries:
            if ts > newest - window_ms and ts >= best.get(item, (0, -1))[1]:
                best[item] = (events, ts)
    top = heapq.nsmallest(k, best.items(), key=_by_score)
    return newest, [(item, events) for item, (events, _) in top]


class CategoryTrending:
    """A trending list per item category, fed the same updates as the global :class:`Trending`.

    Memory only: the global scores keep each item's category, so after a restore the lists
    are rebuilt from them (:meth:`restore`) instead of costing a state write per event. An
    item that changes category leaves its old list.

    >>> c = CategoryTrending()
    >>> for item, category, events, ts in [("a", "x", 3, 10), ("b", "x", 5, 20), ("c", "y", 1, 30),
    ...                                    ("a", "y", 4, 40)]:
    ...     c.update(item, category, events, ts, k=2)
    >>> [(category, c.top(category, 2, window_ms=100)) for category in c.due(2, 100, now=0, newest=40)]
    [('x', [('b', 5)]), ('y', [('a', 4), ('c', 1)])]
    """

    REBUILD_MS = 5000

    def __init__(self) -> None:
        self.lists: dict[str, Trending] = {}
        self.category_of: dict[str, str] = {}
        self.touched: set[str] = set()  # categories whose list changed since :meth:`due`
        self.rebuilt: dict[str, float] = {}

    def update(self, item: str, category: str, events: int, ts: int, k: int) -> None:
        before = self.category_of.get(item)
        if before is not None and before != category:
            old = self.lists[before]
            prev = old.scores.get(item)
            if prev is not None:  # (else its old list already let it go)
                if ts < prev[1]:
                    return
                old.remove(item)
                self.touched.add(before)
        t = self.lists.get(category)
        if t is None:
            t = self.lists[category] = Trending(ScoreMap())
        if t.update(item, events, ts, k):
            self.category_of[item] = category
            self.touched.add(category)

    def forget(self, items: Iterable[str]) -> None:
        """Drop items the global list let go (quiet for a window), so memory stays bounded."""
        for item in items:
            category = self.category_of.pop(item, None)
            if category is not None:
                self.lists[category].remove(item)

    def due(self, k: int, window_ms: int, now: float, newest: int) -> list[str]:
        """The categories changed since the last call, each rebuilt first where it needs it (at
        most every REBUILD_MS per category, ``now`` in ms). ``newest``: the global list's newest
        event; the window ends there for every category, so a quiet category's list empties."""
        out = sorted(self.touched)
        for category in out:
            t = self.lists[category]
            t.newest = max(t.newest, newest)
            if t.needs_rebuild(window_ms) and now - self.rebuilt.get(category, -self.REBUILD_MS) >= self.REBUILD_MS:
                t.rebuild(k, window_ms)
                self.rebuilt[category] = now
        self.touched.clear()
        return out

    def top(self, category: str, k: int, window_ms: int) -> list[tuple[str, int]]:
        return self.lists[category].top(k, window_ms)

    @classmethod
    def restore(cls, scores: Mapping[str, tuple], k: int) -> CategoryTrending:
        """The lists again from the global scores ``(events, ts[, category])``."""
        c = cls()
        for item, value in scores.items():
            if len(value) > 2:
                c.update(item, value[2], value[0], value[1], k)
        for t in c.lists.values():
            t.dirty = True  # candidates picked in arrival order: the first due() rebuilds
        return c
