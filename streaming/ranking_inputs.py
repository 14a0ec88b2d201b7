"""The ranking service's definitions (features/dsl.Ranking), folded beside the built-in views
so that training examples carry their values from just before each event.

The catalogue job writes the same definitions to Redis, where serving reads them; both fold
with streaming/aggregates.py, so a value a model learned from is the value the API serves
(online values: as of the entity's newest record, whatever order records came in).

>>> from datetime import timedelta as td
>>> from features.dsl import Count, Feature, Sliding, user
>>> views = Feature(name="user_views_1h", entity=user, aggregation=Count(), behaviors=["view"],
...                 window=Sliding(size=td(hours=1), slide=td(minutes=5)), ttl=td(days=1), owner="o",
...                 description="d")
>>> kind = KindValues([views])
>>> st, before = None, []
>>> for n, ts in enumerate([1_000, 2_000, 9_000_000]):
...     before.append(kind.values(st))
...     st = kind.add(st, Ev(f"e{n}", "u", "i", "view", ts, ""), lambda: -1)
>>> before
[{}, {'user_views_1h': 1}, {'user_views_1h': 2}]
>>> kind.values(st)  # the first two left the window
{'user_views_1h': 1}
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from features.dsl import Definition, Ranking, Ratio, item, user
from streaming.aggregates import EntityState, Plan, Rec
from streaming.state import Ev

SETTLE_AT = 32  # open records an entity keeps before settling them into panes (bounds its state)


class KindValues:
    """The listed definitions of one entity kind (and the features their ratios divide)."""

    def __init__(self, listed: Sequence[Definition]) -> None:
        needed: dict[str, Definition] = {}
        for d in listed:
            if isinstance(d, Ratio):
                needed.setdefault(d.numerator.name, d.numerator)
                needed.setdefault(d.denominator.name, d.denominator)
            needed[d.name] = d
        self.plan = Plan.of(needed.values())
        self.names = tuple(d.name for d in listed)

    def values(self, st: EntityState | None) -> dict[str, Any]:
        """The entity's online values; {} before its first record."""
        if st is None:
            return {}
        values = st.online(self.plan)
        return {n: values[n] for n in self.names}

    def add(self, st: EntityState | None, ev: Ev, horizon: Callable[[], int]) -> EntityState:
        """Fold an event in. ``horizon``: the time up to which no record can arrive any more
        (asked only when the entity settles)."""
        st = st or EntityState()
        st.add(Rec(ev.ts, ev.event_id, ev.behavior, ev.user_id, ev.item_id, ev.category_id), self.plan)
        if len(st.open) >= SETTLE_AT:
            st.settle(horizon(), self.plan, finals=False)
        return st


class RankingInputs:
    """The ranking service's user and item definitions; ``user``/``item`` are None when it
    lists none of that kind."""

    def __init__(self, ranking: Ranking) -> None:
        def of(kind: Any) -> KindValues | None:
            listed = [d for d in ranking.features if d.entity_kind == kind]
            return KindValues(listed) if listed else None

        self.user, self.item = of(user), of(item)
