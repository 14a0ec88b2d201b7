package freshrec;

import java.io.IOException;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HashSet;
import java.util.List;
import java.util.Map;
import java.util.Set;

import org.apache.flink.api.common.typeutils.SimpleTypeSerializerSnapshot;
import org.apache.flink.api.common.typeutils.TypeSerializer;
import org.apache.flink.api.common.typeutils.TypeSerializerSnapshot;
import org.apache.flink.core.memory.DataInputView;
import org.apache.flink.core.memory.DataOutputView;
import org.apache.flink.types.StringValue;

/**
 * {@link EntityState} as checkpoints write it, by hand: Kryo (Flink's fallback for its maps of
 * accumulators) spent a quarter of the catalogue job's CPU writing snapshots and copying state
 * on a 60k-event run, most of it on type tags and reference tracking. A copy is a deep copy of
 * what changes in place (the accumulators' sets, lists and maps); records and list entries are
 * never changed once made, so copies share them. The running totals EntityState keeps in
 * memory are not written: they are rebuilt from the panes.
 */
public final class EntityStateSerializer extends TypeSerializer<EntityState> {

    private static final long serialVersionUID = 1L;
    private static final int VERSION = 1;
    private static final byte LONG = 0;
    private static final byte DOUBLE = 1;
    private static final byte MEAN = 2;
    private static final byte SET = 3;
    private static final byte LIST = 4;
    private static final byte COUNTS = 5;

    @Override
    public boolean isImmutableType() {
        return false;
    }

    @Override
    public TypeSerializer<EntityState> duplicate() {
        return this;  // no state of its own
    }

    @Override
    public EntityState createInstance() {
        return new EntityState();
    }

    @Override
    public EntityState copy(EntityState from) {
        EntityState to = new EntityState();
        to.horizon = from.horizon;
        to.newest = from.newest;
        to.open = new ArrayList<>(from.open);
        to.openPanes = copyPanes(from.openPanes);
        to.settled = copyPanes(from.settled);
        to.versions = new HashMap<>(from.versions);
        to.unsent = from.unsent;
        return to;
    }

    @SuppressWarnings("unchecked")
    private static HashMap<String, HashMap<Long, Object>> copyPanes(HashMap<String, HashMap<Long, Object>> from) {
        HashMap<String, HashMap<Long, Object>> to = new HashMap<>(from.size() * 2);
        from.forEach((name, panes) -> {
            HashMap<Long, Object> copied = new HashMap<>(panes.size() * 2);
            panes.forEach((p, acc) -> copied.put(p,
                    acc instanceof double[] mean ? mean.clone()
                    : acc instanceof HashSet<?> set ? new HashSet<>((Set<String>) set)
                    : acc instanceof ArrayList<?> list ? new ArrayList<>((List<EntityState.Entry>) list)
                    : acc instanceof HashMap<?, ?> counts ? new HashMap<>((Map<String, Long>) counts)
                    : acc));  // Long, Double: immutable
            to.put(name, copied);
        });
        return to;
    }

    @Override
    public EntityState copy(EntityState from, EntityState reuse) {
        return copy(from);
    }

    @Override
    public int getLength() {
        return -1;
    }

    @Override
    public void serialize(EntityState s, DataOutputView out) throws IOException {
        out.writeByte(VERSION);
        out.writeLong(s.horizon);
        out.writeLong(s.newest);
        out.writeBoolean(s.unsent);
        out.writeInt(s.open.size());
        for (Rec r : s.open) {
            out.writeLong(r.ts);
            for (String f : new String[] {r.rid, r.behavior, r.user, r.item, r.category, r.other}) {
                StringValue.writeString(f, out);
            }
        }
        writePanes(s.openPanes, out);
        writePanes(s.settled, out);
        out.writeInt(s.versions.size());
        for (Map.Entry<String, String> e : s.versions.entrySet()) {
            StringValue.writeString(e.getKey(), out);
            StringValue.writeString(e.getValue(), out);
        }
    }

    @SuppressWarnings("unchecked")
    private static void writePanes(HashMap<String, HashMap<Long, Object>> all, DataOutputView out) throws IOException {
        out.writeInt(all.size());
        for (Map.Entry<String, HashMap<Long, Object>> def : all.entrySet()) {
            StringValue.writeString(def.getKey(), out);
            out.writeInt(def.getValue().size());
            for (Map.Entry<Long, Object> pane : def.getValue().entrySet()) {
                out.writeLong(pane.getKey());
                Object acc = pane.getValue();
                if (acc instanceof Long n) {
                    out.writeByte(LONG);
                    out.writeLong(n);
                } else if (acc instanceof Double x) {
                    out.writeByte(DOUBLE);
                    out.writeDouble(x);
                } else if (acc instanceof double[] mean) {
                    out.writeByte(MEAN);
                    out.writeDouble(mean[0]);
                    out.writeDouble(mean[1]);
                } else if (acc instanceof HashSet<?> set) {
                    out.writeByte(SET);
                    out.writeInt(set.size());
                    for (Object v : set) {
                        StringValue.writeString((String) v, out);
                    }
                } else if (acc instanceof ArrayList<?> list) {
                    out.writeByte(LIST);
                    out.writeInt(list.size());
                    for (EntityState.Entry e : (List<EntityState.Entry>) list) {
                        out.writeLong(e.ts);
                        StringValue.writeString(e.rid, out);
                        StringValue.writeString(e.value, out);
                    }
                } else if (acc instanceof HashMap<?, ?> counts) {
                    out.writeByte(COUNTS);
                    out.writeInt(counts.size());
                    for (Map.Entry<String, Long> e : ((Map<String, Long>) counts).entrySet()) {
                        StringValue.writeString(e.getKey(), out);
                        out.writeLong(e.getValue());
                    }
                } else {
                    throw new IOException("no encoding for an accumulator of " + acc.getClass());
                }
            }
        }
    }

    @Override
    public EntityState deserialize(DataInputView in) throws IOException {
        int version = in.readByte();
        if (version != VERSION) {
            throw new IOException("entity state written in format " + version + ", this build reads " + VERSION);
        }
        EntityState s = new EntityState();
        s.horizon = in.readLong();
        s.newest = in.readLong();
        s.unsent = in.readBoolean();
        int n = in.readInt();
        s.open = new ArrayList<>(n);
        for (int i = 0; i < n; i++) {
            long ts = in.readLong();
            s.open.add(new Rec(ts, StringValue.readString(in), StringValue.readString(in), StringValue.readString(in),
                               StringValue.readString(in), StringValue.readString(in), StringValue.readString(in)));
        }
        s.openPanes = readPanes(in);
        s.settled = readPanes(in);
        int versions = in.readInt();
        for (int i = 0; i < versions; i++) {
            s.versions.put(StringValue.readString(in), StringValue.readString(in));
        }
        return s;
    }

    private static HashMap<String, HashMap<Long, Object>> readPanes(DataInputView in) throws IOException {
        int defs = in.readInt();
        HashMap<String, HashMap<Long, Object>> all = new HashMap<>(defs * 2);
        for (int d = 0; d < defs; d++) {
            String name = StringValue.readString(in);
            int n = in.readInt();
            HashMap<Long, Object> panes = new HashMap<>(n * 2);
            for (int i = 0; i < n; i++) {
                long p = in.readLong();
                byte tag = in.readByte();
                panes.put(p, switch (tag) {
                    case LONG -> in.readLong();
                    case DOUBLE -> in.readDouble();
                    case MEAN -> new double[] {in.readDouble(), in.readDouble()};
                    case SET -> {
                        int k = in.readInt();
                        HashSet<String> set = new HashSet<>(k * 2);
                        for (int j = 0; j < k; j++) {
                            set.add(StringValue.readString(in));
                        }
                        yield set;
                    }
                    case LIST -> {
                        int k = in.readInt();
                        ArrayList<EntityState.Entry> list = new ArrayList<>(k);
                        for (int j = 0; j < k; j++) {
                            list.add(new EntityState.Entry(in.readLong(), StringValue.readString(in),
                                                           StringValue.readString(in)));
                        }
                        yield list;
                    }
                    case COUNTS -> {
                        int k = in.readInt();
                        HashMap<String, Long> counts = new HashMap<>(k * 2);
                        for (int j = 0; j < k; j++) {
                            counts.put(StringValue.readString(in), in.readLong());
                        }
                        yield counts;
                    }
                    default -> throw new IOException("unknown accumulator tag " + tag);
                });
            }
            all.put(name, panes);
        }
        return all;
    }

    @Override
    public EntityState deserialize(EntityState reuse, DataInputView in) throws IOException {
        return deserialize(in);
    }

    @Override
    public void copy(DataInputView in, DataOutputView out) throws IOException {
        serialize(deserialize(in), out);
    }

    @Override
    public boolean equals(Object o) {
        return o instanceof EntityStateSerializer;
    }

    @Override
    public int hashCode() {
        return EntityStateSerializer.class.hashCode();
    }

    @Override
    public TypeSerializerSnapshot<EntityState> snapshotConfiguration() {
        return new Snapshot();
    }

    /** Restores the serializer by class: the format's version is in each value. */
    public static final class Snapshot extends SimpleTypeSerializerSnapshot<EntityState> {
        public Snapshot() {
            super(EntityStateSerializer::new);
        }
    }
}
