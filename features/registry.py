"""The catalogue's definitions as Feast objects, and what applying them would change.

Each definition is a feature view of its own name holding one feature of that name, so its
owner, description, TTL and tags sit on the view, where ``feast ui`` shows them; the window,
entity, aggregation and a fingerprint of what it computes are tags too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from feast import FeatureView, Field, FileSource
from feast.types import Array, Float64, Int64, String

from features.definitions import FEATURE_VIEWS, category, item, user
from features.dsl import CoVisitation, Definition, Feature, Ratio, load
from freshrec.config import Settings

_DTYPES = {"int64": Int64, "float64": Float64, "array<string>": Array(String)}
_ENTITIES = {"user": [user], "item": [item], "category": [category], "user_category": [user, category]}
DEFINED_TAG = "freshrec.definition"  # marks views made from the catalogue (the others are built in)


def _describe(d: Definition) -> dict[str, str]:
    if isinstance(d, Feature):
        return {"aggregation": d.aggregation.describe(), "window": str(d.window),
                "behaviors": ",".join(d.behaviors) if d.behaviors else "all"}
    if isinstance(d, Ratio):
        return {"aggregation": f"ratio({d.numerator.name} / {d.denominator.name}, prior {d.prior} "
                               f"x {d.prior_weight})"}
    assert isinstance(d, CoVisitation)
    return {"aggregation": f"covisit(gap {d.gap}, top {d.top_k})", "window": str(d.window)}


def feature_view(d: Definition) -> FeatureView:
    return FeatureView(
        name=d.name,
        entities=_ENTITIES[d.entity_kind.name],
        ttl=d.ttl,
        schema=[*(Field(name=k, dtype=String) for k in d.entity_kind.join_keys),
                Field(name=d.name, dtype=_DTYPES[d.dtype], description=d.description)],
        source=FileSource(name=f"{d.name}_log", path=f"offline/{d.name}", timestamp_field="event_timestamp"),
        owner=d.owner,
        description=d.description,
        tags={**d.tags, **_describe(d), "entity": d.entity_kind.name, DEFINED_TAG: d.fingerprint()},
    )


def definition_views(defs: Iterable[Definition]) -> list[FeatureView]:
    return [feature_view(d) for d in defs]


def all_views(settings: Settings, defs: list[Definition] | None = None) -> list[FeatureView]:
    """Every feature view the job writes: the built-in ones and the catalogue's."""
    return [*FEATURE_VIEWS, *definition_views(load(settings.features) if defs is None else defs)]


@dataclass
class Plan:
    """What ``freshrec features apply`` would change in the registry."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # computes differently: history needs a backfill
    described: list[str] = field(default_factory=list)  # only metadata (owner, description, TTL, tags)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.described or self.removed)

    @property
    def restarts(self) -> list[str]:
        """Jobs that must restart to run the new catalogue."""
        return ["freshrec-features (the streaming feature job)"] if (self.added or self.changed or self.removed) \
            else []

    @property
    def backfills(self) -> list[str]:
        return self.added + self.changed

    def render(self) -> str:
        lines = []
        for mark, title, names in (("+", "added", self.added), ("~", "changed (values differ)", self.changed),
                                   ("*", "metadata only", self.described), ("-", "removed", self.removed)):
            for n in names:
                lines.append(f"  {mark} {n}  [{title}]")
        if self.empty:
            return f"No changes: {len(self.unchanged)} definitions match the registry."
        out = ["Feature definitions vs the registry:", *lines]
        out.append("Jobs to restart: " + (", ".join(self.restarts) or "none"))
        if self.backfills:
            out.append("Backfill for history: freshrec backfill --source FILES --from T1 --to T2 "
                       f"(covers {', '.join(self.backfills)})")
        return "\n".join(out)


def plan(defs: list[Definition], registered: list[FeatureView]) -> Plan:
    """Compare the catalogue with the catalogue views already in the registry."""
    p = Plan()
    have = {v.name: v for v in registered if DEFINED_TAG in (v.tags or {})}
    for d in defs:
        old = have.pop(d.name, None)
        if old is None:
            p.added.append(d.name)
        elif old.tags.get(DEFINED_TAG) != d.fingerprint():
            p.changed.append(d.name)
        elif feature_view(d) != old:
            p.described.append(d.name)
        else:
            p.unchanged.append(d.name)
    p.removed = sorted(have)
    return p

