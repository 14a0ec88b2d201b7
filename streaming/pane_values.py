"""Online values from pane totals: the merge that Flink SQL leaves to Python.

Flink's GROUP BY (entity, pane) keeps each pane's totals (streaming/sql.py,
``Query.pane_totals``; the pane tiles every window's slide) and hands on, per mini-batch, the
panes that changed. An entity's value is then the merge of the panes of the newest window
containing its newest record, as streaming/aggregates.py computes it online, with its own
arithmetic (``Op.result``): counts and sums add (a count or sum of nothing is 0), means divide
the summed sums by the summed counts, min and max take theirs (None for none). This module
keeps the panes and picks each window's; the keyed operator around it is
streaming/definitions.py's ``OnlineValues``.

>>> from datetime import timedelta as td
>>> from features.dsl import Count, Feature, Max, Ratio, Sliding, user
>>> w = Sliding(size=td(seconds=20), slide=td(seconds=10))
>>> meta = dict(ttl=td(days=1), owner="o", description="d")
>>> views = Feature(name="views", entity=user, aggregation=Count(), behaviors=["view"], window=w, **meta)
>>> buys = Feature(name="buys", entity=user, aggregation=Count(), behaviors=["buy"], window=w, **meta)
>>> last = Feature(name="last", entity=user, aggregation=Max(of="ts"), window=w, **meta)
>>> rate = Ratio(name="rate", numerator=buys, denominator=views, **meta)
>>> merge = PaneMerge.of([views, buys, last, rate])
>>> panes = EntityPanes()
>>> panes.put(0, 9000, [3.0, None, 9000.0])  # pane 0 (0-10 s): 3 views, newest at 9 s
>>> merge.values(panes)
{'views': 3, 'buys': 0, 'last': 9000.0, 'rate': 0.0}
>>> panes.put(2, 25000, [1.0, 1.0, 25000.0])  # pane 2: the window 10-30 s leaves pane 0 behind
>>> merge.values(panes), panes.newest
({'views': 1, 'buys': 1, 'last': 25000.0, 'rate': 1.0}, 25000)
>>> sorted(panes.panes)  # out of reach of every later value
[2]
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from features.dsl import Definition
from streaming.aggregates import Plan


class EntityPanes:
    """One entity's totals per pane, and the time of its newest record; ``touched`` and
    ``expires`` are the keyed operator's (wall-clock ms of the last change, of its expiry timer)."""

    def __init__(self) -> None:
        self.panes: dict[int, list[float | None]] = {}
        self.newest = -(2**63)
        self.touched = 0
        self.expires: int | None = None

    def put(self, pane: int, newest: int, totals: list[float | None]) -> None:
        self.panes[pane] = totals
        self.newest = max(self.newest, newest)


def _acc(kind: str, totals: list[float | None], at: int) -> Any:
    """A pane's totals as streaming/aggregates.py's accumulator of the kind (None: no record)."""
    if kind == "mean":
        return (totals[at], int(totals[at + 1])) if totals[at + 1] else None
    v = totals[at]
    return int(v) if kind == "count" and v is not None else v


class PaneMerge:
    """One entity kind's compiled definitions, ready to merge pane totals into values."""

    def __init__(self, fine_ms: int, shapes: list[tuple[int, int, list[tuple[str, str, int]]]], plan: Plan) -> None:
        self.fine_ms, self.shapes, self.plan = fine_ms, shapes, plan
        self.ops = {op.name: op for op in plan.ops}  # the merge is aggregates.py's: Op.result
        self.reach_ms = max(slide * n for slide, n, _ in shapes)

    @classmethod
    def of(cls, defs: Iterable[Definition]) -> PaneMerge:
        from streaming.sql import Query  # the panes and the totals' order are the query's

        defs = list(defs)
        kinds = {d.entity_kind for d in defs}
        if len(kinds) != 1:
            raise ValueError(f"one entity kind per merge, got {sorted(k.name for k in kinds)}")
        fine_ms, shapes = Query.of(kinds.pop(), defs).pane_plan()
        return cls(fine_ms, shapes, Plan.of(defs))

    def values(self, entity: EntityPanes) -> dict[str, Any]:
        """The values of the newest windows containing the entity's newest record; panes out of
        reach of every window (so of every later value) are dropped."""
        fine, newest, panes = self.fine_ms, entity.newest, entity.panes
        first = (newest // fine * fine - self.reach_ms) // fine + 1
        for p in [p for p in panes if p < first]:
            del panes[p]
        out: dict[str, Any] = {}
        for slide_ms, n, parts in self.shapes:
            start = (newest // slide_ms - n + 1) * slide_ms // fine  # the window's first fine pane
            totals = [t for p, t in panes.items() if p >= start]  # none is newer than the newest record
            for name, kind, at in parts:
                out[name] = self.ops[name].result([_acc(kind, t, at) for t in totals])
        return self.plan.values(out)
