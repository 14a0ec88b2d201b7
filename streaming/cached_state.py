"""A keyed Flink ValueState read through a cache of the unpickled values.

In PyFlink's thread mode every ``value()`` crosses into Java and unpickles the state (~60 us on
this machine, whatever its size) and every ``update()`` crosses and pickles (~100 us). The
catalogue's operators read and write an entity's state on every record, several entities per
event, so these calls were most of the job's time per event. Writes still go through on every
record (a checkpoint must hold them); reads of a key this operator wrote or read before come
from the cache. The operator is the only writer of its keyed state, and a restored job starts
with new operator instances, so the cache never serves a value the state does not hold.

>>> class Backend:  # stands in for Flink's ValueState of the current key
...     def __init__(self): self.key, self.data, self.reads = None, {}, 0
...     def value(self): self.reads += 1; return self.data.get(self.key)
...     def update(self, v): self.data[self.key] = v
...     def clear(self): self.data.pop(self.key, None)
>>> backend = Backend()
>>> state = CachedValueState(backend, entries=2)
>>> backend.key = "a"
>>> state.value("a") is None, backend.reads
(True, 1)
>>> state.update("a", [1]); state.value("a"), backend.reads  # no second read
([1], 1)
>>> state.clear("a"); state.value("a"), backend.reads
(None, 2)
"""

from __future__ import annotations

from typing import Any

_MISSING = object()


class CachedValueState:
    """``value/update/clear`` of the current key, which the caller names (Flink knows it too).

    Values are shared with the cache: mutate one only to ``update`` it right after. The cache
    holds at most ``entries`` keys and is emptied when full (hot keys come straight back)."""

    def __init__(self, state: Any, entries: int = 20_000) -> None:
        self.state, self.entries = state, entries
        self.cache: dict[str, Any] = {}

    def value(self, key: str) -> Any:
        v = self.cache.get(key, _MISSING)
        if v is _MISSING:
            v = self.state.value()
            self._keep(key, v)
        return v

    def update(self, key: str, value: Any) -> None:
        self.state.update(value)
        self._keep(key, value)

    def clear(self, key: str) -> None:
        self.state.clear()
        self.cache.pop(key, None)

    def _keep(self, key: str, value: Any) -> None:
        if len(self.cache) >= self.entries:
            self.cache.clear()
        self.cache[key] = value
