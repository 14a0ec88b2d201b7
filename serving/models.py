"""The models the API serves, kept current from the trainer's published versions.

A background thread polls the parameter store every FRESHREC_MODEL_POLL_MS and applies new
deltas (or a snapshot, after a gap or a rollback) under a lock that requests take only to
score, so a request sees one version whole and never waits for a download. Until anything
is published, :attr:`recommender` is None and the API ranks with its transparent scorer.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np
import redis

from online_learning.publish import ParameterStore
from online_learning.recommender import OnlineRecommender
from online_learning.trainer import rebuild

log = logging.getLogger("freshrec.models")


class ServedModels:
    def __init__(self, store: ParameterStore, poll_ms: int = 50) -> None:
        self.store, self.poll_s = store, poll_ms / 1000
        self.recommender: OnlineRecommender | None = None
        self.version = 0
        self.published_ms: int | None = None  # when the served version was published
        self.applied_ms: int | None = None  # when we applied it
        self.error: str | None = None  # the last failure to follow, for /healthz and logs
        self.lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def refresh(self) -> int:
        """Apply what was published since the served version; returns the version served."""
        chain = self.store.catch_up(self.version)
        if not chain:
            return self.version
        # Build outside the lock when starting from a snapshot (seconds for a big model);
        # deltas are small and go in under it.
        if chain[0].kind == "snapshot" and chain[0].blobs:  # a fresh start (blob-less: equal to ours)
            rec = rebuild(chain)
            with self.lock:
                self.recommender = rec
                self._served(chain)
        else:
            with self.lock:
                self.recommender = rebuild(chain, self.recommender)
                self._served(chain)
        return self.version

    def _served(self, chain: list[Any]) -> None:
        self.version = chain[-1].version
        self.published_ms = chain[-1].created_ms
        self.applied_ms = int(time.time() * 1000)

    def start(self) -> None:
        def loop() -> None:
            while not self._stop.is_set():
                try:
                    self.refresh()
                    self.error = None
                except (redis.RedisError, OSError, ValueError) as exc:
                    if self.error is None:
                        log.warning("cannot follow model versions: %s", exc)
                    self.error = str(exc)
                self._stop.wait(self.poll_s)

        self._thread = threading.Thread(target=loop, name="model-follower", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def score(self, user: dict[str, Any] | None, candidates: list[tuple[str, dict[str, Any] | None]],
              user_id: str) -> tuple[np.ndarray, int] | None:
        """Scores from the served version, and that version; None while no model is published."""
        with self.lock:
            if self.recommender is None:
                return None
            return self.recommender.score_many(user, candidates, user_id), self.version

    def knows(self, item_id: str) -> dict[str, bool]:
        """Whether the served version has parameters for an item (admitted and not evicted)."""
        with self.lock:
            rec = self.recommender
            if rec is None:
                return {"embedding": False, "ranker": False}
            return {"embedding": rec.embedding.items.get(item_id) >= 0,
                    "ranker": f"item={item_id}" in rec.ranker.model._weights}

    def retrieve(self, user: dict[str, Any] | None, k: int, user_id: str, exclude: set[str]) -> list[str]:
        with self.lock:
            if self.recommender is None:
                return []
            return self.recommender.retrieve(user, k, user_id, exclude)
