package freshrec;

import java.io.BufferedInputStream;
import java.io.BufferedOutputStream;
import java.io.IOException;
import java.io.InputStream;
import java.io.OutputStream;
import java.io.Serializable;
import java.net.InetSocketAddress;
import java.net.Socket;
import java.net.URI;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.LinkedHashMap;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.common.operators.ProcessingTimeService;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.metrics.Counter;

/**
 * Rows waiting for Redis, written pipelined over one connection (RESP by hand: no client jar).
 *
 * <p>Rows wait at most {@code flushMs}, or until {@code batchRows} wait; a newer row of the
 * same key replaces a waiting one. Flink calls {@link #flush} before each checkpoint, so a
 * checkpoint never covers an unwritten row (at least once). While Redis is away, writes retry
 * with backoff and the job backs up; after {@code patienceMs} the task fails, and Flink
 * restarts it from the last checkpoint. An error reply other than {@code LOADING} fails it at
 * once.
 */
abstract class RedisBatchWriter<T> implements SinkWriter<T> {

    /** Where and how often to write: the sinks' serializable settings. */
    static final class Settings implements Serializable {
        private static final long serialVersionUID = 1L;
        final String redisUrl;
        final long flushMs;
        final int batchRows;
        final long patienceMs;
        final String job;

        Settings(String redisUrl, long flushMs, int batchRows, long patienceMs, String job) {
            this.redisUrl = redisUrl;
            this.flushMs = flushMs;
            this.batchRows = batchRows;
            this.patienceMs = patienceMs;
            this.job = job;
        }
    }

    /** A row's commands and how many replies they get. */
    record Commands(byte[] bytes, int count) { }

    private final Settings settings;
    private final ProcessingTimeService timers;
    private final Counter sent;
    private final Map<String, Commands> waiting = new LinkedHashMap<>();
    private boolean timerSet;
    private Socket socket;
    private OutputStream out;
    private InputStream in;

    RedisBatchWriter(Settings settings, WriterInitContext context) {
        this.settings = settings;
        this.timers = context.getProcessingTimeService();
        this.sent = context.metricGroup().getNumRecordsSendCounter();
    }

    /** Queue a row's commands under ``key`` (null: the row writes nothing). */
    void put(String key, Commands commands) throws IOException, InterruptedException {
        if (commands == null) {
            return;
        }
        waiting.put(key, commands);
        if (waiting.size() >= settings.batchRows) {
            send();
        } else if (!timerSet) {
            timerSet = true;
            timers.registerTimer(timers.getCurrentProcessingTime() + settings.flushMs, time -> {
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
        int replies = 0;
        for (Commands c : waiting.values()) {
            replies += c.count();
        }
        long downSince = -1;
        for (int attempt = 0; ; attempt++) {
            try {
                connect();
                for (Commands c : waiting.values()) {
                    out.write(c.bytes());
                }
                out.flush();
                for (int i = 0; i < replies; i++) {
                    reply();
                }
                if (downSince >= 0) {
                    log(String.format("Redis is back after %.1fs; writing on", (System.nanoTime() - downSince) / 1e9));
                }
                sent.inc(waiting.size());
                waiting.clear();
                return;
            } catch (IOException e) {
                disconnect();  // replies may be left unread on it
                if (e instanceof RedisError && !((RedisError) e).retry()) {
                    throw new IOException("Redis refused a feature row's write at " + settings.redisUrl + ": "
                                          + e.getMessage(), e);
                }
                long now = System.nanoTime();
                if (downSince < 0) {
                    downSince = now;
                    log("Redis unreachable at " + settings.redisUrl + " (" + e + "); " + waiting.size()
                        + " rows wait, retrying with backoff");
                } else if (now - downSince > settings.patienceMs * 1_000_000L) {
                    throw new IOException("Redis unreachable at " + settings.redisUrl + " for "
                                          + settings.patienceMs / 1000 + "s: " + e.getMessage(), e);
                }
                Thread.sleep(Math.min(50L << Math.min(attempt, 6), 2000L));
            }
        }
    }

    private void connect() throws IOException {
        if (socket != null) {
            return;
        }
        URI uri = URI.create(settings.redisUrl);
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
        String db = uri.getPath() == null ? "" : uri.getPath().replace("/", "");
        if (!db.isEmpty() && !db.equals("0")) {
            hello.add(List.of("SELECT".getBytes(StandardCharsets.US_ASCII), db.getBytes(StandardCharsets.US_ASCII)));
        }
        if (!hello.isEmpty()) {
            FeastLayout.Bytes b = new FeastLayout.Bytes();
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
        System.out.println("[" + settings.job + "] " + message);
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
}
