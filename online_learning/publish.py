"""Versioned model parameters in Redis: deltas every few hundred ms, snapshots now and then.

Every publish gets the next version of a Redis counter, so versions only grow. A version is
a hash ``<project>:model:v:<version>`` holding one blob per model that changed, its kind
(``delta`` or ``snapshot``), its ``base`` (the version a delta applies on top of; for a
snapshot, the version whose state it equals, 0 if none: a rollback), the
Kafka offsets the trainer had consumed, the prequential metric and the time. The sorted
set ``<project>:model:log`` lists versions in order; ``<project>:model:snapshots`` the
snapshots. Deltas expire after ``delta_ttl_s``; snapshots are kept (the newest
``keep_snapshots``), so a reader that fell behind, or a rollback, starts from one. Each new
version (and each canary change) is also announced on the pub/sub channel
``<project>:model:published``, so readers wake at once instead of at their next poll.

A reader applies a delta only on top of its base; any gap (expired delta, a rollback, a new
trainer) sends it back to the newest snapshot. A reader already at a snapshot's base skips
its content (a periodic snapshot changes nothing; rebuilding a big model from one takes
seconds, and every reader would stall on it once a minute). :meth:`ParameterStore.rollback` publishes an
old snapshot again as a new version, so everyone follows it the same way, the trainer too.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import redis

BLOB = "blob:"


@dataclass
class Version:
    version: int
    kind: str  # "delta" or "snapshot"
    base: int  # the version a delta applies to (0 for a snapshot)
    blobs: dict[str, bytes]
    created_ms: int
    meta: dict[str, Any] = field(default_factory=dict)  # offsets, metric, rollback_of, ...


class ParameterStore:
    def __init__(self, client: redis.Redis, project: str, delta_ttl_s: int = 3600, keep_snapshots: int = 20) -> None:
        self.client = client
        self.prefix = f"{project}:model"
        self.delta_ttl_s, self.keep_snapshots = delta_ttl_s, keep_snapshots

    def _key(self, version: int) -> str:
        return f"{self.prefix}:v:{version}"

    @property
    def channel(self) -> str:
        """Where new versions and canary changes are announced (the message: a version, or 0)."""
        return f"{self.prefix}:published"

    def publish(self, kind: str, blobs: dict[str, bytes], base: int, meta: dict[str, Any] | None = None) -> int:
        if kind not in ("delta", "snapshot"):
            raise ValueError(f"kind must be delta or snapshot, not {kind!r}")
        version = int(self.client.incr(f"{self.prefix}:version"))
        mapping: dict[str, Any] = {"kind": kind, "base": base,
                                   "created_ms": int(time.time() * 1000), "meta": json.dumps(meta or {})}
        mapping |= {BLOB + name: blob for name, blob in blobs.items()}
        pipe = self.client.pipeline(transaction=True)  # readers see a version whole or not at all
        pipe.hset(self._key(version), mapping=mapping)
        if kind == "delta":
            pipe.expire(self._key(version), self.delta_ttl_s)
        else:
            pipe.zadd(f"{self.prefix}:snapshots", {str(version): version})
        pipe.zadd(f"{self.prefix}:log", {str(version): version})
        pipe.publish(self.channel, version)
        pipe.execute()
        if kind == "snapshot":
            self._prune()
        return version

    def _prune(self) -> None:
        old = self.client.zrange(f"{self.prefix}:snapshots", 0, -self.keep_snapshots - 1)
        if old:
            pipe = self.client.pipeline(transaction=True)
            for v in old:
                pipe.delete(self._key(int(v)))
                pipe.zrem(f"{self.prefix}:snapshots", v)
            pipe.execute()
        # the log forgets versions whose hashes are gone (expired deltas, pruned snapshots)
        first_kept = self.client.zrange(f"{self.prefix}:snapshots", 0, 0)
        if first_kept:
            self.client.zremrangebyscore(f"{self.prefix}:log", "-inf", f"({int(first_kept[0])}")

    def get(self, version: int, blobs: bool = True) -> Version | None:
        if blobs:
            raw = self.client.hgetall(self._key(version))
        else:
            names = ("kind", "base", "created_ms", "meta")
            values = self.client.hmget(self._key(version), names)
            raw = {k.encode(): v for k, v in zip(names, values, strict=True) if v is not None}
        if not raw:
            return None
        fields = {k.decode(): v for k, v in raw.items()}
        return Version(version=version, kind=fields["kind"].decode(), base=int(fields["base"]),
                       created_ms=int(fields["created_ms"]), meta=json.loads(fields["meta"]),
                       blobs={k[len(BLOB):]: v for k, v in fields.items() if k.startswith(BLOB)})

    def head(self) -> int:
        """The newest published version (0: none yet)."""
        newest = self.client.zrevrange(f"{self.prefix}:log", 0, 0)
        return int(newest[0]) if newest else 0

    def versions_after(self, version: int) -> list[int]:
        return [int(v) for v in self.client.zrangebyscore(f"{self.prefix}:log", f"({version}", "+inf")]

    def snapshots(self) -> list[int]:
        return [int(v) for v in self.client.zrange(f"{self.prefix}:snapshots", 0, -1)]

    def history(self, n: int = 10) -> list[dict[str, Any]]:
        """The newest ``n`` snapshots (the rollback targets) and the head, oldest first: what
        ``freshrec model list`` prints and the API's ``GET /model/versions`` returns."""
        head = self.head()
        wanted = self.snapshots()[-n:]
        if head and head not in wanted:
            wanted.append(head)
        out = []
        for v in wanted:
            ver = self.get(v, blobs=False)
            if ver is not None:
                out.append({"version": v, "kind": ver.kind, "created_ms": ver.created_ms,
                            "examples": ver.meta.get("examples"), "auc": ver.meta.get("auc"),
                            "rollback_of": ver.meta.get("rollback_of"), "head": v == head})
        return out

    def catch_up(self, served: int) -> list[Version]:
        """What a reader at ``served`` applies to reach the head: the deltas after it, or, when
        the chain is broken (or it has nothing yet), the newest snapshot and the deltas after that."""
        if served:
            chain = self._walk(served)
            if chain is not None:
                return chain
        snaps = self.snapshots()
        start = self.get(snaps[-1]) if snaps else None
        if start is None:
            return []
        return [start] + (self._walk(start.version) or [])

    def chain_to(self, version: int) -> list[Version] | None:
        """What builds exactly ``version`` from nothing (a snapshot at or before it, then the deltas
        up to it), for serving a pinned or canary version; None when it is no longer stored."""
        if self.get(version, blobs=False) is None:
            return None
        for snap in reversed([s for s in self.snapshots() if s <= version]):
            start = self.get(snap)
            if start is None or not start.blobs:
                continue
            rest = self._walk(snap, until=version)
            if rest is not None and (rest[-1].version if rest else snap) == version:
                return [start, *rest]
        return None

    def _walk(self, at: int, until: int | None = None) -> list[Version] | None:
        """The versions after ``at`` (up to ``until``) that apply in a chain; None at a break."""
        out: list[Version] = []
        for v in self.versions_after(at):
            if until is not None and v > until:
                break
            head = self.get(v, blobs=False)
            if head is None:
                continue  # expired meanwhile: the next one's base will not match
            if head.kind == "snapshot" and head.base and head.base == at:
                out.append(head)  # the state we have: move on without its blobs
            elif head.kind == "snapshot" or head.base == at:
                ver = self.get(v)
                if ver is None:
                    return None
                out.append(ver)
            else:
                return None
            at = v
        return out

    def rollback(self, to: int, why: str = "rollback_of") -> int:
        """Publish snapshot ``to`` again as the newest version; returns that version. (Promoting
        a canary is the same move, recorded with ``why="promoted"``.)"""
        old = self.get(to)
        if old is None or old.kind != "snapshot" or not old.blobs:
            have = ", ".join(map(str, self.snapshots())) or "none"
            raise ValueError(f"version {to} is not a stored snapshot; snapshots kept: {have}")
        return self.publish("snapshot", old.blobs, 0, {**old.meta, why: to})  # base 0: everyone loads it

    # -- which version serves whom (read by every API process) ----------------------------
    def set_canary(self, version: int | None, share: float = 0.0) -> None:
        """Send ``share`` of users (by a stable hash of their id) to ``version``; None ends it."""
        if version is None:
            self.client.delete(f"{self.prefix}:canary")
        else:
            self.client.set(f"{self.prefix}:canary", json.dumps({"version": version, "share": share}))
        self.client.publish(self.channel, version or 0)

    def canary(self) -> tuple[int, float] | None:
        raw = self.client.get(f"{self.prefix}:canary")
        if not raw:
            return None
        doc = json.loads(raw)
        return int(doc["version"]), float(doc["share"])
