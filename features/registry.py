"""The catalogue's definitions as Feast objects, and what applying them would change.

Each definition is a feature view of its own name holding one feature of that name, so its
owner, description, TTL and tags sit on the view, where ``feast ui`` shows them; the window,
entity, aggregation and a fingerprint of what it computes are tags too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from feast import FeatureService, FeatureView, Field, FileSource
from feast.types import Array, Float64, Int64, String

from features.definitions import FEATURE_VIEWS, category, item, user
from features.dsl import CoVisitation, Definition, Feature, Ranking, Ratio, load
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


def ranking_views(ranking: Ranking) -> list[FeatureView]:
    """What the ranker reads: the built-in views and a view per listed definition."""
    return [*FEATURE_VIEWS, *definition_views(ranking.features)]


def ranking_service(ranking: Ranking) -> FeatureService:
    """The ranker's inputs as Feast sees them (:func:`ranking_views`)."""
    return FeatureService(name=ranking.name, features=ranking_views(ranking),
                          description="What the ranker weighs: the built-in views and the catalogue's Ranking "
                                      "definitions; the trainer learns from them, the API scores with them.",
                          owner="recsys@freshrec", tags={"team": "recsys"})


def service_names(service: FeatureService | None) -> list[str]:
    """The definitions a registered ranking service lists (beyond the built-in views)."""
    built_in = {v.name for v in FEATURE_VIEWS}
    return [p.name for p in service.feature_view_projections if p.name not in built_in] if service else []


@dataclass
class Plan:
    """What ``freshrec features apply`` would change in the registry."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)  # computes differently: history needs a backfill
    described: list[str] = field(default_factory=list)  # only metadata (owner, description, TTL, tags)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    ranking: list[str] | None = None  # the ranking service's new definitions, when they change

    @property
    def empty(self) -> bool:
        return not (self.added or self.changed or self.described or self.removed or self.ranking is not None)

    @property
    def restarts(self) -> list[str]:
        """Jobs that must restart to run the new catalogue."""
        jobs = ["the catalogue job"] if (self.added or self.changed or self.removed) else []
        if self.ranking is not None:  # the training examples, the model's inputs and what the API reads
            jobs += ["the feature job", "the trainer", "the API"]
        return jobs

    @property
    def backfills(self) -> list[str]:
        return self.added + self.changed

    def render(self) -> str:
        lines = []
        for mark, title, names in (("+", "added", self.added), ("~", "changed (values differ)", self.changed),
                                   ("*", "metadata only", self.described), ("-", "removed", self.removed)):
            for n in names:
                lines.append(f"  {mark} {n}  [{title}]")
        if self.ranking is not None:
            lines.append("  ~ ranking service: the built-in views" + "".join(f", {n}" for n in self.ranking))
        if self.empty:
            return f"No changes: {len(self.unchanged)} definitions match the registry."
        out = ["Feature definitions vs the registry:", *lines]
        out.append("Jobs to restart: " + (", ".join(self.restarts) or "none"))
        if self.backfills:
            out.append("Backfill for history: freshrec backfill --source FILES --from T1 --to T2 "
                       f"(covers {', '.join(self.backfills)})")
        return "\n".join(out)


def plan(defs: list[Definition], registered: list[FeatureView], ranking: Ranking | None = None,
         registered_ranking: FeatureService | None = None) -> Plan:
    """Compare the catalogue (and its ranking service, when given) with the registry's."""
    p = Plan()
    if ranking is not None:
        names = [d.name for d in ranking.features]
        if names != service_names(registered_ranking) or registered_ranking is None:
            p.ranking = names
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

