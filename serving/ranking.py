"""Candidates and a transparent score, until learned models arrive.

A candidate earns points from two sources, and the response says which:

* ``covisit:<item>`` — it is a co-visitation neighbour of an item the user viewed recently;
  the neighbour's share of that item's co-visits, weighted 1/(1+r) by how recent the view
  was (r = 0 for the newest);
* ``trending`` — it is in the trending list; its events in the window relative to the top
  item's, times ``TRENDING_WEIGHT`` so that personal signals win ties.

>>> rank([["a", "b"]], [[3, 1]], [("c", 10), ("b", 5)], k=3)
[('a', 0.75, ['covisit:0']), ('b', 0.3, ['covisit:0', 'trending']), ('c', 0.1, ['trending'])]
"""

from __future__ import annotations

TRENDING_WEIGHT = 0.1


def rank(
    neighbours: list[list[str]],
    counts: list[list[int]],
    trending: list[tuple[str, int]],
    k: int,
    recent: list[str] | None = None,
) -> list[tuple[str, float, list[str]]]:
    """``neighbours[r]``/``counts[r]`` belong to the user's r-th most recent item."""
    scores: dict[str, float] = {}
    sources: dict[str, list[str]] = {}
    for r, (items, cnts) in enumerate(zip(neighbours, counts, strict=True)):
        total = sum(cnts)
        if not total:
            continue
        label = f"covisit:{recent[r]}" if recent else f"covisit:{r}"
        for item, c in zip(items, cnts, strict=True):
            scores[item] = scores.get(item, 0.0) + c / total / (1 + r)
            sources.setdefault(item, []).append(label)
    top = trending[0][1] if trending else 0
    for item, events in trending:
        if top:
            scores[item] = scores.get(item, 0.0) + TRENDING_WEIGHT * events / top
            sources.setdefault(item, []).append("trending")
    ranked = sorted(scores.items(), key=lambda kv: (-kv[1], kv[0]))[:k]
    return [(item, round(score, 6), sources[item]) for item, score in ranked]
