"""The feature language and its one implementation, as pure logic: no services."""

from __future__ import annotations

import math
import random
from datetime import timedelta as td
from pathlib import Path

import pytest

from features.dsl import (
    KEY_SEPARATOR,
    Count,
    CoVisitation,
    DefinitionError,
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
    item,
    load,
    user,
    user_category,
    validate,
)
from features.registry import definition_views, plan
from streaming.aggregates import EntityState, Plan, Rec

W = Sliding(size=td(seconds=60), slide=td(seconds=10))


def _f(name: str, agg: object, window: object = W, **kw: object) -> Feature:
    return Feature(name=name, entity=user, aggregation=agg, window=window, ttl=td(days=1), owner="o",
                   description="d", **kw)


DEFS = [
    _f("n_views", Count(), behaviors=["view"]),
    _f("w_sum", Sum(of={"view": 1, "buy": 5.5})),
    _f("hour_mean", Mean(of="hour"), window=Tumbling(size=td(seconds=30))),
    _f("first_ts", Min(of="ts")),
    _f("last_ts", Max(of="ts")),
    _f("items", DistinctCount(of="item_id")),
    _f("last3", LastN(of="item_id", n=3)),
]
N_BUYS = _f("n_buys", Count(), behaviors=["buy"])
RATE = Ratio(name="rate", numerator=N_BUYS, denominator=DEFS[0], prior=0.1, prior_weight=2, ttl=td(days=1),
             owner="o", description="d")


def brute(recs: list[Rec], t: int) -> dict[str, object]:
    """Each definition straight from its meaning: the records of the newest window containing t, up to t."""
    def window(slide: int, size: int) -> list[Rec]:
        start = (t // slide - size // slide + 1) * slide
        return [r for r in recs if start <= r.ts <= t]

    a, b = window(10_000, 60_000), window(30_000, 30_000)
    weights = {"view": 1, "buy": 5.5}
    views, buys = sum(r.behavior == "view" for r in a), sum(r.behavior == "buy" for r in a)
    return {
        "n_views": views,
        "w_sum": math.fsum(weights.get(r.behavior, 0) for r in a),
        "hour_mean": sum(r.ts // 3_600_000 % 24 for r in b) / len(b) if b else None,
        "first_ts": float(min(r.ts for r in a)) if a else None,
        "last_ts": float(max(r.ts for r in a)) if a else None,
        "items": len({r.item_id for r in a}),
        "last3": [r.item_id for r in sorted(a, reverse=True)[:3]],
        "n_buys": buys,
        "rate": (buys + 0.2) / (views + 2),
    }


@pytest.mark.parametrize("seed", range(6))
def test_final_rows_equal_their_definition_whatever_the_arrival_order(seed: int) -> None:
    rnd = random.Random(seed)
    span = [300_000, 3_000_000, 30_000_000][seed % 3]  # dense windows, and sparse ones that empty out
    recs = [Rec(1_700_000_000_000 + rnd.randrange(0, span) // 500 * 500, f"e{i}",
                rnd.choice(["view", "view", "buy", "cart"]), "u", f"i{rnd.randrange(8)}", "c") for i in range(300)]
    p = Plan.of([*DEFS, N_BUYS, RATE])
    lateness = 20_000
    # Arrival: in time order but shuffled within the lateness bound.
    arrival = sorted(recs, key=lambda r: r.ts + rnd.randrange(0, lateness))
    st, finals, newest = EntityState(), {}, 0
    for r in arrival:
        assert st.add(r, p)
        newest = max(newest, r.ts)
        known = [x for x in recs if x in st.open or x.ts <= st.horizon]
        assert st.online(p) == brute(known, newest)
        for ts, values in st.settle(newest - lateness, p):  # the watermark moves on
            assert ts not in finals
            finals[ts] = values
    for ts, values in st.settle(2**62, p):  # the end of input
        finals[ts] = values
    assert sorted(finals) == sorted({r.ts for r in recs})
    for ts, values in finals.items():
        assert values == brute(recs, ts), ts
    assert not st.add(Rec(recs[0].ts, "late", "view", "u", "i0", "c"), p)  # behind the horizon


@pytest.mark.parametrize("seed", range(3))
def test_covisit_final_rows_equal_their_definition(seed: int) -> None:
    """Many partners with tied counts, panes leaving the window, settled in several steps."""
    rnd = random.Random(seed)
    d = CoVisitation(name="cv", window=W, top_k=3, ttl=td(days=1), owner="o", description="d")
    p = Plan.of([d])
    recs = sorted(Rec(rnd.randrange(0, 200_000) // 250 * 250, f"p{i}", "view", "u", "it", "", f"o{rnd.randrange(12)}")
                  for i in range(400))

    def brute(t: int) -> list[str]:
        start = (t // 10_000 - 5) * 10_000
        counts: dict[str, int] = {}
        for r in recs:
            if start <= r.ts <= t:
                counts[r.other] = counts.get(r.other, 0) + 1
        return [k for k, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:3]]

    st, finals = EntityState(), {}
    for i, r in enumerate(recs):
        st.add(r, p)
        if i % 37 == 0:
            finals.update(st.settle(r.ts - 5_000, p))
    finals.update(st.settle(2**62, p))
    assert sorted(finals) == sorted({r.ts for r in recs})
    for ts, values in finals.items():
        assert values == {"cv": brute(ts)}, ts


def test_a_record_with_several_partners_counts_as_each_pair() -> None:
    """The job sends the viewed item's partners of one time as one record (partners joined)."""
    rnd = random.Random(7)
    p = Plan.of([CoVisitation(name="cv", window=W, top_k=3, ttl=td(days=1), owner="o", description="d")])
    singles = sorted(Rec(rnd.randrange(0, 100_000) // 1000 * 1000, f"p{i}", "view", "u", "it", "",
                         f"o{rnd.randrange(9)}") for i in range(300))
    partners: dict[int, list[str]] = {}
    for r in singles:
        partners.setdefault(r.ts, []).append(r.other)
    joined = [Rec(ts, f"j{ts}", "view", "u", "it", "", KEY_SEPARATOR.join(o)) for ts, o in sorted(partners.items())]
    assert len(joined) < len(singles)

    def run(recs: list[Rec]) -> tuple[dict[str, object], dict[int, dict[str, object]]]:
        st, finals = EntityState(), {}
        for r in recs:
            st.add(r, p)
        online = st.online(p)
        finals.update(st.settle(50_000, p))
        finals.update(st.settle(2**62, p))
        return online, finals

    assert run(joined) == run(singles)


def test_settling_in_steps_across_long_gaps_gives_the_rows_of_one_settle() -> None:
    """An entity settled now and then (the training path settles every few dozen records),
    quiet for many windows in between: panes settled before a gap must not be counted out
    when the window jumps past them (a distinct count once raised KeyError there)."""
    minute = 60_000
    w = Sliding(size=td(hours=1), slide=td(minutes=5))
    defs = [_f("distinct", DistinctCount(of="item_id"), w), _f("last", LastN(of="item_id", n=3), w),
            _f("n", Count(), w)]
    plan = Plan.of(defs)
    times = [0, 50, 65, 300, 302, 900, 2000, 2001, 2003, 2100]  # minutes: gaps of hours
    recs = [Rec(t * minute, f"e{k}", "view", "u", f"i{k % 3}", "c") for k, t in enumerate(times)]
    once, stepped = EntityState(), EntityState()
    for r in recs:
        once.add(r, plan)
    rows = []
    for k, r in enumerate(recs):
        stepped.add(r, plan)
        if k in (1, 3, 6):
            rows += stepped.settle(r.ts, plan)
    rows += stepped.settle(2**62, plan)
    assert rows == once.settle(2**62, plan)
    assert [v["distinct"] for _, v in rows] == [1, 2, 2, 1, 2, 1, 1, 2, 3, 1]


def test_a_changed_definition_starts_afresh_and_others_keep_their_state() -> None:
    st = EntityState()
    p1 = Plan.of(DEFS[:2])
    for i in range(5):
        st.add(Rec(1000 * i, f"e{i}", "view", "u", "a", "c"), p1)
    changed = _f("w_sum", Sum(of={"view": 2}))
    p2 = Plan.of([DEFS[0], changed])
    st.add(Rec(6000, "e6", "view", "u", "a", "c"), p2)
    assert st.online(p2) == {"n_views": 6, "w_sum": 12.0}  # the open records are refolded
    st.settle(10_000, p2)
    st.add(Rec(11_000, "e7", "view", "u", "a", "c"), p2)
    p3 = Plan.of([DEFS[0], _f("w_sum", Sum(of={"view": 3}))])
    assert st.online(p3) == {"n_views": 7, "w_sum": 3.0}  # settled panes of the old meaning are dropped


def test_validate_names_the_definition_and_the_field() -> None:
    good = DEFS[0]
    other_entity = Feature(name="item_views", entity=item, aggregation=Count(), window=W, ttl=td(days=1),
                           owner="o", description="d")
    bad = [
        good, _f("n_views", Count()),  # duplicate
        _f("user_recent", Count()),  # a built-in view's name
        _f("Bad-Name", Count()),
        _f("typo", Count(), behaviors=["pv"]),
        _f("short", Count(), window=Sliding(size=td(seconds=5), slide=td(seconds=10))),
        _f("uneven", Count(), window=Sliding(size=td(seconds=25), slide=td(seconds=10))),
        _f("what", Sum(of="price")),
        _f("long", LastN(of="item_id", n=0)),
        Ratio(name="mixed", numerator=other_entity, denominator=good, ttl=td(days=1), owner="o", description="d"),
        Feature(name="nobody", entity=user_category, aggregation=Count(), window=W, ttl=td(0), owner=" ",
                description=""),
    ]
    problems = validate([*bad, other_entity])
    expect = [
        "n_views: name: duplicate name",
        "user_recent: name: taken by a built-in feature view",
        "'Bad-Name': name: use lower_snake_case",
        "typo: behaviors: unknown behavior 'pv'",
        "short: window: the window (5s) is shorter than its slide (10s)",
        "uneven: window: size 25s is not a whole number of slides",
        "what: aggregation: of='price' is not a number of an event",
        "long: aggregation: n=0",
        "mixed: denominator: ratio of incompatible entities",
        "nobody: ttl:", "nobody: owner:", "nobody: description:",
    ]
    for e in expect:
        assert any(p.startswith(e) for p in problems), (e, problems)
    assert len(problems) == len(expect)


def test_load_reports_a_broken_file_without_a_traceback(tmp_path: Path) -> None:
    f = tmp_path / "mine.py"
    text = ("from datetime import timedelta\nfrom features.dsl import Count, Feature, Tumbling, user\n"
            "x = Feature(name='x', entity=user, aggregation=Count(), window=Tumbling(size=timedelta(hours=1)), "
            "ttl=timedelta(days=1), owner='a', description='b')\n")
    f.write_text(text.replace("Tumbling(", "Hourly("))
    with pytest.raises(DefinitionError, match="mine.py: cannot load the definitions: NameError: name 'Hourly'"):
        load(str(f))
    f.write_text(text.replace("owner='a'", "owner=''"))
    with pytest.raises(DefinitionError, match="x: owner: say who answers"):
        load(str(f))
    with pytest.raises(DefinitionError, match="no such file"):
        load(str(tmp_path / "missing.py"))


def test_plan_tells_added_changed_metadata_and_removed() -> None:
    before = definition_views([DEFS[0], DEFS[1], DEFS[2]])
    renamed_owner = Feature(**{**DEFS[0].__dict__, "owner": "someone-else"})
    changed = _f("w_sum", Sum(of={"view": 2}))
    p = plan([renamed_owner, changed, DEFS[3]], before)
    assert (p.added, p.changed, p.described, p.removed) == (["first_ts"], ["w_sum"], ["n_views"], ["hour_mean"])
    assert p.restarts and p.backfills == ["first_ts", "w_sum"]
    assert "+ first_ts" in p.render() and "- hour_mean" in p.render()
    assert plan(DEFS[:3], before).empty
