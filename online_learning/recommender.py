"""The online recommender: the embedding model retrieves and scores, the FTRL ranker decides.

Both learn from every example (test-then-train); the ranker also sees the embedding model's
score of the example's item as a feature ("stacking"), computed *before* the embedding model
learns from that example, just as serving computes it with the parameters it has.

The ranker learns only from examples whose item already had features: it re-ranks
candidates, which all have history, and since negatives are drawn from items with history,
examples of brand-new items would teach it that "no history" means "positive" (measured:
a weight of +5.2 on that indicator after 20k Taobao events). The embedding learns from all.

Parameters travel per model: :meth:`state_delta` and :meth:`snapshot` return a blob per
model name, which is what the trainer publishes and the API applies.

>>> rec = OnlineRecommender.default(min_count=1)
>>> ex = Example(user_id="u", item_id="a", ts=1, label=1, behavior="view", user=None, item=None)
>>> _ = rec.learn_one(ex)
>>> sorted(rec.snapshot())
['ftrl', 'two_tower']
"""

from __future__ import annotations

from typing import Any

import numpy as np

from online_learning.embeddings import TwoTower
from online_learning.examples import Example
from online_learning.params import decode
from online_learning.ranker import BUILT_IN, FTRLRanker, Inputs

Model = FTRLRanker | TwoTower
MODELS: dict[str, type[FTRLRanker] | type[TwoTower]] = {FTRLRanker.name: FTRLRanker, TwoTower.name: TwoTower}


class OnlineRecommender:
    def __init__(self, ranker: FTRLRanker, embedding: TwoTower) -> None:
        self.ranker, self.embedding = ranker, embedding

    @classmethod
    def default(cls, min_count: int = 2, ttl_ms: int = 6 * 3_600_000, max_rows: int | None = 200_000,
                seed: int = 0, inputs: Inputs = BUILT_IN) -> OnlineRecommender:
        """``inputs``: the ranking service's definitions the ranker weighs (:class:`Inputs`)."""
        return cls(FTRLRanker(min_count=min_count, ttl_ms=ttl_ms, user_inputs=inputs.user, item_inputs=inputs.item),
                   TwoTower(min_count=min_count, ttl_ms=ttl_ms, max_rows=max_rows, seed=seed))

    @property
    def models(self) -> dict[str, Model]:
        return {self.ranker.name: self.ranker, self.embedding.name: self.embedding}

    def learn_one(self, ex: Example) -> tuple[float, float | None] | None:
        return self.learn_many([ex])[0]

    def learn_many(self, examples: list[Example]) -> list[tuple[float, float | None] | None]:
        """Learn from the examples of one event (a positive and its negatives share the user):
        the embedding scores all their items in one call, before learning from any of them.

        For each example, the ranker's probability from just before and the pinned (served)
        weights' one (:meth:`FTRLRanker.learn_one`), or None for an example it skips."""
        if not examples:
            return []
        first = examples[0]
        same_user = all(ex["user_id"] == first["user_id"] and ex["user"] == first["user"] for ex in examples)
        if same_user:
            items = [ex["item_id"] for ex in examples]
            mfs = self.embedding.score_many(first["user"], items, first["user_id"]).tolist()
        else:
            mfs = [float(self.embedding.score_many(ex["user"], [ex["item_id"]], ex["user_id"])[0]) for ex in examples]
        out = [self.ranker.learn_one(ex, mf=mf) if ex["item"] is not None else None
               for ex, mf in zip(examples, mfs, strict=True)]
        for ex in examples:
            self.embedding.learn_one(ex)
        return out

    def retrieve(self, user: dict[str, Any] | None, k: int, user_id: str | None = None,
                 exclude: set[str] | None = None) -> list[str]:
        return self.embedding.nearest(user, k, user_id, exclude)

    def score_many(self, user: dict[str, Any] | None, candidates: list[tuple[str, dict[str, Any] | None]],
                   user_id: str | None = None) -> np.ndarray:
        mf = self.embedding.score_many(user, [i for i, _ in candidates], user_id).astype(np.float64)
        return self.ranker.score_many(user, candidates, mf)

    def state_delta(self, keep: bool = False) -> dict[str, bytes]:
        """Each model's changes since the last call that did not ``keep`` them."""
        out = {}
        for name, model in self.models.items():
            blob = model.state_delta(keep)
            if blob is not None:
                out[name] = blob
        return out

    @property
    def has_changes(self) -> bool:
        """Whether any model has changes a delta would carry."""
        return any(model.has_changes for model in self.models.values())

    def forget_delta(self) -> None:
        """The next delta starts from now, without encoding the one that is dropped."""
        for model in self.models.values():
            model.forget_delta()

    def apply_delta(self, blob: bytes) -> None:
        """Apply one model's delta or snapshot (the blob says which model and which kind)."""
        header, _ = decode(blob)
        name = header.get("model")
        if name not in MODELS:
            raise ValueError(f"unknown model {name!r} in parameters")
        if header.get("kind") == "snapshot":
            restored = MODELS[name].restore(blob)
            if isinstance(restored, FTRLRanker):
                self.ranker = restored
            else:
                self.embedding = restored
        else:
            self.models[name].apply_delta(blob)

    def snapshot(self) -> dict[str, bytes]:
        return {name: model.snapshot() for name, model in self.models.items()}

    @classmethod
    def restore(cls, blobs: dict[str, bytes]) -> OnlineRecommender:
        return cls(FTRLRanker.restore(blobs[FTRLRanker.name]), TwoTower.restore(blobs[TwoTower.name]))
