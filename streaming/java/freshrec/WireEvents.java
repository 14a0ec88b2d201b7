package freshrec;

import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.api.common.typeinfo.Types;
import org.apache.flink.api.java.tuple.Tuple6;
import org.apache.flink.streaming.api.datastream.DataStream;
import org.apache.flink.streaming.api.datastream.SingleOutputStreamOperator;
import org.apache.flink.streaming.api.functions.ProcessFunction;
import org.apache.flink.types.Row;
import org.apache.flink.util.Collector;
import org.apache.flink.util.OutputTag;

/**
 * Behavior events already in the wire form ({@code BehaviorEvent.to_json} of
 * connectors/schema.py, as every producer of the project writes them) parsed in Java; anything
 * else leaves raw through {@link #OTHERS} for the Python parser (jobs/feature_job.py's
 * ParseEvents), which keeps the schema's rules and its messages in one home.
 *
 * <p>Only what {@code validate} would take unchanged passes here: a flat JSON object of printable
 * ASCII without escapes, ids of 1 to {@code maxId} characters with no space, one of the five
 * behavior names, {@code ts} an integer in range, an {@code event_id}. Whatever this parser is
 * unsure of (aliases, numeric ids, a missing event id, unicode, escapes, nested extras, an event
 * behind the watermark by more than the lateness) is the Python parser's to judge: a wrong
 * answer here can only be a slower one. tests/test_wire_events.py holds the rows equal to
 * {@code validate}'s on a fuzzed corpus.
 */
public class WireEvents extends ProcessFunction<String, Object> {

    private static final long serialVersionUID = 1L;
    public static final OutputTag<String> OTHERS = new OutputTag<>("others", Types.STRING);
    private static final String[] BEHAVIORS = {"view", "click", "cart", "fav", "buy"};
    private static final int EVENT_ID = 1, USER = 2, ITEM = 4, BEHAVIOR = 8, TS = 16, CATEGORY = 32;
    private static final int REQUIRED = EVENT_ID | USER | ITEM | BEHAVIOR | TS;

    private final long lateness;
    private final long minTs;
    private final long maxFuture;
    private final int maxBytes;
    private final int maxId;
    private final boolean tuples;

    /**
     * The limits are connectors/schema.py's, handed over by the job (one home for them). {@code
     * tuples}: events as Tuple6 (the feature job's Python operators take them so), not rows.
     */
    public WireEvents(long lateness, long minTs, long maxFuture, int maxBytes, int maxId, boolean tuples) {
        this.lateness = lateness;
        this.minTs = minTs;
        this.maxFuture = maxFuture;
        this.maxBytes = maxBytes;
        this.maxId = maxId;
        this.tuples = tuples;
    }

    /**
     * Wire-form events of {@code raw} as {@code type} (a row type, or a tuple type when {@code
     * tuples}); the rest on {@link #OTHERS}.
     */
    @SuppressWarnings("unchecked")
    public static SingleOutputStreamOperator<Object> attach(DataStream<String> raw, TypeInformation<?> type,
                                                            long lateness, long minTs, long maxFuture, int maxBytes,
                                                            int maxId, boolean tuples) {
        return raw.process(new WireEvents(lateness, minTs, maxFuture, maxBytes, maxId, tuples),
                           (TypeInformation<Object>) type);
    }

    /** The raw events {@code parsed} left to the Python parser. */
    public static DataStream<String> others(SingleOutputStreamOperator<Object> parsed) {
        return parsed.getSideOutput(OTHERS);
    }

    @Override
    public void processElement(String value, Context ctx, Collector<Object> out) {
        Row row = parse(value, System.currentTimeMillis());
        if (row == null || !onTime((long) row.getField(4), ctx.timerService().currentWatermark())) {
            ctx.output(OTHERS, value);
        } else if (tuples) {
            out.collect(Tuple6.of(row.getField(0), row.getField(1), row.getField(2), row.getField(3),
                                  row.getField(4), row.getField(5)));
        } else {
            out.collect(row);
        }
    }

    /** Not behind {@code watermark} by more than the lateness (else the Python parser says so in the DLQ). */
    public boolean onTime(long ts, long watermark) {
        return ts + lateness >= watermark;  // not wm - lateness: the watermark starts at Long.MIN_VALUE
    }

    /**
     * The event (event_id, user_id, item_id, behavior, ts, category_id or "") if {@code text} is in
     * the wire form, or null: then the Python parser decides.
     */
    public Row parse(String text, long nowMs) {
        if (text == null || text.length() > maxBytes) {
            return null;
        }
        Scan s = new Scan(text);
        String eventId = null, user = null, item = null, behavior = null, category = null;
        long ts = 0;
        int seen = 0;
        if (!s.take('{')) {
            return null;
        }
        do {
            String key = s.string();
            if (key == null || !s.take(':')) {
                return null;
            }
            char c = s.peek();
            Object value;
            if (c == '"') {
                value = s.string();
            } else if (c >= '0' && c <= '9') {
                value = s.integer();
            } else if (s.word("null")) {
                value = s;  // a marker for JSON null: only the optional ids may be null
            } else {
                return null;  // floats, booleans, negative numbers, nested extras: Python's to read
            }
            if (value == null) {
                return null;
            }
            int field = fieldOf(key);
            seen |= field;  // a key given twice: the last value counts, as in Python's json
            if (field == TS) {
                if (!(value instanceof Long)) {
                    return null;
                }
                ts = (Long) value;
            } else if (field != 0) {
                String id = value == s ? null : value instanceof String ? (String) value : "\u0000";
                if (field == BEHAVIOR) {
                    behavior = id;
                } else if (field == CATEGORY) {
                    category = id;
                } else if (field == EVENT_ID) {
                    eventId = id;
                } else if (field == USER) {
                    user = id;
                } else {
                    item = id;
                }
            }
        } while (s.take(','));
        if (!s.take('}') || !s.atEnd() || (seen & REQUIRED) != REQUIRED) {
            return null;
        }
        if (!isId(eventId) || !isId(user) || !isId(item) || !isBehavior(behavior)
                || ts < minTs || ts > nowMs + maxFuture) {
            return null;
        }
        if (category == null || category.isEmpty()) {
            category = "";  // validate's None, as the jobs' rows carry it
        } else if (!isId(category)) {
            return null;
        }
        return Row.of(eventId, user, item, behavior, ts, category);
    }

    private static int fieldOf(String key) {
        switch (key) {
            case "event_id": return EVENT_ID;
            case "user_id": return USER;
            case "item_id": return ITEM;
            case "behavior": return BEHAVIOR;
            case "ts": return TS;
            case "category_id": return CATEGORY;
            default: return 0;  // an app's extra field: validate leaves it out too
        }
    }

    private boolean isId(String id) {
        if (id == null || id.isEmpty() || id.length() > maxId) {
            return false;
        }
        for (int i = 0; i < id.length(); i++) {
            char c = id.charAt(i);
            if (c <= ' ' || c > '~') {
                return false;
            }
        }
        return true;
    }

    private static boolean isBehavior(String name) {
        for (String b : BEHAVIORS) {
            if (b.equals(name)) {
                return true;
            }
        }
        return false;
    }

    /** A cursor over one flat JSON object; each method returns null/false where Python must judge. */
    private static final class Scan {
        private final String text;
        private int at;

        Scan(String text) {
            this.text = text;
        }

        private void space() {
            while (at < text.length()) {
                char c = text.charAt(at);
                if (c != ' ' && c != '\t' && c != '\n' && c != '\r') {
                    return;
                }
                at++;
            }
        }

        char peek() {
            space();
            return at < text.length() ? text.charAt(at) : '\u0000';
        }

        boolean take(char c) {
            if (peek() != c) {
                return false;
            }
            at++;
            return true;
        }

        boolean atEnd() {
            space();
            return at == text.length();
        }

        boolean word(String w) {
            space();
            if (!text.startsWith(w, at)) {
                return false;
            }
            at += w.length();
            return true;
        }

        /** A string of printable ASCII without escapes. */
        String string() {
            if (!take('"')) {
                return null;
            }
            int start = at;
            while (at < text.length()) {
                char c = text.charAt(at);
                if (c == '"') {
                    return text.substring(start, at++);
                }
                if (c < ' ' || c > '~' || c == '\\') {
                    return null;
                }
                at++;
            }
            return null;
        }

        /** A non-negative JSON integer of at most 18 digits (no sign, fraction or exponent). */
        Long integer() {
            int start = at;
            while (at < text.length() && text.charAt(at) >= '0' && text.charAt(at) <= '9') {
                at++;
            }
            int digits = at - start;
            if (digits > 18 || (digits > 1 && text.charAt(start) == '0')) {
                return null;
            }
            if (at < text.length()) {
                char next = text.charAt(at);
                if (next == '.' || next == 'e' || next == 'E') {
                    return null;
                }
            }
            return Long.parseLong(text, start, at, 10);
        }
    }
}
