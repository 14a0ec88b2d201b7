"""The compiled definitions' one plan (streaming/sql.py) in both of Flink's runtime modes: a
stream of out-of-order events gives the final rows a batch run gives, and both equal the Python
engine's (streaming/aggregates.py), so the backfill and a stream agree by construction. The
online values (``Query.online``: streaming/java's pane_merge) follow the Python engine's online
values record by record.

No services: a table environment over a file the test writes, bounded, so the stream ends."""

from __future__ import annotations

import math
import random
from datetime import timedelta as td
from pathlib import Path
from typing import Any

import pytest
from pyflink.common import RowKind

from features.dsl import Count, Feature, Max, Mean, Min, Ratio, Sliding, Sum, Tumbling, item, user
from streaming import sql
from streaming.aggregates import EntityState, Plan, Rec
from streaming.flink import table_environment

LATENESS_MS = 40_000
META = dict(ttl=td(days=1), owner="o@test", description="a test feature")
W = Sliding(size=td(seconds=60), slide=td(seconds=10))
VIEWS = Feature(name="views", entity=user, aggregation=Count(), behaviors=["view"], window=W, **META)
BUYS = Feature(name="buys", entity=user, aggregation=Count(), behaviors=["buy"], window=W, **META)
DEFS = [
    VIEWS, BUYS,
    Ratio(name="buy_rate", numerator=BUYS, denominator=VIEWS, prior=0.05, prior_weight=3, **META),
    Feature(name="weight", entity=user, aggregation=Sum(of={"view": 0.1, "buy": 2.5}), window=W, **META),
    Feature(name="hour", entity=user, aggregation=Mean(of="hour"), window=Tumbling(size=td(seconds=30)), **META),
    Feature(name="newest", entity=user, aggregation=Max(of="ts"),
            window=Sliding(size=td(minutes=2), slide=td(seconds=30)), **META),
    Feature(name="first", entity=item, aggregation=Min(of="ts"), window=W, **META),
]


def _log(n: int, seed: int) -> list[tuple[Any, ...]]:
    """Unique events (the SQL reads de-duplicated ones) out of order within the lateness, with
    several events at one time."""
    rnd = random.Random(seed)
    start, events = 1_600_000_000_000, []
    for i in range(n):
        ts = start + rnd.randrange(600_000)
        if events and rnd.random() < 0.1:
            ts = events[-1][4]  # a peer: same user and time
            user_id = events[-1][1]
        else:
            user_id = f"u{rnd.randrange(6)}"
        events.append((f"e{i}", user_id, f"i{rnd.randrange(9)}", rnd.choice(["view", "view", "buy", "cart"]), ts, "c1"))
    return sorted(events, key=lambda e: e[4] + rnd.randrange(LATENESS_MS // 2))


def _run(mode: str, plan: str, path: Path, queries: list[sql.Query]) -> dict[str, set[tuple[Any, ...]]]:
    t_env = table_environment(batch=mode == "batch", parallelism=2)
    t_env.execute_sql(sql.table("events", sql.EVENT_COLUMNS, str(path), lateness_ms=LATENESS_MS))
    rows = {}
    for q in queries:
        with t_env.execute_sql(q.select("events", stream=plan == "stream")).collect() as results:
            rows[q.kind.name] = {tuple(r) for r in results}
    return rows


def _online(path: Path, queries: list[sql.Query]) -> dict[str, list[tuple[str, int, dict[str, Any]]]]:
    """Each kind's online rows in the order the stream emitted them: (entity, ts, values)."""
    t_env = table_environment(batch=False, parallelism=2)
    sql.use_functions(t_env)
    t_env.execute_sql(sql.table("events", sql.EVENT_COLUMNS, str(path)))
    rows = {}
    for q in queries:
        with t_env.execute_sql(q.online("events")).collect() as results:
            rows[q.kind.name] = [(r[0], r[1], dict(zip(q.names, list(r)[2:], strict=True))) for r in results
                                 if r.get_row_kind() in (RowKind.INSERT, RowKind.UPDATE_AFTER)]
    return rows


def _python(events: list[tuple[Any, ...]]) -> dict[str, dict[tuple[str, int], dict[str, Any]]]:
    """The Python engine's final rows, each entity folded in arrival order and settled at the end."""
    out: dict[str, dict[tuple[str, int], dict[str, Any]]] = {}
    for kind, key in (("user", 1), ("item", 2)):
        plan = Plan.of([d for d in DEFS if d.entity_kind.name == kind])
        states: dict[str, EntityState] = {}
        for e in events:
            assert states.setdefault(e[key], EntityState()).add(Rec(e[4], e[0], e[3], e[1], e[2], e[5]), plan)
        out[kind] = {(entity, ts): v for entity, st in states.items() for ts, v in st.settle(2**62, plan)}
    return out


def _points(rows: set[tuple[Any, ...]]) -> dict[tuple[str, int], tuple[Any, ...]]:
    return {(r[0], r[1]): r[2:] for r in rows}


def _same(a: Any, b: Any) -> bool:
    return a == b or (a is not None and b is not None and math.isclose(a, b, rel_tol=1e-12))


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    events = _log(600, seed=5)
    path = tmp_path_factory.mktemp("compiled") / "events.tsv"
    path.write_text("".join("\t".join(map(str, e)) + "\n" for e in events))
    compiled, rest = sql.split(DEFS, stream=True)
    assert not rest
    queries = sql.queries(compiled)
    return {"events": events, "queries": queries, "batch": _run("batch", "batch", path, queries),
            "stream": _run("stream", "stream", path, queries),
            "stream plan in batch": _run("batch", "stream", path, queries), "online": _online(path, queries)}


def test_a_stream_gives_the_final_rows_of_a_batch_run(runs: dict[str, Any]) -> None:
    for run in ("stream", "stream plan in batch"):
        for kind in ("user", "item"):
            stream, batch = _points(runs[run][kind]), _points(runs["batch"][kind])
            assert stream.keys() == batch.keys(), (run, kind)
            for point, row in batch.items():  # sums may differ in the last bit: each plan adds in its own order
                assert all(_same(a, b) for a, b in zip(stream[point], row, strict=True)), (run, kind, point)
    # one row per entity and distinct time: the peers became one row
    times = {(e[1], e[4]) for e in runs["events"]}
    assert len(runs["batch"]["user"]) == len(times) < len(runs["events"])


def test_the_compiled_rows_equal_the_python_engines(runs: dict[str, Any]) -> None:
    python = _python(runs["events"])
    for q in runs["queries"]:
        columns = [c for c, _ in q.columns]
        rows = _points(runs["batch"][q.kind.name])
        got = {point: dict(zip(columns[2:], row, strict=True)) for point, row in rows.items()}
        want = python[q.kind.name]
        assert got.keys() == want.keys(), q.kind.name
        for point, values in want.items():
            for name, value in values.items():
                assert _same(got[point][name], value), (q.kind.name, point, name, got[point][name], value)


def test_the_online_values_follow_the_python_engines(runs: dict[str, Any]) -> None:
    """Per entity, each value the GROUP BY emitted is the Python engine's online value after a
    prefix of the entity's records in arrival order (an update that changes nothing is not
    emitted), the last after all of them: late records inside the lateness count, and panes
    that leave the window leave the value."""
    events = runs["events"]
    for kind, key in (("user", 1), ("item", 2)):
        plan = Plan.of([d for d in DEFS if d.entity_kind.name == kind])
        emitted: dict[str, list[dict[str, Any]]] = {}
        for entity, _, values in runs["online"][kind]:
            emitted.setdefault(entity, []).append(values)
        assert emitted.keys() == {e[key] for e in events}
        for entity, got in emitted.items():
            st, prefixes = EntityState(), []
            for e in events:
                if e[key] == entity:
                    st.add(Rec(e[4], e[0], e[3], e[1], e[2], e[5]), plan)
                    prefixes.append(st.online(plan))
            at = 0
            for values in got:  # a subsequence of the prefixes' values
                while at < len(prefixes) and not _same_values(values, prefixes[at]):
                    at += 1
                assert at < len(prefixes), (kind, entity, values)
            assert _same_values(got[-1], prefixes[-1]), (kind, entity)
            assert len(got) > 1


def _same_values(got: dict[str, Any], want: dict[str, Any]) -> bool:
    return got.keys() == want.keys() and all(_same(got[n], v) for n, v in want.items())
