"""The default feature catalogue: what freshrec computes for every deployment.

Add a definition here (or in your own module named by FRESHREC_FEATURES), run
``freshrec features validate`` and ``freshrec features plan``, then ``freshrec features apply``:
the catalogue job picks it up when it restarts, and ``freshrec backfill`` fills its history.
List it in ``ranking`` (at the end) and the ranker learns from it and the API scores with it;
``freshrec evaluate --features NAME,...`` measures a log with and without it first.
"""

from datetime import timedelta

from features.dsl import (
    Count,
    CoVisitation,
    DistinctCount,
    Feature,
    LastN,
    Max,
    Ranking,
    Ratio,
    Sliding,
    Sum,
    Tumbling,
    category,
    item,
    user,
    user_category,
)

HOUR = Sliding(size=timedelta(hours=1), slide=timedelta(minutes=5))
DAY = Sliding(size=timedelta(days=1), slide=timedelta(hours=1))
OWNER = "recsys@freshrec"

user_views_1h = Feature(
    name="user_views_1h", entity=user, aggregation=Count(), behaviors=["view"], window=HOUR,
    ttl=timedelta(days=2), owner=OWNER, description="Items the user viewed in the last hour.",
    tags={"team": "recsys", "use": "ranking"},
)
user_engagement_1d = Feature(
    name="user_engagement_1d", entity=user, window=DAY,
    aggregation=Sum(of={"view": 1, "click": 2, "fav": 3, "cart": 4, "buy": 8}),
    ttl=timedelta(days=3), owner=OWNER, description="Weighted activity of the user over the last day.",
    tags={"team": "recsys", "use": "ranking"},
)
user_distinct_items_1h = Feature(
    name="user_distinct_items_1h", entity=user, aggregation=DistinctCount(of="item_id"), window=HOUR,
    ttl=timedelta(days=2), owner=OWNER, description="Different items the user touched in the last hour.",
    tags={"team": "recsys", "use": "ranking"},
)
user_last_categories = Feature(
    name="user_last_categories", entity=user, aggregation=LastN(of="category_id", n=5), window=DAY,
    ttl=timedelta(days=3), owner=OWNER, description="Categories of the user's newest events, newest first.",
    tags={"team": "recsys", "use": "candidates"},
)
user_category_views_1h = Feature(
    name="user_category_views_1h", entity=user_category, aggregation=Count(), behaviors=["view"],
    window=HOUR, ttl=timedelta(days=2), owner=OWNER,
    description="Views by the user of items in the category in the last hour.", tags={"team": "recsys"},
)
user_category_last_seen = Feature(
    name="user_category_last_seen", entity=user_category, aggregation=Max(of="ts"), window=DAY,
    ttl=timedelta(days=3), owner=OWNER,
    description="Event time (ms) of the user's newest event in the category within a day.", tags={"team": "recsys"},
)
item_views_1h = Feature(
    name="item_views_1h", entity=item, aggregation=Count(), behaviors=["view"], window=HOUR,
    ttl=timedelta(days=2), owner=OWNER, description="Views of the item in the last hour.",
    tags={"team": "recsys", "use": "ranking"},
)
item_buys_1h = Feature(
    name="item_buys_1h", entity=item, aggregation=Count(), behaviors=["buy"], window=HOUR,
    ttl=timedelta(days=2), owner=OWNER, description="Purchases of the item in the last hour.",
    tags={"team": "recsys", "use": "ranking"},
)
item_buy_rate_1h = Ratio(
    name="item_buy_rate_1h", numerator=item_buys_1h, denominator=item_views_1h, prior=0.01, prior_weight=20,
    ttl=timedelta(days=2), owner=OWNER,
    description="Buys per view in the last hour, pulled towards 1% while views are few.",
    tags={"team": "recsys", "use": "ranking"},
)
item_buyers_1d = Feature(
    name="item_buyers_1d", entity=item, aggregation=DistinctCount(of="user_id"), behaviors=["buy"],
    window=DAY, ttl=timedelta(days=3), owner=OWNER, description="Different users who bought the item today.",
    tags={"team": "recsys"},
)
category_views_1h = Feature(
    name="category_views_1h", entity=category, aggregation=Count(), behaviors=["view"],
    window=Tumbling(size=timedelta(hours=1)), ttl=timedelta(days=2), owner=OWNER,
    description="Views in the category since the start of the hour.", tags={"team": "merchandising"},
)
item_covisited_1d = CoVisitation(
    name="item_covisited_1d", gap=timedelta(minutes=30), window=DAY, top_k=10, ttl=timedelta(days=7),
    owner=OWNER, description="Items viewed within 30 minutes of this one by the same users, today.",
    tags={"team": "recsys", "use": "candidates"},
)

ranking = Ranking(features=[user_views_1h, user_engagement_1d, user_distinct_items_1h, item_views_1h,
                            item_buy_rate_1h, item_buyers_1d])
