"""Training examples from behavior: positives with the features of just before, sampled negatives.

One builder serves the streaming job (jobs/feature_job.py feeds it from keyed state) and
batch runs (``freshrec evaluate``, warm start), so both produce the same examples from the
same events.

* **No leakage:** an example carries the user's and the item's features as they were
  *before* the event it learns from; the caller passes those in.
* **Attribution:** a conversion (click, cart, fav, buy) is attributed to the user's last
  view of that item within ``attribution_ms``; its example carries the features as of that
  view, the moment the recommendation was made. A conversion whose view is older than the
  window is a *late label* (counted; learned with the features as of the conversion); one
  with no view at all is *unattributed* (counted, learned the same way).
* **Negatives:** ``negatives`` items per positive, never the positive item itself. A share
  ``1 - uniform_share`` is drawn from a ring of recent events' items, i.e. in proportion to
  recent popularity (the hard negatives a uniform draw would miss); the rest uniformly from
  the items with features, so that a model does not simply learn "popular means negative".
  Their features are the newest the builder has seen, which in event-time order are from
  before this event.

>>> b = ExampleBuilder(negatives=1, seed=1)
>>> b.observe_item("i9", {"views": 4})
>>> b.add(Ev("e1", "u1", "i9", "view", 1_000, ""), None, None)[0]["label"]
1
>>> ex = b.add(Ev("e2", "u1", "i2", "view", 2_000, ""), {"views": 1}, None)
>>> [(e["item_id"], e["label"]) for e in ex]
[('i2', 1), ('i9', 0)]
>>> b.add(Ev("e3", "u1", "i2", "buy", 9_000, ""), {"views": 2}, {"views": 1})[0]["user"]  # as of the view
{'views': 1}
"""

from __future__ import annotations

import random
from collections import Counter, OrderedDict
from typing import Any, TypedDict

from features.dsl import Ranking
from freshrec.config import Settings
from streaming.aggregates import EntityState
from streaming.ranking_inputs import RankingInputs
from streaming.state import Ev, ItemState, Neighbours, RecentViews, Spec, UserState

CONVERSIONS = ("click", "cart", "fav", "buy")


class Example(TypedDict):
    user_id: str
    item_id: str
    ts: int
    label: int
    behavior: str  # what made it: the behavior of a positive, "negative" for a sampled one
    user: dict[str, Any] | None  # user features before the event (None: a new user)
    item: dict[str, Any] | None  # item features before the event (None: a new item)


class ExampleBuilder:
    def __init__(self, positives: tuple[str, ...] = ("view", *CONVERSIONS), negatives: int = 2,
                 attribution_ms: int = 1_800_000, pool_size: int = 20_000, max_items: int = 200_000,
                 max_views: int = 200_000, uniform_share: float = 0.5, seed: int = 0) -> None:
        self.positives = set(positives)
        self.negatives = negatives
        self.attribution_ms = attribution_ms
        self.rng = random.Random(seed)
        self.pool: list[str] = []  # ring of recent events' items
        self.pool_size, self.pool_at = pool_size, 0
        self.items: OrderedDict[str, dict[str, Any] | None] = OrderedDict()  # newest features, LRU-bounded
        self.max_items = max_items
        self.uniform_share = uniform_share
        self.known: list[str] = []  # the keys of ``items``, for O(1) uniform draws
        self.known_at: dict[str, int] = {}
        self.views: OrderedDict[tuple[str, str], tuple[int, Any, Any]] = OrderedDict()  # (user, item) -> last view
        self.max_views = max_views
        self.stats: Counter[str] = Counter()

    @classmethod
    def of(cls, s: Settings, seed: int = 0) -> ExampleBuilder:
        """The builder the configuration asks for (the job's, a warm start's)."""
        return cls(positives=s.positive_behaviors, negatives=s.negatives, attribution_ms=s.attribution_seconds * 1000,
                   seed=seed)

    def observe_item(self, item: str, features: dict[str, Any] | None) -> None:
        """The item's features after an event (feeds the negatives' features)."""
        if item not in self.items:
            self.known_at[item] = len(self.known)
            self.known.append(item)
        self.items[item] = features
        self.items.move_to_end(item)
        if len(self.items) > self.max_items:
            old, _ = self.items.popitem(last=False)
            at = self.known_at.pop(old)
            last = self.known.pop()
            if last != old:
                self.known[at], self.known_at[last] = last, at

    def add(self, ev: Ev, user: dict[str, Any] | None, item: dict[str, Any] | None) -> list[Example]:
        """Examples for one event, given the features of just before it."""
        key = (ev.user_id, ev.item_id)
        if ev.behavior == "view":
            self.views[key] = (ev.ts, user, item)
            self.views.move_to_end(key)
            if len(self.views) > self.max_views:
                self.views.popitem(last=False)
        elif ev.behavior in CONVERSIONS:
            seen = self.views.get(key)
            if seen is None or seen[0] > ev.ts:
                self.stats["unattributed"] += 1
            elif ev.ts - seen[0] > self.attribution_ms:
                self.stats["late_labels"] += 1
            else:
                self.stats["attributed"] += 1
                _, user, item = seen
        out: list[Example] = []
        if ev.behavior in self.positives:
            out.append(Example(user_id=ev.user_id, item_id=ev.item_id, ts=ev.ts, label=1, behavior=ev.behavior,
                               user=user, item=item))
            self.stats["positives"] += 1
            for neg in self._sample(ev.item_id):
                out.append(Example(user_id=ev.user_id, item_id=neg, ts=ev.ts, label=0, behavior="negative",
                                   user=user, item=self.items.get(neg)))
                self.stats["negatives"] += 1
        self._remember(ev.item_id)
        return out

    def _sample(self, positive: str) -> list[str]:
        if not self.pool:
            return []
        picked: list[str] = []
        for _ in range(self.negatives * 3):  # a few retries: popular positives are often in the pool
            uniform = self.known and self.rng.random() < self.uniform_share
            source = self.known if uniform else self.pool
            cand = source[self.rng.randrange(len(source))]
            if cand != positive and cand not in picked:
                picked.append(cand)
                if len(picked) == self.negatives:
                    break
        return picked

    def _remember(self, item: str) -> None:
        if len(self.pool) < self.pool_size:
            self.pool.append(item)
        else:
            self.pool[self.pool_at] = item
            self.pool_at = (self.pool_at + 1) % self.pool_size


class BatchExamples:
    """The builder run in batch over a log, with the streaming job's own feature state
    (streaming/state.py): each event's examples carry the features the job would have had
    just before it, and duplicates are dropped at the user as the job drops them.

    An item's features are its ``item_recent`` row and, once it has co-visits, its
    ``item_covisit`` row (``neighbours``, ``neighbour_counts``), as the job's item operator
    holds them: an event's own pairs count after its example, the pairs its view gives the
    other items right after it.

    >>> b = BatchExamples(ExampleBuilder(negatives=0))
    >>> first = b.add(Ev("e1", "u", "a", "view", 1_000, ""))
    >>> second = b.add(Ev("e2", "u", "b", "view", 2_000, ""))
    >>> first[0]["user"], second[0]["user"]["last_viewed_items"], second[0]["item"]
    (None, ['a'], None)
    >>> b.item_features("b")["neighbours"], b.covisit_row("a")  # views 1 s apart: 1 / (1 + 1/60)
    (['a'], {'neighbours': ['b'], 'neighbour_counts': [0.983607]})
    >>> b.add(Ev("e2", "u", "b", "view", 2_000, "")) is None  # a duplicate
    True

    ``ranking``: the ranking service's definitions, folded per user and item beside the
    built-in views (as the job's operators fold them) and added to their features by name.
    """

    def __init__(self, builder: ExampleBuilder, spec: Spec | None = None, ranking: RankingInputs | None = None) -> None:
        self.builder, self.spec = builder, spec or Spec()
        self.ranking = ranking or RankingInputs(Ranking())
        self.defined: dict[str, dict[str, EntityState]] = {"user": {}, "item": {}}  # ranking definitions' state
        self.defined_values: dict[str, dict[str, Any]] = {}  # an item's, until its next event
        self.newest = -(2**63)
        self.users: dict[str, UserState] = {}
        self.items: dict[str, ItemState] = {}
        self.views: dict[str, RecentViews] = {}  # per user, for pairing
        self.neighbours: dict[str, Neighbours] = {}
        self.item_cache: dict[str, dict[str, Any] | None] = {}  # features until the item next changes
        self.rows: dict[str, dict[str, Any]] = {}  # co-visitation rows until a pair changes them

    def user_features(self, user: str) -> dict[str, Any] | None:
        st = self.users.get(user)
        if not st:
            return None
        kind = self.ranking.user
        return st.features(self.spec) | kind.values(self.defined["user"].get(user)) if kind else st.features(self.spec)

    def covisit_row(self, item: str) -> dict[str, Any]:
        """The item's ``item_covisit`` row as the job writes it; {} before its first co-visit."""
        row = self.rows.get(item)
        if row is None:
            n = self.neighbours.get(item)
            row = self.rows[item] = n.features(self.spec) if n else {}
        return row

    def item_features(self, item: str) -> dict[str, Any] | None:
        if item not in self.item_cache:
            st = self.items.get(item)
            row = st.features() | self.covisit_row(item) if st else None
            if row and self.ranking.item:  # its values change with its own events only, not with its pairs
                values = self.defined_values.get(item)
                if values is None:
                    values = self.defined_values[item] = self.ranking.item.values(self.defined["item"].get(item))
                row |= values
            self.item_cache[item] = row
        return self.item_cache[item]

    def add(self, ev: Ev, user: dict[str, Any] | None = None) -> list[Example] | None:
        """Fold one event in; its examples, or None for a duplicate (``user``: its user's
        features before, if the caller has them already)."""
        if user is None:
            user = self.user_features(ev.user_id)
        if not self.users.setdefault(ev.user_id, UserState()).add(ev, self.spec):
            return None
        examples = self.builder.add(ev, user, self.item_features(ev.item_id))
        self.newest = max(self.newest, ev.ts)
        for kind, key, states in ((self.ranking.user, ev.user_id, self.defined["user"]),
                                  (self.ranking.item, ev.item_id, self.defined["item"])):
            if kind:
                # A log read in order never goes back further than the job's lateness allows.
                states[key] = kind.add(states.get(key), ev, lambda: self.newest - self.spec.dedup_ms - 1)
        self.defined_values.pop(ev.item_id, None)
        self.items.setdefault(ev.item_id, ItemState()).add(ev, self.spec)
        self.item_cache.pop(ev.item_id, None)
        if ev.behavior == "view":
            for a, b, ts, gap in self.views.setdefault(ev.user_id, RecentViews()).add(ev, self.spec):
                self.neighbours.setdefault(a, Neighbours()).add(b, ts, self.spec, gap)
                self.rows.pop(a, None)
                self.item_cache.pop(a, None)
        self.builder.observe_item(ev.item_id, self.item_features(ev.item_id))
        return examples
