"""Append the feature log to Feast's offline store: Parquet per feature view and day.

The feature job sends every row it writes to Redis on to ``<events>-features``; this writer
consumes that topic and appends the rows under the Feast repo as
``offline/<view>/date=YYYY-MM-DD/part-<partition>.<first offset>-<its record time>.parquet`` (the layout the
views' FileSources read), so ``get_historical_features`` sees what the online store saw, as
of each row's event time.

Offsets are committed after the files are written. A crash in between re-reads the rows from
the same first records, so they land in files of the same names, replacing the first try's (the
record time keeps a fresh embedded broker, whose offsets restart at 0, from reusing names).

The consumer group is named after the log epoch (connectors/log_epoch.py). A broker that lost
its log gets the old log's positions committed to it by a writer that has not yet noticed,
and a group re-join would resume the new log from them, past its first rows. Under the new
epoch's group no commit exists, so the new log is read from its start; the embedded broker does
not keep commit metadata, which would otherwise carry the epoch.

Run: ``python -m connectors.offline_store`` with FRESHREC_* variables set (``freshrec up`` does).
"""

from __future__ import annotations

import json
import signal
import sys
import time
from collections import defaultdict
from typing import Any

import pyarrow as pa
from feast import FeatureView
from feast.types import Array, Float64, Int64, String
from kafka import KafkaConsumer
from kafka.errors import KafkaError

from connectors.kafka import consumer
from connectors.log_epoch import EpochWatch
from connectors.offline_files import conform, records, write_part
from features.registry import all_views
from features.store import repo_dir
from freshrec.config import Settings
from jobs.topics import epoch_topic, feature_log_topic, offline_group, topic_plan

_ARROW = {Int64: pa.int64(), Float64: pa.float64(), String: pa.string(), Array(String): pa.list_(pa.string()),
          Array(Int64): pa.list_(pa.int64()), Array(Float64): pa.list_(pa.float64())}


def arrow_schema(view: FeatureView) -> pa.Schema:
    """Join key, event time, then the view's features, typed as Feast declares them."""
    try:
        features = [pa.field(f.name, _ARROW[f.dtype]) for f in view.features]
    except KeyError as err:
        raise TypeError(f"feature view {view.name}: type {err} has no Parquet mapping; "
                        "add one to connectors/offline_store.py") from None
    keys = [pa.field(c.name, pa.string()) for c in view.entity_columns]
    return pa.schema([*keys, pa.field("event_timestamp", pa.timestamp("ms", tz="UTC")), *features])


def join_keys(view: FeatureView) -> list[str]:
    return [c.name for c in view.entity_columns]


class OfflineWriter:
    """Buffers feature-log rows and writes them out every ``flush_rows`` rows or ``flush_s`` seconds."""

    def __init__(self, settings: Settings, flush_rows: int = 50_000, flush_s: float = 5.0) -> None:
        self.settings = settings
        self.root = repo_dir(settings) / "offline"
        views = all_views(settings)
        self.keys = {v.name: join_keys(v) for v in views}
        self.schemas = {v.name: arrow_schema(v) for v in views}
        for name, schema in self.schemas.items():
            if n := conform(self.root, name, schema):
                log(f"rewrote {n} Parquet files of {name} in its current schema")
        self.flush_rows, self.flush_s = flush_rows, flush_s
        self.consumer: KafkaConsumer | None = None  # opened by run(), once the log epoch is known
        # (view, date) -> rows
        self.pending: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
        self.first: dict[int, tuple[int, int]] = {}  # partition -> (offset, record time) of its first row
        self.count = 0
        self.written = 0

    def add(self, raw: bytes, partition: int, offset: int, record_ms: int) -> None:
        for view, day, record in records(json.loads(raw), self.keys):
            self.pending[(view, day)].append(record)
        self.first.setdefault(partition, (offset, record_ms))
        self.count += 1

    def flush(self) -> int:
        """Write every pending row, then commit the offsets they came from."""
        if not self.count:
            return 0
        assert self.consumer is not None
        tag = "_".join(f"{p}.{o}-{t}" for p, (o, t) in sorted(self.first.items()))
        for (name, day), rows in self.pending.items():
            write_part(self.root, name, day, f"part-{tag}", rows, self.schemas[name])
        try:
            self.consumer.commit()
        except KafkaError as exc:  # a rebalance or a broker restart: the rows are on disk either way
            log(f"could not commit offsets ({exc}); rows read again later land in the same file names")
        n, self.count = self.count, 0
        self.written += n
        self.pending.clear()
        self.first.clear()
        return n

    def run(self, stop_after_idle_s: float | None = None) -> int:
        """Consume until SIGTERM/SIGINT, or (for tools and tests) until ``stop_after_idle_s`` pass
        without rows once rows came (30 s if none come at all); returns the rows written."""
        stopping = False

        def stop(*_: Any) -> None:
            nonlocal stopping
            stopping = True

        if stop_after_idle_s is None:
            signal.signal(signal.SIGTERM, stop)
            signal.signal(signal.SIGINT, stop)
        s = self.settings
        watch = EpochWatch(s.kafka_bootstrap, topic_plan(s), epoch_topic(s), s.broker_check_ms)
        self.consumer = self._consumer(watch.current.id)
        last_flush = time.monotonic()
        last_row = last_flush + 30 - (stop_after_idle_s or 0)  # the consumer's group join takes seconds
        try:
            while not stopping:
                new = watch.changed()
                if new is not None:
                    log(f"WARNING: the broker lost its log (new log epoch {new}): writing what is pending, then "
                        f"reading {feature_log_topic(s)} again from its start")
                    self.flush()
                    self.consumer.close()
                    self.consumer = self._consumer(new.id)
                for tp, records in self.consumer.poll(timeout_ms=500, max_records=5000).items():
                    for rec in records:
                        self.add(rec.value, tp.partition, rec.offset, rec.timestamp)
                    last_row = time.monotonic()
                now = time.monotonic()
                if self.count >= self.flush_rows or (self.count and now - last_flush >= self.flush_s):
                    self.flush()
                    last_flush = now
                if stop_after_idle_s is not None and now - last_row > stop_after_idle_s:
                    break
            self.flush()
        finally:
            watch.close()
            self.consumer.close()
        return self.written

    def _consumer(self, epoch: str) -> KafkaConsumer:
        s = self.settings
        return consumer(s.kafka_bootstrap, feature_log_topic(s), group=offline_group(s, epoch),
                        enable_auto_commit=False)


def log(message: str) -> None:
    print(f"[offline-store] {message}", file=sys.stderr, flush=True)


def main() -> int:
    settings = Settings.from_env()
    writer = OfflineWriter(settings)
    log(f"{feature_log_topic(settings)} -> {writer.root}")
    writer.run()
    log(f"stopped after writing {writer.written} rows")
    return 0


if __name__ == "__main__":
    sys.exit(main())

