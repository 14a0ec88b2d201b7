"""Strong simple baselines for ``freshrec evaluate``: what a team would run without streaming
models, each as good as its simple idea allows (no windows that forget a long log).

All learn with ``learn_one(user_id, item_id)`` (events in time order) and answer with
``recommend(user_id, exclude, k)``.

>>> knn = CoVisitation()
>>> for user, item in [("u", "a"), ("u", "b"), ("v", "a"), ("v", "b"), ("v", "c"), ("w", "a")]:
...     knn.learn_one(user, item)
>>> knn.recommend("w", exclude={"a"}, k=3)  # b follows a twice; c is popularity's fill
['b', 'c']
>>> last = LastDistinct()
>>> for item in ["a", "b", "a", "c"]:
...     last.learn_one("u", item)
>>> last.recommend("u", exclude=set(), k=5)
['c', 'a', 'b']
"""

from __future__ import annotations

import heapq
from collections import Counter, OrderedDict, defaultdict
from collections.abc import Collection, Mapping


def most_common(counts: Mapping[str, int], n: int) -> list[tuple[str, int]]:
    """The ``n`` largest counts, ties by key (so a ranking is the same in every run).

    >>> most_common({"b": 2, "a": 2, "c": 5}, 2)
    [('c', 5), ('a', 2)]
    """
    return heapq.nsmallest(n, counts.items(), key=lambda kv: (-kv[1], kv[0]))


class Popularity:
    """Events per item over the whole log; the ranking is refreshed every ``every`` events."""

    def __init__(self, every: int = 1000, depth: int = 200) -> None:
        self.counts: Counter[str] = Counter()
        self.every, self.depth, self.since = every, depth, 0
        self.top: list[str] = []

    def learn_one(self, user_id: str, item_id: str) -> None:
        self.counts[item_id] += 1
        self.since += 1
        if self.since >= self.every or len(self.top) < self.depth:
            self.since = 0
            self.top = [i for i, _ in most_common(self.counts, self.depth)]

    def recommend(self, user_id: str, exclude: Collection[str], k: int) -> list[str]:
        return [i for i in self.top if i not in exclude][:k]


class LastDistinct:
    """The user's distinct items, most recently touched first (repeat-aware: an item touched
    again moves to the front)."""

    def __init__(self, keep: int = 50) -> None:
        self.items: dict[str, OrderedDict[str, None]] = defaultdict(OrderedDict)
        self.keep = keep

    def learn_one(self, user_id: str, item_id: str) -> None:
        seen = self.items[user_id]
        seen[item_id] = None
        seen.move_to_end(item_id)
        if len(seen) > self.keep:
            seen.popitem(last=False)

    def recommend(self, user_id: str, exclude: Collection[str], k: int) -> list[str]:
        seen = self.items.get(user_id)
        return [i for i in reversed(seen) if i not in exclude][:k] if seen else []


class CoVisitation:
    """Item-to-item kNN: how often two items are adjacent in a user's sequence, over the whole
    log. A user's list is the neighbours of their ``anchors`` newest distinct items, counts
    summed, then popularity. It teaches ``last`` and ``popularity`` itself: give it the ones
    a caller also scores, and they learn each event once."""

    def __init__(self, anchors: int = 3, neighbours: int = 50, last: LastDistinct | None = None,
                 popularity: Popularity | None = None) -> None:
        self.pairs: dict[str, Counter[str]] = defaultdict(Counter)
        self.last = last or LastDistinct(keep=anchors)
        self.popularity = popularity or Popularity()
        self.anchors, self.neighbours = anchors, neighbours
        self._top: dict[str, list[tuple[str, int]]] = {}  # an item's strongest neighbours, until it changes

    def learn_one(self, user_id: str, item_id: str) -> None:
        seen = self.last.items.get(user_id)
        previous = next(reversed(seen)) if seen else None
        if previous is not None and previous != item_id:
            self.pairs[previous][item_id] += 1
            self.pairs[item_id][previous] += 1
            self._top.pop(previous, None)
            self._top.pop(item_id, None)
        self.last.learn_one(user_id, item_id)
        self.popularity.learn_one(user_id, item_id)

    def _strongest(self, item: str) -> list[tuple[str, int]]:
        top = self._top.get(item)
        if top is None:
            top = self._top[item] = most_common(self.pairs[item], self.neighbours)
        return top

    def recommend(self, user_id: str, exclude: Collection[str], k: int) -> list[str]:
        scores: Counter[str] = Counter()
        for anchor in self.last.recommend(user_id, (), self.anchors):
            if anchor in self.pairs:
                for item, n in self._strongest(anchor):
                    scores[item] += n
        ranked = [i for i, _ in sorted(scores.items(), key=lambda kv: (-kv[1], kv[0])) if i not in exclude][:k]
        if len(ranked) < k:
            taken = set(ranked)
            ranked += [i for i in self.popularity.recommend(user_id, exclude, k + len(taken)) if i not in taken]
        return ranked[:k]
