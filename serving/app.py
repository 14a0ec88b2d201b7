"""The recommendation API.

For apps:  ``GET /recommendations`` (and ``POST`` with context), ``POST /events``.
For operators: ``GET /model``, ``/model/versions``, ``/status``, ``/healthz``, ``/readyz``,
``/metrics``, and, with the ``X-API-Key`` from FRESHREC_ADMIN_API_KEY, ``/admin/rollback``,
``/admin/publish`` and ``/admin/canary``. For analysts: ``GET /features`` and
``/features/values``. For people: the live page at ``/ui/`` (serving/ui/), which reads only
these endpoints. The request path is serving/request_path.py; the served versions
serving/models.py.

Run: ``uvicorn serving.app:app`` with FRESHREC_* variables set (``freshrec up`` does).
OpenAPI docs are at ``/docs``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any

import orjson
import redis
from fastapi import Body, Depends, FastAPI, HTTPException, Query, Request, Response, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, Field

from connectors.embedded import port_bindable
from connectors.feast_redis import FeastRedisReader
from connectors.kafka import BrokerError, EventProducer
from connectors.schema import InvalidEvent
from features.dsl import KEY_SEPARATOR
from features.registry import DEFINED_TAG, all_views
from freshrec.config import Settings
from online_learning.publish import ParameterStore
from online_learning.threads import one_thread
from serving.limits import BodyLimit
from serving.metrics import Metrics, RequestTimer
from serving.models import ServedModels, UnknownVersion, freeze_heap
from serving.request_path import Answer, Context, RequestPath, ranking_reader
from serving.status import StatusFeed

UI = Path(__file__).parent / "ui"
log = logging.getLogger("freshrec.api")

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


class VersionInfo(BaseModel):
    version: int
    kind: str  # snapshot (a rollback target) or delta
    created_ms: int
    examples: int | None
    auc: float | None  # prequential AUC when it was published
    rollback_of: int | None
    head: bool  # the newest version (what the API follows)


class Versions(BaseModel):
    served: int  # the version this API process serves
    versions: list[VersionInfo]  # the newest snapshots and the head, oldest first


class FeatureViewInfo(BaseModel):
    name: str
    built_in: bool  # written by the feature job itself (False: a catalogue definition)
    join_keys: list[str]
    features: list[str]
    owner: str
    description: str
    ttl_s: int
    tags: dict[str, str]  # window, aggregation, entity ... for catalogue definitions


class FeatureValues(BaseModel):
    entity: dict[str, str]  # the join keys asked for
    views: dict[str, dict[str, Any]]  # view -> {"values": {feature: value} or None, "event_ms": ...}


def create_app(settings: Settings | None = None, own_process: bool = False, standby: bool = False) -> FastAPI:
    """``own_process``: the app is all the process does (uvicorn's workers), so it may set
    process-wide things: one BLAS/torch thread, and a frozen heap (serving/models.py).
    ``standby``: start, load the served model and follow it, but listen only once the API's
    port is free (serving/standby.py)."""
    settings = settings or Settings.from_env()
    if own_process:
        one_thread()  # workers share few cores (online_learning/threads.py)
    timeout = settings.redis_timeout_ms / 1000
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=timeout, socket_connect_timeout=timeout)
    reader, inputs = ranking_reader(client, settings)
    producer: list[EventProducer] = []  # created on first ingest, so the API starts without a broker
    # Versions move whole snapshots (a rollback copies one: tens of MB), so the follower and the
    # admin endpoints have a client with a longer timeout than the request path's.
    store = ParameterStore(redis.Redis.from_url(settings.redis_url, socket_timeout=10, socket_connect_timeout=2),
                           settings.feast_project)
    models = ServedModels(store, settings.model_poll_ms, freeze=own_process)
    path = RequestPath(client, reader, models, settings.feast_project, settings.item_cache_ms,
                       inputs=inputs)
    metrics = Metrics(models, path)
    # The page's views: every feature view, the catalogue's too, through a reader of their own
    # (the request path's caches stay the hot path's).
    views = all_views(settings)
    page_reader = FeastRedisReader(client, settings.feast_project, views, cache_entries=10_000)
    feed = StatusFeed(settings, api=lambda: model().model_dump(), extra=lambda: {"requests": metrics.recent()})

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if own_process:
            freeze_heap()  # the imports; again once a model is in
        # The first answer is scored by the current model (uvicorn listens once this returns).
        try:
            await asyncio.to_thread(models.refresh)
        except (redis.RedisError, OSError, ValueError, UnknownVersion) as exc:
            log.warning("no model yet (%s); following the store for one", exc)
        models.start()
        if standby:
            print(f"warm spare ready (model version {models.version}); waiting for port {settings.api_port}",
                  flush=True)
            while not port_bindable(settings.api_host, settings.api_port):
                await asyncio.sleep(0.05)
        yield
        feed.stop()
        models.stop()
        for p in producer:
            p.close()
        client.close()

    app = FastAPI(title="freshrec", version="0.2.0", lifespan=lifespan,
                  description="Real-time recommendations from a streaming feature pipeline.")
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes)
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
              responses={413: {"description": "the body is over FRESHREC_MAX_BODY_BYTES; nothing was read"},
                         422: {"description": "some events were refused (they went to the DLQ)"},
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

    @app.get("/model/versions", response_model=Versions, responses={503: {"description": "Redis unavailable"}})
    def model_versions() -> Versions:
        """The newest snapshots (rollback targets) and the newest version, as `freshrec model list` shows them."""
        try:
            history = store.history(20)
        except redis.RedisError as exc:
            raise HTTPException(503, f"parameter store unavailable: {exc}") from exc
        return Versions(served=models.version, versions=[VersionInfo(**v) for v in history])

    @app.get("/status")
    def status() -> dict[str, Any]:
        """Each part of the pipeline (what `freshrec status --json` prints), collected about once
        a second while asked for, with event rates and this process's recent requests."""
        return feed.latest()

    # -- for analysts ----------------------------------------------------------------------------
    @app.get("/features", response_model=list[FeatureViewInfo])
    def feature_views() -> list[FeatureViewInfo]:
        """Every feature view: the feature job's own and each catalogue definition, with its metadata."""
        return [FeatureViewInfo(name=v.name, built_in=DEFINED_TAG not in (v.tags or {}),
                                join_keys=[c.name for c in v.entity_columns], features=[f.name for f in v.features],
                                owner=v.owner, description=v.description,
                                ttl_s=int(v.ttl.total_seconds()) if v.ttl else 0,
                                tags={k: t for k, t in (v.tags or {}).items() if k != DEFINED_TAG}) for v in views]

    @app.get("/features/values", response_model=FeatureValues,
             responses={404: {"description": "no feature view has these join keys"},
                        503: {"description": "Redis unavailable"}})
    def feature_values(
        user_id: Annotated[str | None, Query(pattern=ID)] = None,
        item_id: Annotated[str | None, Query(pattern=ID)] = None,
        category_id: Annotated[str | None, Query(pattern=ID)] = None,
    ) -> FeatureValues:
        """The newest values of every view whose join keys are all given (a user's views, an
        item's, a category's, and with user_id and category_id the pair's)."""
        given = {k: v for k, v in (("user_id", user_id), ("item_id", item_id), ("category_id", category_id)) if v}
        wanted = [(name, layout) for name, layout in page_reader.layouts.items()
                  if layout.join_keys and set(layout.join_keys) <= set(given)]
        if not wanted:
            raise HTTPException(404, "no feature view is keyed by " + (", ".join(given) or "nothing")
                                + "; give user_id, item_id and/or category_id")
        requests = [(name, KEY_SEPARATOR.join(given[k] for k in layout.join_keys)) for name, layout in wanted]
        try:
            rows = page_reader.read(requests)
        except redis.RedisError as exc:
            raise HTTPException(503, f"online store unavailable: {exc}") from exc
        out = {}
        for (name, _), row in zip(requests, rows, strict=True):
            values = dict(row) if row else None
            event_ms = values.pop("_event_ts_ms", None) if values else None
            out[name] = {"values": values, "event_ms": event_ms}
        return FeatureValues(entity=given, views=out)

    # -- for people: the live page (/ui redirects to /ui/, which serves index.html) ---------------
    app.mount("/ui", StaticFiles(directory=UI, html=True), name="ui")

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
