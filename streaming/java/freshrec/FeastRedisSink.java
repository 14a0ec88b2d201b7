package freshrec;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.ByteArrayOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.HexFormat;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.operators.ProcessingTimeService;
import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.metrics.Counter;
import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;

/**
 * Flink SQL's online rows to Redis in Feast's layout, pipelined, with no Python on the way.
 *
 * <p>The rows: {@code (entity, ts, one column per feature view)}, each view of one feature, all
 * of one entity kind (streaming/sql.py, {@code Query.online}). Each row becomes an {@code HSET}
 * of the entity's hash: per view its feature's field (murmur3 of {@code view:feature}) holding
 * a serialized {@code ValueProto}, and {@code _ts:view} holding the row's time as a protobuf
 * {@code Timestamp}; then an {@code EXPIRE} when the views have a TTL. That is what
 * connectors/feast_redis.py's {@code FeastRedisWriter} writes, and Feast's
 * {@code get_online_features} reads.
 *
 * <p>The layout, a text that connectors/feast_redis.py's {@code sink_layout} derives from the
 * Feast views: {@code header|order|value type|project|ttl s|columns}, bytes in hex.
 * <ul>
 *   <li>header: the serialized entity key up to its values (the key count and the join keys);
 *   <li>order: the entity's parts (joined by U+001F, in join-key order) in Feast's sorted order;
 *   <li>value type: the code Feast writes before each string value;
 *   <li>columns: per view, comma-separated, {@code field:ts field:type}, type {@code i} for
 *       Int64 and {@code d} for Float64 (NULL writes an empty value: Feast reads None).
 * </ul>
 *
 * <p>Rows wait at most {@code flushMs}, or until {@code batchRows} entities wait; a newer row of
 * an entity replaces its waiting one. Flink calls {@link SinkWriter#flush} before each
 * checkpoint, so a checkpoint never covers an unwritten row (at least once). While Redis is
 * away, writes retry with backoff and the job backs up; after {@code patienceMs} the task
 * fails, and Flink restarts it from the last checkpoint.
 */
public class FeastRedisSink implements Sink<Row> {

    private static final long serialVersionUID = 1L;
    private static final char KEY_SEPARATOR = '\u001f';

    private final String redisUrl;
    private final String layout;
    private final long flushMs;
    private final int batchRows;
    private final long patienceMs;
    private final String name;

    public FeastRedisSink(String redisUrl, String layout, long flushMs, int batchRows, long patienceMs, String name) {
        this.redisUrl = redisUrl;
        this.layout = layout;
        this.flushMs = flushMs;
        this.batchRows = batchRows;
        this.patienceMs = patienceMs;
        this.name = name;
        new Layout(layout);  // a bad layout fails where the job is built, not on a TaskManager
    }

    @Override
    public SinkWriter<Row> createWriter(WriterInitContext context) {
        return new Writer(context.getProcessingTimeService(),
                          context.metricGroup().getNumRecordsSendCounter());
    }

    /** The layout, parsed. */
    static final class Layout {
        final byte[] header;
        final int[] order;
        final int valueType;
        final byte[] project;
        final long ttl;
        final byte[][] fields;
        final byte[][] tsFields;
        final char[] types;

        Layout(String text) {
            String[] parts = text.split("\\|", -1);
            if (parts.length != 6) {
                throw new IllegalArgumentException("a FeastRedisSink layout has 6 parts, not " + parts.length + ": " + text);
            }
            HexFormat hex = HexFormat.of();
            header = hex.parseHex(parts[0]);
            String[] positions = parts[1].split(",");
            order = new int[positions.length];
            for (int i = 0; i < positions.length; i++) {
                order[i] = Integer.parseInt(positions[i]);
            }
            valueType = Integer.parseInt(parts[2]);
            project = hex.parseHex(parts[3]);
            ttl = Long.parseLong(parts[4]);
            String[] columns = parts[5].split(",");
            fields = new byte[columns.length][];
            tsFields = new byte[columns.length][];
            types = new char[columns.length];
            for (int i = 0; i < columns.length; i++) {
                String[] c = columns[i].split(":");
                fields[i] = hex.parseHex(c[0]);
                tsFields[i] = hex.parseHex(c[1]);
                types[i] = c[2].charAt(0);
                if (types[i] != 'i' && types[i] != 'd') {
                    throw new IllegalArgumentException("column type " + c[2] + " is neither i (Int64) nor d (Float64)");
                }
            }
        }

        /** Feast's Redis key of an entity: the serialized entity key, then the project. */
        byte[] key(String entity) {
            String[] parts = order.length > 1 ? entity.split(String.valueOf(KEY_SEPARATOR), -1) : new String[] {entity};
            if (parts.length != order.length) {
                throw new IllegalArgumentException("entity " + entity.replace(KEY_SEPARATOR, '|') + " has "
                                                   + parts.length + " parts, its kind " + order.length);
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

        /** The row's commands in RESP, and how many there are. */
        byte[] commands(Row row) {
            byte[] key = key((String) row.getField(0));
            long ms = ((Number) row.getField(1)).longValue();
            byte[] ts = timestamp(ms);
            List<byte[]> hset = new ArrayList<>(2 + 4 * fields.length);
            hset.add(HSET);
            hset.add(key);
            for (int i = 0; i < fields.length; i++) {
                hset.add(fields[i]);
                hset.add(value(row.getField(2 + i), types[i]));
                hset.add(tsFields[i]);
                hset.add(ts);
            }
            Bytes out = new Bytes();
            out.command(hset);
            if (ttl > 0) {
                out.command(List.of(EXPIRE, key, Long.toString(ttl).getBytes(StandardCharsets.US_ASCII)));
            }
            return out.toByteArray();
        }

        int commandsPerRow() {
            return ttl > 0 ? 2 : 1;
        }
    }

    private static final byte[] HSET = "HSET".getBytes(StandardCharsets.US_ASCII);
    private static final byte[] EXPIRE = "EXPIRE".getBytes(StandardCharsets.US_ASCII);

    /** A ValueProto: int64_val (field 4, varint) or double_val (field 5, fixed64); none for NULL. */
    static byte[] value(Object v, char type) {
        Bytes out = new Bytes();
        if (v == null) {
            return out.toByteArray();
        }
        Number n = (Number) v;
        if (type == 'i') {
            out.write(0x20);
            out.varint(n.longValue());
        } else {
            out.write(0x29);
            long bits = Double.doubleToRawLongBits(n.doubleValue());
            for (int i = 0; i < 8; i++) {
                out.write((int) (bits >>> (8 * i)) & 0xff);
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

    /** An error reply; {@code LOADING} (a restarted server reading its data) is worth a retry. */
    static final class RedisError extends IOException {
        RedisError(String message) {
            super(message);
        }

        boolean retry() {
            return getMessage().startsWith("LOADING");
        }
    }

    /** The rows waiting for Redis, and the connection they go out on. */
    final class Writer implements SinkWriter<Row> {
        private final Layout layout = new Layout(FeastRedisSink.this.layout);
        private final ProcessingTimeService timers;
        private final Counter sent;
        private final Map<String, byte[]> waiting = new LinkedHashMap<>();
        private boolean timerSet;
        private Socket socket;
        private OutputStream out;
        private InputStream in;

        Writer(ProcessingTimeService timers, Counter sent) {
            this.timers = timers;
            this.sent = sent;
        }

        @Override
        public void write(Row row, Context context) throws IOException, InterruptedException {
            RowKind kind = row.getKind();
            if (kind == RowKind.UPDATE_BEFORE || kind == RowKind.DELETE) {
                return;  // an upsert stream: the entity's next row replaces the value
            }
            waiting.put((String) row.getField(0), layout.commands(row));
            if (waiting.size() >= batchRows) {
                send();
            } else if (!timerSet) {
                timerSet = true;
                timers.registerTimer(timers.getCurrentProcessingTime() + flushMs, time -> {
                    timerSet = false;
                    send();
                });
            }
        }

        @Override
        public void flush(boolean endOfInput) throws IOException, InterruptedException {
            send();
        }

        @Override
        public void close() {
            disconnect();
        }

        private void send() throws IOException, InterruptedException {
            if (waiting.isEmpty()) {
                return;
            }
            int replies = waiting.size() * layout.commandsPerRow();
            long downSince = -1;
            for (int attempt = 0; ; attempt++) {
                try {
                    connect();
                    for (byte[] commands : waiting.values()) {
                        out.write(commands);
                    }
                    out.flush();
                    for (int i = 0; i < replies; i++) {
                        reply();
                    }
                    if (downSince >= 0) {
                        log(String.format("Redis is back after %.1fs; writing on",
                                          (System.nanoTime() - downSince) / 1e9));
                    }
                    sent.inc(waiting.size());
                    waiting.clear();
                    return;
                } catch (IOException e) {
                    disconnect();  // replies may be left unread on it
                    if (e instanceof RedisError && !((RedisError) e).retry()) {
                        throw new IOException("Redis refused a feature row's write at " + redisUrl + ": "
                                              + e.getMessage(), e);
                    }
                    long now = System.nanoTime();
                    if (downSince < 0) {
                        downSince = now;
                        log("Redis unreachable at " + redisUrl + " (" + e + "); " + waiting.size()
                            + " rows wait, retrying with backoff");
                    } else if (now - downSince > patienceMs * 1_000_000L) {
                        throw new IOException("Redis unreachable at " + redisUrl + " for " + patienceMs / 1000
                                              + "s: " + e.getMessage(), e);
                    }
                    Thread.sleep(Math.min(50L << Math.min(attempt, 6), 2000L));
                }
            }
        }

        private void connect() throws IOException {
            if (socket != null) {
                return;
            }
            URI uri = URI.create(redisUrl);
            Socket s = new Socket();
            try {
                s.setTcpNoDelay(true);
                s.setSoTimeout(30_000);
                s.connect(new InetSocketAddress(uri.getHost(), uri.getPort() < 0 ? 6379 : uri.getPort()), 5_000);
                socket = s;
                out = new BufferedOutputStream(s.getOutputStream(), 1 << 16);
                in = new BufferedInputStream(s.getInputStream(), 1 << 16);
            } catch (IOException e) {
                s.close();
                throw e;
            }
            List<List<byte[]>> hello = new ArrayList<>();
            String user = uri.getUserInfo();
            if (user != null && !user.isEmpty()) {  // redis://[user]:password@host
                int colon = user.indexOf(':');
                List<byte[]> auth = new ArrayList<>(List.of("AUTH".getBytes(StandardCharsets.US_ASCII)));
                if (colon > 0) {
                    auth.add(user.substring(0, colon).getBytes(StandardCharsets.UTF_8));
                }
                auth.add(user.substring(colon + 1).getBytes(StandardCharsets.UTF_8));
                hello.add(auth);
            }
            String path = uri.getPath() == null ? "" : uri.getPath().replace("/", "");
            if (!path.isEmpty() && !path.equals("0")) {
                hello.add(List.of("SELECT".getBytes(StandardCharsets.US_ASCII),
                                  path.getBytes(StandardCharsets.US_ASCII)));
            }
            if (!hello.isEmpty()) {
                Bytes b = new Bytes();
                hello.forEach(b::command);
                out.write(b.toByteArray());
                out.flush();
                for (int i = 0; i < hello.size(); i++) {
                    reply();
                }
            }
        }

        private void disconnect() {
            if (socket != null) {
                try {
                    socket.close();
                } catch (IOException ignored) {
                    // closing a broken connection: nothing to keep
                }
                socket = null;
            }
        }

        /** Reads one reply, whatever it holds; an error reply raises {@link RedisError}. */
        private void reply() throws IOException {
            int type = in.read();
            if (type < 0) {
                throw new IOException("Redis closed the connection");
            }
            String line = line();
            switch (type) {
                case '+', ':' -> { }
                case '-' -> throw new RedisError(line);
                case '$' -> {
                    long n = Long.parseLong(line);
                    if (n >= 0) {
                        in.skipNBytes(n + 2);
                    }
                }
                case '*' -> {
                    for (long n = Long.parseLong(line); n > 0; n--) {
                        reply();
                    }
                }
                default -> throw new IOException("not a Redis reply: " + (char) type + line);
            }
        }

        private String line() throws IOException {
            StringBuilder b = new StringBuilder();
            for (int c = in.read(); c != '\r'; c = in.read()) {
                if (c < 0) {
                    throw new IOException("Redis closed the connection");
                }
                b.append((char) c);
            }
            in.read();  // '\n'
            return b.toString();
        }

        private void log(String message) {
            // stdout, as the Python operators log: `freshrec up` keeps each job's in its log file
            System.out.println("[" + name + "] " + message);
        }
    }
}
