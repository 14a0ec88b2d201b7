package freshrec;

import java.io.Serializable;
import java.util.LinkedHashMap;
import java.util.Map;

/**
 * A record an entity's definitions fold: an event, or a co-visit pair whose {@code other} holds
 * the partners, joined by {@link #SEPARATOR} (streaming/aggregates.py's {@code Rec}, in its
 * order: records compare field by field, so equal times fold in one order everywhere).
 */
public class Rec implements Comparable<Rec>, Serializable {

    private static final long serialVersionUID = 1L;
    /** features/dsl.py's KEY_SEPARATOR: between the parts of a composite key, and between partners. */
    public static final String SEPARATOR = "\u001f";

    public long ts;
    public String rid;
    public String behavior;
    public String user;
    public String item;
    public String category;
    public String other;

    public Rec() {}

    public Rec(long ts, String rid, String behavior, String user, String item, String category, String other) {
        this.ts = ts;
        this.rid = rid;
        this.behavior = behavior;
        this.user = user;
        this.item = item;
        this.category = category;
        this.other = other;
    }

    /** The co-visit partners a pair record carries (aggregates.py's {@code partners}). */
    public String[] partners() {
        return other.split(SEPARATOR, -1);
    }

    /** An event field by its name in the schema (features/dsl.py's STRING_FIELDS). */
    public String field(String name) {
        return switch (name) {
            case "user_id" -> user;
            case "item_id" -> item;
            case "category_id" -> category;
            case "behavior" -> behavior;
            default -> throw new IllegalArgumentException("no event field " + name);
        };
    }

    @Override
    public int compareTo(Rec o) {
        int c = Long.compare(ts, o.ts);
        if (c == 0) {
            c = rid.compareTo(o.rid);
        }
        if (c == 0) {
            c = behavior.compareTo(o.behavior);
        }
        if (c == 0) {
            c = user.compareTo(o.user);
        }
        if (c == 0) {
            c = item.compareTo(o.item);
        }
        if (c == 0) {
            c = category.compareTo(o.category);
        }
        return c != 0 ? c : other.compareTo(o.other);
    }

    /** As the DLQ's payload shows it: the fields by their Python names. */
    public Map<String, Object> fields() {
        Map<String, Object> m = new LinkedHashMap<>();
        m.put("ts", ts);
        m.put("rid", rid);
        m.put("behavior", behavior);
        m.put("user_id", user);
        m.put("item_id", item);
        m.put("category_id", category);
        m.put("other", other);
        return m;
    }
}
