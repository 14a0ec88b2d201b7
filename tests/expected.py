"""Feature values computed the slow, obvious way, to check the job against."""

from __future__ import annotations

from collections import Counter

from connectors.schema import BehaviorEvent


def user_features(events: list[BehaviorEvent], user: str, window_ms: int, last_n: int) -> dict[str, object]:
    mine = [e for e in events if e.user_id == user]
    newest = max(e.ts for e in mine)
    recent = Counter(e.behavior for e in mine if e.ts > newest - window_ms)
    views = sorted((e for e in mine if e.behavior == "view"), key=lambda e: (e.ts, e.event_id), reverse=True)
    return {"views": recent["view"], "clicks": recent["click"], "carts": recent["cart"], "favs": recent["fav"],
            "buys": recent["buy"], "last_viewed_items": [e.item_id for e in views[:last_n]]}


def item_features(events: list[BehaviorEvent], item: str, window_ms: int) -> dict[str, object]:
    mine = [e for e in events if e.item_id == item]
    newest = max(e.ts for e in mine)
    recent = Counter(e.behavior for e in mine if e.ts > newest - window_ms)
    return {"views": recent["view"], "buys": recent["buy"], "events": sum(recent.values())}
