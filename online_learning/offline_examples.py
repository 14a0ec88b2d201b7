"""Training examples over the offline store: the same builder, with the features as logged.

:class:`~online_learning.examples.BatchExamples` recomputes each event's features from the log
with today's feature code; :class:`OfflineExamples` takes them from Feast's offline store, as
the feature job logged them while it ran (connectors/offline_store.py), so a warm start learns
from the values serving saw. Each event gets, point in time:

* the user's and the item's newest row from *strictly before* its millisecond (no leakage),
  within the view's TTL (as Feast's point-in-time join does);
* for the negatives' features, the item's newest row *at* its millisecond (the builder's
  ``observe_item``, as the job feeds it the item's features after the event).

An item's features are its ``item_recent`` row joined with its ``item_covisit`` row, each
looked up as above; a user's and an item's rows gain the ranking service's definitions
(features/dsl.Ranking) from the catalogue job's final rows, looked up the same way. For a log
whose users and items each have at most one event per millisecond, arriving in time order,
the ``item_recent`` and ``user_recent`` parts equal the streaming job's and
``BatchExamples``'. Otherwise they are stricter: of events in the same
millisecond, none sees another's features (the job's see those that arrived before), and an
event that arrived late sees the features of its own time. The job logs an item's co-visitation
row once per flush tick, not per pair, so the row found may miss the pairs of the last tick
before the event: older than the job's, never newer.

The rows come through Feast's offline-store interface (``pull_all_from_table_or_query``), so
any offline store Feast can read works; the point-in-time lookups are done here, not with
``get_historical_features``, whose file store collapses entity rows sharing a key and a
timestamp (feast-dev/feast#6787), drops rows with no earlier value, and ran at ~700 rows/s.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import pyarrow as pa

from freshrec.config import Settings
from online_learning.examples import Example, ExampleBuilder
from streaming.state import Ev, Seen, Spec

Row = dict[str, Any]


@dataclass
class AsOf:
    """One feature view's rows per entity, for point-in-time lookups.

    Rows of one entity at one millisecond are ordered by the sum of their counts: counts within a
    window pane only grow, so the row that counted more events is the later one.

    >>> rows = [("u", 1_000, {"views": 1}), ("u", 3_000, {"views": 3}), ("u", 3_000, {"views": 2})]
    >>> v = AsOf.of(rows, ttl_ms=10_000)
    >>> v.before("u", 1_000), v.before("u", 3_000), v.before("u", 3_001), v.at("u", 3_000)
    (None, {'views': 1}, {'views': 3}, {'views': 3})
    >>> v.before("u", 13_001)  # older than the TTL
    """

    ttl_ms: int  # 0: rows never expire
    stamps: dict[str, list[int]] = field(default_factory=dict)
    rows: dict[str, list[Row]] = field(default_factory=dict)

    @classmethod
    def of(cls, rows: Iterable[tuple[str, int, Row]], ttl_ms: int) -> AsOf:
        out = cls(ttl_ms)
        counted = sorted(rows, key=lambda r: (r[0], r[1], sum(v for v in r[2].values() if type(v) is int)))
        for key, ts, row in counted:
            out.stamps.setdefault(key, []).append(ts)
            out.rows.setdefault(key, []).append(row)
        return out

    def before(self, key: str, ts: int) -> Row | None:
        """The entity's newest row from strictly before ``ts``."""
        return self._row(key, ts, bisect_left(self.stamps.get(key, ()), ts) - 1)

    def at(self, key: str, ts: int) -> Row | None:
        """The entity's newest row up to and including ``ts``."""
        return self._row(key, ts, bisect_right(self.stamps.get(key, ()), ts) - 1)

    def logged_before(self, key: str, ts: int) -> bool:
        """Whether any row of the entity, expired or not, is from before ``ts``."""
        return bisect_left(self.stamps.get(key, ()), ts) > 0

    def _row(self, key: str, ts: int, i: int) -> Row | None:
        if i < 0 or (self.ttl_ms and self.stamps[key][i] < ts - self.ttl_ms):
            return None
        return self.rows[key][i]

    def __len__(self) -> int:
        return sum(len(s) for s in self.stamps.values())


class OfflineExamples:
    """The builder over a log, with each event's features from the offline store's views.

    >>> users = AsOf.of([("u", 1_000, {"views": 1})], ttl_ms=0)
    >>> items = AsOf.of([("a", 1_000, {"views": 1}), ("b", 2_000, {"views": 1})], ttl_ms=0)
    >>> b = OfflineExamples(ExampleBuilder(negatives=0), users, items, Spec())
    >>> b.add(Ev("e1", "u", "a", "view", 1_000, ""))[0]["user"]  # nothing logged before it
    >>> b.add(Ev("e2", "u", "b", "view", 2_000, ""))[0]["user"]
    {'views': 1}
    >>> b.add(Ev("e2", "u", "b", "view", 2_000, "")) is None  # a duplicate, dropped as the job drops it
    True
    """

    def __init__(self, builder: ExampleBuilder, users: AsOf, items: AsOf, spec: Spec,
                 covisit: AsOf | None = None, ranked_users: list[AsOf] | None = None,
                 ranked_items: list[AsOf] | None = None) -> None:
        self.builder, self.users, self.items, self.spec = builder, users, items, spec
        self.covisit = covisit or AsOf(0)
        self.ranked_users, self.ranked_items = ranked_users or [], ranked_items or []  # one per definition
        self.seen: dict[str, Seen] = {}
        self.first: dict[str, int] = {}  # user -> time of their first event in the log
        self.missing = 0  # events of a user seen earlier in the log whose features the store lacks

    def add(self, ev: Ev) -> list[Example] | None:
        """The examples of one event; None for a duplicate."""
        if not self.seen.setdefault(ev.user_id, Seen()).first(ev.event_id, ev.ts, self.spec.dedup_ms):
            return None
        first = self.first.setdefault(ev.user_id, ev.ts)
        user = _with(self.users.before(ev.user_id, ev.ts), self.ranked_users, ev.user_id, ev.ts, AsOf.before)
        if first < ev.ts and not self.users.logged_before(ev.user_id, ev.ts):  # the job would have
            self.missing += 1
        examples = self.builder.add(ev, user, self._item(ev.item_id, ev.ts, AsOf.before))
        self.builder.observe_item(ev.item_id, self._item(ev.item_id, ev.ts, AsOf.at))
        return examples

    def _item(self, item: str, ts: int, lookup: Callable[[AsOf, str, int], Row | None]) -> Row | None:
        row = lookup(self.items, item, ts)
        covisit = lookup(self.covisit, item, ts) if row is not None else None
        return _with(row | covisit if covisit else row, self.ranked_items, item, ts, lookup)


def _with(row: Row | None, views: list[AsOf], key: str, ts: int,
          lookup: Callable[[AsOf, str, int], Row | None]) -> Row | None:
    """A built-in row with the definitions' values found for it (each view holds one)."""
    if row is None or not views:
        return row
    out = dict(row)
    for view in views:
        found = lookup(view, key, ts)
        if found:
            out.update(found)
    return out


def read_view(store: Any, name: str, start_ms: int, end_ms: int) -> AsOf:
    """A registered view's rows with event times in [start - TTL, end], through Feast's offline store."""
    from feast.infra.offline_stores.offline_utils import get_offline_store_from_config

    view = store.get_feature_view(name)
    ttl_ms = int(view.ttl.total_seconds() * 1000) if view.ttl else 0
    keys = [c.name for c in view.entity_columns]
    names = [f.name for f in view.features]
    source = view.batch_source
    start = datetime.fromtimestamp((start_ms - ttl_ms) / 1000, tz=UTC)
    end = datetime.fromtimestamp(end_ms / 1000, tz=UTC) + timedelta(milliseconds=1)
    try:
        table = get_offline_store_from_config(store.config.offline_store).pull_all_from_table_or_query(
            config=store.config, data_source=source, join_key_columns=keys, feature_name_columns=names,
            timestamp_field=source.timestamp_field, start_date=start, end_date=end).to_arrow()
    except FileNotFoundError:  # a file store nothing has been logged to yet
        return AsOf(ttl_ms)
    stamps = table.column(source.timestamp_field).cast(pa.timestamp("ms", tz="UTC")).cast(pa.int64()).to_pylist()
    features = table.select(names).to_pylist()
    return AsOf.of(zip(table.column(keys[0]).to_pylist(), stamps, features, strict=True), ttl_ms)


class OfflineStoreError(Exception):
    """The offline store cannot serve a log's features, with what to do about it."""


def offline_examples(settings: Settings, events: list[Ev], builder: ExampleBuilder) -> OfflineExamples:
    """:class:`OfflineExamples` for ``events`` (in time order), reading the views they need."""
    from features.definitions import item_covisit, item_recent, user_recent
    from features.dsl import item, load_ranking, user
    from features.store import feature_store, repo_dir

    start, end = min(e.ts for e in events), max(e.ts for e in events)
    store = feature_store(settings)
    users, items, covisit = (read_view(store, v.name, start, end) for v in (user_recent, item_recent, item_covisit))
    if not len(users):
        span = " to ".join(dict.fromkeys(datetime.fromtimestamp(t / 1000, tz=UTC).isoformat(timespec="seconds")
                                         for t in (start, end)))
        raise OfflineStoreError(
            f"the offline store ({repo_dir(settings) / 'offline'}) holds no {user_recent.name} rows for "
            f"{span}: the feature job logs them while it runs (freshrec up), for the events it reads; "
            "without --from-offline-store, training recomputes the features from the log")
    ranking = load_ranking(settings.features)
    ranked_users, ranked_items = ([read_view(store, name, start, end) for name in ranking.names(kind)]
                                  for kind in (user, item))
    return OfflineExamples(builder, users, items, Spec.of(settings), covisit, ranked_users, ranked_items)
