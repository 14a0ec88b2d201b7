"""Feature values computed the slow, obvious way, to check the job against."""

from __future__ import annotations

from collections import Counter

from connectors.schema import BehaviorEvent
from streaming.state import Spec


def _recent(mine: list[BehaviorEvent], spec: Spec) -> Counter:
    """Behaviors in the hopping window (whole panes) that holds the newest event."""
    newest_pane = max(e.ts for e in mine) // spec.pane_ms
    first_pane = newest_pane - spec.window_ms // spec.pane_ms + 1
    return Counter(e.behavior for e in {e.event_id: e for e in mine}.values() if e.ts // spec.pane_ms >= first_pane)


def user_features(events: list[BehaviorEvent], user: str, spec: Spec) -> dict[str, object]:
    mine = [e for e in events if e.user_id == user]
    recent = _recent(mine, spec)
    views = sorted((e for e in mine if e.behavior == "view"), key=lambda e: (e.ts, e.event_id), reverse=True)
    return {"views": recent["view"], "clicks": recent["click"], "carts": recent["cart"], "favs": recent["fav"],
            "buys": recent["buy"], "last_viewed_items": [e.item_id for e in views[:spec.last_n]]}


def item_features(events: list[BehaviorEvent], item: str, spec: Spec) -> dict[str, object]:
    mine = [e for e in events if e.item_id == item]
    recent = _recent(mine, spec)
    named = [(e.ts, e.category_id) for e in mine if e.category_id]
    return {"views": recent["view"], "buys": recent["buy"], "events": sum(recent.values()),
            "category": max(named)[1] if named else ""}
