package freshrec;

import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.Collections;
import java.util.Iterator;
import java.util.List;
import java.util.Map;

import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.api.java.tuple.Tuple4;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.JsonNode;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * The Python operators' feature rows to Redis in Feast's layout ({@link FeastLayout}): rows
 * {@code (view, entity, ts, JSON object)} (jobs/feature_job.py's {@code ROW}). The operators
 * only hand the row on; the encoding, buffering and writes are here. A newer row of the same
 * view and entity replaces a waiting one.
 * <ul>
 *   <li>A view of the layout: the object holds values of its features (other keys are left out).
 *   <li>A catalogue operator's view ({@code @...}, features/dsl.py's {@code expand}): the object
 *       holds a value per definition, each definition a view of the layout.
 *   <li>The trending view (when given): the object is the list, written as one JSON value
 *       {@code {"ts": ts, "items": list}} at the trending key.
 * </ul>
 */
public class FeastJsonSink implements Sink<Tuple4<String, String, Long, String>> {

    private static final long serialVersionUID = 1L;
    private static final String DEFINED = "@";
    private static final byte[] SET = "SET".getBytes(StandardCharsets.US_ASCII);

    private final RedisBatchWriter.Settings settings;
    private final String layout;
    private final String trendingView;
    private final String trendingKey;

    public FeastJsonSink(String redisUrl, String layout, long flushMs, int batchRows, long patienceMs, String job,
                         String trendingView, String trendingKey) {
        this.settings = new RedisBatchWriter.Settings(redisUrl, flushMs, batchRows, patienceMs, job);
        this.layout = layout;
        this.trendingView = trendingView;
        this.trendingKey = trendingKey;
        new FeastLayout(layout);  // a bad layout fails where the job is built, not on a TaskManager
    }

    @Override
    public SinkWriter<Tuple4<String, String, Long, String>> createWriter(WriterInitContext context) {
        FeastLayout parsed = new FeastLayout(layout);
        ObjectMapper json = new ObjectMapper();
        return new RedisBatchWriter<>(settings, context) {
            @Override
            public void write(Tuple4<String, String, Long, String> row, Context c)
                    throws IOException, InterruptedException {
                String key = row.f0 + '\u0000' + row.f1;
                if (row.f0.equals(trendingView)) {
                    String value = "{\"ts\": " + row.f2 + ", \"items\": " + row.f3 + "}";
                    FeastLayout.Bytes out = new FeastLayout.Bytes();
                    out.command(List.of(SET, trendingKey.getBytes(StandardCharsets.UTF_8),
                                        value.getBytes(StandardCharsets.UTF_8)));
                    put(key, new Commands(out.toByteArray(), 1));
                    return;
                }
                List<FeastLayout.Part> parts = new ArrayList<>();
                boolean defined = row.f0.startsWith(DEFINED);
                FeastLayout.View rowView = defined ? null : parsed.view(row.f0);
                List<FeastLayout.Feature> features = new ArrayList<>();
                List<Object> values = new ArrayList<>();
                for (Iterator<Map.Entry<String, JsonNode>> it = json.readTree(row.f3).fields(); it.hasNext(); ) {
                    Map.Entry<String, JsonNode> e = it.next();
                    if (defined) {
                        FeastLayout.View view = parsed.view(e.getKey());
                        FeastLayout.Feature f = view.features.get(0);
                        parts.add(new FeastLayout.Part(view, List.of(f), Collections.singletonList(
                                value(e.getValue(), f.type()))));
                    } else {
                        FeastLayout.Feature f = rowView.byName.get(e.getKey());
                        if (f != null) {
                            features.add(f);
                            values.add(value(e.getValue(), f.type()));
                        }
                    }
                }
                if (!defined) {
                    parts.add(new FeastLayout.Part(rowView, features, values));
                }
                if (parts.isEmpty()) {
                    return;
                }
                put(key, parsed.commands(row.f1, row.f2, parts));
            }
        };
    }

    /** A JSON value as {@link FeastLayout#value} takes it: as Python's int(), float(), str() read it. */
    static Object value(JsonNode node, char type) {
        if (node == null || node.isNull()) {
            return null;
        }
        return switch (type) {
            case 'i' -> node.asLong();
            case 'd' -> node.asDouble();
            case 's' -> text(node);
            case 'S' -> {
                List<String> list = new ArrayList<>();
                node.forEach(x -> list.add(text(x)));
                yield list;
            }
            default -> {  // 'D'
                List<Double> list = new ArrayList<>();
                node.forEach(x -> list.add(x.asDouble()));
                yield list;
            }
        };
    }

    private static String text(JsonNode node) {
        return node.isTextual() ? node.asText() : node.toString();
    }
}
