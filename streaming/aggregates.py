"""The one implementation of features/dsl.py: the streaming job and the backfill both fold
records into :class:`EntityState` and emit what it returns.

A value at time t covers the records of the newest window containing t, up to and including
t. Each entity keeps its records in two parts:

* *open*: records newer than its horizon. Late records can still join them, so they are kept
  as they are; online values (as of the newest record) fold them in on top of the settled part.
* *settled*: per definition, one partial aggregate per slide of the window (a pane), built in
  event-time order. Records move here when the horizon passes them (the stream: watermark minus
  allowed lateness; the backfill: the end of input), and each distinct time passed gets one
  *final* row: the value as of that time, which no later record can change.

Final rows depend only on which records exist, never on the order they arrived in, so the
stream's final rows and the backfill's are the same rows (features/parity.py measures it).

>>> from datetime import timedelta as td
>>> from features.dsl import Feature, Count, LastN, Tumbling, user
>>> w = Tumbling(size=td(seconds=10))
>>> views = Feature(name="views", entity=user, aggregation=Count(), behaviors=["view"], window=w,
...                 ttl=td(days=1), owner="o", description="d")
>>> last = Feature(name="last", entity=user, aggregation=LastN(of="item_id", n=2), window=w,
...                ttl=td(days=1), owner="o", description="d")
>>> plan = Plan.of([views, last])
>>> st = EntityState()
>>> for ts, it in [(1000, "a"), (3000, "b"), (2000, "c")]:  # out of order
...     _ = st.add(Rec(ts, f"e{ts}", "view", "u", it, "c1"), plan)
>>> st.online(plan)
{'views': 3, 'last': ['b', 'c']}
>>> [(ts, v["views"], v["last"]) for ts, v in st.settle(2500, plan)]  # horizon passes 1000 and 2000
[(1000, 1, ['a']), (2000, 2, ['c', 'a'])]
>>> st.add(Rec(1500, "late", "view", "u", "z", "c1"), plan)  # behind the horizon: refused
False
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right, insort
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, NamedTuple

from features.dsl import (
    KEY_SEPARATOR,
    Count,
    CoVisitation,
    Definition,
    Feature,
    LastN,
    Ratio,
)

HOUR_MS = 3_600_000


class Rec(NamedTuple):
    """A record an entity folds: an event, or (for co-visitation) pairs with ``other``: one
    partner, or several joined by KEY_SEPARATOR (:func:`partners`)."""

    ts: int
    rid: str  # event id, or the pair's two event ids: orders records of the same ts
    behavior: str
    user_id: str
    item_id: str
    category_id: str
    other: str = ""


def partners(other: str) -> list[str]:
    """The co-visit partners a pair record carries (ids hold no control characters).

    >>> partners("a" + KEY_SEPARATOR + "b"), partners("c")
    (['a', 'b'], ['c'])
    """
    return other.split(KEY_SEPARATOR)


# --- aggregations as (start, add, merge) on plain values, so state pickles small --------------

def _value_of(agg: Any) -> Any:
    of = agg.of
    if isinstance(of, dict):
        return lambda r: float(of.get(r.behavior, 0))
    if of == "ts":
        return lambda r: float(r.ts)
    if of == "hour":
        return lambda r: float(r.ts // HOUR_MS % 24)
    return lambda r: getattr(r, of)


class Op:
    """One definition's arithmetic: ``add`` folds a record into a pane's accumulator (None for
    an empty pane), ``result`` merges the window's panes."""

    def __init__(self, d: Feature | CoVisitation) -> None:
        self.name = d.name
        self.slide_ms = int(d.window.slide.total_seconds() * 1000)
        self.panes = int(d.window.size / d.window.slide)
        if isinstance(d, CoVisitation):
            self.kind, self.top_k, self.behaviors = "covisit", d.top_k, None
            self.value = lambda r: r.other
            return
        agg = d.aggregation
        self.kind = agg.kind
        self.behaviors = frozenset(d.behaviors) if d.behaviors else None
        self.value = (lambda r: 1) if isinstance(agg, Count) else _value_of(agg)
        self.n = agg.n if isinstance(agg, LastN) else 0

    def accepts(self, r: Rec) -> bool:
        return self.behaviors is None or r.behavior in self.behaviors

    def window(self, ts: int) -> tuple[int, int]:
        """First and last pane of the newest window containing ts."""
        last = ts // self.slide_ms
        return last - self.panes + 1, last

    def add(self, acc: Any, r: Rec) -> Any:
        kind, v = self.kind, self.value(r)
        if kind == "count":
            return (acc or 0) + 1
        if kind == "sum":
            return (acc or 0.0) + v
        if kind == "mean":
            s, n = acc or (0.0, 0)
            return s + v, n + 1
        if kind == "min":
            return v if acc is None else min(acc, v)
        if kind == "max":
            return v if acc is None else max(acc, v)
        if kind == "distinct":
            acc = acc or set()
            acc.add(v)
            return acc
        if kind == "last_n":
            acc = acc or []
            insort(acc, (r.ts, r.rid, v))
            del acc[:-self.n]
            return acc
        acc = acc or {}  # covisit
        for p in partners(v):
            acc[p] = acc.get(p, 0) + 1
        return acc

    def result(self, accs: Iterable[Any]) -> Any:
        kind = self.kind
        accs = [a for a in accs if a is not None]
        if kind == "count":
            return sum(accs)
        if kind == "sum":
            return math.fsum(accs)  # exact, so it does not depend on how records fell into panes
        if kind == "mean":
            n = sum(a[1] for a in accs)
            return math.fsum(a[0] for a in accs) / n if n else None
        if kind == "min":
            return min(accs) if accs else None
        if kind == "max":
            return max(accs) if accs else None
        if kind == "distinct":
            return len(set().union(*accs))
        if kind == "last_n":
            newest = sorted(e for a in accs for e in a)[-self.n:]
            return [v for _, _, v in reversed(newest)]
        totals: dict[str, int] = {}
        for a in accs:
            for k, n in a.items():
                totals[k] = totals.get(k, 0) + n
        return [k for k, _ in sorted(totals.items(), key=lambda kv: (-kv[1], kv[0]))[:self.top_k]]


@dataclass
class RatioOp:
    name: str
    numerator: str
    denominator: str
    prior: float
    weight: float

    def result(self, values: dict[str, Any]) -> float | None:
        den = (values[self.denominator] or 0) + self.weight
        if den == 0:
            return None
        return ((values[self.numerator] or 0) + self.prior * self.weight) / den


class Plan:
    """The definitions of one entity kind, ready to run: what its operator evaluates."""

    def __init__(self, ops: list[Op], ratios: list[RatioOp], fingerprints: dict[str, str]) -> None:
        self.ops, self.ratios, self.fingerprints = ops, ratios, fingerprints
        self.names = [o.name for o in ops] + [r.name for r in ratios]

    @classmethod
    def of(cls, defs: Iterable[Definition]) -> Plan:
        ops: list[Op] = []
        ratios: list[RatioOp] = []
        prints: dict[str, str] = {}
        for d in defs:
            prints[d.name] = d.fingerprint()
            if isinstance(d, Ratio):
                ratios.append(RatioOp(d.name, d.numerator.name, d.denominator.name, float(d.prior),
                                      float(d.prior_weight)))
            elif isinstance(d, Feature | CoVisitation):
                ops.append(Op(d))
        return cls(ops, ratios, prints)

    def values(self, results: dict[str, Any]) -> dict[str, Any]:
        """The operators' results plus the ratios computed from them."""
        for r in self.ratios:
            results[r.name] = r.result(results)
        return results


class Window:
    """One definition's value over the newest window while records fold into its settled panes
    in event-time order (settle's order). Distinct counts, last-N and co-visits keep running
    totals, so a final row costs O(1) instead of merging the window's panes: the merge made the
    backfill quadratic in an item's co-visit partners. The rest merge their few small panes.

    >>> from datetime import timedelta as td
    >>> from features.dsl import DistinctCount, Feature, Sliding, user
    >>> d = Feature(name="d", entity=user, aggregation=DistinctCount(of="item_id"), ttl=td(days=1),
    ...             window=Sliding(size=td(seconds=2), slide=td(seconds=1)), owner="o", description="d")
    >>> w = Window(Op(d), {})
    >>> for ts, it in [(0, "a"), (500, "a"), (1200, "b"), (2100, "c")]:
    ...     w.add(Rec(ts, str(ts), "view", "u", it, "c1"))
    ...     print(ts, w.value(ts))
    0 1
    500 1
    1200 2
    2100 2
    """

    def __init__(self, op: Op, panes: dict[int, Any]) -> None:
        self.op, self.panes = op, panes  # the state's settled panes: kept up to date here
        self.first: int | None = None  # first pane of the window the totals cover
        self.counts: dict[Any, int] = {}  # distinct: panes holding a value; covisit: pairs per partner
        self.newest: list[tuple[int, str, Any]] = []  # last_n: the newest n entries
        self.top: list[str] | None = None  # covisit: the top k of counts; None when it needs a sort

    def _advance(self, ts: int) -> None:
        first, _ = self.op.window(ts)
        if self.first is None:
            self.first = first
            for p in list(self.panes):
                if p < first:  # settled earlier, out of reach of this record and every later one
                    del self.panes[p]
                else:
                    self._enter(self.panes[p])
            return
        if first <= self.first:
            return
        gone = ([p for p in self.panes if p < first] if first - self.first > len(self.panes)
                else [p for p in range(self.first, first) if p in self.panes])
        for p in gone:
            self._leave(self.panes.pop(p))  # no later value reaches it
        self.first = first

    def _enter(self, acc: Any) -> None:
        kind, counts = self.op.kind, self.counts
        if kind == "distinct":
            for v in acc:
                counts[v] = counts.get(v, 0) + 1
        elif kind == "covisit":
            for v, n in acc.items():
                counts[v] = counts.get(v, 0) + n
        elif kind == "last_n":
            self.newest = sorted([*self.newest, *acc])[-self.op.n:]

    def _leave(self, acc: Any) -> None:
        kind, counts = self.op.kind, self.counts
        if kind not in ("distinct", "covisit"):
            return
        for v in acc:
            n = counts[v] - (1 if kind == "distinct" else acc[v])
            if n:
                counts[v] = n
            else:
                del counts[v]
        if kind == "covisit":
            self.top = None

    def add(self, r: Rec) -> None:
        """Fold a record no older than any folded before."""
        op = self.op
        self._advance(r.ts)
        pane = r.ts // op.slide_ms
        acc = self.panes.get(pane)
        if op.kind == "distinct":
            v = op.value(r)
            if acc is None or v not in acc:
                self.counts[v] = self.counts.get(v, 0) + 1
        elif op.kind == "covisit":
            for p in partners(op.value(r)):
                self._count_pair(p)
        elif op.kind == "last_n":
            self.newest.append((r.ts, r.rid, op.value(r)))
            del self.newest[:-op.n]
        self.panes[pane] = op.add(acc, r)

    def _count_pair(self, v: str) -> None:
        counts, top = self.counts, self.top
        counts[v] = counts.get(v, 0) + 1
        if top is None:
            return
        # Counts only grow between sorts, so only v itself can enter or move in the top k.
        rank = lambda k: (-counts[k], k)  # noqa: E731
        if v in top or len(top) < self.op.top_k:
            if v not in top:
                top.append(v)
            top.sort(key=rank)
        elif rank(v) < rank(top[-1]):
            top[-1] = v
            top.sort(key=rank)

    def value(self, ts: int) -> Any:
        """The value as of ts, no earlier than the last record folded."""
        op = self.op
        self._advance(ts)
        first, last = op.window(ts)
        if op.kind == "distinct":
            return len(self.counts)
        if op.kind == "last_n":
            return [v for t, _, v in reversed(self.newest) if t // op.slide_ms >= first]
        if op.kind == "covisit":
            if self.top is None:
                self.top = heapq.nsmallest(op.top_k, self.counts, key=lambda k: (-self.counts[k], k))
            return list(self.top)
        return op.result(self.panes[p] for p in range(first, last + 1) if p in self.panes)


class EntityState:
    """Everything one entity's features need (pickled into one Flink ValueState)."""

    __slots__ = ("horizon", "newest", "open", "open_panes", "settled", "versions")

    def __init__(self) -> None:
        self.horizon = -(2**63)  # records at or before it are settled (or refused as late)
        self.newest = -(2**63)
        self.open: list[Rec] = []  # sorted by (ts, rid)
        self.open_panes: dict[str, dict[int, Any]] = {}  # definition -> pane -> accumulator of open records
        self.settled: dict[str, dict[int, Any]] = {}
        self.versions: dict[str, str] = {}  # definition -> fingerprint its panes were built with

    def _upgrade(self, plan: Plan) -> None:
        """Definitions changed since the state was written start empty; removed ones are dropped."""
        if self.versions == plan.fingerprints:
            return
        for name in list(self.settled):
            if plan.fingerprints.get(name) != self.versions.get(name):
                self.settled.pop(name, None)
                self.open_panes.pop(name, None)
        self.versions = dict(plan.fingerprints)
        self._rebuild_open(plan)

    def _rebuild_open(self, plan: Plan) -> None:
        self.open_panes = {}
        for r in self.open:
            self._fold_open(r, plan)

    def _fold_open(self, r: Rec, plan: Plan) -> None:
        for op in plan.ops:
            if op.accepts(r):
                panes = self.open_panes.setdefault(op.name, {})
                pane = r.ts // op.slide_ms
                panes[pane] = op.add(panes.get(pane), r)

    def add(self, r: Rec, plan: Plan, online: bool = True) -> bool:
        """Keep a record; False (and nothing changes) when it is at or behind the horizon."""
        self._upgrade(plan)
        if r.ts <= self.horizon:
            return False
        insort(self.open, r)
        if online:  # the backfill needs no online values: it skips their upkeep
            self._fold_open(r, plan)
        self.newest = max(self.newest, r.ts)
        return True

    def online(self, plan: Plan) -> dict[str, Any]:
        """Values as of the newest record: settled and open records together."""
        self._upgrade(plan)
        t = self.newest

        def accs(op: Op) -> list[Any]:
            first, last = op.window(t)
            out = []
            for part in (self.settled.get(op.name, {}), self.open_panes.get(op.name, {})):
                out.extend(a for p, a in part.items() if first <= p <= last)
            return out

        return plan.values({op.name: op.result(accs(op)) for op in plan.ops})

    def settle(self, horizon: int, plan: Plan, finals: bool = True) -> list[tuple[int, dict[str, Any]]]:
        """Move records up to ``horizon`` into the settled panes, in event-time order; return
        the final row of each distinct time passed (none without ``finals``: a caller that
        only needs online values skips their cost)."""
        self._upgrade(plan)
        if horizon <= self.horizon:
            return []
        cut = bisect_right(self.open, (horizon, "\U0010ffff"))
        passing, self.open = self.open[:cut], self.open[cut:]
        self.horizon = horizon
        rows: list[tuple[int, dict[str, Any]]] = []
        windows = [Window(op, self.settled.setdefault(op.name, {})) for op in plan.ops]
        for i, r in enumerate(passing):
            for w in windows:
                if w.op.accepts(r):
                    w.add(r)
            if finals and (i + 1 == len(passing) or passing[i + 1].ts != r.ts):
                rows.append((r.ts, plan.values({w.op.name: w.value(r.ts) for w in windows})))
        if passing:
            self._evict(plan)
            if self.open_panes:
                self._rebuild_open(plan)
        return rows

    def _evict(self, plan: Plan) -> None:
        """Drop settled panes no value at or after the horizon can reach."""
        for op in plan.ops:
            panes = self.settled.get(op.name)
            if panes:
                first, _ = op.window(self.horizon)
                for p in [p for p in panes if p < first]:
                    del panes[p]

    def empty(self) -> bool:
        return not self.open and not any(self.settled.values())
