package freshrec;

import java.nio.charset.StandardCharsets;

import org.apache.flink.api.common.serialization.SerializationSchema;
import org.apache.flink.api.java.tuple.Tuple4;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.core.JsonProcessingException;
import org.apache.flink.shaded.jackson2.com.fasterxml.jackson.databind.ObjectMapper;

/**
 * A feature row {@code (view, entity, ts, JSON object)} as the feature log's line, the offline
 * store's input: {@code {"view": ..., "entity": ..., "ts": ..., "values": {...}}}.
 */
public class FeatureLogLine implements SerializationSchema<Tuple4<String, String, Long, String>> {

    private static final long serialVersionUID = 1L;
    private static final ObjectMapper JSON = new ObjectMapper();

    @Override
    public byte[] serialize(Tuple4<String, String, Long, String> row) {
        try {
            return ("{\"view\":" + JSON.writeValueAsString(row.f0) + ",\"entity\":" + JSON.writeValueAsString(row.f1)
                    + ",\"ts\":" + row.f2 + ",\"values\":" + row.f3 + "}").getBytes(StandardCharsets.UTF_8);
        } catch (JsonProcessingException e) {
            throw new IllegalStateException("cannot write a string as JSON", e);
        }
    }
}
