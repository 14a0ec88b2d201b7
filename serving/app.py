"""The recommendation API: ``GET /recommendations``, ``POST /events``, ``GET /model``, ``GET /healthz``.

A request: the user's features -> candidates (co-visitation neighbours of recent views,
embedding retrieval, the user's recent items, trending) -> their item features in one
pipelined Redis round trip -> scores from the newest published model version (the
transparent scorer until one is published) -> top-k with each item's sources.

Run: ``uvicorn serving.app:app`` with FRESHREC_* variables set (``freshrec up`` does).
OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import redis
from fastapi import Body, FastAPI, HTTPException, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import BrokerError, EventProducer
from connectors.schema import InvalidEvent
from features.definitions import FEATURE_VIEWS, trending_key
from freshrec.config import Settings
from online_learning.publish import ParameterStore
from serving.candidates import merge
from serving.models import ServedModels
from serving.ranking import rank

RECENT_ITEMS = 5
SCORER = "transparent-v1"
RETRIEVE = 60


class Recommendation(BaseModel):
    item_id: str
    score: float
    sources: list[str]


class Recommendations(BaseModel):
    user_id: str
    items: list[Recommendation]
    scorer: str
    features: dict[str, int | None]  # feature view -> event time (ms) of the values used
    known_user: bool
    model_version: int | None  # the parameter version that scored (None: transparent scorer)


class ModelInfo(BaseModel):
    version: int
    published_ms: int | None
    applied_ms: int | None
    lag_ms: int | None  # now - publish time of the served version
    error: str | None
    item: dict[str, bool] | None = None  # with ?item_id=: which models have parameters for it


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[dict[str, Any]]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    reader = FeastRedisReader(client, settings.feast_project, FEATURE_VIEWS)
    producer: list[EventProducer] = []  # created on first ingest, so the API starts without a broker
    models = ServedModels(ParameterStore(client, settings.feast_project), settings.model_poll_ms)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        models.start()
        yield
        models.stop()
        for p in producer:
            p.close()
        client.close()

    app = FastAPI(title="freshrec", version="0.1.0", lifespan=lifespan,
                  description="Real-time recommendations from a streaming feature pipeline.")

    def event_producer() -> EventProducer:
        if not producer:
            producer.append(EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic,
                                          source="api"))
        return producer[0]

    app.state.models = models

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model", response_model=ModelInfo)
    def model(item_id: Annotated[str | None, Query(min_length=1, max_length=128,
                                                   description="also say whether this item has parameters")] = None,
              ) -> ModelInfo:
        """The parameter version being served and how old it is."""
        now = int(time.time() * 1000)
        return ModelInfo(version=models.version, published_ms=models.published_ms, applied_ms=models.applied_ms,
                         lag_ms=now - models.published_ms if models.published_ms else None, error=models.error,
                         item=models.knows(item_id) if item_id else None)

    @app.get("/recommendations", response_model=Recommendations)
    def recommendations(
        user_id: Annotated[str, Query(min_length=1, max_length=128, description="the app's user id")],
        k: Annotated[int, Query(ge=1, le=200, description="how many items")] = 10,
    ) -> Recommendations:
        try:
            (user,) = reader.read([("user_recent", user_id)])
            recent = list(user["last_viewed_items"] or [])[:RECENT_ITEMS] if user else []
            covisit = reader.read([("item_covisit", i) for i in recent]) if recent else []
            raw_trending = client.get(trending_key(settings.feast_project))
        except redis.RedisError as exc:
            raise HTTPException(503, f"online store unavailable: {exc}") from exc
        trending_doc = json.loads(raw_trending) if raw_trending else {"ts": None, "items": []}
        trending = [(str(i), int(n)) for i, n in trending_doc["items"]]
        rows = [c or {} for c in covisit]
        neighbours = [r.get("neighbours", []) for r in rows]
        counts = [r.get("neighbour_counts", []) for r in rows]
        freshness = {"user_recent": user["_event_ts_ms"] if user else None,
                     "item_covisit": max((r["_event_ts_ms"] for r in rows if r), default=None),
                     "trending": trending_doc["ts"]}
        items = None
        if models.recommender is not None:
            items = learned_ranking(user_id, user, recent, neighbours, counts, trending, k)
        if items is None:
            items, version, scorer = rank(neighbours, counts, trending, k, recent), None, SCORER
        else:
            items, version = items
            scorer = f"online-v{version}"
        return Recommendations(user_id=user_id, scorer=scorer, features=freshness, known_user=user is not None,
                               model_version=version,
                               items=[Recommendation(item_id=i, score=s, sources=src) for i, s, src in items])

    def learned_ranking(user_id: str, user: dict[str, Any] | None, recent: list[str], neighbours: list[list[str]],
                        counts: list[list[int]], trending: list[tuple[str, int]],
                        k: int) -> tuple[list[tuple[str, float, list[str]]], int] | None:
        """Candidates from every source, their item features in one round trip, the served model's scores."""
        covisit_ranked = rank(neighbours, counts, [], 100, recent)
        covisit = [i for i, _, _ in covisit_ranked]
        why = {i: src for i, _, src in covisit_ranked}  # "covisit:<the recent item it neighbours>"
        features = {key: v for key, v in (user or {}).items() if not key.startswith("_")}
        retrieved = models.retrieve(features, RETRIEVE, user_id, set())
        cands = merge([("covisit", covisit), ("embedding", retrieved), ("recent", recent),
                       ("trending", [i for i, _ in trending])])
        if not cands:
            return None
        try:
            item_rows = reader.read([("item_recent", i) for i, _ in cands])
        except redis.RedisError as exc:
            raise HTTPException(503, f"online store unavailable: {exc}") from exc
        item_feats = [{key: v for key, v in r.items() if not key.startswith("_")} if r else None for r in item_rows]
        scored = models.score(features or None, [(i, f) for (i, _), f in zip(cands, item_feats, strict=True)],
                              user_id)
        if scored is None:
            return None
        scores, version = scored
        order = sorted(range(len(cands)), key=lambda j: (-scores[j], cands[j][0]))[:k]
        def sources(item: str, found_by: list[str]) -> list[str]:
            return list(dict.fromkeys(x for src in found_by for x in (why[item] if src == "covisit" else [src])))

        return [(cands[j][0], round(float(scores[j]), 6), sources(*cands[j])) for j in order], version

    @app.post("/events", response_model=IngestResult,
              responses={422: {"description": "some events were refused (they went to the DLQ)"}})
    def ingest(events: Annotated[list[dict[str, Any]], Body(max_length=10_000)]) -> Any:
        """Validate a batch; good events are produced (acks=all), bad ones go to the DLQ.

        Answers 200 when all were accepted, 422 listing each refused event's index, field
        and reason otherwise (the accepted ones of that batch are still produced).
        """
        now = int(time.time() * 1000)
        errors: list[dict[str, Any]] = []
        try:
            p = event_producer()
            for i, raw in enumerate(events):
                result = p.send(raw, now)
                if isinstance(result, InvalidEvent):
                    errors.append({"index": i, "field": result.field, "reason": result.reason})
            p.flush()
        except BrokerError as exc:
            raise HTTPException(503, f"event log unavailable, nothing acknowledged: {exc}") from exc
        result = IngestResult(accepted=len(events) - len(errors), rejected=len(errors), errors=errors)
        return JSONResponse(result.model_dump(), status_code=422 if errors else 200)

    return app


def __getattr__(name: str) -> Any:
    # `uvicorn serving.app:app` builds the app on first access, from the environment.
    if name == "app":
        globals()["app"] = create_app()
        return globals()["app"]
    raise AttributeError(name)
