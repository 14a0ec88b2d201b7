"""streaming/java's WireEvents (the jobs' parser for events in the wire form) against
connectors/schema.validate, the schema's one home: on a fuzzed corpus of good, odd and broken
payloads, every event Java parses is the row validate makes of it, and the producers' own form
always takes the Java path. Pure logic in the gateway JVM: no services, no job."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from connectors.schema import (
    BEHAVIOR_ALIASES,
    MAX_EVENT_BYTES,
    MAX_FUTURE_MS,
    MAX_ID_LENGTH,
    MIN_TS_MS,
    InvalidEvent,
    validate,
)
from connectors.simulator import simulate
from streaming.flink import java_gateway

NOW = 1_800_000_000_000


@pytest.fixture(scope="module")
def wire() -> Any:
    return java_gateway().jvm.freshrec.WireEvents(0, MIN_TS_MS, MAX_FUTURE_MS, MAX_EVENT_BYTES, MAX_ID_LENGTH, False)


def java_row(wire: Any, text: str) -> tuple[Any, ...] | None:
    row = wire.parse(text, NOW)
    return None if row is None else tuple(row.getField(i) for i in range(6))


def python_row(text: str) -> tuple[Any, ...] | None:
    try:
        e = validate(text, now_ms=NOW)
    except InvalidEvent:
        return None
    return (e.event_id, e.user_id, e.item_id, e.behavior, e.ts, e.category_id or "")


def wire_form(n: int, seed: int) -> list[str]:
    """What the project's producers write: validate's event, as to_json encodes it."""
    return [validate(e, now_ms=NOW).to_json().decode() for e in simulate(n, seed=seed, start_ms=NOW - 3_600_000)]


ODD_IDS = [7, 7.5, True, None, "", " ", "a b", " padded ", "é", "x\u0085", "tab\t", "i" * MAX_ID_LENGTH,
           "i" * (MAX_ID_LENGTH + 1), {"n": 1}, [1], "a\\b", 'q"uote', "\u00a0", "~!#$%&'()*+,-./:;<=>?@[]^_`{|}"]
ODD_BEHAVIORS = ["View", " view", "like", "", None, 3, *BEHAVIOR_ALIASES]
ODD_TS = [NOW, float(NOW), str(NOW), "2027-01-15T08:00:00Z", "2027-01-15T08:00:00", -NOW, 0, MIN_TS_MS - 1,
          MIN_TS_MS, NOW + MAX_FUTURE_MS, NOW + MAX_FUTURE_MS + 1, 10**19, 10**30, None, True, 1.5e12, "soon"]
ODD_EXTRAS = [{"page": "home"}, {"n": 3}, {"score": 0.5}, {"nested": {"a": [1, 2]}}, {"flag": False},
              {"note": "ünïcode"}, {"timestamp": 1_511_658_000}, {"pad": "x" * MAX_EVENT_BYTES}, {"": None}]


def mutate(rnd: random.Random, text: str) -> str:
    """One change to a wire-form event: a field's value, an extra field, or the JSON text."""
    e = json.loads(text)
    kind = rnd.randrange(8)
    if kind == 0:
        e[rnd.choice(["user_id", "item_id", "event_id", "category_id"])] = rnd.choice(ODD_IDS)
    elif kind == 1:
        e["behavior"] = rnd.choice(ODD_BEHAVIORS)
    elif kind == 2:
        e["ts"] = rnd.choice(ODD_TS)
    elif kind == 3:
        del e[rnd.choice(list(e))]
    elif kind == 4:
        e.update(rnd.choice(ODD_EXTRAS))
    else:
        text = json.dumps(e, separators=rnd.choice([(",", ":"), (", ", ": "), (" ,\n", " :\t")]),
                          ensure_ascii=rnd.random() < 0.5)
        if kind == 6:  # the JSON text itself: duplicates, escapes, numbers, garbage
            edits = [lambda t: t[:-1] + ',"user_id":"dup"}', lambda t: t.replace('"view"', '"vi\\u0065w"'),
                     lambda t: t.replace('"user_id"', '"user\\u005fid"'), lambda t: t + " x", lambda t: t[:-1],
                     lambda t: "\ufeff" + t, lambda t: "[" + t + "]", lambda t: t[:-1] + ",}",
                     lambda t: t.replace('"ts":', '"ts":0'), lambda t: t.replace('"ts":', '"ts":-'),
                     lambda t: t[:-1] + ',"e":1e5}', lambda t: t[:-1] + ',"n":NaN}', lambda t: "\n " + t + "\r\n",
                     lambda t: t.replace('"', "'"), lambda t: t.replace(":", ": null, \"x\":", 1)]
            text = rnd.choice(edits)(text)
        return text
    return json.dumps(e, separators=(",", ":"))


def test_the_producers_form_is_parsed_in_java_as_validate_does(wire: Any) -> None:
    for text in wire_form(300, seed=1):
        assert java_row(wire, text) == python_row(text), text


@pytest.mark.parametrize("seed", range(3))
def test_every_event_java_parses_is_the_row_validate_makes(wire: Any, seed: int) -> None:
    rnd = random.Random(seed)
    taken = left = refused = 0
    for text in wire_form(120, seed=seed):
        for _ in range(12):
            odd = mutate(rnd, text)
            mine, reference = java_row(wire, odd), python_row(odd)
            if mine is None:
                left += 1  # the Python parser's to judge
                refused += reference is None
            else:
                taken += 1
                assert mine == reference, odd
    # The corpus holds both sides: odd events Java reads (extras, spacing), and ones it leaves to
    # Python, good (aliases, numeric ids) and refused alike.
    assert taken > 200 and left > 200 and 0 < refused < left


def test_only_an_event_behind_the_watermark_by_more_than_the_lateness_is_late(wire: Any) -> None:
    text = wire_form(1, seed=2)[0]
    gateway = java_gateway()
    assert wire.onTime(json.loads(text)["ts"], gateway.jvm.java.lang.Long.MIN_VALUE)
    assert wire.onTime(NOW, NOW)
    assert not wire.onTime(NOW - 1, NOW)
