"""Pure logic: schema, log parsing, configuration, event-time state, ranking. No services."""

from __future__ import annotations

import io
import random

import pytest

from connectors.logfile import LogFormatError, detect_format, read_rows
from connectors.replay import Pacer
from connectors.schema import InvalidEvent, validate
from connectors.simulator import simulate
from freshrec.config import ConfigError, Settings
from serving.status import StatusFeed
from streaming.state import (
    CategoryTrending,
    Ev,
    ItemState,
    Neighbours,
    PaneCounts,
    RecentViews,
    ScoreMap,
    Spec,
    Trending,
    UserState,
    merge_partials,
    trending_shard,
)

NOW = 1_800_000_000_000


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"item_id": "i", "behavior": "view", "ts": NOW}, "user_id"),
        ({"user_id": "", "item_id": "i", "behavior": "view", "ts": NOW}, "user_id"),
        ({"user_id": True, "item_id": "i", "behavior": "view", "ts": NOW}, "user_id"),
        ({"user_id": "a b", "item_id": "i", "behavior": "view", "ts": NOW}, "user_id"),
        ({"user_id": "u", "item_id": 1.5, "behavior": "view", "ts": NOW}, "item_id"),
        ({"user_id": "u", "item_id": "i", "behavior": 3, "ts": NOW}, "behavior"),
        ({"user_id": "u", "item_id": "i", "behavior": "view", "ts": True}, "ts"),
        ({"user_id": "u", "item_id": "i", "behavior": "view", "ts": float("nan")}, "ts"),
        ({"user_id": "u", "item_id": "i", "behavior": "view", "ts": NOW + 2 * 86_400_000}, "ts"),
        ({"user_id": "u", "item_id": "i", "behavior": "view", "timestamp": "2017-11-26T01:00:00"}, "timestamp"),
        ({"user_id": "u", "item_id": "i", "behavior": "view", "ts": NOW, "category_id": ["x"]}, "category_id"),
        ("not json", "payload"),
        ("3", "payload"),
    ],
)
def test_schema_names_the_bad_field(raw: object, field: str) -> None:
    with pytest.raises(InvalidEvent) as err:
        validate(raw, now_ms=NOW)  # type: ignore[arg-type]
    assert err.value.field == field
    assert str(err.value).startswith(field + ": ")


def test_schema_normalizes_friendly_input() -> None:
    a = validate({"user_id": 7, "item_id": "9", "behavior": " PV ", "timestamp": 1511658000.5}, now_ms=NOW)
    b = validate({"user_id": "7", "item_id": 9, "behavior": "view", "ts": "2017-11-26T01:00:00.500Z"}, now_ms=NOW)
    assert (a.user_id, a.item_id, a.behavior, a.ts) == ("7", "9", "view", 1511658000500)
    assert (b.user_id, b.item_id, b.behavior, b.ts) == ("7", "9", "view", 1511658000500)
    assert a.event_id == b.event_id  # derived from content when absent: replays stay idempotent
    assert validate({"user_id": 1, "item_id": 2, "behavior": "buy", "ts": NOW, "event_id": "x"}, NOW).event_id == "x"


def test_log_formats() -> None:
    taobao = list(read_rows(io.StringIO("1,2,3,pv,1511658000\n1,2\n"), "taobao"))
    assert taobao[0][0] == {"user_id": "1", "item_id": "2", "category_id": "3", "behavior": "pv",
                            "timestamp": "1511658000"}
    assert taobao[1] == (None, "1,2")  # a short line is reported, not dropped
    csv_rows = list(read_rows(io.StringIO("user_id,item_id,behavior,ts\nu,i,cart,1511658000000\n"), "csv"))
    assert csv_rows[0][0] == {"user_id": "u", "item_id": "i", "behavior": "cart", "ts": "1511658000000"}
    jsonl = list(read_rows(io.StringIO('{"user_id": "u"}\n\nnope\n'), "jsonl"))
    assert [r for r, _ in jsonl] == [{"user_id": "u"}, None]


def test_detect_format(tmp_path) -> None:  # noqa: ANN001
    cases = {"a.csv": "1,2,3,pv,1511658000\n", "b.csv": "user_id,item_id,behavior,ts\n",
             "c.jsonl": '{"user_id": 1}\n', "ratings.csv": "userId,movieId,rating,timestamp\n1,1,4.0,964982703\n",
             "u.data": "196\t242\t3\t881250949\n"}
    got = {}
    for name, text in cases.items():
        (tmp_path / name).write_text(text)
        got[name] = detect_format(tmp_path / name)
    assert got == {"a.csv": "taobao", "b.csv": "csv", "c.jsonl": "jsonl", "ratings.csv": "movielens",
                   "u.data": "movielens"}
    (tmp_path / "d.txt").write_text("what,is,this\n")
    with pytest.raises(LogFormatError, match="--format"):
        detect_format(tmp_path / "d.txt")


def test_config_from_env_and_errors() -> None:
    s = Settings.from_env({"FRESHREC_PARTITIONS": "4", "FRESHREC_REDIS_URL": "redis://h:1/2"})
    assert (s.partitions, s.redis_url) == (4, "redis://h:1/2")
    assert Settings.from_env(s.to_env()) == s
    with pytest.raises(ConfigError, match="FRESHREC_PARTITIONS"):
        Settings.from_env({"FRESHREC_PARTITIONS": "0"})
    with pytest.raises(ConfigError, match="hashmap or rocksdb"):
        Settings.from_env({"FRESHREC_STATE_BACKEND": "memory"})
    with pytest.raises(ConfigError, match="FRESHREC_COVISIT_WINDOW_SECONDS is no longer used.*HALF_LIFE"):
        Settings.from_env({"FRESHREC_COVISIT_WINDOW_SECONDS": "86400"})
    assert Settings.from_env({"FRESHREC_CATEGORY_TRENDING_SIZE": "0"}).category_trending_size == 0  # off
    with pytest.raises(ConfigError, match="FRESHREC_CATEGORY_TRENDING_SIZE=-1 must be 0 or more"):
        Settings.from_env({"FRESHREC_CATEGORY_TRENDING_SIZE": "-1"})
    with pytest.raises(ValueError, match="not both"):
        Pacer(speed=2, rate=3)


SPEC = Spec(window_ms=600_000, pane_ms=60_000, last_n=5, top_categories=2, dedup_ms=10**9,
            covisit_gap_ms=60_000, covisit_keep_ms=10**9, covisit_max_views=10**6, covisit_half_life_ms=600_000,
            covisit_top_k=5)


def _fold(events: list[Ev]) -> tuple:
    user, item, views, neigh = UserState(), ItemState(), RecentViews(), {}
    for e in events:
        if not user.add(e, SPEC):
            continue  # a duplicate: the job forwards only new events
        item.add(e, SPEC)
        for a, b, ts, gap in views.add(e, SPEC) if e.behavior == "view" else []:
            neigh.setdefault(a, Neighbours()).add(b, ts, SPEC, gap)
    return (user.features(SPEC), item.features(), {k: v.features(SPEC) for k, v in sorted(neigh.items())})


def test_state_is_independent_of_arrival_order_and_duplicates() -> None:
    raw = list(simulate(300, n_users=1, n_items=12, n_categories=3, seed=5, events_per_second=0.2))
    events = [Ev(r["event_id"], "u", r["item_id"], r["behavior"], r["ts"], r["category_id"]) for r in raw]
    ordered = _fold(events)
    shuffled = events + events[:40]  # redelivered duplicates
    random.Random(1).shuffle(shuffled)
    assert _fold(shuffled) == ordered
    user = ordered[0]
    first_pane = events[-1].ts // 60_000 - 9
    assert user["views"] == sum(1 for e in events if e.behavior == "view" and e.ts // 60_000 >= first_pane)
    assert len(user["last_viewed_items"]) == 5
    assert ordered[1]["category"] == max((e.ts, e.category_id) for e in events)[1]  # the newest event's
    assert ordered[2], "co-visitation found no pairs in a session-structured log"


def test_co_visits_fade_by_half_life_in_any_order_and_across_reference_moves() -> None:
    half_life = 1_000
    spec = SPEC._replace(covisit_half_life_ms=half_life, covisit_top_k=50, covisit_kept=50)
    rng = random.Random(3)
    # Over 3,000 half-lives: the scores' reference moves (every 256) and old pairs fade to nothing.
    pairs = [(f"i{rng.randrange(30)}", rng.randrange(3_000_000)) for _ in range(2_000)]
    newest = max(ts for _, ts in pairs)
    want: dict[str, float] = {}
    for other, ts in pairs:
        want[other] = want.get(other, 0.0) + 2.0 ** ((ts - newest) / half_life)
    results = []
    for order in (pairs, sorted(pairs, key=lambda p: p[1]), rng.sample(pairs, len(pairs))):
        n = Neighbours()
        for other, ts in order:
            n.add(other, ts, spec)
        results.append(n.features(spec))
    assert results[0] == results[1] == results[2]
    got = dict(zip(results[0]["neighbours"], results[0]["neighbour_counts"], strict=True))
    assert got.keys() == {k for k, v in want.items() if float(f"{v:.6g}")}
    assert all(abs(got[k] - want[k]) <= 1e-5 * want[k] for k in got)


def test_co_visit_rows_kept_up_to_date_equal_rows_ranked_afresh() -> None:
    import pickle

    rng = random.Random(11)
    for spec in (SPEC._replace(covisit_half_life_ms=1_000, covisit_top_k=5, covisit_kept=8),
                 SPEC._replace(covisit_half_life_ms=0, covisit_top_k=8, covisit_kept=8)):
        n = Neighbours()
        for step in range(3_000):  # ties (no fading), truncation, reference moves, late pairs
            n.add(f"i{rng.randrange(40)}", rng.randrange(3_000_000) if spec.covisit_half_life_ms else step, spec)
            if rng.random() < 0.3:
                got = n.features(spec)
                fresh = pickle.loads(pickle.dumps(n))  # the ranking is not pickled: this one ranks anew
                assert got == fresh.features(spec)
                assert len(got["neighbours"]) == min(spec.covisit_top_k, len(n.scores))


def test_a_co_visit_counts_less_the_further_apart_its_views() -> None:
    def row(spec: Spec) -> dict[str, object]:
        views, n = RecentViews(), Neighbours()
        for ts, item in [(0, "a"), (600_000, "far"), (1_000, "near")]:  # "near" arrives late
            for a, b, at, gap in views.add(Ev(f"e{ts}", "u", item, "view", ts, ""), spec):
                if a == "a":
                    n.add(b, at, spec, gap)
        return n.features(spec)

    near, far = 1 / (1 + 1_000 / 60_000), 1 / (1 + 600_000 / 60_000)
    spec = SPEC._replace(covisit_gap_ms=3_600_000, covisit_half_life_ms=0, covisit_proximity_ms=60_000)
    assert row(spec) == {"neighbours": ["near", "far"], "neighbour_counts": [float(f"{near:.6g}"), float(f"{far:.6g}")]}
    assert row(spec._replace(covisit_proximity_ms=0))["neighbour_counts"] == [1.0, 1.0]


def test_co_visits_keep_bounded_state_and_read_a_windowed_checkpoint() -> None:
    spec = SPEC._replace(covisit_kept=10, covisit_half_life_ms=0)  # 0: counts never fade
    n = Neighbours()
    for i in range(100):
        for _ in range(100 - i):
            n.add(f"i{i:03}", i, spec)
    assert len(n.scores) <= 20
    assert n.features(spec)["neighbours"][:3] == ["i000", "i001", "i002"]
    # State pickled by the windowed Neighbours: its totals count as co-visits at its newest pair.
    old = PaneCounts()
    for ts, other in [(5_000, "a"), (6_000, "a"), (6_000, "b")]:
        old.add(ts, other, pane_ms=1_000, window_ms=60_000)
    restored = Neighbours.__new__(Neighbours)
    restored.__setstate__((None, {"counts": old, "newest": 6_000}))
    fading = SPEC._replace(covisit_half_life_ms=1_000)
    assert restored.features(fading)["neighbour_counts"] == [2.0, 1.0]
    restored.add("b", 7_000, fading)  # a half-life later: a and b fade to 1 and 0.5, b gains 1
    assert restored.features(fading) == {"neighbours": ["b", "a"], "neighbour_counts": [1.5, 1.0]}


def test_category_trending_matches_a_full_ranking_and_restores_from_the_global_scores() -> None:
    rng = random.Random(5)
    t, by_category = Trending(ScoreMap()), CategoryTrending()
    truth: dict[str, tuple[int, int, str]] = {}
    for ts in range(3000):
        item, events = f"i{rng.randrange(200)}", rng.randrange(1, 50)
        category = f"c{int(item[1:]) % 7}" if rng.random() > 0.05 else f"c{rng.randrange(7)}"  # some move
        if t.update(item, events, ts, k=10, category=category):
            by_category.update(item, category, events, ts, k=5)
            truth[item] = (events, ts, category)
        if ts % 211 == 0:
            by_category.forget(t.rebuild(10, window_ms=600))
            assert by_category.category_of.keys() <= t.scores.keys()  # memory: no item the global list let go
            due = by_category.due(5, window_ms=600, now=ts * 1000.0, newest=t.newest)
            restored = CategoryTrending.restore(t.scores, k=5)
            restored.due(5, window_ms=600, now=0, newest=t.newest)
            assert due
            for c in due:
                live = [(i, v[0]) for i, v in truth.items() if v[2] == c and v[1] > t.newest - 600]
                want = sorted(live, key=lambda iv: (-iv[1], iv[0]))[:5]
                assert by_category.top(c, 5, window_ms=600) == want
                assert restored.top(c, 5, window_ms=600) == want


def test_trending_in_shards_then_merged_matches_one_global_ranking() -> None:
    rng = random.Random(4)
    shards: dict[int, Trending] = {}
    truth: dict[str, tuple[int, int]] = {}
    for ts in range(2000):
        item, events = f"i{rng.randrange(300)}", rng.randrange(1, 50)
        category = f"c{int(item[1:]) % 9}" if int(item[1:]) % 4 else ""  # a quarter have none
        shards.setdefault(trending_shard(category, item), Trending(ScoreMap())).update(item, events, ts, k=10)
        if item not in truth or ts >= truth[item][1]:
            truth[item] = (events, ts)
        if ts % 97 == 0:
            partials = []
            for t in shards.values():
                t.rebuild(10, window_ms=500)
                partials.append((t.newest, [(i, e, t.candidates[i][1]) for i, e in t.top(10, window_ms=500)]))
            live = {i: v for i, v in truth.items() if v[1] > ts - 500}
            want = sorted(live.items(), key=lambda kv: (-kv[1][0], kv[0]))[:10]
            assert merge_partials(partials, 10, window_ms=500) == (ts, [(i, v[0]) for i, v in want])
    assert len(shards) > 4  # the load spreads: categories and uncategorised items over several keys


def test_trending_candidates_match_a_full_ranking() -> None:
    rng = random.Random(3)
    t = Trending(ScoreMap())
    truth: dict[str, tuple[int, int]] = {}
    for ts in range(2000):
        item, events = f"i{rng.randrange(300)}", rng.randrange(1, 50)
        t.update(item, events, ts, k=10)
        if item not in truth or ts >= truth[item][1]:
            truth[item] = (events, ts)
        if ts % 97 == 0:
            t.rebuild(10, window_ms=500)
            live = {i: v for i, v in truth.items() if v[1] > ts - 500}
            want = sorted(live.items(), key=lambda kv: (-kv[1][0], kv[0]))[:10]
            assert t.top(10, window_ms=500) == [(i, v[0]) for i, v in want]


def test_status_feed_says_why_it_could_not_collect() -> None:
    """A failing collection is reported to the page, not swallowed (it would show "collecting" forever)."""
    def no_api() -> dict[str, object]:
        raise RuntimeError("the API's model is not there")

    feed = StatusFeed(Settings(kafka_bootstrap="127.0.0.1:1", redis_url="redis://127.0.0.1:1/0"), api=no_api)
    try:
        assert feed.latest(wait_s=15)["error"].endswith("RuntimeError: the API's model is not there")
    finally:
        feed.stop()


def test_offline_files_written_under_an_older_schema_are_rewritten_in_the_current_one(tmp_path) -> None:  # noqa: ANN001
    from datetime import UTC, datetime

    import pyarrow as pa
    import pyarrow.parquet as pq

    from connectors.offline_files import conform, write_part

    def schema(counts: pa.DataType) -> pa.Schema:
        return pa.schema([pa.field("item_id", pa.string()), pa.field("event_timestamp", pa.timestamp("ms", tz="UTC")),
                          pa.field("neighbour_counts", pa.list_(counts))])

    when = datetime(2026, 12, 6, tzinfo=UTC)
    write_part(tmp_path, "v", "2026-12-06", "a-old", [{"item_id": "a", "event_timestamp": when,
                                                     "neighbour_counts": [3, 1]}], schema(pa.int64()))
    now = schema(pa.float64())
    write_part(tmp_path, "v", "2026-12-06", "b-new", [{"item_id": "b", "event_timestamp": when,
                                                     "neighbour_counts": [0.5]}], now)
    with pytest.raises(pa.ArrowInvalid):  # what a reader of the whole folder met before
        pq.read_table(tmp_path / "v")
    assert conform(tmp_path, "v", now) == 1
    assert conform(tmp_path, "v", now) == 0
    got = pq.read_table(tmp_path / "v").sort_by("item_id").to_pydict()
    assert got["neighbour_counts"] == [[3.0, 1.0], [0.5]]
    with pytest.raises(ValueError, match="a-old.parquet.*move the file away"):
        conform(tmp_path, "v", now.append(pa.field("extra", pa.string())))


def test_free_port_never_hands_out_a_port_twice() -> None:
    # the kernel may return one ephemeral port to binds in a row; two servers sharing it fail late
    from connectors.embedded import free_port

    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
