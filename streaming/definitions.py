"""The feature catalogue (features/dsl.py) wired into PyFlink operators.

    de-duplicated events -> per entity kind with definitions: key by its key -> Definitions
                         '-> key by user -> CoVisitPairs -> key by item -> Definitions (pairs)
    Definitions emit, per record, the entity's online row (streaming only) and, as the
    horizon passes (the watermark minus ``settle_ms``; in batch, the end of input), a final
    row per distinct event time: the rows the offline store keeps.

The backfill (jobs/backfill.py) calls :func:`attach` in batch runtime mode: these Python
operators over streaming/aggregates.py. The catalogue job runs the same graph in Java,
:func:`attach_java` (streaming/java's ``Definitions`` and ``CoVisitPairs``, aggregates.py's
rules ported one for one, held equal to the backfill by tests/test_parity.py), and counts,
sums, means, min and max in Flink SQL (:func:`attach_compiled`, streaming/sql.py): a GROUP BY
per entity for the online values (its aggregate, streaming/java's pane_merge, merges the
newest windows' panes), and the stream plan for the final rows. ``FRESHREC_CATALOGUE_ENGINE=
python`` runs :func:`attach` in the stream too: the engine before, a baseline.

Why not Flink SQL windows: a SQL window emits once the watermark passes its end and drops
late rows silently. Apps need a value within a second of each event, and late events within
the allowed lateness must still count (and correct the offline rows).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Collection
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, OutputTag, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from connectors.schema import dead_letter
from features.dsl import DEFINED, KEY_SEPARATOR, CoVisitation, Definition, EntityKind, Feature, LastN, item, load
from streaming.aggregates import EntityState, Op, Plan, Rec
from streaming.cached_state import CachedValueState
from streaming.sql import EVENT_COLUMNS
from streaming.state import Ev, RecentViews, Spec

if TYPE_CHECKING:
    from streaming.batch import DayFiles  # pyarrow: only the backfill's workers load it

# The feature-row "view" of catalogue values is DEFINED + the operator's name: one row carries
# every definition an operator computes for an entity (rows of one view and entity replace each
# other while they wait for Redis, so each operator needs a view of its own).
ROW = Types.TUPLE([Types.STRING(), Types.STRING(), Types.LONG(), Types.STRING()])


def _rec_type() -> Any:
    return Types.TUPLE([Types.LONG(), *[Types.STRING()] * 6])


REC = _rec_type()
FINAL = OutputTag("final", Types.STRING())
LATE = OutputTag("late", Types.STRING())
TIMER_STEP_MS = 5000  # final rows leave in steps of this much event time: one timer per key and step
BATCH_END = 2**62
# The GROUP BYs and the Java entity operators hand on an entity's values at most this often:
# latency against sink rows.
MINI_BATCH_MS = 100


def final_row(view: str, entity: str, ts: int, values: dict[str, Any]) -> str:
    """A final row as the feature log carries it (connectors/offline_store.py reads it)."""
    return json.dumps({"view": view, "entity": entity, "ts": ts, "values": values, "final": True},
                      separators=(",", ":"))


def plans(defs: list[Definition]) -> tuple[dict[EntityKind, list[Definition]], list[CoVisitation]]:
    """Definitions by the entity kind whose events they read; co-visitation reads pairs."""
    by_kind: dict[EntityKind, list[Definition]] = {}
    covisits = [d for d in defs if isinstance(d, CoVisitation)]
    for d in defs:
        if not isinstance(d, CoVisitation):
            by_kind.setdefault(d.entity_kind, []).append(d)
    return by_kind, covisits


def max_window_ms(defs: list[Definition]) -> int:
    """How far back an entity's values reach: windows, plus the gap of co-visit pairs."""
    reach = [d.window.size + (d.gap if isinstance(d, CoVisitation) else timedelta(0))
             for d in defs if isinstance(d, Feature | CoVisitation)]
    return int(max(reach, default=timedelta(0)).total_seconds() * 1000)


class Definitions(KeyedProcessFunction):
    """One entity kind's definitions over its records; state: one EntityState per key."""

    def __init__(self, catalogue: str, names: list[str], lateness_ms: int, online: bool, view: str,
                 files: DayFiles | None = None) -> None:
        # The catalogue is loaded again in the worker by name: an analyst's file is no importable module.
        self.catalogue, self.names, self.view = catalogue, names, view
        self.lateness_ms, self.online, self.files = lateness_ms, online, files

    def open(self, runtime_context: RuntimeContext) -> None:
        defs = [d for d in load(self.catalogue) if d.name in self.names]
        self.plan = Plan.of(defs)
        self.reach_ms = max_window_ms(defs)
        self.state = CachedValueState(runtime_context.get_state(ValueStateDescriptor("entity",
                                                                                 Types.PICKLED_BYTE_ARRAY())))
        self.timers: set[tuple[str, int]] = set()  # saves a call into Java per record; refilled after a restore
        self.batch_key: str | None = None
        self.batch_state = EntityState()
        if self.files:
            # get_index_of_this_subtask() fails in thread mode (PyFlink 2.3 calls a removed Java method).
            self.files.open(f"{self.view[1:]}-{uuid.uuid4().hex[:8]}")

    def close(self) -> None:
        if self.files:
            self.files.flush()

    def _timer(self, ctx: KeyedProcessFunction.Context, key: str, at: int) -> None:
        at = -(-at // TIMER_STEP_MS) * TIMER_STEP_MS
        if (key, at) not in self.timers:
            self.timers.add((key, at))
            ctx.timer_service().register_event_time_timer(at)

    def _load(self, key: str) -> EntityState:
        if self.online:
            return self.state.value(key) or EntityState()
        # Batch: a key's records come together and nothing is checkpointed, so its state stays in
        # memory (pickling it per record made the backfill quadratic in a key's records).
        if self.batch_key != key:
            self.batch_key, self.batch_state = key, EntityState()
        return self.batch_state

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        r = Rec(*value)
        key = ctx.get_current_key()
        st = self._load(key)
        if not st.add(r, self.plan, self.online):
            # Passed parsing but came after its time settled here (a watermark read slightly stale).
            yield LATE, dead_letter(json.dumps(r._asdict()), f"ts: {r.ts} is behind the settled horizon of "
                                    f"{key!r} ({st.horizon}); FRESHREC_ALLOWED_LATENESS_MS bounds lateness",
                                    "feature_job").decode()
            return
        if not self.online:  # settled once, at the end of the key's input
            self._timer(ctx, key, BATCH_END)
            return
        self.state.update(key, st)
        # Settled once no event this old can be accepted any more.
        self._timer(ctx, key, r.ts + self.lateness_ms + 1)
        yield self.view, key, st.newest, json.dumps(st.online(self.plan))

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        key = ctx.get_current_key()
        self.timers.discard((key, timestamp))
        if not self.online:
            if self.batch_key != key:  # would lose the key's records: Flink's batch mode no longer sorts by key
                raise RuntimeError(f"batch timer for {key!r} after the records of {self.batch_key!r}")
            for ts, values in self.batch_state.settle(timestamp, self.plan):
                self.files.add(self.view, key, ts, values)
            self.batch_key = None
            return
        st: EntityState | None = self.state.value(key)
        if st is None:
            return
        horizon = timestamp - self.lateness_ms - 1
        for ts, values in st.settle(horizon, self.plan):
            yield FINAL, final_row(self.view, key, ts, values)
        if not st.open and horizon > st.newest + self.reach_ms:
            self.state.clear(key)  # every window has emptied: a quiet entity costs nothing
            return
        self.state.update(key, st)
        if not st.open:
            self._timer(ctx, key, st.newest + self.reach_ms + self.lateness_ms + 2)


def state_ttl_ms(defs: list[Definition], lateness_ms: int) -> int:
    """How long the compiled operators keep an entity's state after its last change: until no
    window can reach its records and no late record can join them, twice over, because state
    TTL runs in processing time (a job catching up moves event time faster, which is safe)."""
    return 2 * (max_window_ms(defs) + lateness_ms)


class CoVisitPairs(KeyedProcessFunction):
    """Per user: each view pairs with the user's other views within the gap (both ways)."""

    def __init__(self, d: CoVisitation, lateness_ms: int) -> None:
        gap = int(d.gap.total_seconds() * 1000)
        self.spec = Spec(covisit_gap_ms=gap, covisit_keep_ms=gap + lateness_ms, covisit_max_views=d.max_views)

    def open(self, runtime_context: RuntimeContext) -> None:
        self.state = CachedValueState(runtime_context.get_state(ValueStateDescriptor("views",
                                                                                 Types.PICKLED_BYTE_ARRAY())))

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        r = Rec(*value)
        if r.behavior != "view":
            return
        views: RecentViews = self.state.value(r.user_id) or RecentViews()
        pairs = views.add(Ev(r.rid, r.user_id, r.item_id, r.behavior, r.ts, r.category_id), self.spec)
        self.state.update(r.user_id, views)
        rid = f"{r.user_id}{KEY_SEPARATOR}{r.rid}"
        # The viewed item's pairs of one time leave as one record (partners joined): its state is
        # then read, written and sent to Redis once, not once per partner. Each partner's own pair
        # goes to its own key.
        mine: dict[int, list[str]] = {}
        for it, other, at, _ in pairs:  # an analyst's CoVisitation counts each pair 1
            if it == r.item_id:
                mine.setdefault(at, []).append(other)
            else:
                yield at, rid, "view", r.user_id, it, "", other
        for at, others in mine.items():
            yield at, rid, "view", r.user_id, r.item_id, "", KEY_SEPARATOR.join(others)


def _to_rec(e: tuple) -> tuple:
    event_id, user_id, item_id, behavior, ts, category_id = e[:6]
    return ts, event_id, behavior, user_id, item_id, category_id or "", ""


def _keyer(kind: EntityKind) -> Any:
    fields = [Rec._fields.index(k) for k in kind.join_keys]
    return lambda r: KEY_SEPARATOR.join(r[i] for i in fields)


def _complete(kind: EntityKind) -> Any:
    fields = [Rec._fields.index(k) for k in kind.join_keys]
    return lambda r: all(r[i] for i in fields)


def attach(events: Any, catalogue: str, lateness_ms: int, online: bool, files: DayFiles | None = None,
           names: Collection[str] | None = None,
           settle_ms: int | None = None) -> tuple[list[Any], list[Any], list[Any]]:
    """Wire the catalogue (only ``names`` of it, when given) onto a stream of de-duplicated
    events (the job's EVENT tuples); returns the online-row streams, the final-row streams and
    the late-record streams. In batch (not ``online``), ``files`` writes the final rows
    instead: no final-row streams. Rows settle ``settle_ms`` behind the watermark: the
    lateness, unless the watermark already holds it back (``read_events(hold_back_ms=)``)."""
    settle_ms = lateness_ms if settle_ms is None else settle_ms
    if not online and files is None:
        raise ValueError("attach(online=False) needs files: the batch operators write their final rows there")
    defs = [d for d in load(catalogue) if names is None or d.name in names]
    rows, finals, late = [], [], []
    if not defs:  # no operator: a Python map with no reader would still run per record
        return rows, finals, late
    by_kind, covisits = plans(defs)
    recs = events.map(_to_rec, output_type=REC).name("catalogue_records").uid("catalogue_records")

    def run(stream: Any, kind: EntityKind, group: list[Definition], uid: str) -> None:
        out = (stream.key_by(_keyer(kind), key_type=Types.STRING())
               .process(Definitions(catalogue, [d.name for d in group], settle_ms, online, DEFINED + uid, files),
                        output_type=ROW)
               .name(uid).uid(uid))
        rows.append(out)
        if online:
            finals.append(out.get_side_output(FINAL))
        late.append(out.get_side_output(LATE))

    for kind, group in by_kind.items():
        stream = recs if kind.name in ("user", "item") else recs.filter(_complete(kind)).name(f"has_{kind}")
        run(stream, kind, group, f"catalogue_{kind}")
    for d in covisits:
        pairs = (recs.key_by(lambda r: r[3], key_type=Types.STRING())
                 .process(CoVisitPairs(d, lateness_ms), output_type=_rec_type())
                 .name(f"pairs_{d.name}").uid(f"pairs_{d.name}"))
        run(pairs, item, [d], f"catalogue_{d.name}")
    return rows, finals, late


def _op_plan(d: Feature | CoVisitation) -> dict[str, Any]:
    """A definition's arithmetic as streaming/java's EntityState reads it (aggregates.py's Op)."""
    op = Op(d)
    plan: dict[str, Any] = {"name": d.name, "kind": op.kind, "slide": op.slide_ms, "panes": op.panes,
                            "behaviors": sorted(op.behaviors) if op.behaviors else None}
    if isinstance(d, CoVisitation):
        return {**plan, "top_k": d.top_k}
    agg = d.aggregation
    of = getattr(agg, "of", "")
    plan["of"] = "weights" if isinstance(of, dict) else of
    if isinstance(of, dict):
        plan["weights"] = {b: float(w) for b, w in of.items()}
    if isinstance(agg, LastN):
        plan["n"] = agg.n
    return plan


def java_plan(defs: list[Definition]) -> str:
    """The catalogue's operators as streaming/java's Definitions.attach builds them: a group per
    entity kind and per co-visitation definition, as :func:`attach` wires the Python ones."""
    by_kind, covisits = plans(defs)
    groups = [(str(kind), kind, group, None) for kind, group in by_kind.items()]
    groups += [(d.name, item, [d], {"gap": int(d.gap.total_seconds() * 1000), "max_views": d.max_views})
               for d in covisits]
    out = []
    for name, kind, group, pairs in groups:  # the Python operators' views, so rows and finals read the same
        plan = Plan.of(group)
        out.append({"uid": f"definitions_{name}", "view": f"{DEFINED}catalogue_{name}",
                    "keys": list(kind.join_keys), "pairs": pairs, "reach": max_window_ms(group),
                    "ops": [_op_plan(d) for d in group if isinstance(d, Feature | CoVisitation)],
                    "ratios": [vars(r) for r in plan.ratios], "fingerprints": plan.fingerprints})
    return json.dumps({"groups": out})


def attach_java(events: Any, catalogue: str, lateness_ms: int, names: Collection[str],
                settle_ms: int) -> tuple[list[Any], list[Any], list[Any]]:
    """:func:`attach` for a stream, in Java (streaming/java's Definitions and CoVisitPairs, the
    same rules as streaming/aggregates.py): no Python call per record. Takes de-duplicated
    :data:`EVENT_ROW` s; returns the online rows (an entity's at most once per
    :data:`MINI_BATCH_MS`, as the SQL GROUP BYs hand theirs on), the final rows' lines and the
    DLQ lines."""
    from pyflink.datastream import DataStream
    from pyflink.java_gateway import get_gateway

    defs = [d for d in load(catalogue) if d.name in names]
    if not defs:
        return [], [], []
    rows, finals, late = get_gateway().jvm.freshrec.Definitions.attach(events._j_data_stream, java_plan(defs),
                                                                        settle_ms, lateness_ms, MINI_BATCH_MS)
    return [DataStream(rows)], [DataStream(finals)], [DataStream(late)]

EVENT_ROW = Types.ROW_NAMED([c for c, _ in EVENT_COLUMNS], [Types.LONG() if t == "BIGINT" else Types.STRING()
                                                             for _, t in EVENT_COLUMNS])


def _events_table(t_env: Any, events: Any) -> Any:
    """``events`` (:data:`EVENT_ROW`) as a table with the event time ``rt``, whose watermark is
    the stream's: it follows each Kafka partition, where one computed here would run ahead of a
    partition read late (and it holds back the lateness: ``read_events(hold_back_ms=)``)."""
    from pyflink.table import Schema

    schema = (Schema.new_builder().column_by_expression("rt", "TO_TIMESTAMP_LTZ(ts, 3)")
              .watermark("rt", "SOURCE_WATERMARK()").build())
    return t_env.from_data_stream(events, schema)


def deduplicate(env: Any, events: Any, dedup_ms: int) -> Any:
    """Each (user, event id) once, the first to come, in Flink's own operator: a ``ROW_NUMBER()``
    keep-first on processing time (Flink's Deduplicate: it emits each first row at once and
    only appends, and ``rt`` stays the event time downstream). An id is kept for twice
    ``dedup_ms`` of processing time after its event (state TTL, as :func:`state_ttl_ms`); a
    copy that comes later is behind the watermark by more than the lateness, so parsing has
    sent it to the DLQ. Takes and returns :data:`EVENT_ROW` streams."""
    from pyflink.table import StreamTableEnvironment

    t_env = StreamTableEnvironment.create(env)  # of its own: the state TTL is the table environment's
    t_env.get_config().set("table.exec.state.ttl", f"{2 * dedup_ms} ms")
    t_env.create_temporary_view("parsed", _events_table(t_env, events))
    columns = ", ".join(c for c, _ in EVENT_COLUMNS)
    unique = t_env.sql_query(f"SELECT {columns} FROM (SELECT *, ROW_NUMBER() OVER (PARTITION BY user_id, event_id "
                             "ORDER BY pt) AS n FROM (SELECT *, PROCTIME() AS pt FROM parsed)) WHERE n = 1")
    return t_env.to_data_stream(unique)


def attach_compiled(env: Any, events: Any, catalogue: str, names: Collection[str], lateness_ms: int,
                    kafka: str, feature_log: str, dlq: str) -> list[tuple[Any, list[str]]]:
    """Wire the definitions ``names`` (all of :func:`streaming.sql.split`'s first part for a
    stream) onto de-duplicated events (:data:`EVENT_ROW`), in Flink's own operators:

        events (event time rt; the source's watermark, which holds back ``lateness_ms``) -> per kind:
          GROUP BY entity, mini-batch (Query.online: pane_merge keeps the entity's pane totals
            and merges the newest windows') -> online rows (returned, for Redis)
          the stream plan (Query.select(stream=True)) -> final rows -> the feature log, in Kafka
        records behind the watermark -> the DLQ (counted online, left out of the final rows)

    Returns, per kind, the online rows (entity, ts, a column per definition) and the
    definitions in column order: ``write_rows(sql_rows=)`` takes them. The final rows' view is
    ``@catalogue_<kind>_sql``."""
    from pyflink.table import ChangelogMode, Schema, StreamTableEnvironment

    from streaming.sql import column_list, epoch_ms, kafka_table, name, queries, use_functions, use_utc

    defs = [d for d in load(catalogue) if d.name in names]
    ttl_ms = state_ttl_ms(defs, lateness_ms)

    def tables(mini_batch: bool) -> Any:
        """A table environment over the events. Two: mini-batch assigners carry watermarks of
        their own (processing time, where no operator orders by event time), which would make
        CURRENT_WATERMARK, so the DLQ, wrong; the final rows gain nothing from them."""
        t_env = StreamTableEnvironment.create(env)
        use_utc(t_env)
        config = t_env.get_config()
        config.set("table.exec.state.ttl", f"{ttl_ms} ms")
        config.set("table.exec.mini-batch.enabled", str(mini_batch).lower())  # said both ways: configs leak
        config.set("table.exec.mini-batch.allow-latency", f"{MINI_BATCH_MS} ms")
        config.set("table.exec.mini-batch.size", "5000")
        t_env.create_temporary_view("events", _events_table(t_env, events))
        return t_env

    online, t_env = tables(mini_batch=True), tables(mini_batch=False)
    use_functions(online)
    statements = t_env.create_statement_set()
    by_entity = Schema.new_builder().primary_key("entity").build()
    rows = []
    for q in queries(defs):
        uid = f"catalogue_{q.kind.name}_sql"
        view = DEFINED + uid
        # Inserts and updates only: a GROUP BY over appended events retracts nothing, and state
        # TTL expires without a row.
        rows.append((online.to_changelog_stream(online.sql_query(q.online("events")), by_entity,
                                                ChangelogMode.upsert()), q.names))
        values = [(c, t) for c, t in q.columns if c not in {*q.kind.join_keys, "ts"}]
        t_env.create_temporary_view(f"finals_{uid}", t_env.sql_query(q.select("events", stream=True)))
        t_env.execute_sql(kafka_table(f"log_{uid}", [("view", "STRING"), ("entity", "STRING"), ("ts", "BIGINT"),
                                                      ("values", f"ROW<{column_list(values)}>"),
                                                      ("final", "BOOLEAN")], feature_log, kafka))
        statements.add_insert_sql(f"INSERT INTO {name('log_' + uid)} SELECT '{view}', {q.entity()}, ts, "
                                  f"ROW({', '.join(name(c) for c, _ in values)}), TRUE FROM {name('finals_' + uid)}")
    # connectors/schema.dead_letter's layout
    t_env.execute_sql(kafka_table("dlq", [("field", "STRING"), ("reason", "STRING"), ("source", "STRING"),
                                          ("payload", "STRING"), ("at", "BIGINT")], dlq, kafka))
    horizon = epoch_ms("CURRENT_WATERMARK(rt)")
    event = ", ".join(f"'{c}' VALUE {name(c)}" for c, _ in EVENT_COLUMNS)
    statements.add_insert_sql(
        f"INSERT INTO dlq SELECT 'ts', 'ts ' || CAST(ts AS STRING) || ' is behind the settled horizon ' || "
        f"CAST(CAST({horizon} AS BIGINT) AS STRING) || ' (the watermark: the newest event time minus the "
        "out-of-orderness bound and FRESHREC_ALLOWED_LATENESS_MS); it counts online but is left out of the final "
        "rows', 'catalogue_job', "
        f"JSON_OBJECT({event}), CAST(UNIX_TIMESTAMP() AS BIGINT) * 1000 FROM events WHERE rt <= CURRENT_WATERMARK(rt)")
    statements.attach_as_datastream()
    return rows
