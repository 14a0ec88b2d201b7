package freshrec;

import java.util.HashMap;
import java.util.Iterator;
import java.util.Map;
import java.util.concurrent.ConcurrentHashMap;

import org.apache.flink.table.functions.AggregateFunction;

/**
 * One entity's compiled definitions online, in Flink's own operator: the values of the newest
 * windows containing the entity's newest record, as streaming/aggregates.py computes them
 * ({@code EntityState.online}: every record up to the newest, in whatever order they came).
 *
 * <p>Called per record in a {@code GROUP BY entity} (streaming/sql.py, {@code Query.online}):
 * {@code pane_merge(plan, ts, ARRAY[inputs])}. The accumulator keeps the entity's totals per
 * pane (the greatest pane that tiles every window's slide) and drops the panes out of reach of
 * every window; the value merges each window's panes. With mini-batch, the value is computed
 * once per entity and flush, not per record.
 *
 * <p>The plan, a literal that {@code Query.online} writes: {@code fine|components|parts}.
 * <ul>
 *   <li>fine: the pane, in ms;
 *   <li>components: per total kept per pane, its aggregate and input, comma-separated:
 *       {@code S0} (sum of input 0), {@code C0} (count of non-null), {@code m0} (min),
 *       {@code M0} (max);
 *   <li>parts: per value, comma-separated, {@code kind:first component:slide ms:panes}, kind
 *       one of count, sum, mean (its sum and count components), min, max.
 * </ul>
 * The value: an array with one element per part (a count or sum of nothing is 0, the rest
 * NULL, as aggregates.py's {@code Op.result}).
 */
public class PaneMerge extends AggregateFunction<Double[], PaneMerge.Acc> {

    /** The entity's totals per pane and the time of its newest record. */
    public static class Acc {
        public Map<Long, Double[]> panes = new HashMap<>();
        public long newest = Long.MIN_VALUE;
    }

    /** A plan, parsed once per plan text. */
    static final class Plan {
        final long fine;
        final char[] aggs;
        final int[] inputs;
        final String[] kinds;
        final int[] firsts;
        final long[] slides;
        final long[] panes;
        final long reach;

        Plan(String text) {
            String[] parts = text.split("\\|");
            fine = Long.parseLong(parts[0]);
            String[] comps = parts[1].split(",");
            aggs = new char[comps.length];
            inputs = new int[comps.length];
            for (int i = 0; i < comps.length; i++) {
                aggs[i] = comps[i].charAt(0);
                inputs[i] = Integer.parseInt(comps[i].substring(1));
            }
            String[] values = parts[2].split(",");
            kinds = new String[values.length];
            firsts = new int[values.length];
            slides = new long[values.length];
            panes = new long[values.length];
            long longest = 0;
            for (int i = 0; i < values.length; i++) {
                String[] f = values[i].split(":");
                kinds[i] = f[0];
                firsts[i] = Integer.parseInt(f[1]);
                slides[i] = Long.parseLong(f[2]);
                panes[i] = Long.parseLong(f[3]);
                longest = Math.max(longest, slides[i] * panes[i]);
            }
            reach = longest;
        }

        /** The first pane any later value can reach, for a newest record at {@code newest}. */
        long first(long newest) {
            return Math.floorDiv(Math.floorDiv(newest, fine) * fine - reach, fine) + 1;
        }
    }

    private static final Map<String, Plan> PLANS = new ConcurrentHashMap<>();

    /** The call's plan, kept by the function, not in each entity's state: an operator's one
     * call site passes one literal, and its values follow its records. */
    private transient Plan plan;

    @Override
    public Acc createAccumulator() {
        return new Acc();
    }

    public void accumulate(Acc acc, String planText, Long ts, Double[] inputs) {
        if (ts == null) {
            return;
        }
        if (plan == null) {
            plan = PLANS.computeIfAbsent(planText, Plan::new);
        }
        Plan p = plan;
        if (ts > acc.newest) {
            boolean newPane = acc.newest == Long.MIN_VALUE
                    || Math.floorDiv(ts, p.fine) > Math.floorDiv(acc.newest, p.fine);
            acc.newest = ts;
            if (newPane) { // the reach moved: drop the panes now out of it
                long first = p.first(ts);
                Iterator<Long> it = acc.panes.keySet().iterator();
                while (it.hasNext()) {
                    if (it.next() < first) {
                        it.remove();
                    }
                }
            }
        }
        long pane = Math.floorDiv(ts, p.fine);
        if (pane < p.first(acc.newest)) {
            return; // out of reach of every window the entity's values can still come from
        }
        Double[] totals = acc.panes.computeIfAbsent(pane, k -> new Double[p.aggs.length]);
        for (int i = 0; i < p.aggs.length; i++) {
            Double v = inputs[p.inputs[i]];
            if (v == null) {
                continue;
            }
            Double t = totals[i];
            switch (p.aggs[i]) {
                case 'S':
                    totals[i] = t == null ? v : t + v;
                    break;
                case 'C':
                    totals[i] = t == null ? 1.0 : t + 1.0;
                    break;
                case 'm':
                    totals[i] = t == null || v < t ? v : t;
                    break;
                default:
                    totals[i] = t == null || v > t ? v : t;
            }
        }
    }

    @Override
    public Double[] getValue(Acc acc) {
        if (plan == null || acc.panes.isEmpty()) {
            return null;
        }
        Plan p = plan;
        Double[] out = new Double[p.kinds.length];
        for (int i = 0; i < out.length; i++) {
            long start = Math.floorDiv((Math.floorDiv(acc.newest, p.slides[i]) - p.panes[i] + 1) * p.slides[i], p.fine);
            int at = p.firsts[i];
            String kind = p.kinds[i];
            double sum = 0.0;
            double count = 0.0;
            Double best = null;
            for (Map.Entry<Long, Double[]> e : acc.panes.entrySet()) {
                if (e.getKey() < start) {
                    continue;
                }
                Double v = e.getValue()[at];
                if (v == null) {
                    continue;
                }
                if (kind.equals("min")) {
                    best = best == null || v < best ? v : best;
                } else if (kind.equals("max")) {
                    best = best == null || v > best ? v : best;
                } else {
                    sum += v;
                    if (kind.equals("mean")) {
                        Double n = e.getValue()[at + 1];
                        count += n == null ? 0.0 : n;
                    }
                }
            }
            if (kind.equals("min") || kind.equals("max")) {
                out[i] = best;
            } else if (kind.equals("mean")) {
                out[i] = count > 0 ? sum / count : null;
            } else {
                out[i] = sum;
            }
        }
        return out;
    }
}
