"""Feature definitions compiled to Flink SQL: the counting runs in Flink's Java operators.

Count, Sum, Mean, Min, Max, DistinctCount and (unfiltered) LastN of one entity over a window,
and Ratios of them, compile to one query per entity kind. The values are exactly those of
streaming/aggregates.py: at every distinct event time t of an entity's records, the records of
the newest window containing t, up to and including t. A window is built of panes (its
slide), so for counts, sums, means, min and max

    value(t) = merge(the panes before t's pane in the window,  -- a pane-level OVER window
                     t's own pane up to t)                     -- a record-level OVER window

joined on (entity, pane). A distinct count is a running sum of +1/-1 steps (:class:`_Distinct`),
the newest n values are LAGs (:class:`_Last`). Co-visitation and filtered last-N lists stay on
the entity operators (streaming/definitions.py; Java in a stream, Python in the backfill):
:func:`split` says which is which.

A stream needs operators that only append, each row final once the watermark passes it: there
the earlier panes are a HOP window over pane totals, met by an interval join, and a 1 ms TUMBLE
window makes one row per time (``select(..., stream=True)``; counts, sums, means, min and max
so far). That plan gives the batch plan's rows in either runtime mode
(tests/test_compiled_stream.py); a batch job keeps its own plan, which runs 1.4-3x faster
(docs/benchmarks/compiled-stream.md).

>>> from datetime import timedelta as td
>>> from features.dsl import Feature, Count, CoVisitation, LastN, Ratio, Sliding, user
>>> hour = Sliding(size=td(hours=1), slide=td(minutes=5))
>>> meta = dict(ttl=td(days=1), owner="o", description="d")
>>> views = Feature(name="views", entity=user, aggregation=Count(), behaviors=["view"], window=hour, **meta)
>>> buys = Feature(name="buys", entity=user, aggregation=Count(), behaviors=["buy"], window=hour, **meta)
>>> rate = Ratio(name="rate", numerator=buys, denominator=views, **meta)
>>> last = Feature(name="last", entity=user, aggregation=LastN(n=2), window=hour, **meta)
>>> bought = Feature(name="bought", entity=user, aggregation=LastN(), behaviors=["buy"], window=hour, **meta)
>>> compiled, rest = split([views, buys, rate, last, bought, CoVisitation(name="co", **meta)])
>>> [d.name for d in compiled], [d.name for d in rest]
(['views', 'buys', 'rate', 'last'], ['bought', 'co'])
>>> q = Query.of(user, compiled)
>>> [c for c, _ in q.columns]
['user_id', 'ts', 'views', 'buys', 'last__v0', 'last__t0', 'last__v1', 'last__t1', 'rate']
>>> "RANGE BETWEEN 11 PRECEDING AND 1 PRECEDING" in q.insert("events", "sink")
True
>>> streamed, _ = split([views, buys, rate, last], stream=True)
>>> [d.name for d in streamed]
['views', 'buys', 'rate']
>>> interval(55 * 60_000) in Query.of(user, streamed).select("events", stream=True)  # the 11 panes before
True
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from features.dsl import (
    KEY_SEPARATOR,
    Count,
    Definition,
    DistinctCount,
    EntityKind,
    Feature,
    LastN,
    Max,
    Mean,
    Min,
    Ratio,
    Sum,
    Window,
)
from streaming.aggregates import HOUR_MS

COMPILED = (Count, Sum, Mean, Min, Max, DistinctCount)
EVENT_COLUMNS = (("event_id", "STRING"), ("user_id", "STRING"), ("item_id", "STRING"), ("behavior", "STRING"),
                 ("ts", "BIGINT"), ("category_id", "STRING"))


_AGG_CODES = {"SUM": "S", "COUNT": "C", "MIN": "m", "MAX": "M"}  # PaneMerge.java's plan: a pane total's aggregate
MAX_LAST_N = 50  # a column per entry: longer lists stay on the Python operators


def _compiles(d: Definition, stream: bool = False) -> bool:
    if stream:  # the append-only plan: counts, sums, means, min and max (HOP windows: under 100 days)
        return (isinstance(d, Feature) and isinstance(d.aggregation, Count | Sum | Mean | Min | Max)
                and d.window.size < timedelta(milliseconds=MAX_INTERVAL_MS))
    if isinstance(d, Feature) and isinstance(d.aggregation, LastN):
        # A filtered list would need the newest accepted records as of every record: not compiled yet.
        return d.behaviors is None and d.aggregation.n <= MAX_LAST_N
    return isinstance(d, Feature) and isinstance(d.aggregation, COMPILED)


def split(defs: Iterable[Definition], stream: bool = False) -> tuple[list[Definition], list[Definition]]:
    """(what compiles to SQL, what stays on the Python operators), for a batch job or a
    ``stream``; a Ratio compiles when both its sides do, and otherwise takes them along, so no
    definition is computed twice."""
    defs = list(defs)
    python = {d.name for d in defs if not isinstance(d, Ratio) and not _compiles(d, stream)}
    for d in defs:
        if isinstance(d, Ratio) and not (_compiles(d.numerator, stream) and _compiles(d.denominator, stream)):
            python |= {d.name, d.numerator.name, d.denominator.name}
    return [d for d in defs if d.name not in python], [d for d in defs if d.name in python]


def name(text: str) -> str:
    """An identifier, quoted: definitions may be called like SQL keywords (``values``, ``count``)."""
    return "`" + text.replace("`", "``") + "`"


def literal(x: float) -> str:
    """A DOUBLE literal of exactly this float (a plain ``0.1`` would be a DECIMAL)."""
    text = repr(float(x))
    return text if "e" in text else text + "E0"


MAX_INTERVAL_MS = 100 * 86_400_000  # Flink plans day-time literals of two day digits only


def interval(ms: int) -> str:
    """An exact INTERVAL literal of ``ms`` milliseconds (``SECOND`` alone holds two digits).

    >>> interval(90_061_001)
    "INTERVAL '1 01:01:01.001' DAY TO SECOND(3)"
    """
    if not 0 <= ms < MAX_INTERVAL_MS:
        raise ValueError(f"{ms} ms is not an interval Flink SQL can plan (0 to 99 days)")
    return (f"INTERVAL '{ms // 86_400_000} {ms // 3_600_000 % 24:02d}:{ms // 60_000 % 60:02d}:"
            f"{ms // 1000 % 60:02d}.{ms % 1000:03d}' DAY TO SECOND(3)")


def epoch_ms(column: str) -> str:
    """Milliseconds since the epoch of a TIMESTAMP_LTZ column (in a UTC session: :func:`use_utc`)."""
    return f"(EXTRACT(EPOCH FROM {column}) * 1000 + EXTRACT(MILLISECOND FROM {column}))"


def _string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _accept(d: Feature) -> str | None:
    """The condition on a record's behavior, None for every behavior."""
    return f"behavior IN ({', '.join(_string(b) for b in d.behaviors)})" if d.behaviors else None


@dataclass(frozen=True)
class _Shape:
    """A window as panes: which pane column it uses, how many panes it spans."""

    slide_ms: int
    panes: int

    @classmethod
    def of(cls, w: Window) -> _Shape:
        return cls(int(w.slide.total_seconds() * 1000), int(w.size / w.slide))


class _Part:
    """One definition's SQL: its per-record input, the aggregates it needs, how they merge."""

    def __init__(self, d: Feature, i: int) -> None:
        self.d, self.x = d, f"x{i}"
        agg = d.aggregation
        self.kind = type(agg).__name__.lower()
        self.sql_type = "BIGINT" if isinstance(agg, Count) else "DOUBLE"
        accept = _accept(d)
        if isinstance(agg, Count):
            value = "CAST(1 AS BIGINT)"
        elif isinstance(agg.of, dict):
            cases = " ".join(f"WHEN {_string(b)} THEN {literal(w)}" for b, w in sorted(agg.of.items()))
            value = f"CASE behavior {cases} ELSE 0.0E0 END"
        elif agg.of == "ts":
            value = "CAST(ts AS DOUBLE)"
        else:  # hour of day, UTC
            value = f"CAST(MOD(ts / {HOUR_MS}, 24) AS DOUBLE)"
        self.input = f"CASE WHEN {accept} THEN {value} END" if accept else value
        # (aggregate over records, how pane values of it merge), named by position
        self.aggs = {"count": [("SUM", "SUM")], "sum": [("SUM", "SUM")], "mean": [("SUM", "SUM"), ("COUNT", "SUM")],
                     "min": [("MIN", "MIN")], "max": [("MAX", "MAX")]}[self.kind]

    def components(self) -> list[tuple[str, str, str]]:
        """(column suffix, aggregate over records, merge over panes)."""
        return [(f"{self.x}_{n}", agg, merge) for n, (agg, merge) in enumerate(self.aggs)]

    def value(self) -> str:
        """The value from the earlier panes' merged aggregates (columns ``<component>_before``;
        none in a one-pane window) and this pane's (``<component>_here``), as Python computes
        it (a count or sum of nothing is 0, the rest NULL)."""
        comps = [c for c, _, _ in self.components()]
        here = [f"{c}_here" for c in comps]
        before = [f"{c}_before" for c in comps] if _Shape.of(self.d.window).panes > 1 else None
        if self.kind in ("count", "sum"):
            zero = "0" if self.kind == "count" else "0.0E0"
            parts = [f"COALESCE({c}, {zero})" for c in ([*before, *here] if before else here)]
            return " + ".join(parts)
        if self.kind == "mean":
            s = " + ".join(f"COALESCE({c}, 0.0E0)" for c in ([before[0], here[0]] if before else [here[0]]))
            n = " + ".join(f"COALESCE({c}, 0)" for c in ([before[1], here[1]] if before else [here[1]]))
            return f"CASE WHEN {n} > 0 THEN ({s}) / ({n}) END"
        if not before:
            return here[0]
        a, b = before[0], here[0]
        better = "<" if self.kind == "min" else ">"
        return f"CASE WHEN {a} IS NULL THEN {b} WHEN {b} IS NULL THEN {a} WHEN {a} {better} {b} THEN {a} ELSE {b} END"


class _Distinct:
    """A distinct count as +1/-1 steps: a record counts for the windows in which it is the first
    of its value. With ``prev`` the value's previous record, that is from
    ``max(ts, start of pane(prev) + k)`` until the start of ``pane(ts) + k``, when it leaves;
    a running sum of the steps over the entity's time line is the count."""

    def __init__(self, d: Feature, i: int) -> None:
        self.d, self.y = d, f"y{i}"
        shape = _Shape.of(d.window)
        self.slide, self.panes = shape.slide_ms, shape.panes
        self.accept = _accept(d)
        # Events carry "" for no category (streaming/aggregates.py counts it as a value); the file reads it as NULL.
        self.input = f"COALESCE({name(d.aggregation.of)}, '')"

    def steps(self, keys: str) -> str:
        slide, k = self.slide, self.panes
        where = f" WHERE {self.accept}" if self.accept else ""
        return (f"s_{self.y} AS (SELECT {keys}, ts, CASE WHEN `before` IS NULL THEN ts ELSE GREATEST(ts, "
                f"(`before` / {slide} + {k}) * {slide}) END AS t_in, (ts / {slide} + {k}) * {slide} AS t_out FROM "
                f"(SELECT {keys}, ts, LAG(ts) OVER (PARTITION BY {keys}, {self.y} ORDER BY ts) AS `before` "
                f"FROM r{where}))")


class _Last:
    """The newest n values: the record's own and n-1 LAGs in (time, event id) order, read at the
    last record of each time, each kept while it is inside the window (its time column says so:
    a value of "" is a value)."""

    def __init__(self, d: Feature, i: int) -> None:
        self.d, self.z = d, f"z{i}"
        self.n = d.aggregation.n
        shape = _Shape.of(d.window)
        self.slide, self.panes = shape.slide_ms, shape.panes
        self.input = f"COALESCE({name(d.aggregation.of)}, '')"
        self.values = [f"{d.name}__v{j}" for j in range(self.n)]
        self.times = [f"{d.name}__t{j}" for j in range(self.n)]

    def ctes(self, keys: str) -> list[str]:
        over = f"OVER (PARTITION BY {keys} ORDER BY ts, event_id)"
        lags = [f"{self.z} AS v0", "ts AS t0"]
        for j in range(1, self.n):
            lags += [f"LAG({self.z}, {j}) {over} AS v{j}", f"LAG(ts, {j}) {over} AS t{j}"]
        start = f"(ts / {self.slide} - {self.panes - 1}) * {self.slide}"
        kept = []
        for j in range(self.n):
            kept += [f"CASE WHEN t{j} >= {start} THEN v{j} END AS {name(self.values[j])}",
                     f"CASE WHEN t{j} >= {start} THEN t{j} END AS {name(self.times[j])}"]
        return [f"l_{self.z} AS (SELECT {keys}, ts, {', '.join(lags)}, LEAD(ts) {over} AS next_ts FROM r)",
                f"k_{self.z} AS (SELECT {keys}, ts, {', '.join(kept)} FROM l_{self.z} "
                "WHERE next_ts IS NULL OR next_ts <> ts)"]


class Query:
    """One entity kind's compiled definitions: an INSERT of one row per entity and distinct
    event time, with a column per definition."""

    def __init__(self, kind: EntityKind, features: list[Feature], ratios: list[Ratio]) -> None:
        self.kind, self.ratios = kind, ratios
        self.parts = [_Part(f, i) for i, f in enumerate(features)
                      if not isinstance(f.aggregation, DistinctCount | LastN)]
        self.distincts = [_Distinct(f, i) for i, f in enumerate(features) if isinstance(f.aggregation, DistinctCount)]
        self.lasts = [_Last(f, i) for i, f in enumerate(features) if isinstance(f.aggregation, LastN)]
        self.shapes: dict[_Shape, str] = {}
        for p in self.parts:
            self.shapes.setdefault(_Shape.of(p.d.window), f"p{len(self.shapes)}")

    @classmethod
    def of(cls, kind: EntityKind, defs: list[Definition]) -> Query:
        return cls(kind, [d for d in defs if isinstance(d, Feature)], [d for d in defs if isinstance(d, Ratio)])

    @property
    def columns(self) -> list[tuple[str, str]]:
        return ([(k, "STRING") for k in self.kind.join_keys] + [("ts", "BIGINT")]
                + [(p.d.name, p.sql_type) for p in self.parts] + [(d.d.name, "BIGINT") for d in self.distincts]
                + [c for last in self.lasts for j in range(last.n) for c in ((last.values[j], "STRING"),
                                                                             (last.times[j], "BIGINT"))]
                + [(r.name, "DOUBLE") for r in self.ratios])

    @property
    def names(self) -> list[str]:
        """The definitions this query computes."""
        return ([p.d.name for p in self.parts] + [d.d.name for d in self.distincts]
                + [last.d.name for last in self.lasts] + [r.name for r in self.ratios])

    @property
    def lists(self) -> dict[str, tuple[list[str], list[str]]]:
        """Each last-N definition's value and time columns (newest first): a list of the values
        whose time is not NULL."""
        return {last.d.name: (last.values, last.times) for last in self.lasts}

    def insert(self, source: str, sink: str, stream: bool = False) -> str:
        return f"INSERT INTO {name(sink)}\n" + self.select(source, stream)

    def select(self, source: str, stream: bool = False) -> str:
        """The query over ``source``, the events' table. ``stream``: the plan whose operators only
        append (:meth:`_stream_panes`), for a table with the event time ``rt`` (:func:`table`);
        it runs in both modes, but a batch job runs the other plan faster."""
        if stream and (self.distincts or self.lasts):
            raise ValueError("distinct counts and last-N lists do not compile for a stream yet: "
                             "split(defs, stream=True)")
        keys = [name(k) for k in self.kind.join_keys]
        k = ", ".join(keys)
        ctes = [self._records(source, stream)]
        tables = []  # (CTE, its value columns): each has one row per entity and distinct time
        if self.parts:
            ctes += self._stream_panes(keys) if stream else self._panes(keys)
            tables.append(("g", [p.d.name for p in self.parts]))
        if self.distincts:
            ctes += self._steps(k)
            tables.append(("n", [d.d.name for d in self.distincts]))
        for last in self.lasts:
            ctes += last.ctes(k)
            tables.append((f"k_{last.z}", [c for j in range(last.n) for c in (last.values[j], last.times[j])]))
        first = tables[0][0]
        joins = " ".join(f"JOIN {t} ON " + " AND ".join(f"{first}.{c} = {t}.{c}" for c in [*keys, "ts"])
                         for t, _ in tables[1:])
        ratios = []
        for r in self.ratios:
            den = f"CAST(COALESCE({name(r.denominator.name)}, 0) AS DOUBLE) + {literal(r.prior_weight)}"
            num = f"CAST(COALESCE({name(r.numerator.name)}, 0) AS DOUBLE) + {literal(r.prior * r.prior_weight)}"
            ratios.append(f"CASE WHEN {den} <> 0.0E0 THEN ({num}) / ({den}) END AS {name(r.name)}")
        out = ", ".join([*(f"{first}.{key}" for key in keys), f"{first}.ts",
                         *(f"{t}.{name(c)}" for t, cols in tables for c in cols), *ratios])
        return "WITH " + ",\n".join(ctes) + f"\nSELECT {out} FROM {first} {joins}"

    def _records(self, source: str, stream: bool) -> str:
        """The CTE ``r``: the kind's records (its keys all set) with each definition's input."""
        keys = [name(k) for k in self.kind.join_keys]
        columns = [*keys, "ts", *(["rt"] if stream else []), "event_id", "behavior",
                   *(f"ts / {s.slide_ms} AS {col}" for s, col in self.shapes.items()),
                   *(f"{p.input} AS {p.x}" for p in self.parts), *(f"{d.input} AS {d.y}" for d in self.distincts),
                   *(f"{last.input} AS {last.z}" for last in self.lasts)]
        complete = [f"{key} IS NOT NULL AND {key} <> ''" for key in keys if key not in ("`user_id`", "`item_id`")]
        return (f"r AS (SELECT {', '.join(columns)} FROM {name(source)}"
                + (f" WHERE {' AND '.join(complete)}" if complete else "") + ")")

    def entity(self) -> str:
        """The entity's key as the Python operators write it (parts joined by KEY_SEPARATOR)."""
        parts = [f"COALESCE({name(k)}, '')" for k in self.kind.join_keys]
        return f" || U&'\\{ord(KEY_SEPARATOR):04X}' || ".join(parts)  # CHR() would make it nullable

    @property
    def fine_ms(self) -> int:
        """The pane of :meth:`online`: the greatest that tiles every window's slide."""
        return math.gcd(*(shape.slide_ms for shape in self.shapes))

    def online(self, source: str) -> str:
        """The online values, as streaming/aggregates.py computes them as of each entity's
        newest record: a GROUP BY entity whose aggregate, ``pane_merge`` (streaming/java,
        registered by :func:`use_functions`), keeps the entity's totals per pane of
        :attr:`fine_ms` and merges the newest windows' panes. A group aggregation emits on every
        record, in any order (with mini-batch, once per entity and flush), so the values follow
        each event, late ones inside the lateness too. Rows: (entity, newest ts, a column per
        name of :attr:`names`), what streaming/java's ``FeastRedisSink`` writes."""
        if self.distincts or self.lasts:
            raise ValueError("distinct counts and last-N lists have no online plan: split(defs, stream=True)")
        comps, parts = [], []
        for i, p in enumerate(self.parts):
            shape = _Shape.of(p.d.window)
            parts.append(f"{p.kind}:{len(comps)}:{shape.slide_ms}:{shape.panes}")
            comps += [f"{_AGG_CODES[agg]}{i}" for _, agg, _ in p.components()]
        plan = f"{self.fine_ms}|{','.join(comps)}|{','.join(parts)}"
        inputs = ", ".join(f"CAST({p.x} AS DOUBLE)" for p in self.parts)
        values = {p.d.name: f"CAST(v[{i + 1}] AS BIGINT)" if p.kind == "count" else f"v[{i + 1}]"
                  for i, p in enumerate(self.parts)}
        for r in self.ratios:  # aggregates.RatioOp
            den = f"(COALESCE({values[r.denominator.name]}, 0) + {literal(r.prior_weight)})"
            num = f"(COALESCE({values[r.numerator.name]}, 0) + {literal(r.prior * r.prior_weight)})"
            values[r.name] = f"CASE WHEN {den} <> 0.0E0 THEN {num} / {den} END"
        columns = ", ".join(f"{values[n]} AS {name(n)}" for n in self.names)
        return (f"WITH {self._records(source, False)}\n"
                f"SELECT entity, newest AS ts, {columns} "
                f"FROM (SELECT entity, MAX(ts) AS newest, pane_merge({_string(plan)}, ts, ARRAY[{inputs}]) AS v FROM "
                f"(SELECT {self.entity()} AS entity, COALESCE(ts, 0) AS ts, "
                f"{', '.join(p.x for p in self.parts)} FROM r) GROUP BY entity)")

    def _parts(self, shape: _Shape) -> list[_Part]:
        """The parts whose windows have this shape."""
        return [p for p in self.parts if _Shape.of(p.d.window) == shape]

    def _panes(self, keys: list[str]) -> list[str]:
        """Counts, sums, means, min and max: the earlier panes of the window merged with the
        record's own pane up to it."""
        k = ", ".join(keys)
        here = []
        for p in self.parts:
            col = self.shapes[_Shape.of(p.d.window)]
            for c, agg, _ in p.components():
                here.append(f"{agg}({p.x}) OVER (PARTITION BY {k}, {col} ORDER BY ts "
                            f"RANGE BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW) AS {c}_here")
        ctes = [f"c AS (SELECT {k}, ts, {', '.join(self.shapes.values())}, {', '.join(here)} FROM r)"]
        joins = []
        for shape, col in self.shapes.items():
            parts = self._parts(shape)
            if shape.panes == 1:
                continue
            totals = ", ".join(f"{agg}({p.x}) AS {c}" for p in parts for c, agg, _ in p.components())
            before = ", ".join(f"{merge}({c}) OVER (PARTITION BY {k} ORDER BY {col} RANGE BETWEEN "
                               f"{shape.panes - 1} PRECEDING AND 1 PRECEDING) AS {c}_before"
                               for p in parts for c, _, merge in p.components())
            ctes.append(f"t_{col} AS (SELECT {k}, {col}, {totals} FROM r GROUP BY {k}, {col})")
            ctes.append(f"b_{col} AS (SELECT {k}, {col}, {before} FROM t_{col})")
            on = " AND ".join(f"c.{key} = b_{col}.{key}" for key in [*keys, col])
            joins.append(f"LEFT JOIN b_{col} ON {on}")
        values = [f"{p.value()} AS {name(p.d.name)}" for p in self.parts]
        ctes.append(f"v AS (SELECT {', '.join(f'c.{key}' for key in keys)}, c.ts, {', '.join(values)} "
                    f"FROM c {' '.join(joins)})")
        # Records of one time share their values (RANGE frames take a row's peers): one row per time.
        grouped = ", ".join(f"MAX({name(p.d.name)}) AS {name(p.d.name)}" for p in self.parts)
        ctes.append(f"g AS (SELECT {k}, ts, {grouped} FROM v GROUP BY {k}, ts)")
        return ctes

    def _stream_panes(self, keys: list[str]) -> list[str]:
        """Counts, sums, means, min and max: per window shape, the record's own pane up to it (a
        record-level OVER window) and the earlier panes of its window (a HOP window over them,
        joined by an interval join), then one row per entity and time (a 1 ms TUMBLE window);
        the shapes meet in a window join. Every operator appends, so the same plan runs in a
        stream, where each row is final once the watermark passes it."""
        k = ", ".join(keys)
        ctes, shapes = [], []
        for shape, col in self.shapes.items():
            parts = self._parts(shape)
            here = ", ".join(f"{agg}({p.x}) OVER (PARTITION BY {k}, {col} ORDER BY rt RANGE BETWEEN UNBOUNDED "
                             f"PRECEDING AND CURRENT ROW) AS {c}_here" for p in parts for c, agg, _ in p.components())
            ctes.append(f"c_{col} AS (SELECT {k}, ts, rt, {col}, {here} FROM r)")
            values, join = [f"{p.value()} AS {name(p.d.name)}" for p in parts], ""
            if shape.panes > 1:  # the window's earlier panes: a HOP window ending where the record's pane starts
                # over pane totals, not records: a record would go to every one of its panes' windows
                totals = ", ".join(f"{agg}({p.x}) AS {c}" for p in parts for c, agg, _ in p.components())
                tumble = f"TUMBLE(TABLE r, DESCRIPTOR(rt), {interval(shape.slide_ms)})"
                ctes.append(f"t_{col} AS (SELECT {k}, window_time AS pt, {totals} FROM TABLE({tumble}) "
                            f"GROUP BY {k}, window_start, window_end, window_time)")
                merged = ", ".join(f"{merge}({c}) AS {c}_before" for p in parts for c, _, merge in p.components())
                hop = (f"HOP(TABLE t_{col}, DESCRIPTOR(pt), {interval(shape.slide_ms)}, "
                       f"{interval((shape.panes - 1) * shape.slide_ms)})")
                # the pane the window ends at: the records' pane, as a join key (a batch join
                # would otherwise pair each record with every window of its entity)
                ends = f"({epoch_ms('window_time')} + 1) / {shape.slide_ms}"
                ctes.append(f"b_{col} AS (SELECT {k}, window_time AS wt, {ends} AS {col}, {merged} FROM TABLE({hop}) "
                            f"GROUP BY {k}, window_start, window_end, window_time)")
                # the time bounds make it an interval join in a stream: its state leaves with the watermark
                on = " AND ".join([*(f"c_{col}.{key} = b_{col}.{key}" for key in [*keys, col]),
                                   f"c_{col}.rt > b_{col}.wt",
                                   f"c_{col}.rt <= b_{col}.wt + {interval(shape.slide_ms)}"])
                join = f" LEFT JOIN b_{col} ON {on}"
            ctes.append(f"v_{col} AS (SELECT {', '.join(f'c_{col}.{key}' for key in keys)}, c_{col}.ts, c_{col}.rt, "
                        f"{', '.join(values)} FROM c_{col}{join})")
            # Records of one time share their values (RANGE frames take a row's peers): one row per time.
            grouped = ", ".join(f"MAX({name(p.d.name)}) AS {name(p.d.name)}" for p in parts)
            ctes.append(f"g_{col} AS (SELECT {k}, window_start, window_end, MAX(ts) AS ts, {grouped} FROM "
                        f"TABLE(TUMBLE(TABLE v_{col}, DESCRIPTOR(rt), {interval(1)})) "
                        f"GROUP BY {k}, window_start, window_end)")
            shapes.append((f"g_{col}", [p.d.name for p in parts]))
        first = shapes[0][0]
        joins = " ".join(f"JOIN {g} ON " + " AND ".join(f"{first}.{c} = {g}.{c}" for c in [*keys, "window_start",
                                                                                        "window_end"])
                         for g, _ in shapes[1:])
        out = [*(f"{first}.{key}" for key in keys), f"{first}.ts",
               *(f"{g}.{name(c)}" for g, cols in shapes for c in cols)]
        ctes.append(f"g AS (SELECT {', '.join(out)} FROM {first} {joins})")
        return ctes

    def _steps(self, k: str) -> list[str]:
        """Distinct counts: each record's steps on the entity's time line, beside a 0 step at each
        record's own time (where the running sums are read)."""
        ctes = [d.steps(k) for d in self.distincts]
        zero = [f"CAST(0 AS BIGINT) AS {d.y}" for d in self.distincts]
        rows = [f"SELECT {k}, ts AS t_at, 1 AS is_row, {', '.join(zero)} FROM r"]
        for d in self.distincts:
            for at, step in (("t_in", 1), ("t_out", -1)):
                cols = [f"CAST({step if e is d else 0} AS BIGINT) AS {e.y}" for e in self.distincts]
                rows.append(f"SELECT {k}, {at} AS t_at, 0 AS is_row, {', '.join(cols)} FROM s_{d.y} WHERE t_in < t_out")
        ctes.append("all_steps AS (" + " UNION ALL ".join(rows) + ")")
        sums = ", ".join(f"SUM({d.y}) OVER (PARTITION BY {k} ORDER BY t_at RANGE BETWEEN UNBOUNDED PRECEDING AND "
                         f"CURRENT ROW) AS {d.y}" for d in self.distincts)
        ctes.append(f"running_sums AS (SELECT {k}, t_at, is_row, {sums} FROM all_steps)")
        counts = ", ".join(f"MAX({d.y}) AS {name(d.d.name)}" for d in self.distincts)
        ctes.append(f"n AS (SELECT {k}, t_at AS ts, {counts} FROM running_sums WHERE is_row = 1 GROUP BY {k}, t_at)")
        return ctes


def queries(defs: Iterable[Definition]) -> list[Query]:
    """The compiled definitions as one query per entity kind (pass :func:`split`'s first part)."""
    by_kind: dict[EntityKind, list[Definition]] = {}
    for d in defs:
        by_kind.setdefault(d.entity_kind, []).append(d)
    return [Query.of(kind, group) for kind, group in by_kind.items()]


def column_list(columns: Iterable[tuple[str, str]]) -> str:
    """``(name, SQL type)`` pairs as a CREATE TABLE's column list."""
    return ", ".join(f"{name(c)} {t}" for c, t in columns)


def kafka_table(table_name: str, columns: Iterable[tuple[str, str]], topic: str, bootstrap: str) -> str:
    """A Kafka topic of JSON records, written at least once (a sink of the catalogue job)."""
    return (f"CREATE TEMPORARY TABLE {name(table_name)} ({column_list(columns)}) WITH ('connector' = 'kafka', "
            f"'topic' = {_string(topic)}, 'properties.bootstrap.servers' = {_string(bootstrap)}, "
            "'format' = 'json', 'sink.delivery-guarantee' = 'at-least-once')")


def table(table_name: str, columns: Iterable[tuple[str, str]], path: str, lateness_ms: int | None = None) -> str:
    """A tab-separated file table (ids hold no control characters: the schema refuses them).

    With ``lateness_ms``, the events' table of :meth:`Query.insert`: its event time ``rt``, with
    a watermark that far behind the newest row (a batch job reads every row whatever it says)."""
    cols = column_list(columns)
    if lateness_ms is not None:
        cols += f", rt AS TO_TIMESTAMP_LTZ(ts, 3), WATERMARK FOR rt AS rt - {interval(lateness_ms)}"
    return (f"CREATE TEMPORARY TABLE {name(table_name)} ({cols}) WITH ('connector' = 'filesystem', "
            f"'path' = {_string(path)}, 'format' = 'csv', 'csv.field-delimiter' = '\\t', "
            "'csv.disable-quote-character' = 'true', 'csv.null-literal' = '')")


def use_functions(t_env: Any) -> None:
    """Register freshrec's functions (streaming/java; their jar is in ``pipeline.jars`` or the
    cluster's lib/, streaming/jars.py)."""
    t_env.create_java_temporary_system_function("pane_merge", "freshrec.PaneMerge")


def use_utc(t_env: Any) -> None:
    """Windows over TIMESTAMP_LTZ times align in the session's time zone; panes are UTC, as in
    streaming/aggregates.py (a day's pane starts at midnight UTC)."""
    t_env.get_config().set("table.local-time-zone", "UTC")
