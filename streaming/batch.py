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

import pyarrow.parquet as pq

from connectors.offline_files import records, write_part, write_table

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

    def rows(self, day: str, run: str) -> dict[str, int]:
        """Rows per definition that ``run`` wrote for ``day`` (from the Parquet footers)."""
        out: dict[str, int] = {}
        for f in sorted(self.root.glob(f"*/date={day}/backfill-{run}-*.parquet")):
            view = f.parent.parent.name
            out[view] = out.get(view, 0) + pq.ParquetFile(f).metadata.num_rows
        return out

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


class DayFiles:
    """Where the backfill's catalogue operators put their final rows: each operator instance
    writes the rows of the days asked for straight to Parquet, per definition and day, in
    chunks. Sending them on through Flink to a writer cost more than computing them.

    ``layouts``: per definition, its join-key columns and Arrow schema (from Feast, in the driver).
    """

    CHUNK = 100_000

    def __init__(self, root: str, layouts: dict[str, tuple[list[str], Any]], todo: dict[str, tuple[int, int]],
                 run: str) -> None:
        self.root, self.run = root, run
        self.bounds = {lo - lo % DAY_MS: (lo, hi) for lo, hi in todo.values()}  # day's start -> part asked for
        self.keys = {name: keys for name, (keys, _) in layouts.items()}
        self.schemas = {name: schema for name, (_, schema) in layouts.items()}

    def open(self, name: str) -> None:
        """In the worker; ``name`` tells this operator instance's files apart."""
        self.name, self.chunks, self.waiting = name, 0, 0
        self.rows: dict[tuple[str, str], list[dict[str, Any]]] = {}

    def add(self, view: str, entity: str, ts: int, values: dict[str, Any]) -> None:
        bounds = self.bounds.get(ts - ts % DAY_MS)
        if bounds is None or not bounds[0] <= ts < bounds[1]:
            return  # read only for the values of the days asked for
        for name, day, record in records({"view": view, "entity": entity, "ts": ts, "values": values}, self.keys):
            self.rows.setdefault((name, day), []).append(record)
            self.waiting += 1
        if self.waiting >= self.CHUNK:
            self.flush()

    def flush(self) -> None:
        for (view, day), rows in self.rows.items():
            write_part(Path(self.root), view, day, f"backfill-{self.run}-{self.name}-{self.chunks}", rows,
                       self.schemas[view])
        self.rows, self.chunks, self.waiting = {}, self.chunks + 1, 0


def write_compiled(csv_dir: Path, columns: list[tuple[str, str]], keys: list[str], layout: DayFiles,
                   lists: dict[str, tuple[list[str], list[str]]]) -> int:
    """The compiled queries' rows (tab-separated files under ``csv_dir``, one column per
    definition; a last-N list as a value and a time column per entry) as each definition's
    Parquet of the days asked for; returns the rows written."""
    import pyarrow as pa
    import pyarrow.compute as pc
    from pyarrow import csv

    types = {"STRING": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64()}
    names = [c for c, _ in columns]
    in_lists = {c for values, times in lists.values() for c in (*values, *times)}
    views = [c for c in names[len(keys) + 1:] if c not in in_lists] + list(lists)
    written = 0
    files = sorted(p for p in csv_dir.rglob("*") if p.is_file() and not p.name.startswith("."))
    for n, f in enumerate(files):
        t = csv.read_csv(f, read_options=csv.ReadOptions(column_names=names),
                         parse_options=csv.ParseOptions(delimiter="\t", quote_char=False),
                         convert_options=csv.ConvertOptions(column_types={c: types[kind] for c, kind in columns},
                                                            null_values=[""], strings_can_be_null=False))
        for day_start, (lo, hi) in layout.bounds.items():
            part = t.filter(pc.and_(pc.greater_equal(t["ts"], lo), pc.less(t["ts"], hi)))
            if not part.num_rows:
                continue
            when = pc.cast(part["ts"], pa.timestamp("ms", tz="UTC"))
            for view in views:
                if view not in layout.schemas:
                    continue
                schema = layout.schemas[view]
                if view in lists:
                    values, times = lists[view]
                    # An entry is there when its time is: its value may be "" (an event without a category).
                    rows = zip(*(part[c].to_pylist() for c in values), *(part[c].to_pylist() for c in times),
                               strict=True)
                    half = len(values)
                    column = pa.array([[v for v, at in zip(r[:half], r[half:], strict=True) if at is not None]
                                       for r in rows], type=schema.field(view).type)
                else:
                    column = part[view]
                table = pa.Table.from_arrays([*(part[k] for k in keys), when, column], schema=schema)
                write_table(Path(layout.root), view, day_of(day_start),
                            f"backfill-{layout.run}-compiled-{csv_dir.name}-{n}", table)
                written += table.num_rows
    return written


def write_lines(folder: Path, layout: DayFiles) -> int:
    """The Java operators' final rows (streaming/java's Definitions.finals: feature-log lines in
    files under ``folder``) as each definition's Parquet of the days asked for; returns the
    lines read."""
    layout.open("java")
    n = 0
    for f in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
        with f.open() as lines:
            for line in lines:
                row = json.loads(line)
                layout.add(row["view"], row["entity"], row["ts"], row["values"])
                n += 1
    layout.flush()
    return n
