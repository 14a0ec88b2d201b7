"""Online learning, pure logic: examples, models, parameter blobs, evaluation. No services."""

from __future__ import annotations

import io
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from connectors.logfile import detect_format, read_rows
from connectors.schema import validate
from freshrec.evaluate import Evaluation, Scores, load_events
from online_learning.admission import CountingFilter
from online_learning.embeddings import TwoTower
from online_learning.examples import Example, ExampleBuilder
from online_learning.params import ParamsError, decode, encode
from online_learning.ranker import FTRLRanker
from online_learning.recommender import OnlineRecommender
from streaming.state import Ev


def ex(user: str, item: str, label: int, ts: int = 1, recent: list[str] | None = None,
       item_feats: dict | None = None, top_categories: list[str] | None = None) -> Example:
    return Example(user_id=user, item_id=item, ts=ts, label=label, behavior="view" if label else "negative",
                   user={"views": 1, "last_viewed_items": recent or [], "top_categories": top_categories or []},
                   item=item_feats)


def stream(n: int, seed: int = 0, n_items: int = 50) -> list[Example]:
    """Users prefer items of their own parity; each positive comes with one negative."""
    rng = random.Random(seed)
    out = []
    for t in range(n):
        u = rng.randrange(20)
        pos = str(rng.randrange(u % 2, n_items, 2))
        neg = str(rng.randrange(1 - u % 2, n_items, 2))
        recent = [str(rng.randrange(u % 2, n_items, 2)) for _ in range(3)]
        out.append(ex(str(u), pos, 1, t, recent, {"views": 3}))
        out.append(ex(str(u), neg, 0, t, recent, {"views": 3}))
    return out


# -- parameter blobs ---------------------------------------------------------------------------
def test_params_refuse_pickles_and_garbage() -> None:
    with pytest.raises(ParamsError):
        decode(b"not a blob")
    buf = io.BytesIO()
    np.save(buf, np.array([object()], dtype=object), allow_pickle=True)
    with pytest.raises(ParamsError):
        decode(buf.getvalue())
    with pytest.raises(ParamsError):
        decode(pickle.dumps({"w": 1}))
    header, arrays = decode(encode({"a": 1}, {"x": np.arange(3)}))
    assert header == {"a": 1} and arrays["x"].tolist() == [0, 1, 2]


def test_counting_filter_never_undercounts() -> None:
    f = CountingFilter(width=64, depth=2)  # tiny: collisions are certain
    truth: dict[str, int] = {}
    rng = random.Random(1)
    for _ in range(2000):
        k = f"id{rng.randrange(300)}"
        truth[k] = truth.get(k, 0) + 1
        f.add(k)
    assert all(f.count(k) >= n for k, n in truth.items())


# -- the FTRL ranker ---------------------------------------------------------------------------
def test_ranker_admits_ids_only_after_min_count_and_expires_them() -> None:
    r = FTRLRanker(min_count=3, ttl_ms=1000)
    for t in range(2):
        r.learn_one(ex("u", "rare", 1, ts=t))
    assert "item=rare" not in r.model._weights and "item=rare" not in r.last_seen
    r.learn_one(ex("u", "rare", 1, ts=2))
    assert "item=rare" in r.last_seen
    r.learn_one(ex("u", "other", 1, ts=5000))
    assert r.expire() >= 1 and "item=rare" not in r.last_seen and "item=rare" not in r.model.optimizer.z


def test_ranker_learns_and_replicas_follow_by_deltas() -> None:
    r = FTRLRanker(min_count=1)
    replica = FTRLRanker.restore(r.snapshot())
    data = stream(3000)
    for i, e in enumerate(data):
        r.learn_one(e)
        if i % 500 == 0:
            blob = r.state_delta()
            if blob:
                replica.apply_delta(blob)
    replica.apply_delta(r.state_delta())
    user = {"views": 1, "last_viewed_items": []}
    cands = [(str(i), {"views": 3}) for i in range(50)]
    scores = r.score_many(user, cands)
    assert np.array_equal(replica.score_many(user, cands), scores)
    assert r.state_delta() is None  # nothing changed since the last delta
    # learned something: the positives score above the negatives on average
    probs = [r.predict_one(e) for e in data[-400:]]
    pos = np.mean(probs[0::2])
    neg = np.mean(probs[1::2])
    assert pos > neg


def test_ranker_vectorized_scores_equal_the_feature_path() -> None:
    r = FTRLRanker(min_count=1)
    rng = random.Random(4)
    for t in range(3000):
        item = str(rng.randrange(30))
        recent = [str(rng.randrange(30)) for _ in range(rng.randrange(4))]
        linked = bool(recent) and rng.random() < 0.5  # its co-visitation row names the user's newest view
        near = [*recent[:1], *(str(rng.randrange(30, 60)) for _ in range(3))] if linked else []
        feats = None if rng.random() < 0.2 else {"views": rng.randrange(9), "carts": rng.randrange(3),
                                                 "buys": rng.randrange(2), "events": rng.randrange(12),
                                                 "buy_rate": rng.random(), "category": f"c{int(item) % 3}",
                                                 "neighbours": near, "neighbour_counts": [1.0] * len(near)}
        tops = rng.sample(["c0", "c1", "c2"], rng.randrange(3))
        label = int(rng.random() < 0.2 + 0.3 * (item in recent) + 0.2 * (f"c{int(item) % 3}" in tops) + 0.3 * linked)
        r.learn_one(ex("u", item, label, t, recent, feats, tops), mf=rng.random())
    user = {"views": 3, "clicks": 1, "last_viewed_items": ["3", "7", "3"], "top_categories": ["c2", "c0", "c2"]}
    cands = [(str(i), None if i % 5 == 0 else {"views": i, "carts": i % 3, "buys": i % 2, "events": 2 * i,
                                              "buy_rate": i / 40, "category": f"c{i % 4}" if i % 7 else None,
                                              "neighbours": ["7", "1", "3"][:i % 4],
                                              "neighbour_counts": [3.0, 2.0, 1.0]})
             for i in range(30)]
    mf = np.linspace(-1, 1, 30)
    fast = r.score_many(user, cands, mf)
    slow = [r.predict_one(Example(user_id="u", item_id=i, ts=0, label=0, behavior="view", user=user, item=f), m)
            for (i, f), m in zip(cands, mf.tolist(), strict=True)]
    assert np.allclose(fast, slow, rtol=1e-12, atol=0)
    assert r.model._weights.get("seen", 0) > 0 and r.model._weights.get("cat", 0) > 0  # the signals it was given
    assert r.model._weights.get("covisit_hit", 0) > 0 and r.model._weights.get("covisit_log", 0) != 0


def test_ranker_restore_continues_identically() -> None:
    a = FTRLRanker(min_count=2)
    data = stream(600, seed=3)
    for e in data[:300]:
        a.learn_one(e)
    b = FTRLRanker.restore(a.snapshot())
    for e in data[300:]:
        assert a.learn_one(e) == b.learn_one(e)
    with pytest.raises(ParamsError, match="expected a snapshot, got a delta"):
        FTRLRanker.restore(a.state_delta() or b"")
    with pytest.raises(ParamsError, match="not 'two_tower'"):
        TwoTower().apply_delta(a.snapshot())


# -- the embedding model -----------------------------------------------------------------------
def test_embedding_memory_is_flat_with_a_cap_and_grows_without() -> None:
    capped = TwoTower(dim=8, min_count=1, max_rows=512)
    uncapped = TwoTower(dim=8, min_count=1, max_rows=None)
    sizes = []
    for t in range(6000):  # every example a new user and item
        for m in (capped, uncapped):
            m.learn_one(ex(f"u{t}", f"i{t}", 1, ts=t))
            m.learn_one(ex(f"u{t}", f"i{t - 1}", 0, ts=t))
        if t % 1000 == 999:
            sizes.append(capped.items.nbytes)
    assert len(capped.items) <= 512 and capped.items.evicted > 0
    assert len(set(sizes)) == 1  # flat
    assert len(uncapped.items) >= 5999 and uncapped.items.weight.nbytes > 10 * capped.items.weight.nbytes


def test_embedding_ttl_evicts_and_admission_waits() -> None:
    m = TwoTower(dim=4, min_count=2, ttl_ms=100)
    m.learn_one(ex("u", "once", 1, ts=0))
    assert m.items.get("once") < 0  # seen once: not admitted
    m.learn_one(ex("u", "once", 1, ts=1))
    assert m.items.get("once") >= 0
    m.items.expire(now=500)
    assert m.items.get("once") < 0 and "once" in m.items.removed


def test_a_new_user_row_starts_at_zero_and_moves_slower_than_item_rows() -> None:
    # A row sees few examples; Adagrad's first step moves a fresh row as far as a trained one,
    # so a fast user row followed each session (docs/decisions/slow-user-rows.md).
    m = TwoTower(dim=8, min_count=1, batch_size=1)
    m.learn_one(ex("u", "pos", 1, ts=0))
    assert not m.users.weight[m.users.get("u")].any()
    item_before = m.items.weight[m.items.get("pos")].clone()
    m.learn_one(ex("u", "neg", 0, ts=0))  # the pair fills the batch: one step
    user_moved = float(m.users.weight[m.users.get("u")].norm())
    item_moved = float((m.items.weight[m.items.get("pos")] - item_before).norm())
    assert 0 < user_moved <= 0.2 * item_moved


def test_embedding_learns_preferences_and_replicates() -> None:
    m = TwoTower(dim=8, min_count=1, batch_size=16, seed=2)
    replica = TwoTower.restore(m.snapshot())
    for i, e in enumerate(stream(4000, seed=5)):
        m.learn_one(e)
        if i % 700 == 0 and (blob := m.state_delta()):
            replica.apply_delta(blob)
    m.step()
    replica.apply_delta(m.state_delta())
    even_user = {"last_viewed_items": ["0", "2", "4"]}
    top = m.nearest(even_user, k=10)
    assert sum(int(i) % 2 == 0 for i in top) >= 8, top
    items = [str(i) for i in range(50)]
    assert np.array_equal(replica.score_many(even_user, items), m.score_many(even_user, items))


# -- examples ----------------------------------------------------------------------------------
def test_examples_carry_features_from_before_and_never_the_positive_as_negative() -> None:
    b = ExampleBuilder(negatives=3, seed=0, attribution_ms=1000)
    for n in range(200):
        b.observe_item(f"i{n % 7}", {"views": n})
        b.add(Ev(f"w{n}", "warm", f"i{n % 7}", "view", n, ""), None, None)
    before = {"views": 5}
    out = b.add(Ev("e1", "u", "i3", "view", 1000, ""), before, {"views": 9})
    assert out[0]["label"] == 1 and out[0]["user"] is before and out[0]["item"] == {"views": 9}
    negs = out[1:]
    assert len(negs) == 3 and all(n["label"] == 0 and n["item_id"] != "i3" for n in negs)
    assert all(n["item"] == b.items[n["item_id"]] for n in negs)
    # a buy 500 ms later is attributed to the view (features as of the view); one 5 s later is late
    buy = b.add(Ev("e2", "u", "i3", "buy", 1500, ""), {"views": 6}, {"views": 10})[0]
    assert buy["user"] is before and b.stats["attributed"] == 1
    b.add(Ev("e3", "u", "i3", "buy", 7000, ""), {"views": 7}, {"views": 11})
    b.add(Ev("e4", "u", "never-viewed", "cart", 7000, ""), None, None)
    assert b.stats["late_labels"] == 1 and b.stats["unattributed"] == 1


def test_recommender_ranker_skips_items_without_history() -> None:
    rec = OnlineRecommender.default(min_count=1)
    rec.learn_many([ex("u", "new", 1, item_feats=None)])
    assert rec.ranker.examples == 0 and rec.embedding.examples == 1
    rec.learn_many([ex("u", "old", 1, item_feats={"views": 2}), ex("u", "x", 0, item_feats={"views": 9})])
    assert rec.ranker.examples == 2


# -- evaluation --------------------------------------------------------------------------------
def test_scores_rank_metrics() -> None:
    s = Scores()
    s.record("next_item", "online", ["a", "b", "c"], "b", 0)
    s.record("next_item", "online", ["a"] * 20 + ["z"], "z", 0)  # rank 21: a miss everywhere
    row = s.table()["next_item"]["online"]
    assert row["events"] == 2 and row["hr@10"] == 0.5 and row["recall@20"] == 0.5
    assert abs(row["ndcg@10"] - 0.5 / np.log2(3)) < 1e-12


def test_movielens_and_evaluation_on_a_generated_log(tmp_path: Path) -> None:
    # MovieLens u.data: user, item, rating, timestamp (1997), tab-separated, no header
    rng = random.Random(0)
    rows = []
    t = 874_965_758
    for n in range(2500):
        u = rng.randrange(40)
        # users come back to their own few items, plus a popular head
        item = rng.choice([u * 3, u * 3 + 1, u * 3 + 2]) if rng.random() < 0.7 else rng.randrange(10)
        rows.append(f"{u}\t{item}\t{rng.randint(1, 5)}\t{t + n * 60}")
    path = tmp_path / "u.data"
    path.write_text("\n".join(rows) + "\nbroken line\n")
    assert detect_format(path) == "movielens"
    assert next(read_rows(io.StringIO(rows[0] + "\n"), "movielens"))[0]["behavior"] == "view"
    events, refused = load_events(path)
    assert len(events) == 2500 and sum(refused.values()) == 1
    ev = Evaluation(freeze_at=0.2, slices=5)
    for _ in ev.run(events, progress=False):
        pass
    table = ev.scores.table()
    nxt, new = table["next_item"], table["next_new_item"]
    assert nxt["online"]["events"] > 2000 and new["online"]["events"] < nxt["online"]["events"]
    # repeats dominate this log: learning models must find them, far above popularity
    assert nxt["online"]["hr@10"] > nxt["popularity"]["hr@10"] + 0.2
    assert new["recent_items"]["hr@10"] == 0.0  # excluded by the protocol, by construction
    assert new["last_distinct"]["hr@10"] == 0.0
    # the strong baselines see the repeats too; the daily copy is scored on every event
    assert nxt["last_distinct"]["hr@10"] > nxt["popularity_all_time"]["hr@10"] + 0.2
    assert nxt["covisit_knn"]["hr@10"] > nxt["popularity_all_time"]["hr@10"]
    assert nxt["daily"]["events"] == nxt["online"]["events"]
    report = ev.report(str(path), len(events), 1.0, dict(refused))
    assert len(report["over_time"]) == 5
    # split over two processes (live methods | frozen copies), the sums are the same
    merged = Evaluation(slices=5)
    for part in ("live", "frozen"):
        half = Evaluation(freeze_at=0.2, slices=5, part=part)
        for _ in half.run(events, progress=False):
            pass
        merged.scores.merge(half.scores.plain())
    assert merged.scores.table() == table


def test_the_evaluation_measures_the_apis_candidate_policy() -> None:
    """`freshrec evaluate` describes what is served: the API and the evaluation take their
    candidates from one policy (sources, order, quotas, cap), and the evaluation obeys it."""
    from connectors.feast_redis import FeastRedisReader
    from features.definitions import FEATURE_VIEWS
    from serving.candidates import POLICY, Policy
    from serving.request_path import RequestPath

    api = RequestPath(None, FeastRedisReader(None, "p", FEATURE_VIEWS), None, "p")  # type: ignore[arg-type]
    assert Evaluation().policy is api.policy is POLICY
    events = [validate({"user_id": str(n % 7), "item_id": str(n % 23), "behavior": "view", "ts": 1_600_000_000_000
                        + n * 1000}) for n in range(400)]
    seen: list[int] = []

    class Counted(Policy):
        def candidates(self, sources: Any, exclude: Any = ()) -> list[tuple[str, list[str]]]:
            got = super().candidates(sources, exclude)
            seen.append(len(got))
            return got

    ev = Evaluation(policy=Counted((("covisit", 2), ("trending", 1)), cap=2))
    for _ in ev.run(events, progress=False):
        pass
    assert seen and max(seen) == 2, "every list the evaluation scored came from the policy, capped"
    assert ev.scores.table()["next_item"]["online"]["events"] > 300
