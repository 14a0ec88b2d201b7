"""The feature views the streaming job fills, declared for Feast.

Reviewed like code: each view says what it holds, who owns it, and how long a value stays
valid in the online store. The feature job reads these objects to know which fields to
write, so a field's name and type live here and nowhere else.

Offline copies land as Parquet under ``offline/<view>/`` of the Feast repo directory.
"""

from __future__ import annotations

from datetime import timedelta

from feast import Entity, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float64, Int64, String

user = Entity(name="user", join_keys=["user_id"], value_type=ValueType.STRING,
              description="An app user, by the id the app sends in events.")
item = Entity(name="item", join_keys=["item_id"], value_type=ValueType.STRING,
              description="A recommendable item.")
category = Entity(name="category", join_keys=["category_id"], value_type=ValueType.STRING,
                  description="An item category, as events name it.")


def _offline(view: str) -> FileSource:
    return FileSource(name=f"{view}_log", path=f"offline/{view}", timestamp_field="event_timestamp")


user_recent = FeatureView(
    name="user_recent",
    entities=[user],
    ttl=timedelta(days=2),
    schema=[
        Field(name="user_id", dtype=String),
        Field(name="views", dtype=Int64, description="views in the window"),
        Field(name="clicks", dtype=Int64, description="clicks in the window"),
        Field(name="carts", dtype=Int64, description="add-to-carts in the window"),
        Field(name="favs", dtype=Int64, description="favourites in the window"),
        Field(name="buys", dtype=Int64, description="purchases in the window"),
        Field(name="last_viewed_items", dtype=Array(String), description="newest first"),
        Field(name="last_bought_items", dtype=Array(String), description="newest first; serving excludes them"),
        Field(name="top_categories", dtype=Array(String), description="most frequent in the window"),
    ],
    source=_offline("user_recent"),
    owner="recsys@freshrec",
    description="What the user did recently; window = FRESHREC_WINDOW_SECONDS, as of their newest event.",
    tags={"team": "recsys", "job": "feature_job"},
)

item_recent = FeatureView(
    name="item_recent",
    entities=[item],
    ttl=timedelta(days=2),
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="views", dtype=Int64, description="views in the window"),
        Field(name="carts", dtype=Int64, description="add-to-carts in the window"),
        Field(name="buys", dtype=Int64, description="purchases in the window"),
        Field(name="events", dtype=Int64, description="all behaviors in the window"),
        Field(name="buy_rate", dtype=Float64, description="buys / views in the window (0 without views)"),
        Field(name="category", dtype=String, description="the category its newest event named (empty if none)"),
    ],
    source=_offline("item_recent"),
    owner="recsys@freshrec",
    description="How the item is doing recently, as of its newest event.",
    tags={"team": "recsys", "job": "feature_job"},
)

item_covisit = FeatureView(
    name="item_covisit",
    entities=[item],
    ttl=timedelta(days=7),
    schema=[
        Field(name="item_id", dtype=String),
        Field(name="neighbours", dtype=Array(String), description="items viewed close in time by the same users"),
        Field(name="neighbour_counts", dtype=Array(Float64),
              description="co-visit counts, each 1 / (1 + its views' gap / FRESHREC_COVISIT_PROXIMITY_SECONDS), "
                          "halved per FRESHREC_COVISIT_HALF_LIFE_SECONDS since it happened, as of the item's "
                          "newest co-visit; aligned with neighbours"),
    ],
    source=_offline("item_covisit"),
    owner="recsys@freshrec",
    description="Item-to-item co-visitation within FRESHREC_COVISIT_GAP_SECONDS, fading with event time.",
    tags={"team": "recsys", "job": "feature_job"},
)

ENTITIES = [user, item, category]


FEATURE_VIEWS = [user_recent, item_recent, item_covisit]
