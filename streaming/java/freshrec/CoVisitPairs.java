package freshrec;

import java.io.Serializable;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.functions.OpenContext;
import org.apache.flink.api.common.state.ValueState;
import org.apache.flink.api.common.state.ValueStateDescriptor;
import org.apache.flink.api.common.typeinfo.TypeInformation;
import org.apache.flink.streaming.api.functions.KeyedProcessFunction;
import org.apache.flink.util.Collector;

/**
 * Per user: each view pairs with the user's other views within the gap, both ways
 * (streaming/definitions.py's {@code CoVisitPairs} and streaming/state.py's
 * {@code RecentViews}, rule for rule). The viewed item's pairs of one time leave as one record,
 * partners joined; each partner's own pair goes to its own key.
 */
public class CoVisitPairs extends KeyedProcessFunction<String, Rec, Rec> {

    private static final long serialVersionUID = 1L;
    private final long gapMs;
    private final long keepMs;
    private final int maxViews;
    private transient ValueState<Views> state;

    /** A user's views kept long enough to pair each new one with those near it in time. */
    public static class Views implements Serializable {
        private static final long serialVersionUID = 1L;
        public ArrayList<EntityState.Entry> views = new ArrayList<>();  // (time, event id, item), sorted
        public long newest = 0;
    }

    CoVisitPairs(long gapMs, long keepMs, int maxViews) {
        this.gapMs = gapMs;
        this.keepMs = keepMs;
        this.maxViews = maxViews;
    }

    @Override
    public void open(OpenContext context) {
        state = getRuntimeContext().getState(new ValueStateDescriptor<>("views", TypeInformation.of(Views.class)));
    }

    @Override
    public void processElement(Rec r, Context ctx, Collector<Rec> out) throws Exception {
        Views v = state.value();
        if (v == null) {
            v = new Views();
        }
        EntityState.Entry view = new EntityState.Entry(r.ts, r.rid, r.item);
        int i = lowerBound(v.views, view);
        if (i < v.views.size() && v.views.get(i).compareTo(view) == 0) {
            return;  // seen: no new pairs
        }
        v.views.add(i, view);
        String rid = r.user + Rec.SEPARATOR + r.rid;
        Map<Long, List<String>> mine = new LinkedHashMap<>();
        for (EntityState.Entry w : v.views) {
            if (!w.value.equals(r.item) && Math.abs(w.ts - r.ts) <= gapMs) {
                long at = Math.max(w.ts, r.ts);
                mine.computeIfAbsent(at, k -> new ArrayList<>()).add(w.value);
                out.collect(new Rec(at, rid, "view", r.user, w.value, "", r.item));
            }
        }
        for (Map.Entry<Long, List<String>> e : mine.entrySet()) {
            out.collect(new Rec(e.getKey(), rid, "view", r.user, r.item, "", String.join(Rec.SEPARATOR, e.getValue())));
        }
        v.newest = Math.max(v.newest, r.ts);
        // Bounded, so a bot cannot grow state (the one place where order can matter).
        int cut = lowerBound(v.views, new EntityState.Entry(v.newest - keepMs + 1, "", ""));
        int from = Math.max(cut, v.views.size() - maxViews);
        v.views = new ArrayList<>(v.views.subList(from, v.views.size()));
        state.update(v);
    }

    private static int lowerBound(List<EntityState.Entry> views, EntityState.Entry x) {
        int lo = 0;
        int hi = views.size();
        while (lo < hi) {
            int mid = (lo + hi) >>> 1;
            if (views.get(mid).compareTo(x) < 0) {
                lo = mid + 1;
            } else {
                hi = mid;
            }
        }
        return lo;
    }
}
