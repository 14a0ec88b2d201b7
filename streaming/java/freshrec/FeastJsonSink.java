package freshrec;

import java.io.IOException;
import java.util.ArrayList;
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
 * The catalogue's Python operators' online rows to Redis in Feast's layout
 * ({@link FeastLayout}): rows {@code (operator view, entity, ts, JSON object)} whose object
 * holds a value per definition, each definition a view of the layout (features/dsl.py's
 * {@code expand}). The Python operators only hand the row on; the encoding and the writes are
 * here. A newer row of the same operator view and entity replaces a waiting one.
 */
public class FeastJsonSink implements Sink<Tuple4<String, String, Long, String>> {

    private static final long serialVersionUID = 1L;

    private final RedisBatchWriter.Settings settings;
    private final String layout;

    public FeastJsonSink(String redisUrl, String layout, long flushMs, int batchRows, long patienceMs, String job) {
        this.settings = new RedisBatchWriter.Settings(redisUrl, flushMs, batchRows, patienceMs, job);
        this.layout = layout;
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
                List<FeastLayout.View> views = new ArrayList<>();
                List<Object> values = new ArrayList<>();
                for (Iterator<Map.Entry<String, JsonNode>> it = json.readTree(row.f3).fields(); it.hasNext(); ) {
                    Map.Entry<String, JsonNode> e = it.next();
                    FeastLayout.View view = parsed.view(e.getKey());
                    views.add(view);
                    values.add(value(e.getValue(), view.type));
                }
                if (views.isEmpty()) {
                    return;
                }
                put(row.f0 + '\u0000' + row.f1, new Commands(parsed.commands(row.f1, row.f2, views, values),
                                                             FeastLayout.commandsPerRow(views)));
            }
        };
    }

    /** A JSON value as {@link FeastLayout#value} takes it: as Python's int(), float(), str() read it. */
    static Object value(JsonNode node, char type) {
        if (node == null || node.isNull()) {
            return null;
        }
        if (type == 'S') {
            List<String> list = new ArrayList<>();
            node.forEach(x -> list.add(x.isTextual() ? x.asText() : x.toString()));
            return list;
        }
        return type == 'i' ? (Object) node.asLong() : (Object) node.asDouble();
    }
}
