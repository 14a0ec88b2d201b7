"""Prequential (test-then-train) evaluation of recommenders over a behavior log.

The log is replayed in event-time order. For every event of a user seen before, each method
is first asked for that user's top list (knowing only the past), the event's item is looked
up in it, and only then does everything learn from the event. Two protocols:

* ``next_item``: the target is the event's item, whatever it is; lists may hold items the
  user already interacted with (e-commerce users come back to what they viewed).
* ``next_new_item``: only events whose item is new to the user count, and lists leave out
  every item the user interacted with before.

Metrics (one target per event): HR@10 (the item is in the top 10), NDCG@10 (1/log2(rank+2)
within the top 10) and recall@20 (in the top 20), overall and per slice of the log.

Methods: ``online`` (candidates from co-visitation, embedding retrieval, recent items and
trending, ranked by the FTRL ranker stacked on the two-tower model, all learning on every
event), ``online_embedding`` (the two-tower model's retrieval alone), ``frozen`` and
``frozen_embedding`` (the same models, no longer learning after the first ``freeze_at`` of the
log), ``daily`` (the online models retrained once a day: as of the start of the event's day),
``popularity`` (most events in a sliding window), ``recent_items`` (the user's own last views,
newest first) and ``item_knn`` (co-visitation neighbours of the user's recent views), both
from the streaming features; and the strong simple baselines of freshrec/baselines.py, over
the whole log: ``popularity_all_time``, ``last_distinct`` (the user's distinct items, most
recent first) and ``covisit_knn`` (neighbours of the user's last 3 items by adjacency in users'
sequences, popularity to fill).

The features, examples and co-visitation counts come from the same code the streaming job
runs (streaming/state.py, online_learning/examples.py). The ranker weighs the catalogue's
ranking service (features/dsl.Ranking) unless ``features`` names other definitions: run a log
with and without one to see what it adds.
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import sys
import time
from collections import Counter, defaultdict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from connectors.replay import sorted_events
from connectors.schema import BehaviorEvent, InvalidEvent
from features.dsl import DefinitionError, Ranking, load, load_ranking, validate_ranking
from freshrec.baselines import CoVisitation, LastDistinct, Popularity, most_common
from online_learning.examples import BatchExamples, ExampleBuilder
from online_learning.ranker import Inputs
from online_learning.recommender import OnlineRecommender
from online_learning.threads import one_thread
from serving.candidates import POLICY, Policy, interleave
from serving.ranking import rank
from streaming.ranking_inputs import RankingInputs
from streaming.state import Ev, Spec

PROTOCOLS = ("next_item", "next_new_item")
METHODS = ("online", "online_embedding", "frozen", "frozen_embedding", "daily", "popularity", "recent_items",
           "item_knn", "popularity_all_time", "last_distinct", "covisit_knn")
DAY_MS = 86_400_000
METRICS = ("hr@10", "ndcg@10", "recall@20")
DEPTH = 20


def load_events(path: Path, fmt: str = "auto", limit: int | None = None) -> tuple[list[BehaviorEvent], Counter[str]]:
    """Valid events in time order (history: no lower bound on time), and the refused rows
    counted by reason (none are dropped silently)."""
    refused: Counter[str] = Counter()

    def count(line: str, err: InvalidEvent) -> None:
        refused[f"{err.field}: {err.reason.split(';')[0]}"] += 1

    events = sorted_events(path, fmt, count, min_ts_ms=0)
    return (events[:limit] if limit else events), refused


class SlidingPopularity:
    """Events per item in the last ``window_ms``; the ranking is refreshed every ``every`` events."""

    def __init__(self, window_ms: int = 3_600_000, every: int = 1000, depth: int = 200) -> None:
        self.window_ms, self.every, self.depth = window_ms, every, depth
        self.events: deque[tuple[int, str]] = deque()
        self.counts: Counter[str] = Counter()
        self.since = 0
        self.top: list[str] = []

    def add(self, item: str, ts: int) -> None:
        self.events.append((ts, item))
        self.counts[item] += 1
        while self.events and self.events[0][0] <= ts - self.window_ms:
            _, old = self.events.popleft()
            self.counts[old] -= 1
            if not self.counts[old]:
                del self.counts[old]
        self.since += 1
        if self.since >= self.every:
            self.refresh()

    def refresh(self) -> None:
        self.since = 0
        self.top = [i for i, _ in most_common(self.counts, self.depth)]


class CategoryPopularity:
    """Events per item of each category in the last ``window_ms`` (the feature job's trending
    list per category); a category's list is recomputed when asked, at most every ``every``
    events of the log once its counts changed.

    >>> p = CategoryPopularity(window_ms=100, every=1)
    >>> for category, item, ts in [("c", "a", 0), ("c", "b", 10), ("c", "b", 20), ("d", "x", 30)]:
    ...     p.add(category, item, ts)
    >>> p.top("c")
    ['b', 'a']
    >>> p.add("c", "a", 115)  # the first two events leave the window
    >>> p.top("c"), p.top("d")
    (['a', 'b'], ['x'])
    """

    def __init__(self, window_ms: int = 3_600_000, every: int = 100, depth: int = 20) -> None:
        self.window_ms, self.every, self.depth = window_ms, every, depth
        self.events: deque[tuple[int, str, str]] = deque()
        self.counts: dict[str, Counter[str]] = defaultdict(Counter)
        self.changed: set[str] = set()
        self.tops: dict[str, tuple[int, list[str]]] = {}  # category -> (event number, its list)
        self.n = 0

    def add(self, category: str, item: str, ts: int) -> None:
        self.n += 1
        if not category:
            return
        self.events.append((ts, category, item))
        self.counts[category][item] += 1
        self.changed.add(category)
        while self.events and self.events[0][0] <= ts - self.window_ms:
            _, cat, old = self.events.popleft()
            counts = self.counts[cat]
            counts[old] -= 1
            if not counts[old]:
                del counts[old]
            self.changed.add(cat)

    def top(self, category: str) -> list[str]:
        at, items = self.tops.get(category, (-self.every, []))
        if category in self.changed and self.n - at >= self.every:
            items = [i for i, _ in most_common(self.counts[category], self.depth)]
            self.tops[category] = (self.n, items)
            self.changed.discard(category)
        return items


@dataclass
class Scores:
    """Sums of each metric per method and protocol, overall and per slice."""

    n: Counter[str] = field(default_factory=Counter)
    sums: dict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    slices: dict[int, dict[str, Counter[str]]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Counter)))
    slice_n: dict[int, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))

    def record(self, protocol: str, method: str, ranked: list[str], target: str, part: int) -> None:
        key = f"{protocol}/{method}"
        try:
            r = ranked.index(target, 0, DEPTH)
        except ValueError:
            r = DEPTH
        hit = {"hr@10": float(r < 10), "ndcg@10": 1 / math.log2(r + 2) if r < 10 else 0.0,
               "recall@20": float(r < DEPTH)}
        self.n[key] += 1
        self.slice_n[part][key] += 1
        for m, v in hit.items():
            self.sums[key][m] += v
            self.slices[part][key][m] += v

    def merge(self, other: Scores) -> None:
        """Add another process's sums (each process scores its own methods over the same events)."""
        self.n.update(other.n)
        for key, sums in other.sums.items():
            self.sums[key].update(sums)
        for part, by_key in other.slices.items():
            for key, sums in by_key.items():
                self.slices[part][key].update(sums)
        for part, n in other.slice_n.items():
            self.slice_n[part].update(n)

    def plain(self) -> Scores:
        """A copy without lambdas, to send from a worker process."""
        copy = Scores()
        copy.merge(self)
        copy.slices = {p: dict(v) for p, v in copy.slices.items()}  # type: ignore[assignment]
        copy.sums, copy.slice_n = dict(copy.sums), dict(copy.slice_n)  # type: ignore[assignment]
        return copy

    def table(self) -> dict[str, dict[str, dict[str, float]]]:
        return {p: {m: {metric: self.sums[f"{p}/{m}"][metric] / max(1, self.n[f"{p}/{m}"]) for metric in METRICS}
                    | {"events": self.n[f"{p}/{m}"]} for m in METHODS} for p in PROTOCOLS}


class Evaluation:
    """``part`` splits the work between two processes over the same events: ``live`` scores
    every method but the frozen copies; ``frozen`` scores only those, and stops learning at
    the freeze point. ``all`` does both in one process."""

    def __init__(self, spec: Spec | None = None, freeze_at: float = 0.2, slices: int = 20, seed: int = 0,
                 part: str = "all", policy: Policy = POLICY, ranking: Ranking | None = None) -> None:
        if part not in ("all", "live", "frozen"):
            raise ValueError(f"part must be all, live or frozen, not {part!r}")
        self.part = part
        self.policy = policy  # the API's candidate policy: what is measured is what is served
        self.spec = spec or Spec()
        self.freeze_at, self.n_slices = freeze_at, slices
        self.ranking = ranking or Ranking()
        self.batch = BatchExamples(ExampleBuilder(seed=seed), self.spec, RankingInputs(self.ranking))
        self.seen: dict[str, set[str]] = defaultdict(set)
        self.popularity = SlidingPopularity(self.spec.window_ms)
        self.by_category = CategoryPopularity(self.spec.window_ms)
        self.online = OnlineRecommender.default(seed=seed, inputs=Inputs.of(self.ranking))
        self.frozen: OnlineRecommender | None = None
        # The daily-retrained copy: the online models as of the start of the event's day (their
        # day's changes applied as one delta, as a replica would), not learning within the day.
        self.daily = OnlineRecommender.restore(self.online.snapshot())
        self.day: int | None = None
        self.last_distinct, self.all_time = LastDistinct(), Popularity()
        self.covisit = CoVisitation(last=self.last_distinct, popularity=self.all_time)  # it teaches both
        self.scores = Scores()

    # -- the methods' top lists ----------------------------------------------------------------
    def _knn(self, recent: list[str]) -> list[str]:
        anchors = recent[:self.policy.anchors]
        rows = [self.batch.covisit_row(i) for i in anchors]
        ranked = rank([r.get("neighbours", []) for r in rows], [r.get("neighbour_counts", []) for r in rows], [],
                      k=100, recent=anchors)
        return [i for i, _, _ in ranked]

    def _ranked(self, rec: OnlineRecommender, user: dict[str, Any], user_id: str, knn: list[str], recent: list[str],
                exclude: set[str], cache: dict[str, dict[str, Any] | None],
                memo: dict[str, Any]) -> tuple[list[str], list[str]]:
        """The system's list and the embedding retrieval's list. ``memo`` holds what both protocols
        of one event share for this model: its retrieval and the scores it gave."""
        depth = self.policy.retrieve
        if "retrieved" not in memo:  # once per event, deep enough for either protocol's exclusions
            memo["retrieved"], memo["scores"] = rec.retrieve(user, depth + len(self.seen[user_id]), user_id), {}
        retrieved = [i for i in memo["retrieved"] if i not in exclude][:depth]
        in_categories = interleave([self.by_category.top(c) for c in user.get("top_categories") or ()])
        cands = [i for i, _ in self.policy.candidates({"recent": recent, "covisit": knn, "category": in_categories,
                                                       "embedding": retrieved, "trending": self.popularity.top},
                                                      exclude)]
        known: dict[str, float] = memo["scores"]
        todo = [i for i in cands if i not in known]
        for i in todo:
            if i not in cache:
                cache[i] = self.batch.item_features(i)
        if todo:
            known.update(zip(todo, rec.score_many(user, [(i, cache[i]) for i in todo], user_id).tolist(), strict=True))
        ranked = sorted(cands, key=lambda i: -known[i])[:DEPTH]
        return ranked, retrieved[:DEPTH]

    def _test(self, ev: BehaviorEvent, user: dict[str, Any], part: int) -> None:
        recent = list(user["last_viewed_items"])
        knn = self._knn(recent)
        seen = self.seen[ev.user_id]
        cache: dict[str, dict[str, Any] | None] = {}
        memos: dict[str, dict[str, Any]] = {"online": {}, "frozen": {}, "daily": {}}
        for protocol in PROTOCOLS:
            if protocol == "next_new_item":
                if ev.item_id in seen:
                    continue
                exclude = seen
            else:
                exclude = set()
            lists: dict[str, list[str]] = {}
            if self.part != "frozen":
                lists["popularity"] = [i for i in self.popularity.top if i not in exclude][:DEPTH]
                lists["recent_items"] = [i for i in recent if i not in exclude][:DEPTH]
                lists["item_knn"] = [i for i in knn if i not in exclude][:DEPTH]
                for method, baseline in (("popularity_all_time", self.all_time), ("last_distinct", self.last_distinct),
                                         ("covisit_knn", self.covisit)):
                    lists[method] = baseline.recommend(ev.user_id, exclude, DEPTH)
            if self.part != "frozen" or self.frozen is None:
                lists["online"], lists["online_embedding"] = self._ranked(self.online, user, ev.user_id, knn,
                                                                          recent, exclude, cache, memos["online"])
            if self.part != "live":
                if self.frozen is None:  # before the freeze point both are the same model
                    lists["frozen"], lists["frozen_embedding"] = lists["online"], lists["online_embedding"]
                else:
                    lists["frozen"], lists["frozen_embedding"] = self._ranked(
                        self.frozen, user, ev.user_id, knn, recent, exclude, cache, memos["frozen"])
                lists["daily"], _ = self._ranked(self.daily, user, ev.user_id, knn, recent, exclude, cache,
                                                 memos["daily"])
                if self.part == "frozen":
                    lists.pop("online", None)
                    lists.pop("online_embedding", None)
            for method, ranked in lists.items():
                self.scores.record(protocol, method, ranked, ev.item_id, part)

    # -- learning ------------------------------------------------------------------------------
    def _learn(self, ev: BehaviorEvent, user: dict[str, Any] | None) -> None:
        e = Ev.of(ev)
        examples = self.batch.add(e, user)
        if examples is None:
            return  # a duplicate: the streaming job drops it at the user too
        self.online.learn_many(examples)  # the frozen part too: its daily copy follows the online models
        if self.part != "frozen":
            self.covisit.learn_one(ev.user_id, ev.item_id)  # and last_distinct and all_time, which it holds
        self.popularity.add(ev.item_id, ev.ts)
        self.by_category.add(e.category_id, ev.item_id, ev.ts)
        self.seen[ev.user_id].add(ev.item_id)

    def run(self, events: list[BehaviorEvent], progress: bool = True) -> Iterator[int]:
        """Evaluate, then learn, event by event; yields the index of each event done."""
        freeze = int(len(events) * self.freeze_at)
        per_slice = max(1, math.ceil(len(events) / self.n_slices))
        for n, ev in enumerate(tqdm(events, unit="ev", disable=None if progress else True, file=sys.stderr,
                                    mininterval=0.5)):
            if n == freeze and self.frozen is None and self.part != "live":
                self.frozen = OnlineRecommender.restore(self.online.snapshot())
            if self.part != "live" and ev.ts // DAY_MS != self.day:
                self.day = ev.ts // DAY_MS
                for blob in self.online.state_delta().values():
                    self.daily.apply_delta(blob)
            user = self.batch.user_features(ev.user_id)
            if user is not None:
                self._test(ev, user, n // per_slice)
            self._learn(ev, user)
            yield n

    def summary(self) -> dict[str, Any]:
        """What the example builder counted and how big the online models grew."""
        rec = self.online
        return {"examples": dict(self.batch.builder.stats),
                "model_size": {"ftrl_weights": rec.ranker.size, "two_tower_rows": rec.embedding.size,
                               "two_tower_evicted": rec.embedding.users.evicted + rec.embedding.items.evicted}}

    def report(self, source: str, n_events: int, seconds: float, refused: dict[str, int],
               summary: dict[str, Any] | None = None) -> dict[str, Any]:
        """The whole result; ``summary`` from the process that learned, when that was another one."""
        slices = []
        for part in sorted(self.scores.slices):
            row: dict[str, Any] = {"slice": part}
            for p in PROTOCOLS:
                for m in METHODS:
                    k = f"{p}/{m}"
                    row[k] = {metric: self.scores.slices[part][k][metric] / max(1, self.scores.slice_n[part][k])
                              for metric in METRICS}
            slices.append(row)
        return {"source": source, "events": n_events, "refused": refused, "seconds": round(seconds, 1),
                "events_per_second": round(n_events / max(seconds, 1e-9)), "freeze_at": self.freeze_at,
                "protocols": list(PROTOCOLS), "methods": list(METHODS),
                "ranking_features": [d.name for d in self.ranking.features],
                "overall": self.scores.table(), "over_time": slices, **(summary or self.summary())}


def plot(report: dict[str, Any], path: Path) -> None:
    """HR@10 per slice of the log, one line per method, a panel per protocol."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PROTOCOLS), figsize=(13, 4.5), sharex=True)
    for ax, protocol in zip(axes, PROTOCOLS, strict=True):
        for method in METHODS:
            xs = [s["slice"] for s in report["over_time"]]
            ys = [s[f"{protocol}/{method}"]["hr@10"] for s in report["over_time"]]
            ax.plot(xs, ys, label=method, linestyle="--" if method.startswith("frozen") else "-")
        ax.set_title(f"{protocol}: HR@10 over the log")
        ax.set_xlabel(f"slice of the log (1/{len(report['over_time'])} each)")
        ax.set_ylabel("HR@10")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.suptitle(f"prequential evaluation: {Path(report['source']).name}, {report['events']:,} events")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def format_table(report: dict[str, Any]) -> str:
    lines = []
    for protocol in PROTOCOLS:
        lines.append(f"\nprotocol {protocol}")
        lines.append(f"  {'method':18} {'events':>8} " + " ".join(f"{m:>10}" for m in METRICS))
        for method, row in report["overall"][protocol].items():
            lines.append(f"  {method:18} {row['events']:>8} " + " ".join(f"{row[m]:>10.4f}" for m in METRICS))
    return "\n".join(lines)


_EVENTS: list[BehaviorEvent] = []  # handed to forked workers without pickling


def _work(part: str, progress: bool, ranking: Ranking) -> tuple[Scores, dict[str, Any]]:
    one_thread()  # two workers on two cores: more threads only contend
    ev = Evaluation(part=part, ranking=ranking)
    for _ in ev.run(_EVENTS, progress):
        pass
    return ev.scores.plain(), ev.summary()


def ranking_of(catalogue: str, features: str | None = None) -> Ranking:
    """The ranking service to evaluate: the catalogue's own (``features`` None), only the
    built-in views ("none"), or the catalogue's definitions named, comma-separated."""
    if features is None:
        return load_ranking(catalogue)
    names = [n.strip() for n in features.split(",") if n.strip() and n.strip() != "none"]
    defs = {d.name: d for d in load(catalogue)}
    unknown = [n for n in names if n not in defs]
    if unknown:
        raise DefinitionError([f"--features: {n!r} is not a definition of {catalogue}; use one of "
                               + ", ".join(defs) for n in unknown])
    ranking = Ranking(features=[defs[n] for n in names])
    problems = validate_ranking(ranking, defs.values())
    if problems:
        raise DefinitionError(problems)
    return ranking


def evaluate(source: Path, fmt: str = "auto", out: Path = Path("bench/results"), limit: int | None = None,
             progress: bool = True, ranking: Ranking | None = None) -> dict[str, Any]:
    """Evaluate a log; the frozen copies are scored by a second process (two cores, half the time).
    ``ranking``: the definitions the ranker weighs (:func:`ranking_of`; none by default)."""
    ranking = ranking or Ranking()
    events, refused = load_events(source, fmt, limit)
    if not events:
        raise ValueError(f"{source}: no valid events to evaluate" + (f" ({dict(refused)})" if refused else ""))
    started = time.perf_counter()
    _EVENTS[:] = events
    try:
        with mp.get_context("fork").Pool(2) as pool:
            frozen = pool.apply_async(_work, ("frozen", False, ranking))
            live = pool.apply_async(_work, ("live", progress, ranking))
            (scores, summary), (frozen_scores, _) = live.get(), frozen.get()
    finally:
        _EVENTS.clear()
    ev = Evaluation(ranking=ranking)
    ev.scores.merge(scores)
    ev.scores.merge(frozen_scores)
    report = ev.report(str(source), len(events), time.perf_counter() - started, dict(refused), summary)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluate.json").write_text(json.dumps(report, indent=1))
    plot(report, out / "evaluate.png")
    return report
