"""Candidate generation: several sources, each with a quota, merged without duplicates.

An item found by several sources appears once and keeps every source's name (the API shows
them as the reason for a recommendation); only new items count against a source's quota.

>>> merge([("covisit", ["a", "b"]), ("embedding", ["b", "c", "d"]), ("trending", ["e"])],
...       {"covisit": 2, "embedding": 1, "trending": 1}, exclude={"d"})
[('a', ['covisit']), ('b', ['covisit', 'embedding']), ('c', ['embedding']), ('e', ['trending'])]
"""

from __future__ import annotations

from collections.abc import Collection
from itertools import chain, zip_longest

QUOTAS = {"covisit": 100, "embedding": 60, "recent": 20, "category": 30, "trending": 40}


def merge(sources: list[tuple[str, list[str]]], quotas: dict[str, int] | None = None,
          exclude: Collection[str] = ()) -> list[tuple[str, list[str]]]:
    quotas = QUOTAS if quotas is None else quotas
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
