package freshrec;

import java.io.IOException;
import java.util.ArrayList;
import java.util.Collections;
import java.util.List;

import org.apache.flink.api.connector.sink2.Sink;
import org.apache.flink.api.connector.sink2.SinkWriter;
import org.apache.flink.api.connector.sink2.WriterInitContext;
import org.apache.flink.types.Row;
import org.apache.flink.types.RowKind;

/**
 * Flink SQL's online rows to Redis in Feast's layout ({@link FeastLayout}), with no Python on
 * the way: rows {@code (entity, ts, a column per view of the layout, in its order)}, all of one
 * entity kind (streaming/sql.py, {@code Query.online}). An upsert stream: an update's before
 * row and a delete write nothing, the entity's next row replaces the value.
 */
public class FeastRedisSink implements Sink<Row> {

    private static final long serialVersionUID = 1L;

    private final RedisBatchWriter.Settings settings;
    private final String layout;

    public FeastRedisSink(String redisUrl, String layout, long flushMs, int batchRows, long patienceMs, String job) {
        this.settings = new RedisBatchWriter.Settings(redisUrl, flushMs, batchRows, patienceMs, job);
        this.layout = layout;
        new FeastLayout(layout);  // a bad layout fails where the job is built, not on a TaskManager
    }

    @Override
    public SinkWriter<Row> createWriter(WriterInitContext context) {
        FeastLayout parsed = new FeastLayout(layout);
        List<FeastLayout.View> views = parsed.views;
        return new RedisBatchWriter<>(settings, context) {
            @Override
            public void write(Row row, Context c) throws IOException, InterruptedException {
                RowKind kind = row.getKind();
                if (kind == RowKind.UPDATE_BEFORE || kind == RowKind.DELETE) {
                    return;
                }
                String entity = (String) row.getField(0);
                List<FeastLayout.Part> parts = new ArrayList<>(views.size());
                for (int i = 0; i < views.size(); i++) {
                    FeastLayout.View v = views.get(i);
                    parts.add(new FeastLayout.Part(v, v.features, Collections.singletonList(row.getField(2 + i))));
                }
                long ms = ((Number) row.getField(1)).longValue();
                put(entity, parsed.commands(entity, ms, parts));
            }
        };
    }
}
