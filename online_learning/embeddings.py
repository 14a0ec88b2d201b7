"""An embedding model (torch) whose ID tables grow and shrink with the catalogue.

:class:`DynamicTable` maps ids to rows of a torch tensor. A row is created when an id is
*admitted* (seen ``min_count`` times, :mod:`online_learning.admission`), freed when the id
is unseen for ``ttl_ms`` of event time, and when ``max_rows`` is reached the least recently
seen rows make room (LRU). Memory therefore stays flat over a long replay instead of growing
with every id ever seen.

:class:`TwoTower` is matrix factorization with a history tower: a user's vector is their own
row (once admitted; it starts at zero and learns at a tenth of the items' rate) plus the mean
of the rows of the items they viewed last. New users (most of a behavior log) get a useful
vector from their first views, before their own id is admitted.
It learns with the BPR loss (a positive should score above its sampled negative) in small
batches with per-row Adagrad, and item rows double as a retrieval index (:meth:`TwoTower.nearest`).

>>> m = TwoTower(dim=8, min_count=1, batch_size=4, seed=0)
>>> for t in range(300):
...     for pos, neg in (("a", "b"), ("c", "d")):
...         u = {"last_viewed_items": ["x"] if pos == "a" else ["y"]}
...         m.learn_one(Example(user_id="u", item_id=pos, ts=t, label=1, behavior="view", user=u, item=None))
...         m.learn_one(Example(user_id="u", item_id=neg, ts=t, label=0, behavior="negative", user=u, item=None))
>>> m.nearest({"last_viewed_items": ["x"]}, k=1, user_id="nobody")
['a']
>>> twin = TwoTower.restore(m.snapshot())
>>> u = {"last_viewed_items": ["y"]}
>>> bool((twin.score_many(u, ["c", "d"]) == m.score_many(u, ["c", "d"])).all())
True
"""

from __future__ import annotations

from itertools import repeat
from typing import Any

import numpy as np
import torch

from online_learning.admission import CountingFilter
from online_learning.examples import Example
from online_learning.params import decode_for, encode, strings


class DynamicTable:
    """Rows of ``dim`` floats for admitted ids, with TTL and LRU eviction."""

    def __init__(self, dim: int, min_count: int = 2, ttl_ms: int = 6 * 3_600_000, max_rows: int | None = 200_000,
                 init_rows: int = 1024, filter_width: int = 1 << 20, seed: int = 0, init_scale: float = 0.1) -> None:
        self.init_scale = init_scale  # new rows: normal noise of this scale (0: zeros)
        self.dim, self.min_count, self.ttl_ms, self.max_rows = dim, min_count, ttl_ms, max_rows
        self.gen = torch.Generator().manual_seed(seed)
        rows = min(init_rows, max_rows) if max_rows else init_rows
        self.weight = torch.zeros(rows, dim)
        self.accum = torch.zeros(rows)  # Adagrad: summed squared gradient per row
        self.last_seen = np.full(rows, -1, dtype=np.int64)  # -1: free row
        self.ids: dict[str, int] = {}
        self.keys: list[str | None] = [None] * rows
        self.free = list(range(rows - 1, -1, -1))
        self.admission = CountingFilter(width=filter_width)
        self.changed: set[str] = set()
        self.removed: set[str] = set()
        self.evicted = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def nbytes(self) -> int:
        return self.weight.nbytes + self.accum.nbytes + self.last_seen.nbytes + self.admission.nbytes

    def get(self, key: str) -> int:
        """The row of an admitted id, or -1; no side effects (serving)."""
        return self.ids.get(key, -1)

    def touch(self, key: str, ts: int) -> int:
        """The id's row, admitting it if it has now been seen often enough; -1 if not (yet)."""
        row = self.ids.get(key, -1)
        if row < 0:
            if self.admission.add(key) < self.min_count:
                return -1
            row = self._allocate(key)
        if ts > self.last_seen[row]:
            self.last_seen[row] = ts
        return row

    def _allocate(self, key: str, init: bool = True) -> int:
        if not self.free:
            if self.max_rows is None or len(self.keys) < self.max_rows:
                self._grow()
            else:  # full: the least recently seen 1/16 make room at once (one scan, not one per id)
                live = np.flatnonzero(self.last_seen >= 0)
                n = max(1, len(live) // 16)
                self._evict(live[np.argpartition(self.last_seen[live], n - 1)[:n]])
        row = self.free.pop()
        self.ids[key] = row
        self.keys[row] = key
        if init:
            self.weight[row] = torch.randn(self.dim, generator=self.gen) * self.init_scale
            self.accum[row] = 0.0
        self.last_seen[row] = -2  # taken; touch() sets the time
        self.changed.add(key)
        self.removed.discard(key)
        return row

    def _grow(self) -> None:
        old = len(self.keys)
        new = old * 2 if self.max_rows is None else min(old * 2, self.max_rows)
        self.weight = torch.cat([self.weight, torch.zeros(new - old, self.dim)])
        self.accum = torch.cat([self.accum, torch.zeros(new - old)])
        self.last_seen = np.concatenate([self.last_seen, np.full(new - old, -1, dtype=np.int64)])
        self.keys.extend([None] * (new - old))
        self.free.extend(range(new - 1, old - 1, -1))

    def _evict(self, rows: np.ndarray) -> None:
        for row in rows.tolist():
            key = self.keys[row]
            if key is None:
                continue
            del self.ids[key]
            self.keys[row] = None
            self.last_seen[row] = -1
            self.free.append(row)
            self.changed.discard(key)
            self.removed.add(key)
            self.evicted += 1

    def expire(self, now: int) -> int:
        """Free the rows unseen for ``ttl_ms`` before ``now`` (event time)."""
        old = np.flatnonzero((self.last_seen >= 0) & (self.last_seen < now - self.ttl_ms))
        self._evict(old)
        return len(old)

    def live_rows(self) -> np.ndarray:
        return np.flatnonzero(self.last_seen != -1)

    # -- parameters -----------------------------------------------------------------------
    def rows(self, keys: list[str]) -> dict[str, np.ndarray]:
        idx = torch.tensor([self.ids[k] for k in keys], dtype=torch.long)
        return {"keys": strings(keys), "weight": self.weight[idx].numpy().copy(),
                "accum": self.accum[idx].numpy().copy(), "seen": self.last_seen[idx.numpy()].copy()}

    def load(self, arrays: dict[str, np.ndarray], prefix: str = "") -> None:
        keys = arrays[prefix + "keys"].tolist()
        rows = [self.ids[k] if k in self.ids else self._allocate(k, init=False) for k in keys]
        if rows:
            idx = torch.tensor(rows, dtype=torch.long)
            self.weight[idx] = torch.from_numpy(arrays[prefix + "weight"]).float()
            self.accum[idx] = torch.from_numpy(arrays[prefix + "accum"]).float()
            self.last_seen[idx.numpy()] = arrays[prefix + "seen"]
        self.changed.clear()

    def drop(self, keys: list[str]) -> None:
        self._evict(np.array([self.ids[k] for k in keys if k in self.ids], dtype=np.int64))
        self.removed.clear()

    def delta(self, keep: bool = False) -> tuple[dict[str, np.ndarray], list[str]]:
        changed = sorted(k for k in self.changed if k in self.ids)
        removed = sorted(self.removed)
        if not keep:
            self.forget_delta()
        return self.rows(changed), removed

    def forget_delta(self) -> None:
        self.changed, self.removed = set(), set()


class TwoTower:
    name = "two_tower"

    def __init__(self, dim: int = 32, lr: float = 0.1, reg: float = 1e-4, batch_size: int = 64, history: int = 5,
                 min_count: int = 2, ttl_ms: int = 6 * 3_600_000, max_rows: int | None = 200_000,
                 seed: int = 0, user_lr: float = 0.01) -> None:
        self.hyper = {"dim": dim, "lr": lr, "reg": reg, "batch_size": batch_size, "history": history,
                      "min_count": min_count, "ttl_ms": ttl_ms, "max_rows": max_rows, "seed": seed,
                      "user_lr": user_lr}
        self.lr, self.user_lr, self.reg, self.batch_size, self.history = lr, user_lr, reg, batch_size, history
        # A user's row starts at zero and learns slowly: it sees a few examples where an item
        # sees thousands, and Adagrad's first steps move a fresh row as far as a trained one, so
        # a random or fast row swung the user's vector with every session
        # (docs/decisions/slow-user-rows.md).
        self.users = DynamicTable(dim, min_count, ttl_ms, max_rows, seed=seed, init_scale=0.0)
        self.items = DynamicTable(dim, min_count, ttl_ms, max_rows, seed=seed + 1)
        self.pending: dict[tuple[str, int], tuple[int, list[int], int]] = {}  # (user, ts) -> positive
        self.batch: list[tuple[int, list[int], int, int]] = []  # (user row, history rows, positive, negative)
        self.newest = 0
        self.examples = 0

    # -- learning -------------------------------------------------------------------------
    def learn_one(self, ex: Example) -> None:
        """Buffer one example; a positive pairs with the negatives sampled for it (same user and
        time), and every ``batch_size`` pairs make one BPR step."""
        self.examples += 1
        ts = ex["ts"]
        if ts > self.newest:
            self.newest = ts
            if self.examples % 5_000 == 0:
                self.users.expire(ts)
                self.items.expire(ts)
        item = self.items.touch(ex["item_id"], ts)
        if ex["label"]:
            user = self.users.touch(ex["user_id"], ts)
            hist = [r for r in (self.items.touch(i, ts) for i in self._recent(ex["user"])) if r >= 0]
            self.pending = {(ex["user_id"], ts): (user, hist, item)} if item >= 0 else {}
            return
        pos = self.pending.get((ex["user_id"], ts))
        if pos is None or item < 0 or (pos[0] < 0 and not pos[1]):
            return
        self.batch.append((*pos, item))
        if len(self.batch) >= self.batch_size:
            self.step()

    def _recent(self, user: dict[str, Any] | None) -> list[str]:
        return list((user or {}).get("last_viewed_items") or [])[: self.history]

    def step(self) -> None:
        """One BPR step on the buffered pairs (gradients by hand: a few rows, no autograd graph)."""
        if not self.batch:
            return
        U, Ii = self.users, self.items
        # Rows in the batch were touched just now, so LRU and TTL eviction (oldest first) spare them.
        n = len(self.batch)
        h_rows, h_of = [], []
        for b, (_, hist, _, _) in enumerate(self.batch):
            h_rows.extend(hist)
            h_of.extend([b] * len(hist))
        urow = torch.tensor([u for u, _, _, _ in self.batch])
        has_u = (urow >= 0).float().unsqueeze(1)
        urow = urow.clamp(min=0)
        p = torch.tensor([x[2] for x in self.batch])
        q = torch.tensor([x[3] for x in self.batch])
        hr, hof = torch.tensor(h_rows, dtype=torch.long), torch.tensor(h_of, dtype=torch.long)
        counts = torch.zeros(n).index_add_(0, hof, torch.ones(len(h_rows))).clamp(min=1).unsqueeze(1)
        hist_mean = torch.zeros(n, U.dim).index_add_(0, hof, Ii.weight[hr]) / counts
        u = U.weight[urow] * has_u + hist_mean
        vp, vq = Ii.weight[p], Ii.weight[q]
        x = (u * (vp - vq)).sum(1, keepdim=True)
        d = torch.sigmoid(-x)  # d(-log sigmoid(x))/dx = -d
        g_u = -d * (vp - vq)
        # Gradients only for the rows this batch touched (a full-table buffer per step would
        # cost as much as the table).
        item_rows = torch.cat([p, q, hr])
        item_grads = torch.cat([-d * u + self.reg * vp, d * u + self.reg * vq, (g_u / counts)[hof]])
        user_sel = has_u[:, 0] > 0
        user_rows = urow[user_sel]
        user_grads = (g_u + self.reg * U.weight[urow])[user_sel]
        for table, rows, grads, lr in ((Ii, item_rows, item_grads, self.lr), (U, user_rows, user_grads, self.user_lr)):
            if not len(rows):
                continue
            uniq, inverse = torch.unique(rows, return_inverse=True)
            g = torch.zeros(len(uniq), table.dim).index_add_(0, inverse, grads)
            table.accum[uniq] += (g * g).mean(1)
            table.weight[uniq] -= lr * g / (table.accum[uniq].sqrt().unsqueeze(1) + 1e-8)
            table.changed.update(table.keys[r] for r in uniq.tolist() if table.keys[r] is not None)
        self.batch = []

    # -- serving --------------------------------------------------------------------------
    # numpy views of the torch tables: the same memory, a tenth of torch's per-call overhead
    # on the small vectors a request touches.
    def user_vector(self, user: dict[str, Any] | None, user_id: str | None = None) -> np.ndarray:
        U, Ii = self.users.weight.numpy(), self.items.weight.numpy()
        v = np.zeros(self.users.dim, dtype=np.float32)
        row = self.users.get(user_id) if user_id is not None else -1
        if row >= 0:
            v += U[row]
        hist = [r for r in (self.items.get(i) for i in self._recent(user)) if r >= 0]
        if hist:
            v += Ii[hist].mean(0)
        return v

    def score_many(self, user: dict[str, Any] | None, items: list[str], user_id: str | None = None) -> np.ndarray:
        """Dot products of the user vector with each item's row (0 for items without a row)."""
        rows = np.fromiter(map(self.items.ids.get, items, repeat(-1)), dtype=np.int64, count=len(items))
        known = rows >= 0
        scores = np.zeros(len(items), dtype=np.float32)
        if known.any():
            scores[known] = self.items.weight.numpy()[rows[known]] @ self.user_vector(user, user_id)
        return scores

    def nearest(self, user: dict[str, Any] | None, k: int, user_id: str | None = None,
                exclude: set[str] | None = None) -> list[str]:
        """Retrieval: the k items whose rows score highest for this user."""
        n_live = len(self.items)
        if not n_live:
            return []
        v = self.user_vector(user, user_id)
        if not v.any():
            return []
        # Score every row in place (the table is at most twice its live rows) rather than copy the live ones.
        scores = self.items.weight.numpy() @ v
        scores[self.items.last_seen == -1] = -np.inf
        want = min(n_live, k + len(exclude or ()))
        top = np.argpartition(-scores, want - 1)[:want]
        top = top[np.argsort(-scores[top], kind="stable")]
        out = [self.items.keys[t] for t in top]
        return [i for i in out if i is not None and i not in (exclude or ())][:k]

    # -- parameters -----------------------------------------------------------------------
    def _header(self, kind: str) -> dict[str, Any]:
        return {"model": self.name, "kind": kind, "hyper": self.hyper, "newest": self.newest,
                "examples": self.examples}

    def state_delta(self, keep: bool = False) -> bytes | None:
        """The rows changed (and removed) since the last call that did not ``keep`` them."""
        if not self.has_changes:
            return None
        arrays: dict[str, np.ndarray] = {}
        for name, table in (("u_", self.users), ("i_", self.items)):
            rows, removed = table.delta(keep)
            arrays |= {name + k: v for k, v in rows.items()}
            arrays[name + "removed"] = strings(removed)
        return encode(self._header("delta"), arrays)

    @property
    def has_changes(self) -> bool:
        """Whether a delta would hold anything (changes not yet forgotten)."""
        return any(t.changed or t.removed for t in (self.users, self.items))

    def forget_delta(self) -> None:
        """The next delta starts from now (what changed so far is published)."""
        self.users.forget_delta()
        self.items.forget_delta()

    def apply_delta(self, blob: bytes) -> None:
        header, arrays = decode_for(blob, self.name)
        for name, table in (("u_", self.users), ("i_", self.items)):
            table.drop(arrays[name + "removed"].tolist())
            table.load(arrays, name)
        self.newest, self.examples = header["newest"], header["examples"]

    def snapshot(self) -> bytes:
        """The parameters as they are (pairs waiting for a full batch are not parameters yet:
        the trainer calls :meth:`step` before it publishes). Taking one changes nothing."""
        arrays: dict[str, np.ndarray] = {}
        for name, table in (("u_", self.users), ("i_", self.items)):
            arrays |= {name + k: v for k, v in table.rows(sorted(table.ids)).items()}
            arrays[name + "admission"] = table.admission.table
        return encode(self._header("snapshot"), arrays)

    @classmethod
    def restore(cls, blob: bytes) -> TwoTower:
        header, arrays = decode_for(blob, cls.name, "snapshot")
        model = cls(**header["hyper"])
        for name, table in (("u_", model.users), ("i_", model.items)):
            table.load(arrays, name)
            table.admission.table = arrays[name + "admission"].copy()
        model.newest, model.examples = header["newest"], header["examples"]
        return model

    def parameters(self) -> np.ndarray:
        return np.concatenate([self.users.weight[torch.from_numpy(self.users.live_rows())].numpy().ravel(),
                               self.items.weight[torch.from_numpy(self.items.live_rows())].numpy().ravel()])

    @property
    def size(self) -> int:
        return len(self.users) + len(self.items)
