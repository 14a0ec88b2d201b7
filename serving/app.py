"""The recommendation API.

For apps:  ``GET /recommendations`` (and ``POST`` with context), ``POST /events``.
For operators: ``GET /model``, ``/healthz``, ``/readyz``, ``/metrics``, and, with the
``X-API-Key`` from FRESHREC_ADMIN_API_KEY, ``/admin/rollback``, ``/admin/publish`` and
``/admin/canary``. The request path is serving/request_path.py; the served versions
serving/models.py.

Run: ``uvicorn serving.app:app`` with FRESHREC_* variables set (``freshrec up`` does).
OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import hmac
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Annotated, Any

import orjson
import redis
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from pydantic import BaseModel, Field

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import BrokerError, EventProducer
from connectors.schema import InvalidEvent
from features.definitions import FEATURE_VIEWS
from freshrec.config import Settings
from online_learning.publish import ParameterStore
from online_learning.threads import one_thread
from serving.metrics import Metrics, RequestTimer
from serving.models import ServedModels, UnknownVersion, freeze_heap
from serving.request_path import Answer, Context, RequestPath

# Ids are the app's own; refuse only what cannot be one (empty, whitespace, control characters).
ID = r"^[^\s\x00-\x1f\x7f]{1,128}$"
MAX_PAGE = 50
KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False, description="FRESHREC_ADMIN_API_KEY")


def _clear_422(request: Request, exc: RequestValidationError) -> JSONResponse:
    """Each problem as ``{field, message}``: the field by name, what to send instead."""
    problems = []
    for err in exc.errors():
        field = ".".join(str(p) for p in err["loc"][1:]) or str(err["loc"][0])
        message = err["msg"]
        if err["type"] == "string_pattern_mismatch":
            message = "must be 1-128 characters without spaces or control characters"
        problems.append({"field": field, "message": message, "in": err["loc"][0]})
    return JSONResponse({"detail": problems}, status_code=422)


class Recommendation(BaseModel):
    item_id: str
    score: float
    sources: list[str]


class Recommendations(BaseModel):
    user_id: str
    items: list[Recommendation]
    scorer: str
    model_version: int | None  # the parameter version that scored (None: transparent scorer)
    model_role: str | None  # live, canary or pinned
    features: dict[str, int | None]  # feature view -> event time (ms) of the newest value used
    known_user: bool
    degraded: bool  # answered without the online store (Redis down or slow)
    degraded_reason: str | None = None
    page: int = 0
    stages_ms: dict[str, float] | None = None  # with debug=true
    candidates: int | None = None  # with debug=true: how many were scored


class RecommendationQuery(BaseModel):
    user_id: str = Field(pattern=ID, description="the app's user id")
    k: int = Field(10, ge=1, le=200, description="how many items")
    current_item: str | None = Field(None, pattern=ID, description="the item on screen: its neighbours come first, "
                                                                   "it is not recommended")
    page: int = Field(0, ge=0, le=MAX_PAGE, description="0 for the first k, 1 for the next k, ...")
    exclude: list[Annotated[str, Field(pattern=ID)]] = Field(default_factory=list, max_length=500,
                                                             description="items not to recommend")
    model_version: int | None = Field(None, ge=1, description="score with this stored version")
    debug: bool = Field(False, description="add the time spent per stage")


class ModelInfo(BaseModel):
    version: int
    published_ms: int | None
    applied_ms: int | None
    lag_ms: int | None  # now - publish time of the served version
    error: str | None
    canary: dict[str, float] | None = None  # {"version": V, "share": s}
    item: dict[str, bool] | None = None  # with ?item_id=: which models have parameters for it


class IngestResult(BaseModel):
    accepted: int
    rejected: int
    errors: list[dict[str, Any]]


class VersionRef(BaseModel):
    version: int = Field(ge=1, description="a stored snapshot version (`freshrec model list`)")


class CanaryShare(BaseModel):
    version: int = Field(ge=1, description="a stored version to send part of the traffic to")
    share: float = Field(ge=0.0, le=1.0, description="share of users (by a stable hash of their id)")


class Published(BaseModel):
    version: int  # the new head version
    of: int  # the snapshot it republishes


def create_app(settings: Settings | None = None, own_process: bool = False) -> FastAPI:
    """``own_process``: the app is all the process does (uvicorn's workers), so it may set
    process-wide things: one BLAS/torch thread, and a frozen heap (serving/models.py)."""
    settings = settings or Settings.from_env()
    if own_process:
        one_thread()  # workers share few cores (online_learning/threads.py)
    timeout = settings.redis_timeout_ms / 1000
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    reader = FeastRedisReader(client, settings.feast_project, FEATURE_VIEWS)
    producer: list[EventProducer] = []  # created on first ingest, so the API starts without a broker
    store = ParameterStore(client, settings.feast_project)
    # The follower may wait on big snapshots: its own client, with a longer timeout.
    models = ServedModels(ParameterStore(redis.Redis.from_url(settings.redis_url, socket_timeout=10),
                                         settings.feast_project), settings.model_poll_ms, freeze=own_process)
    path = RequestPath(client, reader, models, settings.feast_project, settings.item_cache_ms)
    metrics = Metrics(models, path)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_process:
            freeze_heap()  # the imports; again once a model is in
        models.start()
        yield
        models.stop()
        for p in producer:
            p.close()
        client.close()

    app = FastAPI(title="freshrec", version="0.2.0", lifespan=lifespan,
                  description="Real-time recommendations from a streaming feature pipeline.")
    app.state.models = models
    app.state.path = path
    app.add_exception_handler(RequestValidationError, _clear_422)  # type: ignore[arg-type]

    def event_producer() -> EventProducer:
        if not producer:
            # A request waits at most ~5 s on a broker that is gone (then a 503), not kafka-python's 30-60 s.
            producer.append(EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic,
                                          source="api", max_block_ms=5000, bootstrap_timeout_ms=5000))
        return producer[0]

    # -- for apps --------------------------------------------------------------------------------
    def answer(q: RecommendationQuery) -> Response:
        # Blocking Redis reads inside async handlers: a request is CPU-bound and its round trips
        # take ~0.1 ms, so the thread-pool hop would cost more than it frees. A slow Redis blocks
        # a worker for at most FRESHREC_REDIS_TIMEOUT_MS, once a second (the breaker).
        try:
            a: Answer = path.recommend(q.user_id, q.k, Context(q.current_item, q.page, frozenset(q.exclude)),
                                       q.model_version)
        except UnknownVersion as exc:
            raise HTTPException(404, str(exc)) from exc
        for stage, ms in a.stages_ms.items():
            metrics.stage.labels(stage).observe(ms / 1000)
        for source, n in a.sources.items():
            metrics.candidates.labels(source).inc(n)
        if a.degraded:
            metrics.degraded.inc()
        body: dict[str, Any] = {
            "user_id": q.user_id, "scorer": a.scorer, "model_version": a.model_version, "model_role": a.model_role,
            "features": a.features, "known_user": a.known_user, "degraded": a.degraded, "page": q.page,
            "items": [{"item_id": i, "score": s, "sources": src} for i, s, src in a.items]}
        if a.degraded_reason:
            body["degraded_reason"] = a.degraded_reason
        if q.debug:
            body["stages_ms"], body["candidates"] = a.stages_ms, a.candidates
        # Built by hand and serialized once (orjson): FastAPI's response_model pass would
        # validate the same fields again; the model below documents the shape.
        return Response(orjson.dumps(body), media_type="application/json")

    @app.get("/recommendations", response_model=Recommendations, response_model_exclude_none=True,
             responses={404: {"description": "model_version is not stored"}})
    async def recommendations(
        user_id: Annotated[str, Query(pattern=ID, description="the app's user id")],
        k: Annotated[int, Query(ge=1, le=200, description="how many items")] = 10,
        page: Annotated[int, Query(ge=0, le=MAX_PAGE, description="0 for the first k, 1 for the next k")] = 0,
        current_item: Annotated[str | None, Query(pattern=ID, description="the item on screen")] = None,
        model_version: Annotated[int | None, Query(ge=1, description="score with this stored version")] = None,
        debug: Annotated[bool, Query(description="add the time spent per stage")] = False,
    ) -> Response:
        """Top-k items for a user, each with the sources that found it. Never a 5xx for a slow or
        absent online store: the answer is then ``degraded`` (trending and the served model)."""
        return answer(RecommendationQuery.model_construct(user_id=user_id, k=k, page=page, current_item=current_item,
                                                          exclude=[], model_version=model_version, debug=debug))

    @app.post("/recommendations", response_model=Recommendations, response_model_exclude_none=True,
              responses={404: {"description": "model_version is not stored"}})
    async def recommendations_in_context(query: RecommendationQuery) -> Response:
        """The same, with context: the item on screen, the page, items to leave out."""
        return answer(query)

    @app.post("/events", response_model=IngestResult,
              responses={422: {"description": "some events were refused (they went to the DLQ)"},
                         503: {"description": "the event log is unreachable; nothing was acknowledged"}})
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
            p.flush(timeout_s=10)
        except BrokerError as exc:
            if producer:  # the next request starts with a new connection
                producer.pop().abort()
            raise HTTPException(503, f"event log unavailable, nothing acknowledged: {exc}") from exc
        result = IngestResult(accepted=len(events) - len(errors), rejected=len(errors), errors=errors)
        return JSONResponse(result.model_dump(), status_code=422 if errors else 200)

    # -- for operators ---------------------------------------------------------------------------
    @app.get("/model", response_model=ModelInfo)
    def model(item_id: Annotated[str | None, Query(pattern=ID, description="also say whether this item has "
                                                                           "parameters")] = None) -> ModelInfo:
        """The parameter version being served, how old it is, and the canary."""
        now = int(time.time() * 1000)
        canary = models.canary
        return ModelInfo(version=models.version, published_ms=models.published_ms, applied_ms=models.applied_ms,
                         lag_ms=now - models.published_ms if models.published_ms else None, error=models.error,
                         canary={"version": canary[0], "share": canary[1]} if canary else None,
                         item=models.knows(item_id) if item_id else None)

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        """The process is alive (for restarts); readiness is /readyz."""
        return {"status": "ok"}

    @app.get("/readyz", responses={503: {"description": "not ready, with the reasons"}})
    def readyz() -> JSONResponse:
        """Ready for traffic: Redis answers and a model version is loaded."""
        problems = []
        try:
            client.ping()
        except redis.RedisError as exc:
            problems.append(f"redis unreachable: {exc}")
        if models.recommender is None:
            problems.append("no model version loaded yet (is the trainer running?)")
        body = {"ready": not problems, "problems": problems, "model_version": models.version}
        return JSONResponse(body, status_code=503 if problems else 200)

    @app.get("/metrics", response_class=Response)
    def prometheus() -> Response:
        """Prometheus text format."""
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    # -- admin (API key) -------------------------------------------------------------------------
    def admin(key: Annotated[str | None, Security(KEY_HEADER)]) -> None:
        if not settings.admin_api_key:
            raise HTTPException(401, "admin endpoints are disabled: set FRESHREC_ADMIN_API_KEY on the API")
        if not key or not hmac.compare_digest(key.encode(), settings.admin_api_key.encode()):
            raise HTTPException(401, "missing or wrong X-API-Key header", headers={"WWW-Authenticate": "APIKey"})

    def republish(version: int, why: str) -> Published:
        try:
            return Published(version=store.rollback(version, why=why), of=version)
        except ValueError as exc:
            raise HTTPException(404, str(exc)) from exc
        except redis.RedisError as exc:
            raise HTTPException(503, f"parameter store unavailable: {exc}") from exc

    protected: dict[str, Any] = {"dependencies": [Depends(admin)],
                                 "responses": {401: {"description": "no or wrong X-API-Key"},
                                               404: {"description": "the version is not stored"},
                                               503: {"description": "Redis unavailable"}}}

    @app.post("/admin/rollback", response_model=Published, **protected)
    def rollback(body: VersionRef) -> Published:
        """Serve an earlier snapshot again (published as the newest version; the trainer follows)."""
        return republish(body.version, "rollback_of")

    @app.post("/admin/publish", response_model=Published, **protected)
    def promote(body: VersionRef) -> Published:
        """Make a stored snapshot (e.g. the canary) the version everyone gets."""
        result = republish(body.version, "promoted")
        canary = store.canary()
        if canary and canary[0] == body.version:
            store.set_canary(None)
        return result

    @app.put("/admin/canary", response_model=CanaryShare, **protected)
    def set_canary(body: CanaryShare) -> CanaryShare:
        """Send a share of users to a stored version (it is loaded and warmed up first)."""
        try:
            if store.chain_to(body.version) is None:
                raise HTTPException(404, f"model version {body.version} is not stored; `freshrec model list`")
            store.set_canary(body.version, body.share)
        except redis.RedisError as exc:
            raise HTTPException(503, f"parameter store unavailable: {exc}") from exc
        return body

    @app.delete("/admin/canary", status_code=204, response_class=Response, **protected)
    def end_canary() -> Response:
        """Everyone back on the live version."""
        try:
            store.set_canary(None)
        except redis.RedisError as exc:
            raise HTTPException(503, f"parameter store unavailable: {exc}") from exc
        return Response(status_code=204)

    app.add_middleware(RequestTimer, metrics=metrics)
    return app


def __getattr__(name: str) -> Any:
    # `uvicorn serving.app:app` builds the app on first access, from the environment.
    if name == "app":
        globals()["app"] = create_app(own_process=True)
        return globals()["app"]
    raise AttributeError(name)
