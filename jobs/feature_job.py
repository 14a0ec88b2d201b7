"""The real-time feature job: behavior events in, Feast online features out.

    Kafka behavior-events
      -> parse + validate (bad or too-late events -> DLQ topic, with the reason)
      -> key by user: drop duplicates; recent counts, last-N views, top categories   (user_recent)
           '-> each new event with its co-visit pairs, and the pairs its view gives other items
                -> key by item: views/carts/buys, buy rate                         (item_recent)
                                top neighbours, once per flush tick                (item_covisit)
                  -> key by category shard: per-category trending lists, partial global lists
                     -> one key, a row per shard per 200 ms: the global list       (trending)
      -> Redis in Feast's layout in pipelined batches, from Java (streaming/java's FeastJsonSink)
      -> every feature row to the feature-log topic (the offline store's input), as lines
         written in Java (FeatureLogLine)
    The item operator also hands each event, with the user's and the item's features (both item
    rows) from *before* it, keyed by user to the training-example builders -> the examples topic
    (the trainer's input). The user and item operators also fold the ranking service's
    definitions (features/dsl.Ranking), so those features come from before the event too.

No operator's per-event work sits on one key: a cluster spreads every one of them.

Event time is the Kafka record timestamp (our producers set it to the event's ``ts``);
watermarks lag the newest event by FRESHREC_OUT_OF_ORDERNESS_MS, and events older than the
watermark minus FRESHREC_ALLOWED_LATENESS_MS go to the DLQ. Values update on every event
(see streaming/state.py for why that stays exact out of order).

Run: ``python -m jobs.feature_job`` with FRESHREC_* variables set (``freshrec up`` does). On
the local mini-cluster the process also watches the log epoch (connectors/log_epoch.py): when
the broker lost its log, it cancels the job and starts over from the last checkpoint, reading
the new log from its start.

The analysts' catalogue runs as a job of its own over the same log (jobs/catalogue_job.py), so
however heavy it grows, it cannot hold back these views or the training examples.
"""

from __future__ import annotations

import json
import os
import sys
import time
import zlib
from collections.abc import Callable
from typing import Any

from pyflink.common import Duration, Row, Types, WatermarkStrategy
from pyflink.common.serialization import SerializationSchema, SimpleStringSchema
from pyflink.datastream import (
    DataStream,
    KeyedProcessFunction,
    OutputTag,
    ProcessFunction,
    RuntimeContext,
)
from pyflink.datastream.connectors.base import DeliveryGuarantee
from pyflink.datastream.connectors.kafka import (
    KafkaOffsetsInitializer,
    KafkaRecordSerializationSchema,
    KafkaSink,
    KafkaSource,
)
from pyflink.datastream.state import MapStateDescriptor, ValueStateDescriptor
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from connectors.log_epoch import Epoch, EpochWatch
from connectors.schema import (
    MAX_EVENT_BYTES,
    MAX_FUTURE_MS,
    MAX_ID_LENGTH,
    MIN_TS_MS,
    InvalidEvent,
    dead_letter,
    validate,
)
from features.dsl import load_ranking, trending_key
from freshrec.config import Settings
from jobs.topics import (
    JOB_NAME,
    epoch_topic,
    examples_topic,
    feature_job_id,
    feature_log_topic,
    prepare_log,
    topic_plan,
)
from online_learning.examples import ExampleBuilder
from streaming.aggregates import EntityState
from streaming.flink import environment
from streaming.ranking_inputs import RankingInputs
from streaming.state import (
    CategoryTrending,
    Ev,
    ItemState,
    Neighbours,
    RecentViews,
    ScoreMap,
    Spec,
    Trending,
    UserState,
    merge_partials,
    trending_shard,
)


def _event_type() -> Any:
    # Fresh objects per use: an OutputTag pickles its type, which must not hold Java handles yet.
    return Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])


EVENT = _event_type()
# (feature view, entity, event ts ms, JSON of values)
ROW = Types.TUPLE([Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])
DLQ = OutputTag("dlq", Types.STRING())
# An event + JSON of the user's features before it ("" for a new user) + the items its view was
# co-visited with, the pairs' ts ms and the ms between each pair's views. The pairs a view gives
# another item come as a record of their own, keyed by that item, with an empty event id:
# ("", "", item, "", ts, "", "", others, stamps, gaps).
ITEM_INPUTS = OutputTag("item_inputs", Types.TUPLE([*_event_type().get_field_types(), Types.STRING(),
                                                    Types.LIST(Types.STRING()), Types.LIST(Types.LONG()),
                                                    Types.LIST(Types.LONG())]))
COVISIT_ROWS = OutputTag("item_covisit", ROW)  # apart from item_recent's, which feed trending
# that + JSON of the item's features before ("" for a new item) and after it
EXAMPLE_INPUTS = OutputTag("example_inputs", Types.TUPLE([*_event_type().get_field_types(), *[Types.STRING()] * 3]))
TRENDING_VIEW = "trending"


class ParseEvents(ProcessFunction):
    """Validate raw JSON; refused and too-late events leave through the DLQ side output, named
    as from ``source``. Without ``report_invalid``, refused events are left out: another job
    reading the same log (the feature job) reports each of them. ``rows``: events as
    :class:`Row` (for a table, ``EVENT_ROW``), not tuples (:data:`EVENT`)."""

    def __init__(self, allowed_lateness_ms: int, source: str = "feature_job", report_invalid: bool = True,
                 rows: bool = False) -> None:
        self.allowed_lateness_ms, self.source, self.report_invalid = allowed_lateness_ms, source, report_invalid
        self.event = Row if rows else lambda *fields: fields
        self.watermark, self.asked_at = -(2**63), 0.0

    def process_element(self, value: str, ctx: ProcessFunction.Context):  # noqa: ANN201
        try:
            e = validate(value)
        except InvalidEvent as err:
            if self.report_invalid:
                yield DLQ, dead_letter(value, err, self.source).decode()
            return
        except Exception as exc:  # noqa: BLE001 - a bug in validation must not make the event a poison pill
            if self.report_invalid:
                yield DLQ, dead_letter(value, f"validation failed: {exc.__class__.__name__}: {exc}",
                                       self.source).decode()
            return
        now = time.monotonic()
        if now - self.asked_at > 0.01:  # a call into Java; the watermark moves slowly anyway
            self.watermark, self.asked_at = ctx.timer_service().current_watermark(), now
        watermark = self.watermark
        if e.ts < watermark - self.allowed_lateness_ms:
            late = InvalidEvent("ts", f"late by {watermark - e.ts} ms; the allowed lateness is "
                                      f"{self.allowed_lateness_ms} ms (FRESHREC_ALLOWED_LATENESS_MS)")
            yield DLQ, dead_letter(value, late, self.source).decode()
            return
        yield self.event(e.event_id, e.user_id, e.item_id, e.behavior, e.ts, e.category_id or "")


class Ticks:
    """One processing-time timer per key and tick of ``every_ms``: a key's rows wait for the
    tick, however many arrive. Which keys hold a timer is remembered here to save a call into
    Java per element; after a restore this memory is empty, timers are registered again, and
    Flink keeps one per key and time."""

    def __init__(self, every_ms: int) -> None:
        self.every_ms = every_ms
        self.tick = 0
        self.keys: set[Any] = set()

    def ensure(self, ctx: KeyedProcessFunction.Context, key: Any) -> None:
        tick = (int(time.time() * 1000) // self.every_ms + 1) * self.every_ms  # Flink's clock, too
        if tick != self.tick:
            self.tick, self.keys = tick, set()
        if key not in self.keys:
            self.keys.add(key)
            ctx.timer_service().register_processing_time_timer(tick)

    def fired(self, key: Any) -> None:
        self.keys.discard(key)


class _Keyed(KeyedProcessFunction):
    """Holds one pickled state object per key."""

    factory: type = object

    def open(self, runtime_context: RuntimeContext) -> None:
        self.state = runtime_context.get_state(ValueStateDescriptor("state", Types.PICKLED_BYTE_ARRAY()))

    def load(self) -> Any:
        return self.state.value() or self.factory()


def _horizon(ctx: KeyedProcessFunction.Context, lateness_ms: int) -> int:
    """Event time up to which parsing accepts no more events (ParseEvents' rule)."""
    return ctx.timer_service().current_watermark() - lateness_ms - 1


class UserFeatures(KeyedProcessFunction):
    """Per user: drops duplicates, keeps user_recent, and pairs views for co-visitation.
    Each new event, and the pairs its view gives other items, leave (side output) for the
    item operator."""

    def __init__(self, s: Settings) -> None:
        self.spec, self.catalogue, self.lateness_ms = Spec.of(s), s.features, s.allowed_lateness_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        self.state = runtime_context.get_state(ValueStateDescriptor("user", Types.PICKLED_BYTE_ARRAY()))
        self.ranking = RankingInputs(load_ranking(self.catalogue)).user

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        ev = Ev(*value)
        st: UserState
        views: RecentViews
        known = self.state.value()
        st, views, *defined = known or (UserState(), RecentViews(), None)  # state from before ranking: 2 parts
        ranked: EntityState | None = defined[0] if defined else None
        if known:  # for training examples: the features from before the event, no leakage
            user = st.features(self.spec)
            before = json.dumps(user | self.ranking.values(ranked) if self.ranking else user)
        else:
            before = ""
        if not st.add(ev, self.spec):
            return
        pairs = views.add(ev, self.spec) if ev.behavior == "view" else []
        if self.ranking:
            ranked = self.ranking.add(ranked, ev, lambda: _horizon(ctx, self.lateness_ms))
        self.state.update((st, views, ranked))
        yield "user_recent", ev.user_id, st.newest, json.dumps(st.features(self.spec))
        # The viewed item's own pairs travel with the event (one record, and the item operator
        # counts them after the example's "before"); each other item gets its own record.
        mine = [(other, at, gap) for item, other, at, gap in pairs if item == ev.item_id]
        yield ITEM_INPUTS, (*value, before, [p[0] for p in mine], [p[1] for p in mine], [p[2] for p in mine])
        for item, other, at, gap in pairs:
            if item != ev.item_id:
                yield ITEM_INPUTS, ("", "", item, "", at, "", "", [other], [at], [gap])


class ItemFeatures(_Keyed):
    """Per item: item_recent on every event, and the co-visitation scores (item_covisit), sent
    once per flush tick however many pairs arrived (a popular item gets hundreds a second).
    Both rows are in the item features the training examples carry, as serving reads them."""

    factory = ItemState

    def __init__(self, s: Settings) -> None:
        self.spec, self.every_ms = Spec.of(s), s.sink_flush_ms
        self.catalogue, self.lateness_ms = s.features, s.allowed_lateness_ms

    def open(self, runtime_context: RuntimeContext) -> None:
        super().open(runtime_context)
        self.neighbours = runtime_context.get_state(ValueStateDescriptor("neighbours", Types.PICKLED_BYTE_ARRAY()))
        self.ranking = RankingInputs(load_ranking(self.catalogue)).item
        self.ticks = Ticks(self.every_ms)

    def _count(self, nb: Neighbours | None, others: list[str], stamps: list[int], gaps: list[int],
               ctx: KeyedProcessFunction.Context, item: str) -> Neighbours:
        nb = nb or Neighbours()
        for other, ts, gap in zip(others, stamps, gaps, strict=True):
            nb.add(other, ts, self.spec, gap)
        self.neighbours.update(nb)
        self.ticks.ensure(ctx, item)
        return nb

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        *event, user, others, stamps, gaps = value
        if not event[0]:  # pairs another item's view gave this one
            self._count(self.neighbours.value(), others, stamps, gaps, ctx, event[2])
            return
        ev = Ev(*event)
        known = self.state.value()
        # With the ranking service's item definitions, (ItemState, their EntityState): one state
        # access per event, each costs tens of microseconds. A bare ItemState is from before them.
        st, ranked = known if isinstance(known, tuple) else (known or ItemState(), None)
        nb: Neighbours | None = self.neighbours.value()
        row = nb.features(self.spec) if nb else {}
        if self.ranking:  # beside item_recent in the examples
            row = row | self.ranking.values(ranked)
        before = json.dumps(st.features() | row) if known else ""
        st.add(ev, self.spec)
        if self.ranking:
            ranked = self.ranking.add(ranked, ev, lambda: _horizon(ctx, self.lateness_ms))
            row = row | self.ranking.values(ranked)
        self.state.update((st, ranked) if ranked else st)
        if others:
            nb = self._count(nb, others, stamps, gaps, ctx, ev.item_id)
            row = row | nb.features(self.spec)
        features = st.features()
        yield "item_recent", ev.item_id, st.newest, json.dumps(features)
        yield EXAMPLE_INPUTS, (*event, user, before, json.dumps(features | row))

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        item = ctx.get_current_key()
        self.ticks.fired(item)
        nb: Neighbours | None = self.neighbours.value()
        if nb is not None:
            yield COVISIT_ROWS, ("item_covisit", item, nb.newest, json.dumps(nb.features(self.spec)))


class TrainingExamples(KeyedProcessFunction):
    """A builder per subtask, fed keyed by user (a user's views await their conversions in one
    builder). Negatives are drawn from the items the subtask saw: every item at parallelism 1,
    those of its users' events above it. The builder's memory (the sampling pool, newest item
    features, views awaiting a conversion) is not checkpointed: after a restore it refills from
    the stream; positives are unaffected."""

    def __init__(self, s: Settings) -> None:
        self.settings = s

    def open(self, runtime_context: RuntimeContext) -> None:
        self.builder = ExampleBuilder.of(self.settings)

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        *event, user, before, after = value
        ev = Ev(*event)
        for example in self.builder.add(ev, json.loads(user) if user else None,
                                        json.loads(before) if before else None):
            yield json.dumps(example, separators=(",", ":"))
        self.builder.observe_item(ev.item_id, json.loads(after))


class _Shard:
    """One local trending key's memory: its items' scores and its categories' lists."""

    __slots__ = ("categories", "categories_sent", "last_rebuild", "sent", "trending")

    def __init__(self, trending: Trending, categories: CategoryTrending) -> None:
        self.trending, self.categories = trending, categories
        self.last_rebuild = self.categories_sent = 0
        self.sent: tuple[int, list[tuple[str, int, int]]] | None = None  # the partial last sent on


class LocalTrending(KeyedProcessFunction):
    """Trending, phase one, keyed by :func:`trending_shard`: the shard's items ranked by their
    events in the window, sent on as a partial list at most every 200 ms, and the lists of the
    shard's categories (each whole in one shard), sent at most once a second (serving re-reads
    a list once a second).

    Item scores are the only state: a MapState, so an update writes one entry. They are kept
    in memory too, per shard (a key's state is only touched while it is the current key, so
    memory and state cannot diverge). What derives from them is memory only, and a restored
    shard derives it again: its newest event, its candidates and its category lists. The
    category lists go to Redis from here in one MSET, not through the sink's checkpointed
    buffer: a list lost to a failure is sent again with the category's next event. (As rows
    through the sink they took 15-25% of the job's throughput.)"""

    EVERY_MS = 200
    CATEGORIES_EVERY_MS = 1000
    REBUILD_MS = 5000

    def __init__(self, s: Settings) -> None:
        self.window_ms, self.size = s.window_seconds * 1000, s.trending_size
        self.category_size = s.category_trending_size
        self.redis_url, self.project = s.redis_url, s.feast_project

    def open(self, runtime_context: RuntimeContext) -> None:
        self.scores = runtime_context.get_map_state(
            MapStateDescriptor("scores", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
        import redis

        self.client = redis.Redis.from_url(self.redis_url, socket_timeout=5)
        self.shards: dict[int, _Shard] = {}
        self.ticks = Ticks(self.EVERY_MS)

    def load(self, key: int) -> _Shard:
        shard = self.shards.get(key)
        if shard is None:  # the key's first call after open(): rebuild from what a checkpoint restored
            t = Trending(ScoreMap(self.scores))
            t.newest = max((v[1] for v in t.scores.values()), default=0)
            t.rebuild(self.size, self.window_ms)
            categories = (CategoryTrending.restore(t.scores, self.category_size) if self.category_size
                          else CategoryTrending())
            shard = self.shards[key] = _Shard(t, categories)
        return shard

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        _, item, ts, payload = value
        doc = json.loads(payload)
        category = doc.get("category", "")
        key = trending_shard(category, item)  # the current key, without a call into Java
        shard = self.load(key)
        if (shard.trending.update(item, doc["events"], ts, self.size, category=category) and category
                and self.category_size):
            shard.categories.update(item, category, doc["events"], ts, self.category_size)
        self.ticks.ensure(ctx, key)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        key = ctx.get_current_key()
        self.ticks.fired(key)
        shard = self.load(key)
        t = shard.trending
        if t.needs_rebuild(self.window_ms) and timestamp - shard.last_rebuild >= self.REBUILD_MS:
            shard.categories.forget(t.rebuild(self.size, self.window_ms))  # scans the shard: rate-limited
            shard.last_rebuild = timestamp
        partial = [(item, score, t.candidates[item][1]) for item, score in t.top(self.size, self.window_ms)]
        if (t.newest, partial) != shard.sent:  # a quiet shard sends nothing
            shard.sent = (t.newest, partial)
            yield TRENDING_VIEW, str(key), t.newest, json.dumps(partial)
        c = shard.categories
        if not c.touched:
            return
        if timestamp - shard.categories_sent < self.CATEGORIES_EVERY_MS:
            # a timer for the rest, in case no event comes to set one
            ctx.timer_service().register_processing_time_timer(shard.categories_sent + self.CATEGORIES_EVERY_MS)
            return
        shard.categories_sent = timestamp
        size, window = self.category_size, self.window_ms
        due = c.due(size, window, timestamp, t.newest)
        lists = {trending_key(self.project, category): json.dumps(
            {"ts": c.lists[category].newest, "items": c.top(category, size, window)}) for category in due}
        try:
            self.client.mset(lists)
        except (OSError, RedisConnectionError, RedisTimeoutError):  # sent again once Redis is back
            c.touched.update(due)


class TrendingMerge(KeyedProcessFunction):
    """Trending, phase two: the global list, the top of the shards' partial lists (their items
    are disjoint, so the top of the union is the top of all). A global list is one list, so
    this is one key; its input is at most one row per shard per 200 ms, whatever the traffic.
    An item that changed category can be in two shards for a window: its newest score counts."""

    def __init__(self, s: Settings) -> None:
        self.window_ms, self.size = s.window_seconds * 1000, s.trending_size

    def open(self, runtime_context: RuntimeContext) -> None:
        self.partials = runtime_context.get_map_state(
            MapStateDescriptor("partials", Types.STRING(), Types.PICKLED_BYTE_ARRAY()))
        self.memory: dict[str, tuple[int, list[tuple[str, int, int]]]] | None = None
        self.ticks = Ticks(LocalTrending.EVERY_MS)

    def load(self) -> dict[str, tuple[int, list[tuple[str, int, int]]]]:
        if self.memory is None:  # the first call after open(): read what a checkpoint restored
            self.memory = dict(self.partials.items())
        return self.memory

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        _, shard, newest, payload = value
        memory = self.load()
        partial = (newest, [tuple(entry) for entry in json.loads(payload)])
        if memory.get(shard) != partial:
            memory[shard] = partial
            self.partials.put(shard, partial)
            self.ticks.ensure(ctx, TRENDING_VIEW)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        self.ticks.fired(TRENDING_VIEW)
        memory = self.load()  # a restored timer can fire before any row comes
        if memory:
            newest, top = merge_partials(memory.values(), self.size, self.window_ms)
            yield TRENDING_VIEW, "", newest, json.dumps(top)


REDIS_PATIENCE_S = 60  # a Redis sink retries this long with backoff, then its task fails and restarts


def kafka_sink(s: Settings, topic: str, value_schema: Any = None) -> KafkaSink:
    """Strings (or what ``value_schema`` serializes) to ``topic``, at least once."""
    return (KafkaSink.builder()
            .set_bootstrap_servers(s.kafka_bootstrap)
            .set_record_serializer(KafkaRecordSerializationSchema.builder()
                                   .set_topic(topic)
                                   .set_value_serialization_schema(value_schema or SimpleStringSchema())
                                   .build())
            .set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
            .build())


def read_events(env: Any, s: Settings, epoch: Epoch, group: str, source: str = "feature_job",
                report_invalid: bool = True, hold_back_ms: int = 0, row_type: Any = None) -> Any:
    """The source and its parsing: Kafka behavior events -> EVENT tuples in event time (rows of
    ``row_type``, when given); refused and too-late events to the DLQ topic. Events in the wire
    form are parsed in Java (streaming/java's WireEvents), the rest by :class:`ParseEvents`, the
    schema's one home in code. ``group``: the job's consumer group. ``hold_back_ms``: the
    watermark trails the out-of-orderness bound by this much more, and lateness counts from it
    (the catalogue job holds back the allowed lateness: its operators settle at the watermark)."""
    kafka = (KafkaSource.builder()
             .set_bootstrap_servers(s.kafka_bootstrap)
             .set_topics(s.events_topic)
             .set_group_id(group)
             .set_starting_offsets(KafkaOffsetsInitializer.earliest())
             .set_value_only_deserializer(SimpleStringSchema())
             .set_property("session.timeout.ms", "6000")
             # The embedded broker holds every fetch for its full wait, even once records have come
             # (measured: Kafka's default 500 ms gave 130 ms p50 per hop, 50 ms gives 10 ms).
             .set_property("fetch.max.wait.ms", str(s.fetch_wait_ms))
             .build())
    watermarks = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(s.out_of_orderness_ms
                                                                                   + hold_back_ms))
                  .with_idleness(Duration.of_millis(s.idle_timeout_ms)))
    raw = env.from_source(kafka, watermarks, s.events_topic).uid(f"source-{epoch.id}")
    lateness = s.allowed_lateness_ms - hold_back_ms
    parse = ParseEvents(lateness, source, report_invalid, rows=row_type is not None)
    # The wire form in Java (streaming/java's WireEvents); the rest, and the DLQ's reasons, in Python.
    java = _java_class("WireEvents")
    parsed = java.attach(raw._j_data_stream, (row_type or _event_type()).get_java_type_info(), lateness, MIN_TS_MS,
                         MAX_FUTURE_MS, MAX_EVENT_BYTES, MAX_ID_LENGTH, row_type is None)
    wire = DataStream(parsed).name("parse_wire").uid("parse_wire")
    others = DataStream(java.others(parsed)).process(parse, output_type=row_type or EVENT).name("parse").uid("parse")
    others.get_side_output(DLQ).sink_to(kafka_sink(s, s.dlq_topic)).name("dlq").uid("dlq")
    return wire.union(others)


def _java_class(name: str) -> Any:
    """One of streaming/java's classes in the gateway's JVM (the jar is in pipeline.jars, or in
    the cluster's lib/)."""
    from pyflink.java_gateway import get_gateway

    return getattr(get_gateway().jvm.freshrec, name)


def _java(name: str, *args: Any) -> Any:
    """An object of one of streaming/java's classes, made in the gateway's JVM."""
    return _java_class(name)(*args)


def redis_sink(s: Settings, job: str, views: list[str] | None = None) -> Any:
    """A Redis sink in streaming/java, writing Feast's layout with no Python call per row:
    ``FeastRedisSink`` for Flink SQL's rows (entity, ts, a column per view of ``views``), or
    without ``views``, ``FeastJsonSink`` for the Python operators' :data:`ROW` s (built-in views,
    the trending list, the catalogue operators' rows of a value per definition)."""
    from pyflink.datastream.connectors.base import Sink

    from connectors.feast_redis import sink_layout
    from features.registry import all_views

    if not s.redis_url.startswith("redis://"):
        raise ValueError(f"FRESHREC_REDIS_URL={s.redis_url}: the jobs' Redis sinks speak plain TCP; "
                         "give a redis://[:password@]host:port/db URL")
    known = all_views(s)
    by_name = {v.name: v for v in known}
    timing = (s.sink_flush_ms, s.sink_batch_rows, REDIS_PATIENCE_S * 1000, job)
    if views is not None:
        return Sink(_java("FeastRedisSink", s.redis_url, sink_layout(s.feast_project, [by_name[v] for v in views]),
                          *timing))
    return Sink(_java("FeastJsonSink", s.redis_url, sink_layout(s.feast_project, known), *timing, TRENDING_VIEW,
                      trending_key(s.feast_project)))


def write_rows(s: Settings, rows: list[Any], finals: tuple[Any, ...] = (),
               sql_rows: tuple[tuple[Any, list[str]], ...] = (), trending: Any = None, log_rows: bool = True,
               job: str = JOB_NAME) -> None:
    """Feature rows (:data:`ROW`) and the ``trending`` lists -> Redis in Feast's layout, from
    Java (:func:`redis_sink`); with ``log_rows``, the rows to the feature log too, as lines
    written in Java (``FeatureLogLine``). ``finals``: lines for the feature log. ``sql_rows``:
    per entity kind, rows straight from Flink SQL and their views' names
    (streaming/definitions.attach_compiled), each to a sink chained to the query's last operator.

    No key selector: each row comes from a keyed operator, so an entity's rows reach one sink
    subtask, in order."""
    written = [*rows, trending] if trending is not None else rows
    if written:
        first, *rest = written
        first.union(*rest).sink_to(redis_sink(s, job)).name("feast").uid("feast")
    for stream, views in sql_rows:
        uid = f"feast_sql_{zlib.crc32(','.join(views).encode()):08x}"  # a kind's definitions; one sink each
        stream.sink_to(redis_sink(s, job, views)).name("feast_sql").uid(uid)
    topic = feature_log_topic(s)
    if rows and log_rows:
        first, *rest = rows
        (first.union(*rest).sink_to(kafka_sink(s, topic, SerializationSchema(_java("FeatureLogLine"))))
         .name("feature_log_rows").uid("feature_log_rows"))
    if finals:
        first, *rest = finals
        first.union(*rest).sink_to(kafka_sink(s, topic)).name("feature_log").uid("feature_log")


def build(env: Any, s: Settings, epoch: Epoch) -> None:
    """source -> transformations -> sinks, as drawn in the module docstring.

    Every stateful operator has a fixed uid, so a checkpoint restores into it whatever else
    changes. The source's uid names the log epoch: its offsets belong to that log alone."""
    events = read_events(env, s, epoch, feature_job_id(s))
    users = (events.key_by(lambda e: e[1], key_type=Types.STRING())
             .process(UserFeatures(s), output_type=ROW).name("user_recent").uid("user_recent"))
    # The uid is item_recent's from before co-visitation moved in: its state restores; the
    # co-visitation scores of the retired "item_covisit" operator are left behind and refill.
    items = (users.get_side_output(ITEM_INPUTS).key_by(lambda e: e[2], key_type=Types.STRING())
             .process(ItemFeatures(s), output_type=ROW).name("item_features").uid("item_recent"))
    examples = (items.get_side_output(EXAMPLE_INPUTS).key_by(lambda e: e[1], key_type=Types.STRING())
                .process(TrainingExamples(s), output_type=Types.STRING()).name("training_examples")
                .uid("training_examples"))
    examples.sink_to(kafka_sink(s, examples_topic(s))).name("examples").uid("examples")
    partials = (items.key_by(lambda r: trending_shard(json.loads(r[3]).get("category", ""), r[1]),
                             key_type=Types.INT())
                .process(LocalTrending(s), output_type=ROW).name("trending_local").uid("trending_local"))
    trending = (partials.key_by(lambda r: r[0], key_type=Types.STRING())
                .process(TrendingMerge(s), output_type=ROW).name("trending").uid("trending_merge"))
    write_rows(s, [users, items, items.get_side_output(COVISIT_ROWS)], trending=trending)


def log(message: str, job: str = JOB_NAME) -> None:
    # stdout, also from operators: the JVM that runs them in thread mode drops its stderr.
    print(f"[{job}] {message}", flush=True)


def follow(client: Any, watch: EpochWatch, job: str = JOB_NAME) -> bool:
    """Wait on a running job; True when it was cancelled because the log was replaced. A job
    that fails for good raises here (Flink has already retried with its restart strategy)."""
    while True:
        try:
            status = client.get_job_status().result().name
        except Exception:  # noqa: BLE001 - the local mini-cluster shuts down with its only job
            status = "GONE"
        if status in ("FINISHED", "FAILED", "CANCELED", "GONE"):
            client.get_job_execution_result().result()  # raises the job's failure
            return False
        down = watch.unreachable_since
        new = watch.changed()
        if watch.unreachable_since and not down:
            log(f"the broker at {watch.bootstrap} does not answer; the job keeps its state and waits for it", job)
        elif down and not watch.unreachable_since and not new:
            log(f"the broker is back after {time.monotonic() - down:.0f}s with the same log "
                f"(epoch {watch.current})", job)
        if new is not None:
            log(f"WARNING: the event log was replaced (the broker lost its data; new log epoch {new}). "
                "Cancelling the job, then resuming every feature's state from its last checkpoint and reading "
                "the new log from its start", job)
            client.cancel().result()
            try:
                client.get_job_execution_result().result()  # returns once it is gone; raises as it was cancelled
            except Exception:  # noqa: BLE001 - py4j wraps the cancellation
                pass
            return True
        time.sleep(0.5)


def run(job: str, job_id: Callable[[Settings], str], build: Callable[[Any, Settings, Epoch], None]) -> int:
    """Build a job on the configured environment and run it: detached on a cluster; locally,
    watched, and started over in a fresh process when the broker lost its log."""
    settings = Settings.from_env()
    epoch = prepare_log(settings)
    env = environment(settings, job_id(settings))
    build(env, settings, epoch)
    log(f"reading {settings.events_topic} at {settings.kafka_bootstrap} (log epoch {epoch}), "
        f"writing Feast project {settings.feast_project} at {settings.redis_url}", job)
    if settings.flink_mode == "cluster":  # submitted detached; a durable Kafka keeps its log
        env.execute(job)
        return 0
    watch = EpochWatch(settings.kafka_bootstrap, topic_plan(settings), epoch_topic(settings),
                       settings.broker_check_ms, current=epoch)
    try:
        replaced = follow(env.execute_async(job), watch, job)
    finally:
        watch.close()
    if replaced:
        # Start over in a fresh process: this one's PyFlink objects hold Java handles that cannot be
        # pickled into a second job. The gateway JVM exits with us (its stdin closes on exec).
        os.execv(sys.executable, [sys.executable, *sys.orig_argv[1:]])
    return 0


def main() -> int:
    return run(JOB_NAME, feature_job_id, build)


if __name__ == "__main__":
    # Run as the module it is, not as __main__: cloudpickle copies __main__'s classes into the job
    # by value, and Flink's Python then imports their modules without this package's first.
    from jobs.feature_job import main as module_main

    sys.exit(module_main())
