"""An FTRL-Proximal logistic ranker (river), updated on every example.

Features: the user's and the item's recent counts (log-scaled), the item's buy rate, whether
and how recently the user viewed the item, whether the item's category is among the user's
top categories (and which), how strongly the item's co-visitation row names the user's newest
views (:func:`covisit_match`), the item's own id as a sparse feature, and the definitions the
catalogue's ranking service lists (:class:`Inputs`, features/dsl.Ranking). An id
earns a weight only after ``min_count`` sightings (:mod:`online_learning.admission`) and
loses it when unseen for ``ttl_ms`` of event time, so the model stays as large as the
catalogue that is alive, not as large as everything ever seen.

FTRL keeps per-coordinate learning rates (``n``, the sum of squared gradients) and its
L1 term makes unhelpful weights exactly zero (McMahan et al., 2013).

river 0.23's ``LogisticRegression`` computes each dot product over *every* weight it holds,
so learning slowed from ~3.8k to ~1k examples/s within 35k sparse features; the dot product
here runs over the example's own features (~38k examples/s, flat).

>>> r = FTRLRanker(min_count=1)
>>> for _ in range(200):
...     _ = r.learn_one(Example(user_id="u", item_id="a", ts=1, label=1, behavior="view", user=None, item=None))
...     _ = r.learn_one(Example(user_id="u", item_id="b", ts=1, label=0, behavior="negative", user=None, item=None))
>>> a, b = r.score_many(None, [("a", None), ("b", None)])
>>> bool(a > 0.8 > 0.2 > b)
True
>>> twin = FTRLRanker.restore(r.snapshot())
>>> twin.score_many(None, [("a", None), ("b", None)]).tolist() == [a, b]
True
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import repeat
from typing import Any, NamedTuple

import numpy as np
from river import linear_model, optim

from features import dsl
from online_learning.admission import CountingFilter
from online_learning.examples import Example
from online_learning.params import decode_for, encode, strings

USER_COUNTS = ("views", "clicks", "carts", "favs", "buys")
ITEM_COUNTS = ("views", "carts", "buys", "events")
_ITEM_COLUMNS = (*ITEM_COUNTS, "buy_rate")
_NO_ITEM = (0.0,) * len(_ITEM_COLUMNS)
COVISIT_ANCHORS = 5  # the user's newest views the co-visitation feature looks for
_NO_MATCH = (0.0, 0.0)


def covisit_match(item: dict[str, Any] | None, at: dict[str, int]) -> tuple[float, float]:
    """How strongly the item's own co-visitation row (``neighbours``, ``neighbour_counts``) names
    the user's newest views: each one found adds its count, divided by 1 + its rank among them
    (``at``: item -> rank, newest 0; see :func:`anchor_ranks`). Returns that sum as a share of
    the row, and log(1 + the sum): a popular candidate's row is spread over many partners, so
    its share is small where the count itself is large (the count added 0.009 HR@10 on
    MovieLens, docs/decisions/co-visit-proximity.md).

    The candidate's own row, not its anchors': the row is a feature of the item, read with its
    other features, so the stream needs no join (on MovieLens it also ranked better:
    docs/decisions/fading-co-visitation.md).

    >>> share, strength = covisit_match({"neighbours": ["a", "b", "c"], "neighbour_counts": [2.0, 1.0, 1.0]},
    ...                                 {"b": 0, "a": 1})
    >>> share, round(strength, 4)  # b: 1 / (1 + 0), a: 2 / (1 + 1); log(1 + 2)
    (0.5, 1.0986)
    """
    if not item or not at:
        return _NO_MATCH
    names = item.get("neighbours")
    if not names:
        return _NO_MATCH
    found = at.keys() & names  # in C: a request scores ~200 rows, a third of them hits
    if not found:
        return _NO_MATCH
    counts = item.get("neighbour_counts") or ()
    hit = 0.0
    for other in sorted(found, key=at.__getitem__):  # a fixed order: the same float sum everywhere
        j = names.index(other)
        if j < len(counts):  # a torn row scores what aligns
            hit += counts[j] / (1 + at[other])
    if not hit:
        return _NO_MATCH
    total = sum(counts)
    return (hit / total if total else 0.0), math.log1p(hit)


def anchor_ranks(user: dict[str, Any] | None) -> dict[str, int]:
    """The user's newest distinct views, each with its rank (newest 0)."""
    at: dict[str, int] = {}
    for item in (user or {}).get("last_viewed_items") or ():
        if len(at) == COVISIT_ANCHORS:
            break
        at.setdefault(item, len(at))
    return at


class Inputs(NamedTuple):
    """The ranking service's definitions (features/dsl.Ranking) the ranker weighs beyond the
    built-in views, by name: the user's, and each candidate item's."""

    user: tuple[str, ...] = ()
    item: tuple[str, ...] = ()

    @classmethod
    def of(cls, ranking: dsl.Ranking) -> Inputs:
        return cls(ranking.names(dsl.user), ranking.names(dsl.item))


BUILT_IN = Inputs()


def scaled(v: float) -> float:
    """A definition's value as the ranker weighs it: sign(v) log(1 + |v|), one scale for counts,
    sums, rates and times alike (FTRL's learning rate suits features near 1).

    >>> scaled(0.0), round(scaled(9.0), 4), round(scaled(-9.0), 4)
    (0.0, 2.3026, -2.3026)
    """
    return math.copysign(math.log1p(abs(v)), v)


def _defined(prefix: str, row: dict[str, Any], names: tuple[str, ...]) -> dict[str, float]:
    out = {}
    for name in names:
        v = row.get(name)
        if v:  # absent, None (a mean of nothing) and 0 all weigh nothing
            out[prefix + name] = scaled(float(v))
    return out


class _LogisticRegression(linear_model.LogisticRegression):
    def _raw_dot_one(self, x: dict[str, float]) -> float:
        w = self._weights
        return sum(w.get(j, 0.0) * xj for j, xj in x.items()) + self.intercept


def user_part(user: dict[str, Any] | None, inputs: Inputs = BUILT_IN) -> dict[str, float]:
    """The user's share of the features (the same for every candidate of one request).

    ``bias`` is a constant feature, so FTRL learns the base rate at a per-coordinate rate;
    river's intercept learns at a fixed 0.01. Until it caught up, the item count features
    (present in almost every example) stood in for it with negative weights, so popular items
    scored low: the views weight was -0.95 after 10k Taobao events and turned positive near
    30k; with ``bias``, -0.58 and near 20k (measured, one run)."""
    if not user:
        return {"bias": 1.0, "u_new": 1.0}
    x = {"bias": 1.0} | {f"u_{k}": math.log1p(user.get(k) or 0) for k in USER_COUNTS}
    return x | _defined("u.", user, inputs.user) if inputs.user else x


def item_part(user: dict[str, Any] | None, item_id: str, item: dict[str, Any] | None,
              mf: float | None = None, inputs: Inputs = BUILT_IN) -> dict[str, float]:
    x = {f"item={item_id}": 1.0}
    share, strength = covisit_match(item, anchor_ranks(user))
    if share:
        x["covisit"] = share
        x["covisit_hit"] = 1.0
        x["covisit_log"] = strength
    if mf is not None:  # the embedding model's score, stacked: the ranker learns how far to trust it
        x["mf"] = mf
    if item:
        for k in ITEM_COUNTS:
            x[f"i_{k}"] = math.log1p(item.get(k) or 0)
        x["i_buy_rate"] = float(item.get("buy_rate") or 0.0)
        if inputs.item:
            x.update(_defined("i.", item, inputs.item))
    else:
        x["i_new"] = 1.0
    recent = (user or {}).get("last_viewed_items") or []
    if item_id in recent:
        x["seen"] = 1.0
        x["seen_recency"] = 1.0 / (1 + recent.index(item_id))
    tops = (user or {}).get("top_categories") or []
    category = (item or {}).get("category")
    if category and category in tops:
        # The strongest signal for items new to the user: on the Taobao slice, 38% of them are
        # in the user's top 3 categories; next_new_item HR@10 0.0015 -> 0.0026
        # (docs/benchmarks/evaluate.md).
        x["cat"] = 1.0
        x["cat_rank"] = 1.0 / (1 + tops.index(category))
    return x


def features(user: dict[str, Any] | None, item_id: str, item: dict[str, Any] | None,
             mf: float | None = None, inputs: Inputs = BUILT_IN) -> dict[str, float]:
    return user_part(user, inputs) | item_part(user, item_id, item, mf, inputs)


class FTRLRanker:
    name = "ftrl"

    def __init__(self, alpha: float = 0.1, beta: float = 1.0, l1: float = 0.1, l2: float = 1.0,
                 min_count: int = 2, ttl_ms: int = 6 * 3_600_000, filter_width: int = 1 << 20,
                 user_inputs: Sequence[str] = (), item_inputs: Sequence[str] = ()) -> None:
        self.hyper = {"alpha": alpha, "beta": beta, "l1": l1, "l2": l2, "min_count": min_count, "ttl_ms": ttl_ms,
                      "filter_width": filter_width}
        self.use(Inputs(tuple(user_inputs), tuple(item_inputs)))
        self.model = _LogisticRegression(optimizer=optim.FTRLProximal(alpha=alpha, beta=beta, l1=l1, l2=l2),
                                         l2=0.0, intercept_lr=0.01)
        self.admission = CountingFilter(width=filter_width)
        self.min_count, self.ttl_ms = min_count, ttl_ms
        self.last_seen: dict[str, int] = {}  # sparse feature -> newest event time it appeared
        self.newest = 0
        self.examples = 0
        self._changed: set[str] = set()
        self._removed: set[str] = set()
        self.pinned: tuple[dict[str, float], float] | None = None  # the served version's weights, see pin()

    def use(self, inputs: Inputs) -> None:
        """Weigh these definitions from now on (the ranking service changed). Deltas carry them,
        so a replica scores with the inputs its weights were learned with."""
        self.inputs = inputs
        self.hyper |= {"user_inputs": list(inputs.user), "item_inputs": list(inputs.item)}

    # -- learning -------------------------------------------------------------------------
    def _admit(self, x: dict[str, float], ts: int) -> dict[str, float]:
        out = {}
        for k, v in x.items():
            if "=" in k:  # sparse id: only once it is frequent enough
                if k not in self.last_seen and self.admission.add(k) < self.min_count:
                    continue
                self.last_seen[k] = ts
            out[k] = v
        return out

    def predict_one(self, ex: Example, mf: float | None = None) -> float:
        return float(self.model.predict_proba_one(features(ex["user"], ex["item_id"], ex["item"], mf,
                                                                 self.inputs))[True])

    def pin(self) -> None:
        """Remember the current weights as the served version's, to score examples with both
        (the quality gate compares the two on the same examples)."""
        self.pinned = (dict(self.model._weights), self.model.intercept)

    def learn_one(self, ex: Example, mf: float | None = None) -> tuple[float, float | None]:
        """Learn from one example; returns the probability predicted just before (test-then-train),
        and the one the pinned weights predict (None when nothing is pinned)."""
        x = self._admit(features(ex["user"], ex["item_id"], ex["item"], mf, self.inputs), ex["ts"])
        p = float(self.model.predict_proba_one(x)[True])
        p_pinned = None
        if self.pinned is not None:
            w, b = self.pinned
            z = b + sum(w.get(k, 0.0) * v for k, v in x.items())
            p_pinned = 1.0 / (1.0 + math.exp(-max(-500.0, min(500.0, z))))
        self.model.learn_one(x, bool(ex["label"]))
        self._changed.update(x)
        self.examples += 1
        if ex["ts"] > self.newest:
            self.newest = ex["ts"]
        if self.examples % 10_000 == 0:
            self.expire()
        return p, p_pinned

    def expire(self) -> int:
        """Forget sparse features unseen for ``ttl_ms`` of event time; returns how many."""
        horizon = self.newest - self.ttl_ms
        gone = [k for k, ts in self.last_seen.items() if ts < horizon]
        opt = self.model.optimizer
        for k in gone:
            del self.last_seen[k]
            self.model._weights.pop(k, None)
            opt.z.pop(k, None)
            opt.n.pop(k, None)
        self._removed.update(gone)
        self._changed.difference_update(gone)
        return len(gone)

    # -- serving --------------------------------------------------------------------------
    def score_many(self, user: dict[str, Any] | None, candidates: list[tuple[str, dict[str, Any] | None]],
                   mf: np.ndarray | None = None) -> np.ndarray:
        """Probability of each ``(item_id, item features)`` for this user (``mf``: the embedding
        model's scores of the same candidates, when the ranker was trained with them).

        The same features as :func:`features`, laid out as columns (a test holds the two equal):
        a request scores hundreds of candidates, and per-candidate dicts cost 4x more."""
        w = self.model._weights
        n = len(candidates)
        ids = [i for i, _ in candidates]
        rows = [f for _, f in candidates]
        base = self.model.intercept + sum(w.get(k, 0.0) * v for k, v in user_part(user, self.inputs).items())
        # map() over dict.get runs in C: per-candidate Python frames were most of the cost.
        # An absent or null field reads as NaN here, as 0 after nan_to_num (`or 0` in features).
        cols = np.array([tuple(map(f.get, _ITEM_COLUMNS)) if f else _NO_ITEM for f in rows],
                        dtype=np.float64).reshape(n, len(_ITEM_COLUMNS))
        np.nan_to_num(cols, copy=False, nan=0.0)
        has = np.fromiter(map(bool, rows), dtype=bool, count=n)
        first: dict[str, int] = {}
        for pos, item in enumerate((user or {}).get("last_viewed_items") or []):
            first.setdefault(item, pos)
        seen_at = np.fromiter(map(first.get, ids, repeat(-1, n)), dtype=np.float64, count=n)
        seen = seen_at >= 0
        logit = base + w.to_numpy(["item=" + i for i in ids]).astype(np.float64, copy=False)  # 0 if absent
        logit += has * (np.log1p(cols[:, :-1]) @ np.array([w.get(f"i_{k}", 0.0) for k in ITEM_COUNTS])
                        + cols[:, -1] * w.get("i_buy_rate", 0.0))
        logit += ~has * w.get("i_new", 0.0)
        logit += seen * (w.get("seen", 0.0) + w.get("seen_recency", 0.0) / (1 + np.where(seen, seen_at, 0)))
        tops = (user or {}).get("top_categories") or []
        if tops:
            at = {c: pos for pos, c in reversed(list(enumerate(tops)))}
            cat_at = np.fromiter((at.get(f.get("category"), -1) if f else -1 for f in rows), dtype=np.float64,
                                 count=n)
            match = cat_at >= 0
            logit += match * (w.get("cat", 0.0) + w.get("cat_rank", 0.0) / (1 + np.where(match, cat_at, 0)))
        at = anchor_ranks(user)
        if at and (w.get("covisit") or w.get("covisit_hit") or w.get("covisit_log")):
            match = np.array([covisit_match(f, at) for f in rows], dtype=np.float64).reshape(n, 2)
            share = match[:, 0]
            logit += (share * w.get("covisit", 0.0) + (share > 0) * w.get("covisit_hit", 0.0)
                      + match[:, 1] * w.get("covisit_log", 0.0))
        if self.inputs.item:
            names = self.inputs.item
            defined = np.array([tuple(map(f.get, names)) if f else (None,) * len(names) for f in rows],
                               dtype=np.float64).reshape(n, len(names))
            np.nan_to_num(defined, copy=False, nan=0.0)
            logit += (np.sign(defined) * np.log1p(np.abs(defined))) @ np.array([w.get("i." + k, 0.0) for k in names])
        if mf is not None:
            logit += np.asarray(mf, dtype=np.float64) * w.get("mf", 0.0)
        return 1.0 / (1.0 + np.exp(-logit))

    @property
    def size(self) -> int:
        return len(self.model._weights)

    # -- parameters -----------------------------------------------------------------------
    def _arrays(self, keys: list[str]) -> dict[str, np.ndarray]:
        w, z, n = self.model._weights, self.model.optimizer.z, self.model.optimizer.n
        # map() over dict.get runs in C: a snapshot (every key) stalls the trainer while it is taken
        size = len(keys)
        return {"keys": strings(keys),
                "w": np.fromiter(map(w.get, keys, repeat(0.0)), dtype=np.float64, count=size),
                "z": np.fromiter(map(z.get, keys, repeat(0.0)), dtype=np.float64, count=size),
                "n": np.fromiter(map(n.get, keys, repeat(0.0)), dtype=np.float64, count=size),
                "seen": np.fromiter(map(self.last_seen.get, keys, repeat(-1)), dtype=np.int64, count=size)}

    def _header(self, kind: str) -> dict[str, Any]:
        return {"model": self.name, "kind": kind, "hyper": self.hyper, "intercept": self.model.intercept,
                "newest": self.newest, "examples": self.examples,
                "iterations": self.model.optimizer.n_iterations}

    def state_delta(self, keep: bool = False) -> bytes | None:
        """The rows changed (and removed) since the last call that did not ``keep`` them, or None
        when nothing changed."""
        if not self.has_changes:
            return None
        arrays = self._arrays(sorted(self._changed))
        arrays["removed"] = strings(sorted(self._removed))
        if not keep:
            self.forget_delta()
        return encode(self._header("delta"), arrays)

    @property
    def has_changes(self) -> bool:
        """Whether a delta would hold anything (changes not yet forgotten)."""
        return bool(self._changed or self._removed)

    def forget_delta(self) -> None:
        """The next delta starts from now (what changed so far is published)."""
        self._changed, self._removed = set(), set()

    def apply_delta(self, blob: bytes) -> None:
        header, arrays = decode_for(blob, self.name)
        self._load_rows(header, arrays)
        for k in arrays["removed"].tolist():
            self.model._weights.pop(k, None)
            self.model.optimizer.z.pop(k, None)
            self.model.optimizer.n.pop(k, None)
            self.last_seen.pop(k, None)

    def _load_rows(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        w, z, n = self.model._weights, self.model.optimizer.z, self.model.optimizer.n
        for k, wk, zk, nk, seen in zip(arrays["keys"].tolist(), arrays["w"].tolist(), arrays["z"].tolist(),
                                       arrays["n"].tolist(), arrays["seen"].tolist(), strict=True):
            w[k], z[k], n[k] = wk, zk, nk
            if seen >= 0:
                self.last_seen[k] = seen
        self.model.intercept = header["intercept"]
        hyper = header["hyper"]
        self.use(Inputs(tuple(hyper.get("user_inputs", ())), tuple(hyper.get("item_inputs", ()))))
        self.newest, self.examples = header["newest"], header["examples"]
        self.model.optimizer.n_iterations = header["iterations"]

    def snapshot(self) -> bytes:
        keys = sorted(set(self.model._weights.keys()) | set(self.model.optimizer.z) | set(self.last_seen))
        arrays = self._arrays(keys)
        arrays["admission"] = self.admission.table
        return encode(self._header("snapshot"), arrays)

    @classmethod
    def restore(cls, blob: bytes) -> FTRLRanker:
        header, arrays = decode_for(blob, cls.name, "snapshot")
        model = cls(**header["hyper"])
        model._load_rows(header, arrays)
        model.admission.table = arrays["admission"].copy()
        return model

    def parameters(self) -> np.ndarray:
        """Every weight and the intercept, for the quality gate."""
        return np.fromiter([*self.model._weights.values(), self.model.intercept], dtype=np.float64)
