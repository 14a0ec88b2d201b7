"""The real-time feature job: behavior events in, Feast online features out.

    Kafka behavior-events
      -> parse + validate (bad or too-late events -> DLQ topic, with the reason)
      -> key by user  -> recent counts, last-N views, top categories   (user_recent)
      -> key by item  -> recent views/carts/buys, buy rate              (item_recent)
      -> key by user  -> co-visit pairs -> key by item -> neighbours    (item_covisit)
      -> item_recent  -> trending list
      -> Redis in Feast's layout, and every written row to the feature-log topic

Event time is the Kafka record timestamp (our producers set it to the event's ``ts``);
watermarks lag the newest event by FRESHREC_OUT_OF_ORDERNESS_MS, and events older than the
watermark minus FRESHREC_ALLOWED_LATENESS_MS go to the DLQ. Values update on every event
(see streaming/state.py for why that stays exact out of order).

Run: ``python -m jobs.feature_job`` with FRESHREC_* variables set (``freshrec up`` does).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from pyflink.common import Duration, Types, WatermarkStrategy
from pyflink.common.serialization import SimpleStringSchema
from pyflink.datastream import (
    KeyedProcessFunction,
    MapFunction,
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
from pyflink.datastream.state import ValueStateDescriptor

from connectors.schema import InvalidEvent, dead_letter, validate
from features.definitions import trending_key
from freshrec.config import Settings
from jobs.topics import feature_log_topic
from streaming.flink import environment
from streaming.state import Ev, ItemState, Neighbours, RecentViews, Trending, UserState

JOB_NAME = "freshrec-features"
EVENT = Types.TUPLE([Types.STRING(), Types.STRING(), Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])
# (feature view, entity, event ts ms, JSON of values)
ROW = Types.TUPLE([Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])
PAIR = Types.TUPLE([Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])
DLQ = OutputTag("dlq", Types.STRING())
TRENDING_VIEW = "trending"


class ParseEvents(ProcessFunction):
    """Validate raw JSON; refused and too-late events leave through the DLQ side output."""

    def __init__(self, allowed_lateness_ms: int) -> None:
        self.allowed_lateness_ms = allowed_lateness_ms

    def process_element(self, value: str, ctx: ProcessFunction.Context):  # noqa: ANN201
        try:
            e = validate(value)
        except InvalidEvent as err:
            yield DLQ, dead_letter(value, err, "feature_job").decode()
            return
        watermark = ctx.timer_service().current_watermark()
        if e.ts < watermark - self.allowed_lateness_ms:
            late = InvalidEvent("ts", f"late by {watermark - e.ts} ms; the allowed lateness is "
                                      f"{self.allowed_lateness_ms} ms (FRESHREC_ALLOWED_LATENESS_MS)")
            yield DLQ, dead_letter(value, late, "feature_job").decode()
            return
        yield e.event_id, e.user_id, e.item_id, e.behavior, e.ts, e.category_id or ""


class _Keyed(KeyedProcessFunction):
    """Holds one pickled state object per key."""

    factory: type = object

    def open(self, runtime_context: RuntimeContext) -> None:
        self.state = runtime_context.get_state(ValueStateDescriptor("state", Types.PICKLED_BYTE_ARRAY()))

    def load(self) -> Any:
        return self.state.value() or self.factory()


class UserFeatures(_Keyed):
    factory = UserState

    def __init__(self, s: Settings) -> None:
        self.window_ms, self.last_n, self.top_k = s.window_seconds * 1000, s.last_n, s.top_categories

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        ev = Ev(*value)
        st: UserState = self.load()
        if st.add(ev, self.window_ms, self.last_n):
            self.state.update(st)
            yield "user_recent", ev.user_id, st.newest, json.dumps(st.features(self.top_k))


class ItemFeatures(_Keyed):
    factory = ItemState

    def __init__(self, s: Settings) -> None:
        self.window_ms = s.window_seconds * 1000

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        ev = Ev(*value)
        st: ItemState = self.load()
        if st.add(ev, self.window_ms):
            self.state.update(st)
            yield "item_recent", ev.item_id, st.newest, json.dumps(st.features())


class CoVisitPairs(_Keyed):
    factory = RecentViews

    def __init__(self, s: Settings) -> None:
        self.gap_ms = s.covisit_gap_seconds * 1000
        self.keep_ms = self.gap_ms + s.allowed_lateness_ms

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        st: RecentViews = self.load()
        yield from st.add(Ev(*value), self.gap_ms, self.keep_ms, max_views=50)
        self.state.update(st)


class CoVisitNeighbours(_Keyed):
    factory = Neighbours

    def __init__(self, s: Settings) -> None:
        self.window_ms, self.top_k = s.covisit_window_seconds * 1000, s.covisit_top_k

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        item, other, ts, pair_id = value
        st: Neighbours = self.load()
        if st.add(other, ts, pair_id, self.window_ms):
            self.state.update(st)
            yield "item_covisit", item, st.newest, json.dumps(st.features(self.top_k))


class TrendingItems(_Keyed):
    """One global list; recomputed at most every 200 ms, and once more when input pauses."""

    factory = Trending
    EVERY_MS = 200

    def __init__(self, s: Settings) -> None:
        self.window_ms, self.size = s.window_seconds * 1000, s.trending_size

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        _, item, ts, payload = value
        st: Trending = self.load()
        st.update(item, json.loads(payload)["events"], ts)
        self.state.update(st)
        ctx.timer_service().register_processing_time_timer(
            (ctx.timer_service().current_processing_time() // self.EVERY_MS + 1) * self.EVERY_MS)

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        st: Trending = self.load()
        top = st.top(self.size, self.window_ms)
        self.state.update(st)
        yield TRENDING_VIEW, "", st.newest, json.dumps(top)


class FeastSink(MapFunction):
    """Writes each row to Redis before passing it on: a checkpoint barrier that follows a row
    follows its write too, so a restored job never misses one (rewrites are idempotent)."""

    def __init__(self, s: Settings) -> None:
        self.settings = s

    def open(self, runtime_context: RuntimeContext) -> None:
        import redis

        from connectors.feast_redis import FeastRedisWriter
        from features.definitions import FEATURE_VIEWS

        self.client = redis.Redis.from_url(self.settings.redis_url)
        self.writer = FeastRedisWriter(self.client, self.settings.feast_project, FEATURE_VIEWS)
        self.trending_key = trending_key(self.settings.feast_project)

    def map(self, value: tuple) -> str:
        view, entity, ts, payload = value
        for attempt in range(8):
            try:
                if view == TRENDING_VIEW:
                    self.client.set(self.trending_key, json.dumps({"ts": ts, "items": json.loads(payload)}))
                else:
                    self.writer.write([(view, entity, ts, json.loads(payload))])
                break
            except (OSError, ConnectionError) as exc:
                # Redis restarting: back off, then fail the task so Flink restarts from a checkpoint.
                if attempt == 7:
                    raise RuntimeError(f"Redis unreachable at {self.settings.redis_url}: {exc}") from exc
                time.sleep(min(0.1 * 2**attempt, 5))
        return json.dumps({"view": view, "entity": entity, "ts": ts, "values": json.loads(payload)})


def _kafka_sink(s: Settings, topic: str) -> KafkaSink:
    return (KafkaSink.builder()
            .set_bootstrap_servers(s.kafka_bootstrap)
            .set_record_serializer(KafkaRecordSerializationSchema.builder()
                                   .set_topic(topic)
                                   .set_value_serialization_schema(SimpleStringSchema())
                                   .build())
            .set_delivery_guarantee(DeliveryGuarantee.AT_LEAST_ONCE)
            .build())


def build(env: Any, s: Settings) -> None:
    """source -> transformations -> sinks, as drawn in the module docstring."""
    source = (KafkaSource.builder()
              .set_bootstrap_servers(s.kafka_bootstrap)
              .set_topics(s.events_topic)
              .set_group_id(f"{JOB_NAME}-{s.feast_project}")
              .set_starting_offsets(KafkaOffsetsInitializer.earliest())
              .set_value_only_deserializer(SimpleStringSchema())
              .set_property("session.timeout.ms", "6000")
              .build())
    watermarks = (WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(s.out_of_orderness_ms))
                  .with_idleness(Duration.of_millis(s.idle_timeout_ms)))
    raw = env.from_source(source, watermarks, s.events_topic)

    events = raw.process(ParseEvents(s.allowed_lateness_ms), output_type=EVENT).name("parse")
    events.get_side_output(DLQ).sink_to(_kafka_sink(s, s.dlq_topic)).name("dlq")

    by_user = events.key_by(lambda e: e[1], key_type=Types.STRING())
    by_item = events.key_by(lambda e: e[2], key_type=Types.STRING())
    users = by_user.process(UserFeatures(s), output_type=ROW).name("user_recent")
    items = by_item.process(ItemFeatures(s), output_type=ROW).name("item_recent")
    pairs = (events.filter(lambda e: e[3] == "view")
             .key_by(lambda e: e[1], key_type=Types.STRING())
             .process(CoVisitPairs(s), output_type=PAIR).name("covisit_pairs"))
    covisit = (pairs.key_by(lambda p: p[0], key_type=Types.STRING())
               .process(CoVisitNeighbours(s), output_type=ROW).name("item_covisit"))
    trending = (items.key_by(lambda r: "all", key_type=Types.STRING())
                .process(TrendingItems(s), output_type=ROW).name("trending"))

    written = users.union(items, covisit, trending).map(FeastSink(s), output_type=Types.STRING()).name("feast")
    written.sink_to(_kafka_sink(s, feature_log_topic(s))).name("feature_log")


def main() -> int:
    settings = Settings.from_env()
    env = environment(settings, f"{JOB_NAME}-{settings.feast_project}")
    build(env, settings)
    print(f"[{JOB_NAME}] reading {settings.events_topic} at {settings.kafka_bootstrap}, "
          f"writing Feast project {settings.feast_project} at {settings.redis_url}", file=sys.stderr, flush=True)
    env.execute(JOB_NAME)
    return 0


if __name__ == "__main__":
    sys.exit(main())
