"""The ranking service (features/dsl.Ranking): analysts' definitions that reach the model.
Pure logic, no services: the declaration and its checks, the Feast service, the training
examples' values, the ranker's use of them and the evaluation's choice of them."""

from __future__ import annotations

import random
from datetime import timedelta as td
from pathlib import Path

import numpy as np
import pytest

from features.catalog import ranking as default_ranking
from features.dsl import Count, DefinitionError, Feature, Ranking, Sliding, load, load_ranking, user
from features.registry import plan, ranking_service
from freshrec.evaluate import Evaluation, ranking_of
from online_learning.examples import BatchExamples, Example, ExampleBuilder
from online_learning.offline_examples import AsOf, OfflineExamples
from online_learning.ranker import FTRLRanker, Inputs
from streaming.ranking_inputs import SETTLE_AT, RankingInputs
from streaming.state import Ev, Spec

CATALOGUE = '''
from datetime import timedelta
from features.dsl import Count, CoVisitation, Feature, LastN, Ranking, Sliding, category, item, user
W = Sliding(size=timedelta(hours=1), slide=timedelta(minutes=5))
def f(name, entity, agg=Count()):
    return Feature(name=name, entity=entity, aggregation=agg, window=W, ttl=timedelta(days=1), owner="o",
                   description="d")
views = f("views_1h", user)
item_views = f("item_views", item)
per_category = f("per_category", category)
last = f("last_items", user, LastN(of="item_id", n=3))
pairs = CoVisitation(name="pairs", ttl=timedelta(days=1), owner="o", description="d")
loose = f("loose", user)  # not at the top level below: deleted
del loose
ranking = Ranking(features=[views, item_views, per_category, last, pairs, f("loose", user), views])
'''


def test_a_ranking_service_is_checked_against_its_catalogue(tmp_path: Path) -> None:
    f = tmp_path / "mine.py"
    f.write_text(CATALOGUE)
    with pytest.raises(DefinitionError) as err:
        load_ranking(str(f))
    problems = err.value.problems
    for expected in ("ranking: features: per_category is per category; the ranker reads the user's",
                     "ranking: features: last_items is not a number (array<string>)",
                     "ranking: features: pairs is not a number",
                     "ranking: features: 'loose' is not among the catalogue's definitions",
                     "ranking: features: views_1h is listed twice"):
        assert any(p.startswith(expected) for p in problems), (expected, problems)
    assert len(problems) == 5
    f.write_text(CATALOGUE.replace("ranking = ", "other = Ranking()\nranking = "))
    with pytest.raises(DefinitionError, match="2 Ranking declarations; keep one"):
        load_ranking(str(f))
    f.write_text(CATALOGUE.split("ranking = ")[0])
    assert load_ranking(str(f)).features == ()  # none declared: the built-in views alone
    assert len(load(str(f))) == 5


def test_the_feast_service_names_the_built_in_views_and_the_definitions() -> None:
    service = ranking_service(default_ranking)
    names = [p.name for p in service.feature_view_projections]
    assert names[:3] == ["user_recent", "item_recent", "item_covisit"]
    assert names[3:] == [d.name for d in default_ranking.features]
    defs = load("features.catalog")
    assert plan(defs, [], default_ranking, service).ranking is None  # as registered
    changed = plan(defs, [], Ranking(features=[default_ranking.features[0]]), service)
    assert changed.ranking == [default_ranking.features[0].name]
    assert {"the feature job", "the trainer", "the API"} <= set(changed.restarts)
    assert "ranking service" in changed.render()


def _log(n: int, seed: int) -> list[Ev]:
    """A few users and items, so that each settles its ranking state many times over."""
    rng = random.Random(seed)
    ts = 1_600_000_000_000
    out = []
    for k in range(n):
        ts += rng.randrange(0, 40_000)
        out.append(Ev(f"e{k}", f"u{rng.randrange(4)}", f"i{rng.randrange(6)}",
                      rng.choice(["view", "view", "view", "cart", "buy"]), ts, f"c{rng.randrange(2)}"))
    return out


def _in_window(events: list[Ev], newest: int, size_ms: int, slide_ms: int, behavior: str) -> int:
    """A sliding window's count as of ``newest``, counted afresh: panes of ``slide_ms`` back to
    the window's first."""
    first = (newest // slide_ms - size_ms // slide_ms + 1) * slide_ms
    return sum(1 for e in events if first <= e.ts <= newest and e.behavior == behavior)


def test_examples_carry_the_ranking_definitions_from_just_before_each_event() -> None:
    """Counted afresh per example: the user's and the item's hour of views as of their newest
    event before this one (what the catalogue job had written to Redis, so what serving read)."""
    hour, five = 3_600_000, 300_000
    batch = BatchExamples(ExampleBuilder(negatives=1, seed=2), ranking=RankingInputs(default_ranking))
    events = _log(1500, seed=5)
    checked = 0
    for k, ev in enumerate(events):
        examples = batch.add(ev)
        assert examples is not None
        if ev.behavior != "view":  # a conversion carries the features as of its view
            continue
        (positive,) = [e for e in examples if e["label"]]
        past_user = [e for e in events[:k] if e.user_id == ev.user_id]
        past_item = [e for e in events[:k] if e.item_id == ev.item_id]
        if past_user:
            newest = past_user[-1].ts
            assert positive["user"]["user_views_1h"] == _in_window(past_user, newest, hour, five, "view")
            checked += 1
        if past_item and positive["item"] is not None:
            newest = past_item[-1].ts
            assert positive["item"]["item_views_1h"] == _in_window(past_item, newest, hour, five, "view")
            rate = positive["item"]["item_buy_rate_1h"]
            views = _in_window(past_item, newest, hour, five, "view")
            buys = _in_window(past_item, newest, hour, five, "buy")
            assert rate == pytest.approx((buys + 0.01 * 20) / (views + 20), rel=1e-12)
        for negative in [e for e in examples if not e["label"]]:  # a sampled item carries its newest values too
            assert negative["item"] is None or "item_views_1h" in negative["item"]
    assert checked > 800
    assert len(events) / 6 > 3 * SETTLE_AT  # every item settled its state several times


def test_the_ranker_learns_a_definition_and_replicas_score_with_it() -> None:
    """A label that only an item definition explains: the ranker weighs it, scores the same on
    both paths, and a replica that started before the service changed follows by deltas."""
    inputs = Inputs(user=("u_activity",), item=("i_quality", "i_rate"))
    r = FTRLRanker(min_count=1)
    replica = FTRLRanker.restore(r.snapshot())
    r.use(inputs)
    rng = random.Random(1)
    for t in range(4000):
        quality = rng.randrange(-3, 20)
        label = int(rng.random() < (0.8 if quality > 10 else 0.1))
        item = {"views": 1, "i_quality": quality, "i_rate": None if t % 3 else rng.random()}
        user_row = {"views": 2, "u_activity": rng.randrange(5), "last_viewed_items": []}
        r.learn_one(Example(user_id="u", item_id=str(t % 40), ts=t, label=label, behavior="view", user=user_row,
                            item=item))
    assert r.model._weights["i.i_quality"] > 0.1
    replica.apply_delta(r.state_delta() or b"")
    assert replica.inputs == inputs
    user_row = {"views": 2, "u_activity": 3, "last_viewed_items": ["1"]}
    cands = [(str(i), None if i % 7 == 0 else {"views": i, "i_quality": i - 5, "i_rate": [None, 0.5, -2][i % 3]})
             for i in range(25)]
    fast = r.score_many(user_row, cands)
    slow = [r.predict_one(Example(user_id="u", item_id=i, ts=0, label=0, behavior="view", user=user_row, item=f))
            for i, f in cands]
    assert np.allclose(fast, slow, rtol=1e-12, atol=0)
    assert np.allclose(replica.score_many(user_row, cands), fast, rtol=1e-12, atol=0)
    assert FTRLRanker.restore(r.snapshot()).inputs == inputs
    assert fast[16] > fast[6]  # i_quality 11 against 1


def test_the_evaluation_weighs_what_it_is_told() -> None:
    assert ranking_of("features.catalog") is default_ranking
    assert ranking_of("features.catalog", "none").features == []
    chosen = ranking_of("features.catalog", "item_views_1h, user_views_1h")
    assert [d.name for d in chosen.features] == ["item_views_1h", "user_views_1h"]
    with pytest.raises(DefinitionError, match="--features: 'item_views' is not a definition of features.catalog"):
        ranking_of("features.catalog", "item_views")
    with pytest.raises(DefinitionError, match="user_last_categories is not a number"):
        ranking_of("features.catalog", "user_last_categories")
    assert Evaluation(ranking=chosen).online.ranker.inputs == Inputs(("user_views_1h",), ("item_views_1h",))
    report = Evaluation(ranking=chosen).report("x", 0, 1.0, {})
    assert report["ranking_features"] == ["item_views_1h", "user_views_1h"]


def test_a_definition_listed_by_the_ranking_service_stays_a_plain_definition() -> None:
    """Listing one changes what the ranker weighs, not what the catalogue computes."""
    views = Feature(name="v", entity=user, aggregation=Count(), window=Sliding(size=td(hours=1), slide=td(hours=1)),
                    ttl=td(days=1), owner="o", description="d")
    assert Ranking(features=[views]).names(user) == ("v",)
    assert RankingInputs(Ranking(features=[views])).item is None


def test_a_warm_start_from_the_offline_store_reads_the_definitions_as_logged() -> None:
    """The catalogue job's final rows of a ranking definition join the built-in rows, each as of
    strictly before the event (the negatives': at it)."""
    users = AsOf.of([("u", 1_000, {"views": 1}), ("u", 2_000, {"views": 2})], ttl_ms=0)
    items = AsOf.of([("a", 1_000, {"views": 1}), ("b", 1_500, {"views": 1})], ttl_ms=0)
    views_1h = AsOf.of([("u", 1_000, {"user_views_1h": 1}), ("u", 2_000, {"user_views_1h": 2})], ttl_ms=0)
    rate = AsOf.of([("b", 1_500, {"item_buy_rate_1h": 0.5})], ttl_ms=0)
    b = OfflineExamples(ExampleBuilder(negatives=0), users, items, Spec(), ranked_users=[views_1h],
                        ranked_items=[rate])
    b.add(Ev("e1", "u", "a", "view", 1_000, ""))
    (second,) = b.add(Ev("e2", "u", "b", "view", 2_000, "")) or []
    assert second["user"] == {"views": 1, "user_views_1h": 1}
    assert second["item"] == {"views": 1, "item_buy_rate_1h": 0.5}
    (third,) = b.add(Ev("e3", "u", "a", "view", 2_500, "")) or []
    assert third["user"] == {"views": 2, "user_views_1h": 2} and third["item"] == {"views": 1}
