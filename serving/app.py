"""The recommendation API: ``GET /recommendations``, ``POST /events``, ``GET /healthz``.

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
from serving.ranking import rank

RECENT_ITEMS = 5
SCORER = "transparent-v1"


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


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[dict[str, Any]]


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=2)
    reader = FeastRedisReader(client, settings.feast_project, FEATURE_VIEWS)
    producer: list[EventProducer] = []  # created on first ingest, so the API starts without a broker

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
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

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

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
        items = rank([r.get("neighbours", []) for r in rows], [r.get("neighbour_counts", []) for r in rows],
                     trending, k, recent)
        freshness = {"user_recent": user["_event_ts_ms"] if user else None,
                     "item_covisit": max((r["_event_ts_ms"] for r in rows if r), default=None),
                     "trending": trending_doc["ts"]}
        return Recommendations(user_id=user_id, scorer=SCORER, features=freshness, known_user=user is not None,
                               items=[Recommendation(item_id=i, score=s, sources=src) for i, s, src in items])

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
