package freshrec;

import java.io.ByteArrayOutputStream;
import java.io.Serializable;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HashMap;
import java.util.HexFormat;
import java.util.List;
import java.util.Map;

/**
 * Feast's Redis layout for a set of feature views: what connectors/feast_redis.py's
 * {@code FeastRedisWriter} writes and Feast's {@code get_online_features} reads.
 *
 * <p>An entity's row becomes an {@code HSET} of its hash: per view, each feature's field
 * (murmur3 of {@code view:feature}) holding a serialized {@code ValueProto}, and
 * {@code _ts:view} holding the row's time as a protobuf {@code Timestamp}; then an
 * {@code EXPIRE} with the longest TTL of the row's views (the hash holds all the entity's
 * views).
 *
 * <p>The text, which connectors/feast_redis.py's {@code sink_layout} derives from the views:
 * the project in hex, then a line per view, {@code name|header|order|value type|ttl s|ts
 * field|features}, features comma-separated as {@code name:field:type}, bytes and names in hex.
 * <ul>
 *   <li>header: the serialized entity key up to its values (the key count and the join keys);
 *   <li>order: the entity's parts (joined by U+001F, in join-key order) in Feast's sorted order;
 *   <li>value type: the code Feast writes before each string value;
 *   <li>type: {@code i} Int64, {@code d} Float64, {@code s} String, {@code S} Array(String),
 *       {@code D} Array(Float64). A null value writes an empty ValueProto: Feast reads None.
 * </ul>
 */
final class FeastLayout implements Serializable {

    private static final long serialVersionUID = 1L;
    private static final String KEY_SEPARATOR = "\u001f";
    private static final byte[] HSET = "HSET".getBytes(StandardCharsets.US_ASCII);
    private static final byte[] EXPIRE = "EXPIRE".getBytes(StandardCharsets.US_ASCII);

    /** One feature of a view: its hash field and its type. */
    record Feature(String name, byte[] field, char type) implements Serializable { }

    /** One view: its entity key's shape, its timestamp field and its features. */
    static final class View implements Serializable {
        private static final long serialVersionUID = 1L;
        final String name;
        final byte[] header;
        final int[] order;
        final int valueType;
        final long ttl;
        final byte[] tsField;
        final List<Feature> features = new ArrayList<>();
        final Map<String, Feature> byName = new HashMap<>();

        View(String line) {
            String[] p = line.split("\\|", -1);
            if (p.length != 7) {
                throw new IllegalArgumentException("a Feast layout line has 7 parts, not " + p.length + ": " + line);
            }
            HexFormat hex = HexFormat.of();
            name = text(p[0]);
            header = hex.parseHex(p[1]);
            String[] positions = p[2].split(",");
            order = new int[positions.length];
            for (int i = 0; i < positions.length; i++) {
                order[i] = Integer.parseInt(positions[i]);
            }
            valueType = Integer.parseInt(p[3]);
            ttl = Long.parseLong(p[4]);
            tsField = hex.parseHex(p[5]);
            for (String f : p[6].split(",")) {
                String[] c = f.split(":");
                char type = c[2].charAt(0);
                if ("idsSD".indexOf(type) < 0) {
                    throw new IllegalArgumentException(name + "'s type " + c[2] + " is none of i (Int64), d (Float64), "
                                                       + "s (String), S (Array(String)), D (Array(Float64))");
                }
                Feature feature = new Feature(text(c[0]), hex.parseHex(c[1]), type);
                features.add(feature);
                byName.put(feature.name(), feature);
            }
        }

        /** Feast's Redis key of an entity: the serialized entity key, then the project. */
        byte[] key(String entity, byte[] project) {
            String[] parts = order.length > 1 ? entity.split(KEY_SEPARATOR, -1) : new String[] {entity};
            if (parts.length != order.length) {
                throw new IllegalArgumentException(name + ": entity " + entity.replace(KEY_SEPARATOR, "|") + " has "
                                                   + parts.length + " parts, its key " + order.length);
            }
            Bytes out = new Bytes();
            out.writeBytes(header);
            for (int i : order) {
                byte[] value = parts[i].getBytes(StandardCharsets.UTF_8);
                out.int32(valueType);
                out.int32(value.length);
                out.writeBytes(value);
            }
            out.writeBytes(project);
            return out.toByteArray();
        }
    }

    static String text(String hex) {
        return new String(HexFormat.of().parseHex(hex), StandardCharsets.UTF_8);
    }

    final byte[] project;
    final List<View> views = new ArrayList<>();
    final Map<String, View> byName = new HashMap<>();

    FeastLayout(String text) {
        String[] lines = text.split("\n");
        project = HexFormat.of().parseHex(lines[0]);
        for (int i = 1; i < lines.length; i++) {
            View v = new View(lines[i]);
            views.add(v);
            byName.put(v.name, v);
        }
        if (views.isEmpty()) {
            throw new IllegalArgumentException("a Feast layout names no view");
        }
    }

    View view(String name) {
        View v = byName.get(name);
        if (v == null) {
            throw new IllegalArgumentException("feature view " + name + " is not in the sink's layout "
                                               + byName.keySet() + ": was the catalogue applied?");
        }
        return v;
    }

    /** Part of a row: values of some of a view's features (by position). */
    record Part(View view, List<Feature> features, List<Object> values) { }

    /** An entity's row at ``ms``, in RESP: an HSET, and an EXPIRE when a view has a TTL. */
    RedisBatchWriter.Commands commands(String entity, long ms, List<Part> parts) {
        byte[] key = parts.get(0).view().key(entity, project);
        byte[] ts = timestamp(ms);
        List<byte[]> hset = new ArrayList<>();
        hset.add(HSET);
        hset.add(key);
        long ttl = 0;
        for (Part part : parts) {
            for (int i = 0; i < part.features().size(); i++) {
                Feature f = part.features().get(i);
                hset.add(f.field());
                hset.add(value(part.values().get(i), f.type()));
            }
            hset.add(part.view().tsField);
            hset.add(ts);
            ttl = Math.max(ttl, part.view().ttl);
        }
        Bytes out = new Bytes();
        out.command(hset);
        if (ttl > 0) {
            out.command(List.of(EXPIRE, key, Long.toString(ttl).getBytes(StandardCharsets.US_ASCII)));
        }
        return new RedisBatchWriter.Commands(out.toByteArray(), ttl > 0 ? 2 : 1);
    }

    /**
     * A ValueProto: int64_val (field 4, varint), double_val (5, fixed64), string_val (2),
     * string_list_val (12, a StringList: strings in field 1) or double_list_val (15, a
     * DoubleList: packed doubles in field 1); nothing for null. ``v`` is a Number or a String,
     * or for a list a List of its elements.
     */
    static byte[] value(Object v, char type) {
        Bytes out = new Bytes();
        if (v == null) {
            return out.toByteArray();
        }
        switch (type) {
            case 'i' -> {
                out.write(0x20);
                out.varint(((Number) v).longValue());
            }
            case 'd' -> {
                out.write(0x29);
                out.fixed64(((Number) v).doubleValue());
            }
            case 's' -> out.bytes(0x12, String.valueOf(v).getBytes(StandardCharsets.UTF_8));
            case 'S' -> {
                Bytes list = new Bytes();
                for (Object x : (List<?>) v) {
                    list.bytes(0x0a, String.valueOf(x).getBytes(StandardCharsets.UTF_8));
                }
                out.bytes(0x62, list.toByteArray());
            }
            default -> {  // 'D'
                Bytes packed = new Bytes();
                for (Object x : (List<?>) v) {
                    packed.fixed64(((Number) x).doubleValue());
                }
                Bytes list = new Bytes();
                if (packed.size() > 0) {  // protobuf leaves an empty packed field out
                    list.bytes(0x0a, packed.toByteArray());
                }
                out.bytes(0x7a, list.toByteArray());
            }
        }
        return out.toByteArray();
    }

    /** A protobuf Timestamp (seconds: field 1, nanos: field 2; zeros left out, as protobuf does). */
    static byte[] timestamp(long ms) {
        Bytes out = new Bytes();
        long seconds = Math.floorDiv(ms, 1000L);
        long nanos = Math.floorMod(ms, 1000L) * 1_000_000L;
        if (seconds != 0) {
            out.write(0x08);
            out.varint(seconds);
        }
        if (nanos != 0) {
            out.write(0x10);
            out.varint(nanos);
        }
        return out.toByteArray();
    }

    /** A byte buffer with the few encodings the layout needs. */
    static final class Bytes extends ByteArrayOutputStream {
        void int32(int v) {  // little-endian, as Feast's struct.pack("<I")
            for (int i = 0; i < 4; i++) {
                write((v >>> (8 * i)) & 0xff);
            }
        }

        void varint(long v) {
            while ((v & ~0x7fL) != 0) {
                write((int) ((v & 0x7f) | 0x80));
                v >>>= 7;
            }
            write((int) v);
        }

        void fixed64(double d) {
            long bits = Double.doubleToRawLongBits(d);
            for (int i = 0; i < 8; i++) {
                write((int) (bits >>> (8 * i)) & 0xff);
            }
        }

        /** A length-delimited field: its tag, its length, its bytes. */
        void bytes(int tag, byte[] b) {
            write(tag);
            varint(b.length);
            writeBytes(b);
        }

        void ascii(String s) {
            write(s.getBytes(StandardCharsets.US_ASCII), 0, s.length());
        }

        void command(List<byte[]> args) {
            ascii("*" + args.size() + "\r\n");
            for (byte[] a : args) {
                ascii("$" + a.length + "\r\n");
                write(a, 0, a.length);
                ascii("\r\n");
            }
        }
    }
}
