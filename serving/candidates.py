"""Candidate generation: several sources, each with a quota, merged without duplicates.

An item found by several sources appears once and keeps every source's name (the API shows
them as the reason for a recommendation); only new items count against a source's quota.
:data:`POLICY` is the one policy: the API serves with it and ``freshrec evaluate`` measures
it, so an evaluation describes what is served.

>>> merge([("covisit", ["a", "b"]), ("embedding", ["b", "c", "d"]), ("trending", ["e"])],
...       {"covisit": 2, "embedding": 1, "trending": 1}, exclude={"d"})
[('a', ['covisit']), ('b', ['covisit', 'embedding']), ('c', ['embedding']), ('e', ['trending'])]
>>> Policy((("recent", 1), ("trending", 5)), cap=3).candidates({"trending": ["x", "y", "z"], "recent": ["y", "q"]})
[('y', ['recent', 'trending']), ('x', ['trending']), ('z', ['trending'])]
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from dataclasses import dataclass
from itertools import chain, zip_longest


@dataclass(frozen=True)
class Policy:
    """Which sources give candidates, in which order, how many each, and how many in all."""

    quotas: tuple[tuple[str, int], ...]  # (source, most new items it adds), in the order sources are merged
    cap: int  # candidates scored at most
    anchors: int = 5  # the user's newest items whose co-visitation neighbours are candidates
    retrieve: int = 100  # items the embedding model retrieves

    def candidates(self, sources: Mapping[str, list[str]],
                   exclude: Collection[str] = ()) -> list[tuple[str, list[str]]]:
        """Each source's items (best first) merged by this policy; sources it does not name are ignored."""
        return merge([(name, sources.get(name, [])) for name, _ in self.quotas], dict(self.quotas),
                     exclude)[:self.cap]


# The user's own recent items first (few, strong in e-commerce), then neighbours of what they
# viewed, then what trends in their top categories (38 % of the items new to a user are in
# them, on the Taobao slice), then what the embedding retrieves, then trending; the total is capped.
POLICY = Policy(quotas=(("recent", 5), ("covisit", 100), ("category", 30), ("embedding", 100), ("trending", 40)),
                cap=230)


def merge(sources: list[tuple[str, list[str]]], quotas: dict[str, int],
          exclude: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    found: dict[str, list[str]] = {}
    for name, items in sources:
        left = quotas.get(name, 0)
        for item in items:
            if item in exclude:
                continue
            if item in found:
                if name not in found[item]:
                    found[item].append(name)
                continue
            if left <= 0:
                continue
            found[item] = [name]
            left -= 1
    return list(found.items())


def interleave(lists: list[list[str]]) -> list[str]:
    """Best of each list first, then the second best of each, and so on (a quota then takes
    from every list alike).

    >>> interleave([["a", "b", "c"], ["x"], ["p", "q"]])
    ['a', 'x', 'p', 'b', 'q', 'c']
    """
    return [i for i in chain.from_iterable(zip_longest(*lists)) if i is not None]
