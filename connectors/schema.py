"""The one behavior-event schema every producer and the feature job agree on.

An event on the wire (topic ``behavior-events``, keyed by ``user_id``) is JSON::

    {"event_id": "e1", "user_id": "42", "item_id": "7", "category_id": "3",
     "behavior": "view", "ts": 1511658000000}

``ts`` is event time in epoch milliseconds. :func:`validate` accepts friendlier input
(Taobao behavior names, integer ids, seconds or ISO-8601 timestamps) and returns the
normalized :class:`BehaviorEvent`, or raises :class:`InvalidEvent` naming the field.

>>> e = validate({"user_id": 1, "item_id": 2, "behavior": "pv", "timestamp": 1511658000})
>>> (e.user_id, e.item_id, e.behavior, e.ts)
('1', '2', 'view', 1511658000000)
>>> validate({"user_id": 1, "item_id": 2, "behavior": "like", "ts": 1511658000000})
Traceback (most recent call last):
...
connectors.schema.InvalidEvent: behavior: unknown behavior 'like'; use one of view, click, cart, fav, buy
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

BEHAVIORS: tuple[str, ...] = ("view", "click", "cart", "fav", "buy")
# Taobao UserBehavior names and common synonyms.
BEHAVIOR_ALIASES: dict[str, str] = {
    "pv": "view",
    "impression": "view",
    "clk": "click",
    "addtocart": "cart",
    "add_to_cart": "cart",
    "favorite": "fav",
    "favourite": "fav",
    "purchase": "buy",
    "order": "buy",
}
MAX_ID_LENGTH = 128
# Anything before 2000-01-01 is a unit mistake or garbage, not history.
MIN_TS_MS = 946_684_800_000
# Clocks drift, but a day ahead of the receiving host is a bug upstream.
MAX_FUTURE_MS = 24 * 3600 * 1000
# An event needs ~150 bytes; the rest of this is room for an app's extra fields (not kept).
MAX_EVENT_BYTES = 16 * 1024
# A refused payload is kept whole up to this size, then cut (the record says so): a DLQ record
# must stay far below the broker's message limit (1 MB by default), or refusing it fails too.
MAX_DEAD_LETTER_PAYLOAD = 64 * 1024


class InvalidEvent(ValueError):
    """An event that cannot enter the pipeline; ``field`` names what is wrong."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


@dataclass(frozen=True, slots=True)
class BehaviorEvent:
    event_id: str
    user_id: str
    item_id: str
    behavior: str
    ts: int
    category_id: str | None = None

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), separators=(",", ":")).encode()

    @property
    def key(self) -> bytes:
        return self.user_id.encode()


def _id(raw: dict[str, Any], field: str, required: bool = True) -> str | None:
    value = raw.get(field)
    if value is None or value == "":
        if required:
            raise InvalidEvent(field, "missing; every event needs a non-empty " + field)
        return None
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise InvalidEvent(field, f"expected a string or integer id, got {type(value).__name__}")
    text = str(value).strip()
    if not text:
        raise InvalidEvent(field, "blank; every event needs a non-empty " + field)
    if len(text) > MAX_ID_LENGTH:
        raise InvalidEvent(field, f"id is {len(text)} characters; the limit is {MAX_ID_LENGTH}")
    if any(ch.isspace() or not ch.isprintable() for ch in text):
        raise InvalidEvent(field, "id contains whitespace or control characters")
    return text


def _behavior(raw: dict[str, Any]) -> str:
    value = raw.get("behavior")
    if value is None:
        raise InvalidEvent("behavior", "missing; use one of " + ", ".join(BEHAVIORS))
    if not isinstance(value, str):
        raise InvalidEvent("behavior", f"expected a string, got {type(value).__name__}")
    name = value.strip().lower()
    name = BEHAVIOR_ALIASES.get(name, name)
    if name not in BEHAVIORS:
        shown = value if len(value) <= 40 else value[:40] + "..."
        raise InvalidEvent("behavior", f"unknown behavior {shown!r}; use one of " + ", ".join(BEHAVIORS))
    return name


def _timestamp_ms(raw: dict[str, Any], now_ms: int, min_ms: int) -> int:
    field = "ts" if "ts" in raw else "timestamp"
    value = raw.get(field)
    if value is None:
        raise InvalidEvent("ts", "missing; give ts in epoch milliseconds (or timestamp in seconds / ISO-8601)")
    if isinstance(value, bool):
        raise InvalidEvent(field, "expected a number or ISO-8601 string, got bool")
    if isinstance(value, str):
        text = value.strip()
        try:
            value = float(text)
        except ValueError:
            return _check_range(field, _iso_ms(field, text), now_ms, min_ms)
    if not isinstance(value, int | float):
        raise InvalidEvent(field, f"expected a number or ISO-8601 string, got {type(value).__name__}")
    if isinstance(value, float) and not math.isfinite(value):  # JSON's NaN/Infinity, as Python reads them
        raise InvalidEvent(field, f"expected a finite number, got {value}")
    # `ts` is milliseconds; `timestamp` is seconds (the Taobao log's unit).
    ms = int(value) if field == "ts" else int(value * 1000)
    return _check_range(field, ms, now_ms, min_ms)


def _iso_ms(field: str, text: str) -> int:
    try:
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise InvalidEvent(field, f"cannot parse {text[:40]!r} as a number or ISO-8601 time") from None
    if parsed.tzinfo is None:
        raise InvalidEvent(field, "ISO-8601 time needs a UTC offset, e.g. 2017-11-26T01:00:00Z")
    return int(parsed.timestamp() * 1000)


def _check_range(field: str, ms: int, now_ms: int, min_ms: int) -> int:
    shown = f"{ms} ms" if abs(ms) < 10**20 else "a value of over 20 digits"  # str() of a huge int may be refused
    if ms < min_ms:
        raise InvalidEvent(field, f"{shown} is before 2000-01-01; ts is epoch milliseconds, timestamp seconds")
    if ms > now_ms + MAX_FUTURE_MS:
        raise InvalidEvent(field, f"{shown} is more than a day in the future; check the producer's clock/unit")
    return ms


def event_id_for(user_id: str, item_id: str, behavior: str, ts: int) -> str:
    """A stable id for logs that carry none, so replays stay idempotent."""
    return hashlib.blake2b(f"{user_id}|{item_id}|{behavior}|{ts}".encode(), digest_size=10).hexdigest()


def validate(raw: dict[str, Any] | bytes | str, now_ms: int | None = None, min_ts_ms: int = MIN_TS_MS,
             size: int | None = None) -> BehaviorEvent:
    """Parse and normalize one event, or raise :class:`InvalidEvent`. ``min_ts_ms=0`` admits
    old history (MovieLens is from 1997) where a live stream would refuse it. ``size``: the
    encoded size of a parsed event (that of bytes or text is measured here)."""
    if isinstance(raw, bytes | str):
        size = len(raw)
        try:
            raw = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise InvalidEvent("payload", f"not valid JSON ({exc.__class__.__name__}: {exc})") from None
    if not isinstance(raw, dict):
        raise InvalidEvent("payload", f"expected a JSON object, got {type(raw).__name__}")
    now_ms = int(time.time() * 1000) if now_ms is None else now_ms
    user_id = _id(raw, "user_id")
    item_id = _id(raw, "item_id")
    behavior = _behavior(raw)
    ts = _timestamp_ms(raw, now_ms, min_ts_ms)
    category_id = _id(raw, "category_id", required=False)
    event_id = _id(raw, "event_id", required=False)
    assert user_id is not None and item_id is not None
    if size is not None and size > MAX_EVENT_BYTES:  # after the fields: a huge id is named as such
        raise InvalidEvent("payload", f"the event is {size:,} bytes; the limit is {MAX_EVENT_BYTES:,} (it needs only "
                                      "its ids, behavior and ts; leave large extra fields out)")
    return BehaviorEvent(
        event_id=event_id or event_id_for(user_id, item_id, behavior, ts),
        user_id=user_id,
        item_id=item_id,
        behavior=behavior,
        ts=ts,
        category_id=category_id,
    )


def dead_letter(payload: bytes | str, error: InvalidEvent | str, source: str) -> bytes:
    """The DLQ record: the original payload plus why it was refused. A payload over
    MAX_DEAD_LETTER_PAYLOAD keeps its start, and the record says how long it was.

    >>> import json
    >>> r = json.loads(dead_letter(b"x" * 100_000, InvalidEvent("payload", "too big"), "api"))
    >>> len(r["payload"]), r["payload_bytes"], r["truncated"]
    (65536, 100000, True)
    """
    if isinstance(payload, bytes):
        try:
            text = payload.decode()
        except UnicodeDecodeError:
            text = payload.decode("latin-1")
    else:
        text = payload
    field, reason = (error.field, error.reason) if isinstance(error, InvalidEvent) else ("", str(error))
    record: dict[str, Any] = {"field": field, "reason": reason, "source": source, "payload": text,
                              "at": int(time.time() * 1000)}
    if len(text) > MAX_DEAD_LETTER_PAYLOAD:
        record.update(payload=text[:MAX_DEAD_LETTER_PAYLOAD], truncated=True,
                      payload_bytes=len(payload) if isinstance(payload, bytes) else len(text.encode()))
    return json.dumps(record, separators=(",", ":"), ensure_ascii=False).encode()
