"""The feature language analysts write definitions in: declarative, no Flink or Redis code.

A definition says *what* to compute; the streaming job and the batch backfill both run it
(streaming/aggregates.py holds the one implementation), and each definition becomes a Feast
feature view of its own name with its owner, description, TTL and tags.

>>> from datetime import timedelta as td
>>> views = Feature(name="item_views_1h", entity=item, aggregation=Count(), behaviors=["view"],
...                 window=Sliding(size=td(hours=1), slide=td(minutes=5)), ttl=td(days=2),
...                 owner="recsys@freshrec", description="Views of the item in the last hour.")
>>> buys = Feature(name="item_buys_1h", entity=item, aggregation=Count(), behaviors=["buy"],
...                window=views.window, ttl=td(days=2), owner="recsys@freshrec", description="Purchases.")
>>> rate = Ratio(name="item_buy_rate_1h", numerator=buys, denominator=views, prior=0.01, prior_weight=20,
...              ttl=td(days=2), owner="recsys@freshrec", description="Smoothed buys per view.")
>>> [problem for problem in validate([views, buys, rate])]
[]
>>> bad = Feature(name="x", entity=item, aggregation=Count(), behaviors=["like"],
...               window=Sliding(size=td(minutes=1), slide=td(minutes=5)), ttl=td(days=1), owner="me",
...               description="broken")
>>> for problem in validate([bad]): print(problem)
x: behaviors: unknown behavior 'like'; use one of view, click, cart, fav, buy
x: window: the window (1m) is shorter than its slide (5m); make size >= slide
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from connectors.schema import BEHAVIORS

# --- entities ------------------------------------------------------------------------------

@dataclass(frozen=True)
class EntityKind:
    """What a feature is computed per: the event fields that make its key."""

    name: str
    join_keys: tuple[str, ...]

    def __str__(self) -> str:
        return self.name


user = EntityKind("user", ("user_id",))
item = EntityKind("item", ("item_id",))
category = EntityKind("category", ("category_id",))
user_category = EntityKind("user_category", ("user_id", "category_id"))
ENTITY_KINDS = (user, item, category, user_category)
KEY_SEPARATOR = "\x1f"  # between the parts of a composite key; the schema refuses control characters in ids
DEFINED = "@"  # feature rows whose view starts with it hold catalogue values, one per definition


def key_parts(entity: str, join_keys: int) -> list[str]:
    """A key's values in join-key order (composite keys join them with KEY_SEPARATOR)."""
    return entity.split(KEY_SEPARATOR) if join_keys > 1 else [entity]


def trending_key(project: str, category: str = "") -> str:
    """A trending list (the global one, or a category's) is one JSON value beside Feast's
    hashes, not a feature view."""
    return f"{project}:trending:{category}" if category else f"{project}:trending"


def expand(view: str, values: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """A catalogue row (view ``@<operator>``) holds every definition its operator computes for
    the entity: one per view."""
    if not view.startswith(DEFINED):
        return [(view, values)]
    return [(name, {name: value}) for name, value in values.items()]


# --- windows -------------------------------------------------------------------------------

def _fmt(d: timedelta) -> str:
    s = int(d.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s and s % n == 0:
            return f"{s // n}{unit}"
    return f"{s}s"


@dataclass(frozen=True)
class Sliding:
    """Event-time window of ``size`` that moves in steps of ``slide`` (Flink's HOP window).
    A value at time t covers the events from the start of the newest window containing t up
    to t itself."""

    size: timedelta
    slide: timedelta

    def __str__(self) -> str:
        return f"sliding {_fmt(self.size)} every {_fmt(self.slide)}"


@dataclass(frozen=True)
class Tumbling:
    """Event-time window of ``size`` that restarts empty at every multiple of ``size``."""

    size: timedelta

    @property
    def slide(self) -> timedelta:
        return self.size

    def __str__(self) -> str:
        return f"tumbling {_fmt(self.size)}"


Window = Sliding | Tumbling


# --- aggregations --------------------------------------------------------------------------

# What an aggregation can read from an event: strings (for distinct counts and last-N) ...
STRING_FIELDS = ("user_id", "item_id", "category_id", "behavior")
# ... and numbers: the event time in ms, its hour of day (UTC).
NUMBER_FIELDS = ("ts", "hour")


@dataclass(frozen=True)
class Count:
    """Events in the window."""

    kind = "count"
    dtype = "int64"

    def describe(self) -> str:
        return "count"


@dataclass(frozen=True)
class _OfNumber:
    """Reads ``of``: an event number (``"ts"``, ``"hour"``) or weights per behavior, e.g.
    ``{"view": 1, "buy": 5}`` (behaviors not named weigh 0)."""

    of: str | dict[str, float]
    dtype = "float64"

    def describe(self) -> str:
        of = self.of if isinstance(self.of, str) else json.dumps(self.of, sort_keys=True)
        return f"{self.kind}({of})"  # type: ignore[attr-defined]


@dataclass(frozen=True)
class Sum(_OfNumber):
    kind = "sum"


@dataclass(frozen=True)
class Mean(_OfNumber):
    kind = "mean"


@dataclass(frozen=True)
class Min(_OfNumber):
    kind = "min"


@dataclass(frozen=True)
class Max(_OfNumber):
    kind = "max"


@dataclass(frozen=True)
class DistinctCount:
    """Distinct values of an event field in the window."""

    of: str = "item_id"
    kind = "distinct"
    dtype = "int64"

    def describe(self) -> str:
        return f"distinct({self.of})"


@dataclass(frozen=True)
class LastN:
    """The ``n`` newest values of an event field in the window, newest first."""

    of: str = "item_id"
    n: int = 10
    kind = "last_n"
    dtype = "array<string>"

    def describe(self) -> str:
        return f"last_{self.n}({self.of})"


Aggregation = Count | Sum | Mean | Min | Max | DistinctCount | LastN


# --- definitions ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Definition:
    """What every definition carries into the Feast registry."""

    name: str
    ttl: timedelta
    owner: str
    description: str
    tags: dict[str, str] = field(default_factory=dict, kw_only=True)

    def fingerprint(self) -> str:
        """Changes exactly when the computed values would: metadata does not count."""
        return hashlib.sha1(self.semantics().encode()).hexdigest()[:12]

    def semantics(self) -> str:
        raise NotImplementedError

    @property
    def entity_kind(self) -> EntityKind:
        raise NotImplementedError

    @property
    def dtype(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class Feature(Definition):
    """An aggregation of one entity's events over an event-time window, optionally only of
    some behaviors."""

    entity: EntityKind
    aggregation: Aggregation
    window: Window
    behaviors: Sequence[str] | None = None  # None: every behavior

    @property
    def entity_kind(self) -> EntityKind:
        return self.entity

    @property
    def dtype(self) -> str:
        return self.aggregation.dtype

    def semantics(self) -> str:
        behaviors = ",".join(sorted(self.behaviors)) if self.behaviors else "*"
        return (f"{self.entity}|{self.aggregation.describe()}|{behaviors}|"
                f"{int(self.window.size.total_seconds())}/{int(self.window.slide.total_seconds())}")


@dataclass(frozen=True)
class Ratio(Definition):
    """``(numerator + prior * prior_weight) / (denominator + prior_weight)`` of two features of
    the same entity, e.g. a smoothed buy rate; None while both sides are 0."""

    numerator: Feature
    denominator: Feature
    prior: float = 0.0
    prior_weight: float = 0.0

    @property
    def entity_kind(self) -> EntityKind:
        return self.numerator.entity if self.numerator else user

    @property
    def dtype(self) -> str:
        return "float64"

    def semantics(self) -> str:
        num = self.numerator.semantics() if self.numerator else "?"
        den = self.denominator.semantics() if self.denominator else "?"
        return f"ratio({num};{den};{self.prior!r};{self.prior_weight!r})"


@dataclass(frozen=True)
class CoVisitation(Definition):
    """Per item, the ``top_k`` items the same users viewed within ``gap`` of it, counted over
    the window (most co-visited first, ties by item id)."""

    gap: timedelta = timedelta(minutes=30)
    window: Window = field(default_factory=lambda: Sliding(timedelta(days=1), timedelta(hours=1)))
    top_k: int = 20
    max_views: int = 50  # a user's views kept for pairing: bounds what a bot can cost

    @property
    def entity_kind(self) -> EntityKind:
        return item

    @property
    def dtype(self) -> str:
        return "array<string>"

    def semantics(self) -> str:
        return (f"covisit|{int(self.gap.total_seconds())}|{int(self.window.size.total_seconds())}/"
                f"{int(self.window.slide.total_seconds())}|{self.top_k}|{self.max_views}")


@dataclass(frozen=True)
class Ranking:
    """The ranker's inputs beyond the built-in views: definitions of the user or of the
    candidate item, each a number (``ranking = Ranking(features=[...])`` in a catalogue).

    The trainer learns from them and the API scores with them; at most one per catalogue.
    It becomes the Feast ``FeatureService`` named ``name``, with the built-in views."""

    features: Sequence[Definition] = ()
    name: str = "ranking"

    def names(self, kind: EntityKind) -> tuple[str, ...]:
        """The listed definitions of one entity kind, in the order written."""
        return tuple(d.name for d in self.features if isinstance(d, Definition) and d.entity_kind == kind)


# --- validation ----------------------------------------------------------------------------

class DefinitionError(ValueError):
    """Bad definitions; ``problems`` lists one ``name: field: what to fix`` per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("invalid feature definitions:\n  " + "\n  ".join(problems))
        self.problems = problems


NAME = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
RESERVED = ("user_recent", "item_recent", "item_covisit", "trending")  # the built-in views


def _check_window(d: Definition, window: Any, out: list[str]) -> None:
    if not isinstance(window, Sliding | Tumbling):
        out.append(f"{d.name}: window: expected Sliding(size=..., slide=...) or Tumbling(size=...)")
        return
    size, slide = window.size, window.slide
    if not isinstance(size, timedelta) or not isinstance(slide, timedelta):
        out.append(f"{d.name}: window: size and slide are timedeltas, e.g. timedelta(hours=1)")
        return
    if slide <= timedelta(0) or size <= timedelta(0):
        out.append(f"{d.name}: window: size and slide must be positive")
        return
    if size.total_seconds() % 1 or slide.total_seconds() % 1:
        out.append(f"{d.name}: window: use whole seconds")
        return
    if size < slide:
        out.append(f"{d.name}: window: the window ({_fmt(size)}) is shorter than its slide ({_fmt(slide)}); "
                   "make size >= slide")
    elif size % slide:
        out.append(f"{d.name}: window: size {_fmt(size)} is not a whole number of slides ({_fmt(slide)}); "
                   "the window is built of slides")
    elif size // slide > 1440:
        out.append(f"{d.name}: window: {size // slide} slides per window; use at most 1440 (a longer slide)")


def _check_feature(d: Feature, out: list[str]) -> None:
    if d.entity not in ENTITY_KINDS:
        out.append(f"{d.name}: entity: unknown entity {d.entity!r}; use one of "
                   + ", ".join(e.name for e in ENTITY_KINDS))
    agg = d.aggregation
    if not isinstance(agg, Count | Sum | Mean | Min | Max | DistinctCount | LastN):
        out.append(f"{d.name}: aggregation: expected Count(), Sum/Mean/Min/Max(of=...), DistinctCount(of=...) or "
                   "LastN(of=..., n=...)")
    elif isinstance(agg, _OfNumber):
        if isinstance(agg.of, dict):
            unknown = [b for b in agg.of if b not in BEHAVIORS]
            if unknown:
                out.append(f"{d.name}: aggregation: unknown behavior {unknown[0]!r} in the weights; use "
                           + ", ".join(BEHAVIORS))
            if not all(isinstance(w, int | float) and not isinstance(w, bool) for w in agg.of.values()):
                out.append(f"{d.name}: aggregation: weights must be numbers")
        elif agg.of not in NUMBER_FIELDS:
            out.append(f"{d.name}: aggregation: of={agg.of!r} is not a number of an event; use one of "
                       + ", ".join(NUMBER_FIELDS) + " or weights per behavior")
    elif isinstance(agg, DistinctCount | LastN):
        if agg.of not in STRING_FIELDS:
            out.append(f"{d.name}: aggregation: of={agg.of!r} is not an event field; use one of "
                       + ", ".join(STRING_FIELDS))
        if isinstance(agg, LastN) and not (isinstance(agg.n, int) and 1 <= agg.n <= 200):
            out.append(f"{d.name}: aggregation: n={agg.n!r}; use 1 to 200")
    if d.behaviors is not None:
        if isinstance(d.behaviors, str) or not d.behaviors:
            out.append(f"{d.name}: behaviors: give a non-empty list such as ['view'], or None for every behavior")
        else:
            for b in d.behaviors:
                if b not in BEHAVIORS:
                    out.append(f"{d.name}: behaviors: unknown behavior {b!r}; use one of " + ", ".join(BEHAVIORS))
    _check_window(d, d.window, out)


def _check_ratio(d: Ratio, names: dict[str, Definition], out: list[str]) -> None:
    for side in ("numerator", "denominator"):
        f = getattr(d, side)
        if not isinstance(f, Feature):
            out.append(f"{d.name}: {side}: expected a Feature defined in the catalogue")
        elif names.get(f.name) is not f:
            out.append(f"{d.name}: {side}: {f.name!r} is not among the definitions; define it too")
        elif f.aggregation.dtype not in ("int64", "float64"):
            out.append(f"{d.name}: {side}: {f.name} is not a number ({f.aggregation.describe()})")
    if isinstance(d.numerator, Feature) and isinstance(d.denominator, Feature) \
            and d.numerator.entity != d.denominator.entity:
        out.append(f"{d.name}: denominator: ratio of incompatible entities ({d.numerator.name} is per "
                   f"{d.numerator.entity}, {d.denominator.name} per {d.denominator.entity}); use two features "
                   "of one entity")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (d.prior, d.prior_weight)) \
            or d.prior_weight < 0:
        out.append(f"{d.name}: prior_weight: use numbers, prior_weight >= 0")


def _check_covisit(d: CoVisitation, out: list[str]) -> None:
    _check_window(d, d.window, out)
    if not isinstance(d.gap, timedelta) or d.gap <= timedelta(0):
        out.append(f"{d.name}: gap: a positive timedelta, e.g. timedelta(minutes=30)")
    if not (isinstance(d.top_k, int) and 1 <= d.top_k <= 200):
        out.append(f"{d.name}: top_k: {d.top_k!r}; use 1 to 200")
    if not (isinstance(d.max_views, int) and 2 <= d.max_views <= 1000):
        out.append(f"{d.name}: max_views: {d.max_views!r}; use 2 to 1000")


def validate(defs: Iterable[Definition]) -> list[str]:
    """Every problem, as ``definition: field: what is wrong and how to fix it``."""
    out: list[str] = []
    names: dict[str, Definition] = {}
    defs = list(defs)
    for d in defs:
        if not isinstance(d, Definition):
            out.append(f"{d!r}: not a definition (Feature, Ratio or CoVisitation)")
            continue
        if not isinstance(d.name, str) or not NAME.match(d.name):
            out.append(f"{d.name!r}: name: use lower_snake_case starting with a letter, at most 63 characters")
        elif d.name in RESERVED:
            out.append(f"{d.name}: name: taken by a built-in feature view; choose another")
        elif d.name in names:
            out.append(f"{d.name}: name: duplicate name; another definition is called {d.name!r} too")
        else:
            names[d.name] = d
    for d in defs:
        if not isinstance(d, Definition):
            continue
        if not isinstance(d.ttl, timedelta) or d.ttl <= timedelta(0):
            out.append(f"{d.name}: ttl: a positive timedelta, how long a value stays valid online")
        if not isinstance(d.owner, str) or not d.owner.strip():
            out.append(f"{d.name}: owner: say who answers for this feature (a team or an address)")
        if not isinstance(d.description, str) or not d.description.strip():
            out.append(f"{d.name}: description: say what the value means")
        if not isinstance(d.tags, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                   for k, v in d.tags.items()):
            out.append(f"{d.name}: tags: a dict of strings to strings")
        if isinstance(d, Feature):
            _check_feature(d, out)
        elif isinstance(d, Ratio):
            _check_ratio(d, names, out)
        elif isinstance(d, CoVisitation):
            _check_covisit(d, out)
    return out


def validate_ranking(r: Ranking, defs: Iterable[Definition]) -> list[str]:
    """Every problem of a ranking service against its catalogue's definitions."""
    known = {d.name: d for d in defs}
    if not isinstance(r.features, list | tuple):
        return ["ranking: features: a list of definitions, e.g. features=[user_views_1h]"]
    out: list[str] = []
    for d in r.features:
        if not isinstance(d, Definition):
            out.append(f"ranking: features: {d!r} is not a definition; list Feature or Ratio objects")
        elif known.get(d.name) is not d:
            out.append(f"ranking: features: {d.name!r} is not among the catalogue's definitions; define it at the "
                       "catalogue's top level")
        elif d.entity_kind not in (user, item):
            out.append(f"ranking: features: {d.name} is per {d.entity_kind}; the ranker reads the user's and the "
                       "candidate item's values, so list user or item definitions")
        elif d.dtype not in ("int64", "float64"):
            out.append(f"ranking: features: {d.name} is not a number ({d.dtype}); the ranker weighs numbers")
    names = [d.name for d in r.features if isinstance(d, Definition)]
    out += [f"ranking: features: {n} is listed twice" for n in sorted({n for n in names if names.count(n) > 1})]
    return out


# --- catalogues ----------------------------------------------------------------------------

def collect(module: Any) -> list[Definition]:
    """The definitions at a module's top level, in the order they were written."""
    return [v for v in vars(module).values() if isinstance(v, Definition)]


def _module(spec: str) -> Any:
    try:
        if spec.endswith(".py"):
            path = Path(spec)
            if not path.is_file():
                raise DefinitionError([f"{spec}: no such file (FRESHREC_FEATURES)"])
            mod_spec = importlib.util.spec_from_file_location(f"freshrec_features_{path.stem}", path)
            assert mod_spec and mod_spec.loader
            module = importlib.util.module_from_spec(mod_spec)
            sys.modules[mod_spec.name] = module
            mod_spec.loader.exec_module(module)
            return module
        return importlib.import_module(spec)
    except DefinitionError:
        raise
    except Exception as exc:  # noqa: BLE001 - an analyst's file: say where it broke, not a traceback
        raise DefinitionError([f"{spec}: cannot load the definitions: {exc.__class__.__name__}: {exc}"]) from exc


def load(spec: str) -> list[Definition]:
    """Definitions from a module name (``features.catalog``) or a ``.py`` file; raises
    :class:`DefinitionError` naming every problem."""
    defs = collect(_module(spec))
    problems = validate(defs)
    if problems:
        raise DefinitionError(problems)
    return defs


def load_ranking(spec: str) -> Ranking:
    """The catalogue's :class:`Ranking` (an empty one when it declares none), checked against
    its definitions; raises :class:`DefinitionError` naming every problem."""
    module = _module(spec)
    defs = collect(module)
    found = [v for v in vars(module).values() if isinstance(v, Ranking)]
    if len(found) > 1:
        raise DefinitionError([f"{spec}: {len(found)} Ranking declarations; keep one"])
    ranking = found[0] if found else Ranking()
    problems = validate(defs) + validate_ranking(ranking, defs)
    if problems:
        raise DefinitionError(problems)
    return ranking
