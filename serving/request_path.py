"""One recommendation request, stage by stage, timed:

    user        the user's row (recent views and buys, counts): one Redis round trip
    candidates  co-visitation neighbours of the recent items (one round trip), trending in the
                user's top categories, embedding nearest neighbours, the user's recent items,
                trending; per-source quotas, no duplicates, nothing the user just bought or the
                app excluded
    features    every candidate's item rows (item_recent and item_covisit, one HMGET of the item's
                hash): one pipelined round trip, Feast's layout read directly;
                rows read in the last FRESHREC_ITEM_CACHE_MS (250) are reused: an item's counts
                barely move in a quarter second, and popular items are in every request
    score       the chosen model version, vectorized over all candidates
    rank        top-k (of the requested page), each with the sources that found it

Graceful degradation: when Redis fails or is slower than FRESHREC_REDIS_TIMEOUT_MS, the
request is answered from what the process holds (the last trending list, the served
parameters, the embedding's own user rows) and flagged ``degraded``; for the next second no
request waits on Redis again, then one tries.
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import chain
from typing import Any, TypeVar

import numpy as np
import redis

from connectors.feast_redis import FeastRedisReader
from features.dsl import load_ranking, trending_key
from features.registry import ranking_views
from freshrec.config import Settings
from online_learning.ranker import BUILT_IN, Inputs
from serving.candidates import POLICY, Policy, interleave
from serving.models import Choice, ServedModels
from serving.ranking import rank

SCORER = "transparent-v1"
TRENDING_MAX_AGE_S = 1.0  # trending lists change slowly; one read a second, not one per request
BREAKER_S = 1.0
ITEM_CACHE_ENTRIES = 100_000
V = TypeVar("V")


@dataclass(frozen=True)
class Context:
    """What the app knows about the moment of the request (the POST form)."""

    current_item: str | None = None
    page: int = 0
    exclude: frozenset[str] = frozenset()


@dataclass
class Answer:
    items: list[tuple[str, float, list[str]]]
    scorer: str
    model_version: int | None
    model_role: str | None  # live, canary or pinned
    features: dict[str, int | None]  # feature view -> event time (ms) of the newest value used
    known_user: bool
    degraded: bool = False
    degraded_reason: str | None = None
    stages_ms: dict[str, float] = field(default_factory=dict)
    sources: Counter[str] = field(default_factory=Counter)  # candidates per source
    candidates: int = 0


def top_k(scores: np.ndarray, items: list[str], k: int) -> list[int]:
    """Positions of the k highest scores, best first; equal scores in item order.

    A partition finds the k-th score; only what is at least as good gets sorted.

    >>> top_k(np.array([0.1, 0.9, 0.5, 0.9]), ["a", "d", "c", "b"], 3)
    [3, 1, 2]
    """
    if len(scores) > k:
        kth = np.partition(scores, len(scores) - k)[len(scores) - k]
        pos = np.flatnonzero(scores >= kth).tolist()
    else:
        pos = list(range(len(scores)))
    return sorted(pos, key=lambda j: (-scores[j], items[j]))[:k]


def _cached(cache: dict[str, tuple[float, V]], keys: list[str], max_age_s: float,
            fetch: Callable[[list[str]], list[V]]) -> list[V]:
    """The value of each key: as cached while younger than ``max_age_s``, else fetched, all
    the others in one call (``max_age_s`` 0: nothing is kept). A cache grown past
    ITEM_CACHE_ENTRIES starts over.

    >>> asked = []
    >>> def fetch(keys):
    ...     asked.append(keys)
    ...     return [k.upper() for k in keys]
    >>> cache, uncached = {}, {}
    >>> _cached(cache, ["a", "b"], 60, fetch), _cached(cache, ["b", "c"], 60, fetch), asked
    (['A', 'B'], ['B', 'C'], [['a', 'b'], ['c']])
    >>> _cached(uncached, ["a"], 0, fetch), uncached
    (['A'], {})
    """
    now = time.monotonic()
    horizon = now - max_age_s
    out: list[Any] = []
    missing: list[int] = []
    for j, key in enumerate(keys):
        hit = cache.get(key)
        if hit is not None and hit[0] >= horizon:
            out.append(hit[1])
        else:
            out.append(None)
            missing.append(j)
    if missing:
        if len(cache) > ITEM_CACHE_ENTRIES:
            cache.clear()
        for j, value in zip(missing, fetch([keys[j] for j in missing]), strict=True):
            out[j] = value
            if max_age_s:
                cache[keys[j]] = (now, value)
    return out


class _Clock:
    def __init__(self) -> None:
        self.t = time.perf_counter()
        self.laps: dict[str, float] = {}

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.laps[stage] = round((now - self.t) * 1000, 3)
        self.t = now


def ranking_reader(client: redis.Redis, s: Settings) -> tuple[FeastRedisReader, Inputs]:
    """A reader of the views the ranking service names (FRESHREC_FEATURES), and the service's
    definitions as the ranker's inputs."""
    ranking = load_ranking(s.features)
    return FeastRedisReader(client, s.feast_project, ranking_views(ranking)), Inputs.of(ranking)


class RequestPath:
    def __init__(self, client: redis.Redis, reader: FeastRedisReader, models: ServedModels,
                 project: str, item_cache_ms: int = 250, policy: Policy = POLICY, inputs: Inputs = BUILT_IN) -> None:
        self.client, self.reader, self.models, self.project = client, reader, models, project
        # The ranking service's definitions share their entity's Redis hash with the built-in
        # views: one HMGET per entity reads both (the reader must know their views).
        self.user_view = reader.join("user_recent+ranking", ["user_recent", *inputs.user])
        # The ranker reads an item's co-visitation row too (online_learning/ranker.covisit_match).
        self.item_view = reader.join("item_recent+item_covisit+ranking", ["item_recent", "item_covisit", *inputs.item])
        self.policy = policy  # which candidates, how many (serving/candidates.py; `evaluate` measures the same)
        self.item_cache_s = item_cache_ms / 1000
        self.item_cache: dict[str, tuple[float, dict[str, Any] | None]] = {}
        self.trending: list[tuple[str, int]] = []  # the last list read: the fallback too
        self.trending_ts: int | None = None
        self._trending_read = -TRENDING_MAX_AGE_S
        self.category_lists: dict[str, tuple[float, list[str]]] = {}  # category -> (read at, its items)
        self.down_until = 0.0  # Redis failed: answer degraded until then without trying it
        self.down_reason = ""  # and why, for those answers too (another request may have met it)
        self.newest_feature_ms = 0  # event time of the newest feature value seen (for /metrics)

    def recommend(self, user_id: str, k: int, context: Context = Context(), pinned: int | None = None) -> Answer:
        clock = _Clock()
        choice = self.models.choose(user_id, pinned)  # UnknownVersion for a bad pin: the app's 404
        if time.monotonic() < self.down_until:
            return self._fallback(user_id, k, context, choice,
                                  f"online store unavailable: {self.down_reason} (retrying shortly)", clock)
        try:
            return self._recommend(user_id, k, context, choice, clock)
        except redis.RedisError as exc:
            self.down_until, self.down_reason = time.monotonic() + BREAKER_S, str(exc)
            return self._fallback(user_id, k, context, choice, f"online store unavailable: {exc}", clock)

    def _recommend(self, user_id: str, k: int, context: Context, choice: Choice | None, clock: _Clock) -> Answer:
        (user,) = self.reader.read([(self.user_view, user_id)])
        self._refresh_trending()
        clock.lap("user")
        recent = list(user.get("last_viewed_items") or [])[:self.policy.anchors] if user else []
        anchors = list(dict.fromkeys(([context.current_item] if context.current_item else []) + recent))
        covisit = [r or {} for r in self.reader.read([("item_covisit", i) for i in anchors])]
        neighbours = [r.get("neighbours", []) for r in covisit]
        counts = [r.get("neighbour_counts", []) for r in covisit]
        exclude = set(context.exclude) | set((user or {}).get("last_bought_items") or [])
        if context.current_item:
            exclude.add(context.current_item)
        freshness = {"user_recent": user["_event_ts_ms"] if user else None,
                     "item_covisit": max((r["_event_ts_ms"] for r in covisit if r), default=None),
                     "trending": self.trending_ts}
        want = (context.page + 1) * k
        if choice is None:  # nothing published yet: the transparent scorer needs no item features
            ranked = [r for r in rank(neighbours, counts, self.trending, want + len(exclude), anchors)
                      if r[0] not in exclude]
            clock.lap("candidates")
            answer = Answer(ranked[want - k:want], SCORER, None, None, freshness, user is not None,
                            sources=Counter(s.split(":")[0] for _, _, src in ranked for s in src),
                            candidates=len(ranked))
            clock.lap("rank")
            answer.stages_ms = clock.laps
            return answer
        covisit_ranked = rank(neighbours, counts, [], 100, anchors)
        why = {i: src for i, _, src in covisit_ranked}  # "covisit:<the recent item it neighbours>"
        features = {key: v for key, v in (user or {}).items() if not key.startswith("_")} or None
        retrieved = self.models.retrieve(choice, features, self.policy.retrieve, user_id, exclude)
        in_categories = self._in_categories(list((user or {}).get("top_categories") or []))
        cands = self.policy.candidates({"recent": recent, "covisit": [i for i, _, _ in covisit_ranked],
                                        "category": in_categories, "embedding": retrieved,
                                        "trending": [i for i, _ in self.trending]}, exclude)
        clock.lap("candidates")
        rows = self._item_rows([i for i, _ in cands])
        clock.lap("features")
        # Rows go to the model as read (its features ignore the extra _event_ts_ms): no copies.
        freshness["item_recent"] = max((r["_event_ts_ms"] for r in rows if r), default=None)
        self.newest_feature_ms = max(self.newest_feature_ms, *(v or 0 for v in freshness.values()))
        answer = self._score(user_id, features, cands, rows, choice, want, k, why, clock)
        answer.features, answer.known_user = freshness, user is not None
        return answer

    def _score(self, user_id: str, user: dict[str, Any] | None, cands: list[tuple[str, list[str]]],
               item_features: list[dict[str, Any] | None], choice: Choice, want: int, k: int,
               why: dict[str, list[str]], clock: _Clock) -> Answer:
        scores, version = self.models.score(choice, user, [(i, f) for (i, _), f in zip(cands, item_features,
                                                                                        strict=True)], user_id)
        clock.lap("score")
        order = top_k(scores, [i for i, _ in cands], want)[want - k:]

        def reasons(item: str, found_by: list[str]) -> list[str]:
            return list(dict.fromkeys(x for src in found_by for x in (why[item] if src == "covisit" else [src])))

        answer = Answer([(cands[j][0], round(float(scores[j]), 6), reasons(*cands[j])) for j in order],
                        f"online-v{version}", version, choice.role, {}, False,
                        sources=Counter(chain.from_iterable(found_by for _, found_by in cands)), candidates=len(cands))
        clock.lap("rank")
        answer.stages_ms = clock.laps
        return answer

    def _item_rows(self, items: list[str]) -> list[dict[str, Any] | None]:
        return _cached(self.item_cache, items, self.item_cache_s,
                       lambda missing: self.reader.read([(self.item_view, i) for i in missing]))

    def _in_categories(self, categories: list[str]) -> list[str]:
        """The trending lists of these categories, interleaved; a list read in the last second
        is reused, the others come in one round trip."""
        def read(stale: list[str]) -> list[list[str]]:
            raws = self.client.mget([trending_key(self.project, c) for c in stale])
            return [[str(i) for i, _ in json.loads(raw)["items"]] if raw else [] for raw in raws]

        return interleave(_cached(self.category_lists, categories, TRENDING_MAX_AGE_S, read))

    def _refresh_trending(self) -> None:
        now = time.monotonic()
        if now - self._trending_read < TRENDING_MAX_AGE_S:
            return
        raw = self.client.get(trending_key(self.project))
        doc = json.loads(raw) if raw else {"ts": None, "items": []}
        self.trending = [(str(i), int(n)) for i, n in doc["items"]]
        self.trending_ts, self._trending_read = doc["ts"], now

    def _fallback(self, user_id: str, k: int, context: Context, choice: Choice | None, reason: str,
                  clock: _Clock) -> Answer:
        """No Redis: the last trending list and, with a model, its own user row's neighbours."""
        exclude = set(context.exclude) | ({context.current_item} if context.current_item else set())
        want = (context.page + 1) * k
        trending = [i for i, _ in self.trending if i not in exclude]
        if choice is None:
            items = [(i, 0.0, ["trending"]) for i in trending[want - k:want]]
            answer = Answer(items, SCORER, None, None, {}, False, True, reason,
                            sources=Counter({"trending": len(trending)}))
        else:
            retrieved = self.models.retrieve(choice, None, self.policy.retrieve, user_id, exclude)
            cands = self.policy.candidates({"embedding": retrieved, "trending": trending}, exclude)
            answer = self._score(user_id, None, cands, [None] * len(cands), choice, want, k, {}, clock)
            answer.degraded, answer.degraded_reason = True, reason
        answer.stages_ms = answer.stages_ms or clock.laps
        return answer
