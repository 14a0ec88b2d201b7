"""The models the API serves, kept current from the trainer's published versions.

A background thread applies new versions as the trainer announces them (Redis pub/sub), and
polls the parameter store every FRESHREC_MODEL_POLL_MS besides, in case an announcement is
lost (a reconnect). It applies deltas under a lock that requests take only to score, so a
request sees one version whole and never waits for a download. A chain that starts from a full snapshot (a rollback, a
gap, a new trainer) is built beside the serving model, warmed up on recent requests and
switched in one assignment (blue-green); if it fails the warm-up, the old one keeps serving.

Besides the live version: a canary version for a share of users (set in Redis, so every API
process routes alike) and versions pinned by ``?model_version=``, loaded on first use and
kept in a small LRU. Those never change once loaded, so they score without the lock.

Until anything is published, :attr:`recommender` is None and the API ranks with its
transparent scorer.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import zlib
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis

from online_learning.publish import ParameterStore
from online_learning.recommender import OnlineRecommender
from online_learning.trainer import rebuild

log = logging.getLogger("freshrec.models")

Candidates = list[tuple[str, dict[str, Any] | None]]


class UnknownVersion(LookupError):
    """A pinned or canary version the parameter store does not hold (any more)."""


@dataclass(frozen=True)
class Choice:
    """The model one request is scored with."""

    recommender: OnlineRecommender
    version: int
    role: str  # "live", "canary" or "pinned"
    locked: bool  # the live model changes in place: score it under the lock


class ServedModels:
    def __init__(self, store: ParameterStore, poll_ms: int = 250, keep_versions: int = 3,
                 freeze: bool = False) -> None:
        self.store, self.poll_s = store, poll_ms / 1000
        self.freeze = freeze  # freeze_heap() after a model switch: for a process that only serves
        self.recommender: OnlineRecommender | None = None
        self.version = 0
        self.published_ms: int | None = None  # when the served version was published
        self.applied_ms: int | None = None  # when we applied it
        self.error: str | None = None  # the last failure to follow, for /readyz and logs
        self.canary: tuple[int, float] | None = None  # (version, share of users)
        self.lock = threading.Lock()
        self._others: OrderedDict[int, OnlineRecommender] = OrderedDict()  # canary and pinned, LRU
        self._keep = keep_versions
        self._others_lock = threading.Lock()
        self._recent: deque[tuple[dict[str, Any] | None, Candidates, str]] = deque(maxlen=16)  # for warm-ups
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- following the store ----------------------------------------------------------------
    def refresh(self) -> int:
        """Apply what was published since the served version; returns the version served."""
        canary = self.store.canary()
        if canary is not None and canary[0] not in self._others:
            self._load(canary[0])
        self.canary = canary
        chain = self.store.catch_up(self.version)
        if not chain:
            return self.version
        if chain[0].kind == "snapshot" and chain[0].blobs:  # a fresh start (blob-less: equal to ours)
            rec = rebuild(chain)
            if rec is not None:
                self.warm_up(rec)  # raises, and the old version keeps serving, if it cannot score
            with self.lock:
                self.recommender = rec
                self._served(chain)
            if self.freeze:
                freeze_heap()
        else:
            with self.lock:
                self.recommender = rebuild(chain, self.recommender)
                self._served(chain)
        return self.version

    def _served(self, chain: list[Any]) -> None:
        self.version = chain[-1].version
        self.published_ms = chain[-1].created_ms
        self.applied_ms = int(time.time() * 1000)

    def warm_up(self, rec: OnlineRecommender) -> None:
        """Score the last few requests with a model about to serve; any error or a non-finite
        score stops the switch."""
        for user, candidates, user_id in list(self._recent):
            scores = rec.score_many(user, candidates, user_id)
            if not np.isfinite(scores).all():
                raise ValueError("a new version scored recent requests with NaN/Inf; not switching to it")

    def _load(self, version: int) -> OnlineRecommender:
        chain = self.store.chain_to(version)
        if chain is None:
            kept = ", ".join(map(str, self.store.snapshots())) or "none"
            raise UnknownVersion(f"model version {version} is not stored (snapshots kept: {kept}; "
                                 f"deltas expire after {self.store.delta_ttl_s} s)")
        rec = rebuild(chain)
        assert rec is not None
        self.warm_up(rec)
        with self._others_lock:
            self._others[version] = rec
            while len(self._others) > self._keep:
                self._others.popitem(last=False)
        return rec

    def _wait(self, pubsub: Any) -> Any:
        """Until a version is announced or the poll interval passes; returns the subscription,
        or None after it broke (the caller subscribes again on its next round)."""
        if pubsub is None:
            try:
                pubsub = self.store.client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.store.channel)
            except (redis.RedisError, OSError):
                self._stop.wait(self.poll_s)
                return None
        deadline = time.monotonic() + self.poll_s
        try:
            while not self._stop.is_set() and (left := deadline - time.monotonic()) > 0:
                if pubsub.get_message(timeout=min(left, 0.5)) is not None:  # slices: stop() is not kept waiting
                    while pubsub.get_message(timeout=0) is not None:  # a burst: one refresh covers it
                        pass
                    break
            return pubsub
        except (redis.RedisError, OSError):
            pubsub.close()
            self._stop.wait(self.poll_s)
            return None

    def start(self) -> None:
        def loop() -> None:
            # Polling alone cost half the poll interval on average between publish and serve.
            pubsub = None
            while not self._stop.is_set():
                try:
                    self.refresh()
                    self.error = None
                except (redis.RedisError, OSError, ValueError, UnknownVersion) as exc:
                    if self.error != str(exc):
                        log.warning("cannot follow model versions: %s", exc)
                    self.error = str(exc)
                pubsub = self._wait(pubsub)
            if pubsub is not None:
                pubsub.close()

        self._thread = threading.Thread(target=loop, name="model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    # -- requests ---------------------------------------------------------------------------
    def choose(self, user_id: str, pinned: int | None = None) -> Choice | None:
        """The model for this request: a pinned version, the canary for its share of users, or
        the live one; None while nothing is published. Raises UnknownVersion for a bad pin."""
        if pinned is not None and pinned != self.version:
            with self._others_lock:
                rec = self._others.get(pinned)
                if rec is not None:
                    self._others.move_to_end(pinned)
            return Choice(rec or self._load(pinned), pinned, "pinned", False)
        canary = self.canary
        if canary is not None and pinned is None and in_share(user_id, canary[1]):
            rec = self._others.get(canary[0])
            if rec is not None:
                return Choice(rec, canary[0], "canary", False)
        rec = self.recommender
        return None if rec is None else Choice(rec, self.version, "live", True)

    def score(self, choice: Choice, user: dict[str, Any] | None, candidates: Candidates,
              user_id: str) -> tuple[np.ndarray, int]:
        """Scores, and the version that gave them (the live one may have moved on since choose)."""
        self._recent.append((user, candidates, user_id))
        if not choice.locked:
            return choice.recommender.score_many(user, candidates, user_id), choice.version
        with self.lock:
            return self.recommender.score_many(user, candidates, user_id), self.version  # type: ignore[union-attr]

    def retrieve(self, choice: Choice, user: dict[str, Any] | None, k: int, user_id: str,
                 exclude: set[str]) -> list[str]:
        if not choice.locked:
            return choice.recommender.retrieve(user, k, user_id, exclude)
        with self.lock:
            return self.recommender.retrieve(user, k, user_id, exclude)  # type: ignore[union-attr]

    def knows(self, item_id: str) -> dict[str, bool]:
        """Whether the served version has parameters for an item (admitted and not evicted)."""
        with self.lock:
            rec = self.recommender
            if rec is None:
                return {"embedding": False, "ranker": False}
            return {"embedding": rec.embedding.items.get(item_id) >= 0,
                    "ranker": f"item={item_id}" in rec.ranker.model._weights}


def freeze_heap() -> None:
    """Move every object alive now out of the cyclic garbage collector's sight.

    An API process holds ~360k objects from its imports and its model; a full collection
    walks them all, ~110 ms with the GIL held: the slowest requests were those that waited
    for one. What is alive after start-up and after a model switch lives long; frozen, a
    full collection walks only what requests made since. (A model is acyclic: one replaced
    later is still freed, by reference counting.)
    """
    gc.collect()
    gc.freeze()


def in_share(user_id: str, share: float) -> bool:
    """Whether a user falls in a traffic share; stable across processes and restarts.

    >>> sum(in_share(str(u), 0.1) for u in range(10_000))
    1014
    """
    return zlib.crc32(user_id.encode()) % 10_000 < share * 10_000
