package freshrec;

import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Locale;
import java.util.Map;

import org.apache.flink.api.common.eventtime.WatermarkStrategy;
import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.functions.RichMapFunction;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.functions.KeySelector;
import org.apache.flink.api.java.tuple.Tuple4;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonProcessingException;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;
import org.apache.flink.streaming.api.TimeDomain;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * An entity kind's definitions over its records, in Java (streaming/definitions.py's Python
 * {@code Definitions}, for a stream): the entity's online row {@code (view, entity, ts, JSON
 * values)} at the first flush (every {@code flushMs} of processing time) after its records; as
 * the watermark passes a record's time plus
 * {@code settleMs}, a final row per distinct event time (the feature log's line, the offline
 * store's input); a record at or behind the settled horizon goes to the DLQ with the reason.
 *
 * <p>With {@code flushMs} 0 (the backfill, in batch mode) there are no online rows: only the final
 * rows, each key's as its input ends.
 *
 * <p>{@link #attach} wires a whole catalogue: streaming/definitions.py's {@code java_plan}
 * writes the plan, one JSON object: {@code {"groups": [{"uid", "view", "keys", "pairs", "reach",
 * "ops", "ratios", "fingerprints"}]}}, where {@code pairs} (or null) makes the group's records
 * the co-visit pairs of {@link CoVisitPairs}.
 */
public class Definitions extends KeyedProcessFunction<String, Rec, Tuple4<String, String, Long, String>> {

    private static final long serialVersionUID = 1L;
    static final long TIMER_STEP_MS = 5000;  // final rows leave in steps of this much event time
    static final OutputTag<String> FINAL = new OutputTag<>("final", Types.STRING);
    static final OutputTag<String> LATE = new OutputTag<>("late", Types.STRING);
    static final TypeInformation<Tuple4<String, String, Long, String>> ROW =
            Types.TUPLE(Types.STRING, Types.STRING, Types.LONG, Types.STRING);
    private static final ObjectMapper JSON = new ObjectMapper();

    private final String plan;
    private final String view;
    private final long settleMs;
    private final long reachMs;
    private final long flushMs;
    private transient EntityState.Plan parsed;
    private transient ValueState<EntityState> state;

    Definitions(String plan, String view, long settleMs, long reachMs, long flushMs) {
        this.plan = plan;
        this.view = view;
        this.settleMs = settleMs;
        this.reachMs = reachMs;
        this.flushMs = flushMs;
    }

    @Override
    public void open(OpenContext context) throws Exception {
        parsed = new EntityState.Plan(plan);
        state = getRuntimeContext().getState(new ValueStateDescriptor<>("definitions", new EntityStateSerializer()));
    }

    private static void timer(Context ctx, EntityState st, long at) {
        long step = -Math.floorDiv(-at, TIMER_STEP_MS) * TIMER_STEP_MS;
        if (step != st.settleTimer) {
            ctx.timerService().registerEventTimeTimer(step);
            st.settleTimer = step;
        }
    }

    @Override
    public void processElement(Rec r, Context ctx, Collector<Tuple4<String, String, Long, String>> out)
            throws Exception {
        EntityState st = state.value();
        if (st == null) {
            st = new EntityState();
        }
        String key = ctx.getCurrentKey();
        if (!st.add(r, parsed)) {
            // Passed parsing but came after its time settled here (a watermark read slightly stale).
            ctx.output(LATE, deadLetter(r, "ts: " + r.ts + " is behind the settled horizon of '" + key + "' ("
                    + st.horizon + "); FRESHREC_ALLOWED_LATENESS_MS bounds lateness"));
            return;
        }
        timer(ctx, st, r.ts + settleMs + 1);  // settled once no event this old can be accepted any more
        if (flushMs > 0) {
            // The online row at the next flush: one per entity and flush, however many records came
            // (a busy item takes dozens of co-visit pairs per second).
            st.unsent = true;
            long flush = (Math.floorDiv(ctx.timerService().currentProcessingTime(), flushMs) + 1) * flushMs;
            if (flush != st.flushTimer) {
                ctx.timerService().registerProcessingTimeTimer(flush);
                st.flushTimer = flush;
            }
        }
        state.update(st);
    }

    private void send(EntityState st, String key, Collector<Tuple4<String, String, Long, String>> out) {
        out.collect(Tuple4.of(view, key, st.newest, json(st.online(parsed))));
        st.unsent = false;
    }

    @Override
    public void onTimer(long timestamp, OnTimerContext ctx, Collector<Tuple4<String, String, Long, String>> out)
            throws Exception {
        EntityState st = state.value();
        if (st == null) {
            return;
        }
        if (ctx.timeDomain() == TimeDomain.PROCESSING_TIME) {
            st.flushTimer = Long.MIN_VALUE;
            if (st.unsent) {
                send(st, ctx.getCurrentKey(), out);
                state.update(st);
            }
            return;
        }
        st.settleTimer = Long.MIN_VALUE;  // whichever fired: the next record registers its own again
        if (st.unsent) {  // before settling, which may drop the panes of the value as of the newest record
            send(st, ctx.getCurrentKey(), out);
        }
        long horizon = timestamp - settleMs - 1;
        for (EntityState.Row row : st.settle(horizon, parsed)) {
            Map<String, Object> line = new LinkedHashMap<>();
            line.put("view", view);
            line.put("entity", ctx.getCurrentKey());
            line.put("ts", row.ts);
            line.put("values", row.values);
            line.put("final", true);
            ctx.output(FINAL, json(line));
        }
        if (st.open.isEmpty() && horizon > st.newest + reachMs) {
            state.clear();  // every window has emptied: a quiet entity costs nothing
            return;
        }
        state.update(st);
        if (st.open.isEmpty()) {
            timer(ctx, st, st.newest + reachMs + settleMs + 2);
        }
    }

    /** A value as JSON: Java's numbers, strings, lists and maps as Python's json reads them. */
    public static String json(Object value) {
        try {
            return JSON.writeValueAsString(value);
        } catch (JsonProcessingException e) {
            throw new IllegalStateException("cannot write feature values as JSON", e);
        }
    }

    /** connectors/schema.py's dead_letter layout. */
    static String deadLetter(Rec r, String reason) {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("field", "ts");
        m.put("reason", reason);
        m.put("source", "catalogue_job");
        m.put("payload", json(r.fields()));
        m.put("at", System.currentTimeMillis());
        return json(m);
    }

    /** The record's key: its entity's join keys, joined by the separator. */
    static final class Key implements KeySelector<Rec, String> {
        private static final long serialVersionUID = 1L;
        private final String[] fields;

        Key(String[] fields) {
            this.fields = fields;
        }

        @Override
        public String getKey(Rec r) {
            if (fields.length == 1) {
                return r.field(fields[0]);
            }
            StringBuilder b = new StringBuilder();
            for (int i = 0; i < fields.length; i++) {
                b.append(i == 0 ? "" : Rec.SEPARATOR).append(r.field(fields[i]));
            }
            return b.toString();
        }
    }

    /**
     * The plan's operators over de-duplicated events (rows of streaming/sql.py's EVENT_COLUMNS);
     * returns the online rows, the final rows' lines and the DLQ lines, each one stream.
     */
    public static List<DataStream<?>> attach(DataStream<Row> events, String plan, long settleMs, long lateness,
                                             long flushMs)
            throws JsonProcessingException {
        DataStream<Rec> recs = events
                .map(e -> {
                    Object category = e.getField(5);
                    return new Rec((Long) e.getField(4), (String) e.getField(0), (String) e.getField(3),
                                   (String) e.getField(1), (String) e.getField(2),
                                   category == null ? "" : (String) category, "");
                })
                .returns(TypeInformation.of(Rec.class)).name("definition_records").uid("definition_records");
        return wire(recs, plan, settleMs, lateness, flushMs);
    }

    /**
     * The plan's final rows' lines over the backfill's staged events (tab-separated: event id,
     * user, item, behavior, ts, category), for a job in batch mode: each key's records come
     * sorted by time, and its timers fire, in order, as its input ends.
     */
    public static DataStream<String> finals(DataStream<String> staged, String plan, long lateness, long total)
            throws JsonProcessingException {
        DataStream<Rec> recs = staged
                .map(new Staged(total))
                .returns(TypeInformation.of(Rec.class)).name("definition_records")
                .assignTimestampsAndWatermarks(WatermarkStrategy.<Rec>noWatermarks()
                        .withTimestampAssigner((r, previous) -> r.ts));  // batch mode sorts each key's by these
        return (DataStream<String>) wire(recs, plan, 0, lateness, 0).get(1);
    }

    /** A staged line as a record, and how far the job is, every few seconds (batch.Progress's lines). */
    static final class Staged extends RichMapFunction<String, Rec> {
        private static final long serialVersionUID = 1L;
        private final long total;
        private transient long n;
        private transient long started;
        private transient long shown;

        Staged(long total) {
            this.total = total;
        }

        @Override
        public Rec map(String line) {
            String[] f = line.split("\t", -1);
            long now = System.nanoTime();
            if (n++ == 0) {
                started = shown = now;
            } else if ((n % 10_000 == 0 && now - shown > 3_000_000_000L) || n == total) {
                shown = now;
                int of = getRuntimeContext().getTaskInfo().getNumberOfParallelSubtasks();
                long mine = total / of;  // the file's splits are about equal
                System.out.printf(Locale.ROOT, "[backfill] features: %,d/%,d events (%d%%), %,.0f events/s%s%n", n, mine,
                                  100 * n / Math.max(mine, 1), n / ((now - started) / 1e9),
                                  of > 1 ? " in subtask " + (getRuntimeContext().getTaskInfo().getIndexOfThisSubtask()
                                                             + 1) + " of " + of : "");
                System.out.flush();
            }
            return new Rec(Long.parseLong(f[4]), f[0], f[3], f[1], f[2], f[5], "");
        }
    }

    private static List<DataStream<?>> wire(DataStream<Rec> recs, String plan, long settleMs, long lateness,
                                            long flushMs) throws JsonProcessingException {
        JsonNode groups = JSON.readTree(plan).get("groups");
        List<DataStream<Tuple4<String, String, Long, String>>> rows = new ArrayList<>();
        List<DataStream<String>> finals = new ArrayList<>();
        List<DataStream<String>> late = new ArrayList<>();
        for (JsonNode g : groups) {
            String uid = g.get("uid").asText();
            String[] keys = JSON.convertValue(g.get("keys"), String[].class);
            DataStream<Rec> input = recs;
            JsonNode pairs = g.get("pairs");
            if (pairs != null && !pairs.isNull()) {
                input = recs.filter(r -> r.behavior.equals("view")).name("views_" + uid)
                        .keyBy(r -> r.user, Types.STRING)
                        .process(new CoVisitPairs(pairs.get("gap").asLong(), pairs.get("gap").asLong() + lateness,
                                                  pairs.get("max_views").asInt()), TypeInformation.of(Rec.class))
                        .name("pairs_" + uid).uid("pairs_" + uid);
            } else if (keys.length > 1 || !(keys[0].equals("user_id") || keys[0].equals("item_id"))) {
                input = recs.filter(r -> {
                    for (String k : keys) {
                        if (r.field(k).isEmpty()) {
                            return false;
                        }
                    }
                    return true;
                }).name("has_" + uid);
            }
            SingleOutputStreamOperator<Tuple4<String, String, Long, String>> out = input
                    .keyBy(new Key(keys), Types.STRING)
                    .process(new Definitions(JSON.writeValueAsString(g), g.get("view").asText(), settleMs,
                                             g.get("reach").asLong(), flushMs), ROW)
                    .name(uid).uid(uid);
            rows.add(out);
            finals.add(out.getSideOutput(FINAL));
            late.add(out.getSideOutput(LATE));
        }
        return List.of(union(rows), union(finals), union(late));
    }

    @SuppressWarnings("unchecked")
    private static <T> DataStream<T> union(List<DataStream<T>> streams) {
        DataStream<T> first = streams.get(0);
        return streams.size() == 1 ? first : first.union(streams.subList(1, streams.size()).toArray(new DataStream[0]));
    }
}
