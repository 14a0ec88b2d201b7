"""streaming/java's Definitions state (EntityState) against streaming/aggregates.py, record by
record: the same records, in the same arrival order, give the same online values and the same
final rows; and the state survives Flink's serializer (a checkpoint). Pure logic in the gateway
JVM: no services, no job."""

from __future__ import annotations

import json
import random
from datetime import timedelta as td
from typing import Any

import pytest

from features.dsl import (
    KEY_SEPARATOR,
    Count,
    CoVisitation,
    DistinctCount,
    Feature,
    LastN,
    Max,
    Mean,
    Min,
    Ratio,
    Sliding,
    Sum,
    Tumbling,
    user,
)
from streaming.aggregates import EntityState, Plan, Rec
from streaming.definitions import java_plan
from streaming.flink import java_gateway

W = Sliding(size=td(seconds=60), slide=td(seconds=10))
META = dict(ttl=td(days=1), owner="o", description="d")


def _f(name: str, agg: Any, window: Any = W, behaviors: list[str] | None = None) -> Feature:
    return Feature(name=name, entity=user, aggregation=agg, window=window, behaviors=behaviors, **META)


views = _f("views", Count(), behaviors=["view"])
buys = _f("buys", Count(), behaviors=["buy"])
USER = [views, buys, Ratio(name="rate", numerator=buys, denominator=views, prior=0.05, prior_weight=3, **META),
        _f("weight", Sum(of={"view": 0.1, "buy": 2.5, "cart": 1.3})),
        _f("hour", Mean(of="hour"), window=Tumbling(size=td(seconds=30))),
        _f("first", Min(of="ts")),
        _f("newest", Max(of="ts"), window=Sliding(size=td(seconds=90), slide=td(seconds=30))),
        _f("items", DistinctCount(of="item_id")), _f("last", LastN(of="item_id", n=4)),
        _f("bought", LastN(of="category_id", n=3), behaviors=["buy", "cart"])]
COVISIT = [CoVisitation(name="co", gap=td(seconds=20), window=Sliding(size=td(minutes=2), slide=td(seconds=20)),
                        top_k=3, **META)]
# Shorter than the records' disorder: records come after the newest window has left their pane.
SHORT = [CoVisitation(name="co", gap=td(seconds=20), window=Sliding(size=td(seconds=10), slide=td(seconds=5)),
                      top_k=3, **META)]


@pytest.fixture(scope="module")
def jvm() -> Any:
    return java_gateway().jvm


def _records(rnd: random.Random, covisit: bool, n: int = 250) -> list[Rec]:
    """Out of order within 15 s, some at the same time as others; ``n`` over 400 s (a few make
    lists that reach back to a window's first pane)."""
    recs = []
    for i in range(n):
        ts = 1_700_000_000_000 + rnd.randrange(0, 400_000) // 700 * 700
        other = KEY_SEPARATOR.join(f"o{rnd.randrange(9)}" for _ in range(rnd.randrange(1, 4))) if covisit else ""
        recs.append(Rec(ts, f"e{i:03d}", "view" if covisit else rnd.choice(["view", "view", "buy", "cart", "fav"]),
                        "u", f"i{rnd.randrange(12)}", rnd.choice(["c1", "c2", ""]), other))
    return sorted(recs, key=lambda r: r.ts + rnd.randrange(15_000))


def _java_plan(jvm: Any, defs: list[Any]) -> Any:
    group = json.loads(java_plan(defs))["groups"][0]
    return getattr(jvm.freshrec, "EntityState$Plan")(json.dumps(group))


@pytest.mark.parametrize(("defs", "seed", "n"), [(USER, 1, 250), (USER, 2, 40), (COVISIT, 3, 250), (COVISIT, 4, 40),
                                                 (SHORT, 5, 250)],
                         ids=["user-dense", "user-sparse", "covisit-dense", "covisit-sparse", "covisit-short"])
def test_java_state_gives_the_python_engines_values(jvm: Any, defs: list[Any], seed: int, n: int) -> None:
    rnd = random.Random(seed)
    plan, jplan = Plan.of(defs), _java_plan(jvm, defs)
    py, jv = EntityState(), jvm.freshrec.EntityState()
    settled = finals = 0
    for r in _records(rnd, defs is not USER, n):
        accepted = py.add(r, plan)
        assert jv.add(jvm.freshrec.Rec(*r), jplan) == accepted
        if accepted:  # a sum's rounding may follow another order online (never in final rows)
            got, want = json.loads(jvm.freshrec.Definitions.json(jv.online(jplan))), py.online(plan)
            assert got == {k: pytest.approx(v) if isinstance(v, float) else v for k, v in want.items()}
        if rnd.random() < 0.1:  # the horizon moves: final rows, and records behind it refused
            horizon = py.newest - rnd.randrange(20_000)
            want = py.settle(horizon, plan)
            got = [json.loads(str(row)) for row in jv.settle(horizon, jplan)]
            assert got == [[ts, values] for ts, values in want]
            settled, finals = settled + 1, finals + len(want)
    want = py.settle(2**62, plan)
    assert [json.loads(str(row)) for row in jv.settle(2**62, jplan)] == [[ts, v] for ts, v in want]
    assert settled > 1 and finals + len(want) > n // 3  # the comparison saw many rows


def test_java_state_survives_its_serializer(jvm: Any) -> None:
    """A checkpoint writes the state with the operator's serializer and reads it back; the
    hashmap backend copies it while a snapshot runs. Both give a state that computes the same."""
    rnd = random.Random(5)
    for defs in (USER, COVISIT):
        jplan = _java_plan(jvm, defs)
        jv = jvm.freshrec.EntityState()
        recs = _records(rnd, defs is not USER)[:120]
        for r in recs:
            jv.add(jvm.freshrec.Rec(*r), jplan)
        jv.settle(max(r.ts for r in recs) - 30_000, jplan)
        serializer = jvm.freshrec.EntityStateSerializer()
        memory = jvm.org.apache.flink.core.memory
        out = memory.DataOutputSerializer(1024)
        serializer.serialize(jv, out)
        read = serializer.deserialize(memory.DataInputDeserializer(out.getCopyOfBuffer()))
        copied = serializer.copy(jv)
        online = jvm.freshrec.Definitions.json
        states = (jv, read, copied)
        assert len({online(state.online(jplan)) for state in states}) == 1
        rows = [[str(row) for row in state.settle(2**62, jplan)] for state in states]
        assert rows[0] == rows[1] == rows[2] and len(rows[0]) > 5
