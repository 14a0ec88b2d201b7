"""The backfill's own operators (jobs/backfill.py): read staged events, write days of Parquet.

Kept apart from jobs/backfill.py, whose imports (tqdm, file locks, Feast's store) the
embedded Python of a Flink task should not load.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pyflink.common import Types
from pyflink.datastream import KeyedProcessFunction, RuntimeContext
from pyflink.datastream.state import ValueStateDescriptor

from features.dsl import load

DAY_MS = 86_400_000


def log(message: str) -> None:
    print(f"[backfill] {message}", flush=True)  # stdout: the JVM running operators drops their stderr


def day_of(ts: int) -> str:
    return datetime.fromtimestamp(ts / 1000, tz=UTC).strftime("%Y-%m-%d")


@dataclass
class Layout:
    """Where a backfill writes and keeps its books."""

    root: Path  # the Feast repo's offline/ folder

    @property
    def books(self) -> Path:
        return self.root / "_backfill"

    def manifest(self, day: str) -> Path:
        return self.books / "partitions" / f"{day}.json"

    def done(self, day: str, lo: int, hi: int, fingerprint: str) -> bool:
        try:
            m = json.loads(self.manifest(day).read_text())
        except (OSError, ValueError):
            return False
        return m.get("catalogue") == fingerprint and m["from"] <= lo and m["to"] >= hi

    def finish(self, day: str, fingerprint: str, lo: int, hi: int, rows: dict[str, int], run: str) -> None:
        """Mark a day done for this catalogue over [lo, hi)."""
        path = self.manifest(day)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"catalogue": fingerprint, "from": lo, "to": hi, "rows": rows, "run": run,
                                    "finished": datetime.now(UTC).isoformat(timespec="seconds")}))


def staged_event(line: str) -> tuple:
    event_id, user_id, item_id, behavior, ts, category_id = line.split("\t")
    return event_id, user_id, item_id, behavior, int(ts), category_id


class Progress:
    """Counts records through an operator and prints how far the job is, every few seconds."""

    def __init__(self, total: int) -> None:
        self.total, self.n, self.t0, self.shown = total, 0, 0.0, 0.0

    def __call__(self, value: Any) -> Any:
        self.n += 1
        if self.n == 1:
            self.t0 = self.shown = time.monotonic()
        elif self.n % 10_000 == 0 or self.n == self.total:
            now = time.monotonic()
            if now - self.shown > 3 or self.n == self.total:
                self.shown = now
                rate = self.n / max(now - self.t0, 1e-9)
                log(f"features: {self.n:,}/{self.total:,} events ({100 * self.n / max(self.total, 1):.0f}%), "
                    f"{rate:,.0f} events/s")
        return value


class PartitionWriter(KeyedProcessFunction):
    """Keyed by day: collects the day's final rows, writes them per definition in chunks, then
    the day's manifest (batch mode hands it one day after another)."""

    CHUNK = 200_000

    def __init__(self, root: str, catalogue: str, fingerprint: str, todo: dict[str, tuple[int, int]],
                 run: str) -> None:
        self.root, self.catalogue, self.fingerprint, self.todo, self.run = root, catalogue, fingerprint, todo, run

    def open(self, runtime_context: RuntimeContext) -> None:
        from features.registry import definition_views

        self.views = {v.name: v for v in definition_views(load(self.catalogue))}
        self.started = runtime_context.get_state(ValueStateDescriptor("started", Types.BOOLEAN()))
        self.rows: dict[str, list[dict[str, Any]]] = {}
        self.count: dict[str, int] = {}
        self.chunks = self.waiting = 0

    def process_element(self, value: tuple, ctx: KeyedProcessFunction.Context):  # noqa: ANN201
        from connectors.offline_store import records

        day, payload = value
        if not self.started.value():  # first row of the day (batch mode: days come one after another)
            self.started.update(True)
            self.rows, self.count, self.chunks, self.waiting = {}, {}, 0, 0
            for old in Path(self.root).glob(f"*/date={day}/backfill-*.parquet"):
                old.unlink()  # an earlier run's rows of this day, complete or not
            ctx.timer_service().register_event_time_timer(2**62)
        lo, hi = self.todo[day]
        row = json.loads(payload)
        if not lo <= row["ts"] < hi:
            return
        for view, _, record in records(row, self.views):
            self.rows.setdefault(view, []).append(record)
            self.count[view] = self.count.get(view, 0) + 1
            self.waiting += 1
        if self.waiting >= self.CHUNK:
            self._write(day)

    def _write(self, day: str) -> None:
        from connectors.offline_store import arrow_schema, write_part

        for view, rows in self.rows.items():
            write_part(Path(self.root), view, day, f"backfill-{self.run}-{self.chunks}", rows,
                       arrow_schema(self.views[view]))
        self.rows, self.chunks, self.waiting = {}, self.chunks + 1, 0

    def on_timer(self, timestamp: int, ctx: KeyedProcessFunction.OnTimerContext):  # noqa: ANN201
        day = ctx.get_current_key()
        self._write(day)
        Layout(Path(self.root)).finish(day, self.fingerprint, *self.todo[day], self.count, self.run)
        log(f"day {day} written: {sum(self.count.values()):,} rows over {len(self.count)} definitions")
        return []
