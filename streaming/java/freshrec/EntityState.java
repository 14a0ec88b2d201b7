package freshrec;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Comparator;
import java.util.HashMap;
import java.util.HashSet;
import java.util.Iterator;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;
import java.util.PriorityQueue;
import java.util.Set;

import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonProcessingException;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * Everything one entity's definitions need, in Java: streaming/aggregates.py's
 * {@code EntityState}, {@code Op} and {@code Window}, rule for rule, so a stream of these
 * operators and the Python backfill give the same final rows (tests/test_parity.py).
 *
 * <p>Records newer than the horizon stay <em>open</em> (a late record can still join them); the
 * online value folds them on top of the <em>settled</em> panes. {@link #settle} moves records up
 * to a horizon into the settled panes in event-time order and returns a final row per distinct
 * time passed.
 */
public class EntityState implements Serializable {

    private static final long serialVersionUID = 1L;
    static final long HOUR_MS = 3_600_000L;

    public long horizon = Long.MIN_VALUE;
    public long newest = Long.MIN_VALUE;
    public ArrayList<Rec> open = new ArrayList<>();
    public HashMap<String, HashMap<Long, Object>> openPanes = new HashMap<>();
    public HashMap<String, HashMap<Long, Object>> settled = new HashMap<>();
    public HashMap<String, String> versions = new HashMap<>();
    /** Records came since the online row was last sent (the operator's flush). */
    public boolean unsent;
    /**
     * Each definition's running totals over its settled panes, kept between settles while the
     * state stays in memory (the hashmap backend hands back the same object): a settle then
     * costs its new records, not a pass over the window's panes. Not checkpointed; rebuilt
     * from the panes when missing.
     */
    private transient HashMap<String, Window> windows;
    private transient HashMap<String, Online> online;  // co-visits' online totals, kept the same way
    /**
     * The operator's last registered event-time and flush timers for this entity, not fired yet
     * (Long.MIN_VALUE: unknown, as after a restore or a copy): registering one again costs a hash
     * lookup in Flink's timer queue per record, for nothing.
     */
    transient long settleTimer = Long.MIN_VALUE;
    transient long flushTimer = Long.MIN_VALUE;

    /** An entry of a last-N list (and a user's view in CoVisitPairs): ordered by time, then id, then value. */
    public static class Entry implements Comparable<Entry>, Serializable {
        private static final long serialVersionUID = 1L;
        public long ts;
        public String rid;
        public String value;

        public Entry() {}

        Entry(long ts, String rid, String value) {
            this.ts = ts;
            this.rid = rid;
            this.value = value;
        }

        @Override
        public int compareTo(Entry o) {
            int c = Long.compare(ts, o.ts);
            if (c == 0) {
                c = rid.compareTo(o.rid);
            }
            return c != 0 ? c : value.compareTo(o.value);
        }
    }

    /** One definition's arithmetic (aggregates.py's {@code Op}). */
    static final class Op implements Serializable {
        private static final long serialVersionUID = 1L;
        final String name;
        final String kind;
        final long slide;
        final long panes;
        final Set<String> behaviors;  // null: every behavior
        final String of;  // a field, "ts", "hour", "weights"; co-visitation reads the partners
        final Map<String, Double> weights = new HashMap<>();
        final int n;
        final int topK;

        Op(JsonNode j) {
            name = j.get("name").asText();
            kind = j.get("kind").asText();
            slide = j.get("slide").asLong();
            panes = j.get("panes").asLong();
            JsonNode b = j.get("behaviors");
            behaviors = b == null || b.isNull() ? null : new HashSet<>();
            if (behaviors != null) {
                b.forEach(x -> behaviors.add(x.asText()));
            }
            JsonNode w = j.get("weights");
            if (w != null && !w.isNull()) {
                w.fields().forEachRemaining(e -> weights.put(e.getKey(), e.getValue().asDouble()));
            }
            of = j.path("of").asText("");
            n = j.path("n").asInt(0);
            topK = j.path("top_k").asInt(0);
        }

        boolean accepts(Rec r) {
            return behaviors == null || behaviors.contains(r.behavior);
        }

        long first(long ts) {
            return Math.floorDiv(ts, slide) - panes + 1;
        }

        long last(long ts) {
            return Math.floorDiv(ts, slide);
        }

        double number(Rec r) {
            return switch (of) {
                case "weights" -> weights.getOrDefault(r.behavior, 0.0);
                case "ts" -> (double) r.ts;
                case "hour" -> (double) Math.floorMod(Math.floorDiv(r.ts, HOUR_MS), 24L);
                default -> throw new IllegalStateException(name + ": no number " + of);
            };
        }

        @SuppressWarnings("unchecked")
        Object add(Object acc, Rec r) {
            switch (kind) {
                case "count":
                    return acc == null ? 1L : (Long) acc + 1L;
                case "sum":
                    return (acc == null ? 0.0 : (Double) acc) + number(r);
                case "mean": {
                    double[] a = acc == null ? new double[2] : (double[]) acc;
                    a[0] += number(r);
                    a[1] += 1;
                    return a;
                }
                case "min":
                    return acc == null ? number(r) : Math.min((Double) acc, number(r));
                case "max":
                    return acc == null ? number(r) : Math.max((Double) acc, number(r));
                case "distinct": {
                    HashSet<String> s = acc == null ? new HashSet<>() : (HashSet<String>) acc;
                    s.add(r.field(of));
                    return s;
                }
                case "last_n": {
                    ArrayList<Entry> l = acc == null ? new ArrayList<>() : (ArrayList<Entry>) acc;
                    insort(l, new Entry(r.ts, r.rid, r.field(of)));
                    while (l.size() > n) {
                        l.remove(0);
                    }
                    return l;
                }
                default: {  // covisit
                    HashMap<String, Long> m = acc == null ? new HashMap<>() : (HashMap<String, Long>) acc;
                    for (String p : r.partners()) {
                        m.merge(p, 1L, Long::sum);
                    }
                    return m;
                }
            }
        }

        @SuppressWarnings("unchecked")
        Object result(List<Object> accs) {
            switch (kind) {
                case "count": {
                    long s = 0;
                    for (Object a : accs) {
                        s += (Long) a;
                    }
                    return s;
                }
                case "sum": {
                    double[] xs = new double[accs.size()];
                    for (int i = 0; i < xs.length; i++) {
                        xs[i] = (Double) accs.get(i);
                    }
                    return fsum(xs);
                }
                case "mean": {
                    double[] xs = new double[accs.size()];
                    double count = 0;
                    for (int i = 0; i < xs.length; i++) {
                        double[] a = (double[]) accs.get(i);
                        xs[i] = a[0];
                        count += a[1];
                    }
                    return count > 0 ? fsum(xs) / count : null;
                }
                case "min":
                case "max": {
                    Double best = null;
                    for (Object a : accs) {
                        double x = (Double) a;
                        if (best == null || (kind.equals("min") ? x < best : x > best)) {
                            best = x;
                        }
                    }
                    return best;
                }
                case "distinct": {
                    Set<String> all = new HashSet<>();
                    for (Object a : accs) {
                        all.addAll((Set<String>) a);
                    }
                    return (long) all.size();
                }
                case "last_n": {
                    List<Entry> all = new ArrayList<>();
                    for (Object a : accs) {
                        all.addAll((List<Entry>) a);
                    }
                    Collections.sort(all);
                    List<String> out = new ArrayList<>();
                    for (int i = all.size() - 1; i >= Math.max(0, all.size() - n); i--) {
                        out.add(all.get(i).value);
                    }
                    return out;
                }
                default: {  // covisit
                    Map<String, Long> totals = new HashMap<>();
                    for (Object a : accs) {
                        ((Map<String, Long>) a).forEach((k, v) -> totals.merge(k, v, Long::sum));
                    }
                    return top(totals, topK);
                }
            }
        }
    }

    /** A ratio of two values, pulled towards a prior (aggregates.py's {@code RatioOp}). */
    static final class RatioOp implements Serializable {
        private static final long serialVersionUID = 1L;
        final String name;
        final String numerator;
        final String denominator;
        final double prior;
        final double weight;

        RatioOp(JsonNode j) {
            name = j.get("name").asText();
            numerator = j.get("numerator").asText();
            denominator = j.get("denominator").asText();
            prior = j.get("prior").asDouble();
            weight = j.get("weight").asDouble();
        }

        Double result(Map<String, Object> values) {
            double den = orZero(values.get(denominator)) + weight;
            if (den == 0) {
                return null;
            }
            return (orZero(values.get(numerator)) + prior * weight) / den;
        }

        private static double orZero(Object v) {
            return v == null ? 0.0 : ((Number) v).doubleValue();
        }
    }

    /** The definitions of one entity kind (aggregates.py's {@code Plan}), from a group of the plan. */
    public static final class Plan implements Serializable {
        private static final long serialVersionUID = 1L;
        final List<Op> ops = new ArrayList<>();
        final List<RatioOp> ratios = new ArrayList<>();
        final HashMap<String, String> fingerprints = new HashMap<>();

        public Plan(String json) throws JsonProcessingException {
            this(new ObjectMapper().readTree(json));
        }

        Plan(JsonNode j) {
            j.get("ops").forEach(o -> ops.add(new Op(o)));
            j.get("ratios").forEach(o -> ratios.add(new RatioOp(o)));
            j.get("fingerprints").fields().forEachRemaining(e -> fingerprints.put(e.getKey(), e.getValue().asText()));
        }

        Map<String, Object> values(Map<String, Object> results) {
            for (RatioOp r : ratios) {
                results.put(r.name, r.result(results));
            }
            return results;
        }
    }

    /** A final row: the values as of a time no later record can change. */
    public static final class Row {
        public final long ts;
        public final Map<String, Object> values;

        Row(long ts, Map<String, Object> values) {
            this.ts = ts;
            this.values = values;
        }

        /** {@code [ts, values]} as JSON. */
        @Override
        public String toString() {
            return Definitions.json(List.of(ts, values));
        }
    }

    private void upgrade(Plan plan) {
        if (versions.equals(plan.fingerprints)) {
            return;
        }
        for (Iterator<String> it = settled.keySet().iterator(); it.hasNext(); ) {
            String name = it.next();
            String now = plan.fingerprints.get(name);
            if (now == null || !now.equals(versions.get(name))) {
                it.remove();
                openPanes.remove(name);
            }
        }
        versions = new HashMap<>(plan.fingerprints);
        windows = null;
        online = null;
        rebuildOpen(plan);
    }

    private void rebuildOpen(Plan plan) {
        openPanes = new HashMap<>();
        for (Rec r : open) {
            foldOpen(r, plan);
        }
    }

    private void foldOpen(Rec r, Plan plan) {
        for (Op op : plan.ops) {
            if (op.accepts(r)) {
                HashMap<Long, Object> panes = openPanes.computeIfAbsent(op.name, k -> new HashMap<>());
                long pane = Math.floorDiv(r.ts, op.slide);
                panes.put(pane, op.add(panes.get(pane), r));
            }
        }
    }

    /** Keep a record; false (and nothing changes) when it is at or behind the horizon. */
    public boolean add(Rec r, Plan plan) {
        upgrade(plan);
        if (r.ts <= horizon) {
            return false;
        }
        insort(open, r);
        foldOpen(r, plan);
        if (online != null) {
            countOnline(r, plan);
        }
        newest = Math.max(newest, r.ts);
        return true;
    }

    /** Values as of the newest record: settled and open records together. */
    public Map<String, Object> online(Plan plan) {
        upgrade(plan);
        Map<String, Object> results = new LinkedHashMap<>();
        for (Op op : plan.ops) {
            if (op.kind.equals("covisit")) {
                List<String> top = onlineTop(op);
                if (top != null) {
                    results.put(op.name, top);
                    continue;
                }
            }
            long first = op.first(newest);
            long last = op.last(newest);
            List<Object> accs = new ArrayList<>();
            for (Map<Long, Object> part : List.of(settled.getOrDefault(op.name, new HashMap<>()),
                                                  openPanes.getOrDefault(op.name, new HashMap<>()))) {
                part.forEach((p, a) -> {
                    if (first <= p && p <= last) {
                        accs.add(a);
                    }
                });
            }
            results.put(op.name, op.result(accs));
        }
        return plan.values(results);
    }

    /** A co-visit definition's totals and top k over the newest window, kept while in memory. */
    static final class Online {
        final long first;
        final HashMap<String, Long> counts = new HashMap<>();
        final List<String> top;

        @SuppressWarnings("unchecked")
        Online(Op op, long first, long last, List<Map<Long, Object>> parts) {
            this.first = first;
            for (Map<Long, Object> part : parts) {
                part.forEach((p, acc) -> {
                    if (first <= p && p <= last) {
                        ((Map<String, Long>) acc).forEach((k, n) -> counts.merge(k, n, Long::sum));
                    }
                });
            }
            top = top(counts, op.topK);
        }
    }

    /**
     * A co-visit top k online: merged from the window's panes once, then kept up to date record
     * by record (a pair only adds to counts) until the window's first pane moves. Merging every
     * pane per record cost most of the job's time on busy items.
     */
    private List<String> onlineTop(Op op) {
        long first = op.first(newest);
        if (online == null) {
            online = new HashMap<>();
        }
        Online o = online.get(op.name);
        if (o == null || o.first != first) {
            o = new Online(op, first, op.last(newest), List.of(settled.getOrDefault(op.name, new HashMap<>()),
                                                               openPanes.getOrDefault(op.name, new HashMap<>())));
            online.put(op.name, o);
        }
        return new ArrayList<>(o.top);
    }

    /** A new open record's pairs into the kept online totals it falls within. */
    private void countOnline(Rec r, Plan plan) {
        for (Op op : plan.ops) {
            Online o = op.kind.equals("covisit") ? online.get(op.name) : null;
            if (o != null && Math.floorDiv(r.ts, op.slide) >= o.first) {
                for (String p : r.partners()) {
                    countInto(o.counts, o.top, p, op.topK);
                }
            }
        }
    }

    /** The definition's settled window, kept while the state stays in memory. */
    private Window window(Op op, HashMap<Long, Object> panes) {
        if (windows == null) {
            windows = new HashMap<>();
        }
        Window w = windows.get(op.name);
        if (w == null || w.op != op || w.panes != panes) {
            w = new Window(op, panes);
            windows.put(op.name, w);
        }
        return w;
    }

    /** Move records up to {@code to} into the settled panes; the final row of each distinct time passed. */
    public List<Row> settle(long to, Plan plan) {
        upgrade(plan);
        List<Row> rows = new ArrayList<>();
        if (to <= horizon) {
            return rows;
        }
        int cut = 0;
        while (cut < open.size() && open.get(cut).ts <= to) {
            cut++;
        }
        List<Rec> passing = new ArrayList<>(open.subList(0, cut));
        open = new ArrayList<>(open.subList(cut, open.size()));
        horizon = to;
        List<Window> ws = new ArrayList<>();
        for (Op op : plan.ops) {
            ws.add(window(op, settled.computeIfAbsent(op.name, k -> new HashMap<>())));
        }
        for (int i = 0; i < passing.size(); i++) {
            Rec r = passing.get(i);
            for (Window w : ws) {
                if (w.op.accepts(r)) {
                    w.add(r);
                }
            }
            if (i + 1 == passing.size() || passing.get(i + 1).ts != r.ts) {
                Map<String, Object> values = new LinkedHashMap<>();
                for (Window w : ws) {
                    values.put(w.op.name, w.value(r.ts));
                }
                rows.add(new Row(r.ts, plan.values(values)));
            }
        }
        if (!passing.isEmpty()) {
            for (Window w : ws) {  // drops the panes no value at or after the horizon can reach
                w.advance(horizon);
            }
            if (!openPanes.isEmpty()) {
                dropPassed(plan, passing);
            }
        }
        return rows;
    }

    /**
     * The open panes without the records that passed the horizon: panes wholly behind it go. In
     * the one it cuts, counts and co-visits take the passed records off (exact: integers); the
     * rest fold the records left in it again (aggregates.py folds every open record again; the
     * sets are the same, only a sum's rounding may follow another order).
     */
    @SuppressWarnings("unchecked")
    private void dropPassed(Plan plan, List<Rec> passed) {
        for (Op op : plan.ops) {
            HashMap<Long, Object> panes = openPanes.get(op.name);
            if (panes == null) {
                continue;
            }
            long cut = Math.floorDiv(horizon, op.slide);
            panes.keySet().removeIf(p -> p < cut);
            Object acc = panes.remove(cut);
            if (acc == null) {
                continue;
            }
            if (op.kind.equals("count") || op.kind.equals("covisit")) {
                for (Rec r : passed) {
                    if (Math.floorDiv(r.ts, op.slide) == cut && op.accepts(r)) {
                        if (op.kind.equals("count")) {
                            acc = (Long) acc - 1;
                        } else {
                            Map<String, Long> m = (Map<String, Long>) acc;
                            for (String p : r.partners()) {
                                m.compute(p, (k, n) -> n == 1 ? null : n - 1);
                            }
                        }
                    }
                }
                boolean empty = op.kind.equals("count") ? (Long) acc == 0 : ((Map<String, Long>) acc).isEmpty();
                if (!empty) {
                    panes.put(cut, acc);
                }
                continue;
            }
            for (Rec r : open) {
                if (Math.floorDiv(r.ts, op.slide) != cut) {
                    break;  // sorted: the rest lie in later panes
                }
                if (op.accepts(r)) {
                    panes.put(cut, op.add(panes.get(cut), r));
                }
            }
        }
    }

    /**
     * One definition's value over the newest window while records fold into its settled panes
     * in event-time order (aggregates.py's {@code Window}): distinct counts, last-N and
     * co-visits keep running totals, so a final row costs O(1); the rest merge their panes.
     */
    static final class Window {
        final Op op;
        final HashMap<Long, Object> panes;
        Long first;
        final HashMap<String, Long> counts = new HashMap<>();
        List<Entry> newest = new ArrayList<>();
        List<String> top;

        Window(Op op, HashMap<Long, Object> panes) {
            this.op = op;
            this.panes = panes;
        }

        private void advance(long ts) {
            long f = op.first(ts);
            if (first == null) {
                first = f;
                for (Iterator<Map.Entry<Long, Object>> it = panes.entrySet().iterator(); it.hasNext(); ) {
                    Map.Entry<Long, Object> e = it.next();
                    if (e.getKey() < f) {
                        it.remove();
                    } else {
                        enter(e.getValue());
                    }
                }
                return;
            }
            if (f <= first) {
                return;
            }
            for (Iterator<Map.Entry<Long, Object>> it = panes.entrySet().iterator(); it.hasNext(); ) {
                Map.Entry<Long, Object> e = it.next();
                if (e.getKey() < f) {
                    it.remove();
                    leave(e.getValue());
                }
            }
            first = f;
        }

        @SuppressWarnings("unchecked")
        private void enter(Object acc) {
            switch (op.kind) {
                case "distinct" -> ((Set<String>) acc).forEach(v -> counts.merge(v, 1L, Long::sum));
                case "covisit" -> ((Map<String, Long>) acc).forEach((v, n) -> counts.merge(v, n, Long::sum));
                case "last_n" -> {
                    List<Entry> all = new ArrayList<>(newest);
                    all.addAll((List<Entry>) acc);
                    Collections.sort(all);
                    newest = new ArrayList<>(all.subList(Math.max(0, all.size() - op.n), all.size()));
                }
                default -> { }
            }
        }

        @SuppressWarnings("unchecked")
        private void leave(Object acc) {
            if (op.kind.equals("distinct")) {
                ((Set<String>) acc).forEach(v -> counts.compute(v, (k, n) -> n == 1 ? null : n - 1));
            } else if (op.kind.equals("covisit")) {
                ((Map<String, Long>) acc).forEach((v, m) -> counts.compute(v, (k, n) -> n.equals(m) ? null : n - m));
                top = null;
            }
        }

        @SuppressWarnings("unchecked")
        void add(Rec r) {
            advance(r.ts);
            long pane = Math.floorDiv(r.ts, op.slide);
            Object acc = panes.get(pane);
            switch (op.kind) {
                case "distinct" -> {
                    String v = r.field(op.of);
                    if (acc == null || !((Set<String>) acc).contains(v)) {
                        counts.merge(v, 1L, Long::sum);
                    }
                }
                case "covisit" -> {
                    for (String p : r.partners()) {
                        countPair(p);
                    }
                }
                case "last_n" -> {
                    newest.add(new Entry(r.ts, r.rid, r.field(op.of)));
                    while (newest.size() > op.n) {
                        newest.remove(0);
                    }
                }
                default -> { }
            }
            panes.put(pane, op.add(acc, r));
        }

        private void countPair(String v) {
            if (top == null) {
                counts.merge(v, 1L, Long::sum);
            } else {
                countInto(counts, top, v, op.topK);
            }
        }

        Object value(long ts) {
            advance(ts);
            long f = op.first(ts);
            long l = op.last(ts);
            switch (op.kind) {
                case "distinct":
                    return (long) counts.size();
                case "last_n": {
                    List<String> out = new ArrayList<>();
                    for (int i = newest.size() - 1; i >= 0; i--) {
                        Entry e = newest.get(i);
                        if (Math.floorDiv(e.ts, op.slide) >= f) {
                            out.add(e.value);
                        }
                    }
                    return out;
                }
                case "covisit":
                    if (top == null) {
                        top = top(counts, op.topK);
                    }
                    return new ArrayList<>(top);
                default: {
                    List<Object> accs = new ArrayList<>();
                    for (long p = f; p <= l; p++) {
                        Object a = panes.get(p);
                        if (a != null) {
                            accs.add(a);
                        }
                    }
                    return op.result(accs);
                }
            }
        }
    }

    /**
     * One more pair with v, and the top k of the counts kept: counts only grow, so only v can
     * enter or move, and only towards the front, past those it now ranks ahead of.
     */
    static void countInto(Map<String, Long> counts, List<String> top, String v, int k) {
        long n = counts.merge(v, 1L, Long::sum);
        int at = top.indexOf(v);
        if (at < 0) {
            if (top.size() < k) {
                top.add(v);
            } else if (ahead(v, n, top.get(k - 1), counts.get(top.get(k - 1)))) {
                top.set(k - 1, v);
            } else {
                return;
            }
            at = top.size() - 1;
        }
        while (at > 0 && ahead(v, n, top.get(at - 1), counts.get(top.get(at - 1)))) {
            top.set(at, top.get(at - 1));
            top.set(--at, v);
        }
    }

    /** a (n of it) ranks before b (m of it): more counts, ties by key. */
    private static boolean ahead(String a, long n, String b, long m) {
        return n > m || (n == m && a.compareTo(b) < 0);
    }

    private static final Comparator<Map.Entry<String, Long>> RANK =
            Comparator.<Map.Entry<String, Long>>comparingLong(e -> -e.getValue()).thenComparing(Map.Entry::getKey);

    /** The k keys of most counts, ties by key: a heap of k, not a sort of every key. */
    static List<String> top(Map<String, Long> counts, int k) {
        PriorityQueue<Map.Entry<String, Long>> worstFirst = new PriorityQueue<>(k + 1, RANK.reversed());
        for (Map.Entry<String, Long> e : counts.entrySet()) {
            worstFirst.add(e);
            if (worstFirst.size() > k) {
                worstFirst.poll();
            }
        }
        List<Map.Entry<String, Long>> best = new ArrayList<>(worstFirst);
        best.sort(RANK);
        List<String> out = new ArrayList<>(best.size());
        for (Map.Entry<String, Long> e : best) {
            out.add(e.getKey());
        }
        return out;
    }

    static <T extends Comparable<T>> void insort(List<T> list, T x) {
        int lo = 0;
        int hi = list.size();
        while (lo < hi) {  // after any equal ones, as Python's insort
            int mid = (lo + hi) >>> 1;
            if (x.compareTo(list.get(mid)) < 0) {
                hi = mid;
            } else {
                lo = mid + 1;
            }
        }
        list.add(lo, x);
    }

    /** The exactly rounded sum, as Python's math.fsum (Shewchuk's partials), for finite values. */
    static double fsum(double[] xs) {
        double[] partials = new double[Math.max(4, xs.length + 1)];
        int n = 0;
        for (double x0 : xs) {
            double x = x0;
            int i = 0;
            for (int j = 0; j < n; j++) {
                double y = partials[j];
                if (Math.abs(x) < Math.abs(y)) {
                    double t = x;
                    x = y;
                    y = t;
                }
                double hi = x + y;
                double lo = y - (hi - x);
                if (lo != 0.0) {
                    partials[i++] = lo;
                }
                x = hi;
            }
            if (i >= partials.length) {
                partials = java.util.Arrays.copyOf(partials, partials.length * 2);
            }
            partials[i] = x;
            n = i + 1;
        }
        double hi = 0.0;
        if (n > 0) {
            hi = partials[--n];
            double lo = 0.0;
            while (n > 0) {
                double x = hi;
                double y = partials[--n];
                hi = x + y;
                double yr = hi - x;
                lo = y - yr;
                if (lo != 0.0) {
                    break;
                }
            }
            // Round half-even across the partials left, as CPython does.
            if (n > 0 && ((lo < 0.0 && partials[n - 1] < 0.0) || (lo > 0.0 && partials[n - 1] > 0.0))) {
                double y = lo * 2.0;
                double x = hi + y;
                double yr = x - hi;
                if (y == yr) {
                    hi = x;
                }
            }
        }
        return hi;
    }
}
