"""The batch backfill: the feature catalogue over historical logs, into the offline store.

    log files -> validate; refuse what the stream would refuse (bad rows, too late in file
                 order); drop repeated event ids as the stream does
      -> staged events (one tab-separated file)
      -> one Flink job in batch runtime mode:
           the definitions that compile to SQL (streaming/sql.py): a query per entity kind,
             run by Flink's own operators -> tab-separated rows -> Parquet (streaming/batch.py)
           the rest: the Java operators the streaming job runs (streaming/java's Definitions:
             distinct counts and last-N lists SQL cannot take, co-visitation) -> their final
             rows' lines -> Parquet
         under offline/<definition>/date=YYYY-MM-DD/ (Feast's FileSources)
      -> a manifest per day once the job is done
    and optionally Feast's materialize of the newest values into the online store.

A day is done when its manifest (offline/_backfill/partitions/<day>.json) says so for the
same catalogue; a run that stopped resumes at the first day not done (reading back as far as
the longest window, so values at the day's start are whole). Two runs over overlapping days
refuse to run at once.

Run: ``freshrec backfill --source FILES --from T1 --to T2 [--materialize]``.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tqdm import tqdm

from connectors.embedded import alive
from connectors.logfile import detect_format, open_log
from connectors.offline_store import arrow_schema, join_keys
from connectors.schema import MIN_TS_MS, InvalidEvent, dead_letter, validate
from features.dsl import Definition, load
from features.registry import definition_views
from features.store import repo_dir
from freshrec.config import Settings
from streaming.batch import DAY_MS, DayFiles, Layout, day_of, log
from streaming.definitions import max_window_ms
from streaming.state import Seen

NAME = "freshrec-backfill"


class BackfillError(Exception):
    """A backfill that cannot run, with what to do about it."""


def parse_time(text: str, what: str) -> int:
    """ISO-8601 date or time (UTC unless it says otherwise), or epoch seconds; in ms."""
    try:
        return int(float(text) * 1000)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise BackfillError(f"{what}={text!r}: give an ISO-8601 date or time such as 2017-11-25 or "
                            "2017-11-25T12:00, or epoch seconds") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return int(when.timestamp() * 1000)


def catalogue_print(defs: list[Definition]) -> str:
    return hashlib.sha1("|".join(sorted(f"{d.name}={d.fingerprint()}" for d in defs)).encode()).hexdigest()[:12]


def days(start: int, end: int) -> list[tuple[str, int, int]]:
    """The UTC days of [start, end), each with the part of it asked for."""
    out = []
    d = start - start % DAY_MS
    while d < end:
        out.append((day_of(d), max(start, d), min(end, d + DAY_MS)))
        d += DAY_MS
    return out


@contextmanager
def exclusive(layout: Layout, start: int, end: int) -> Iterator[None]:
    """Register this run; refuse while a live run covers an overlapping range."""
    layout.books.mkdir(parents=True, exist_ok=True)
    runs_file = layout.books / "running.json"

    def edit(change: Any) -> None:
        with (layout.books / "lock").open("a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                runs = json.loads(runs_file.read_text()) if runs_file.exists() else []
            except ValueError:
                runs = []
            runs = [r for r in runs if alive(r["pid"])]
            runs_file.write_text(json.dumps(change(runs)))

    def join(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for r in runs:
            if r["from"] < end and start < r["to"]:
                raise BackfillError(
                    f"another backfill (pid {r['pid']}, started {r['started']}) is writing "
                    f"{day_of(r['from'])}..{day_of(r['to'] - 1)}, which overlaps {day_of(start)}..{day_of(end - 1)}; "
                    "wait for it, or stop it and run again (finished days are kept)")
        return [*runs, {"pid": os.getpid(), "from": start, "to": end,
                        "started": datetime.now(UTC).isoformat(timespec="seconds")}]

    edit(join)
    try:
        yield
    finally:
        edit(lambda runs: [r for r in runs if r["pid"] != os.getpid()])


@dataclass
class Staged:
    path: Path
    events: int = 0
    refused: int = 0
    late: int = 0
    duplicates: int = 0
    outside: int = 0
    first: int = 2**63
    last: int = -(2**63)


def stage(sources: list[Path], fmt: str, lo: int, hi: int, s: Settings, into: Path, rejected: Path,
          progress: bool = True) -> Staged:
    """Validate the files in order, refusing what the streaming job would refuse, and keep the
    events of [lo, hi) as tab-separated lines (ids carry no whitespace) for Flink to read.

    The files' order is taken as their arrival order: an event more than the allowed lateness
    behind the newest one before it is late, as it would be in the stream, and a repeated event
    id is dropped as the stream's user operator drops it (streaming/state.Seen)."""
    st = Staged(into)
    newest = -(2**63)
    seen: dict[str, Seen] = {}
    dedup_ms = s.allowed_lateness_ms + s.out_of_orderness_ms
    bound = s.out_of_orderness_ms + 1 + s.allowed_lateness_ms  # the job's watermark lags by ooo + 1 ms
    total = sum(p.stat().st_size for p in sources)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="read", disable=None if progress else True, file=sys.stderr,
               mininterval=0.5)
    now_ms = int(time.time() * 1000)
    with into.open("w") as out, rejected.open("a") as bad:
        for path in sources:
            read = 0  # bytes, roughly (the line as read back), for the progress bar
            for row, line in open_log(path, detect_format(path) if fmt == "auto" else fmt):
                read += len(line) + 1
                if read > 1 << 20:
                    bar.update(read)
                    read = 0
                try:
                    if row is None:
                        raise InvalidEvent("payload", "line does not split into the expected columns")
                    e = validate(row, now_ms, MIN_TS_MS)
                    if e.ts < newest - bound:
                        raise InvalidEvent("ts", f"late by {newest - s.out_of_orderness_ms - e.ts} ms in file order; "
                                                 f"the allowed lateness is {s.allowed_lateness_ms} ms "
                                                 "(FRESHREC_ALLOWED_LATENESS_MS)")
                except InvalidEvent as err:
                    bad.write(dead_letter(line, err, f"backfill:{path.name}").decode() + "\n")
                    st.late += err.field == "ts" and "late by" in err.reason
                    st.refused += 1
                    continue
                newest = max(newest, e.ts)
                if not seen.setdefault(e.user_id, Seen()).first(e.event_id, e.ts, dedup_ms):
                    st.duplicates += 1
                    continue
                if not lo <= e.ts < hi:
                    st.outside += 1
                    continue
                out.write(f"{e.event_id}\t{e.user_id}\t{e.item_id}\t{e.behavior}\t{e.ts}\t{e.category_id or ''}\n")
                st.events += 1
                st.first, st.last = min(st.first, e.ts), max(st.last, e.ts)
            bar.update(read)
    bar.close()
    return st


def run_job(s: Settings, staged: Staged, files: DayFiles, defs: list[Definition], tmp: Path,
            compiled_sql: bool = True) -> None:
    """One batch job: the definitions that compile to SQL (streaming/sql.py) in Flink's own
    operators, the rest in the Java operators the stream runs (streaming/java's Definitions),
    whose final rows' lines go to files and then to Parquet. Without ``compiled_sql`` every
    definition runs on the Python operators (streaming/definitions.attach): the engine before,
    the benchmark's baseline."""
    from pyflink.common import Duration, WatermarkStrategy
    from pyflink.common.serialization import Encoder
    from pyflink.common.watermark_strategy import TimestampAssigner
    from pyflink.datastream import DataStream
    from pyflink.datastream.connectors.file_system import FileSink, FileSource, StreamFormat
    from pyflink.java_gateway import get_gateway
    from pyflink.table import EnvironmentSettings, StreamTableEnvironment

    from jobs.feature_job import EVENT
    from streaming import batch, sql
    from streaming.definitions import attach, java_plan
    from streaming.flink import environment

    class EventTime(TimestampAssigner):
        def extract_timestamp(self, value: Any, record_timestamp: int) -> int:
            return value[4]

    compiled, rest = sql.split(defs) if compiled_sql else ([], defs)
    env = environment(s, NAME, restore=False, batch=True)
    out = tmp / "compiled"
    finals = tmp / "finals"
    if rest:
        source = FileSource.for_record_stream_format(StreamFormat.text_line_format(), str(staged.path)).build()
        lines = env.from_source(source, WatermarkStrategy.no_watermarks(), "staged events")
    if rest and compiled_sql:  # the stream's Java operators: their final rows' lines to files, no Python per record
        lines_out = get_gateway().jvm.freshrec.Definitions.finals(lines._j_data_stream, java_plan(rest),
                                                                 s.allowed_lateness_ms, staged.events)
        DataStream(lines_out).sink_to(FileSink.for_row_format(str(finals), Encoder.simple_string_encoder()).build())
    elif rest:
        progress = batch.Progress(staged.events)
        events = (lines.map(lambda line: progress(batch.staged_event(line)), output_type=EVENT).name("events")
                  .assign_timestamps_and_watermarks(  # batch mode sorts each key's records by these
                      WatermarkStrategy.for_bounded_out_of_orderness(Duration.of_millis(s.out_of_orderness_ms))
                      .with_timestamp_assigner(EventTime())))
        attach(events, s.features, s.allowed_lateness_ms, online=False, files=files, names={d.name for d in rest})
    queries = sql.queries(compiled)
    if queries:
        t_env = StreamTableEnvironment.create(env, EnvironmentSettings.in_batch_mode())
        t_env.execute_sql(sql.table("events", sql.EVENT_COLUMNS, str(staged.path)))  # de-duplicated by stage()
        statements = t_env.create_statement_set()
        for q in queries:
            t_env.execute_sql(sql.table(f"rows_{q.kind.name}", q.columns, str(out / q.kind.name)))
            statements.add_insert_sql(q.insert("events", f"rows_{q.kind.name}"))
        log(f"{len(compiled)} definitions compiled to Flink SQL ({', '.join(q.kind.name for q in queries)}), "
            f"{len(rest)} on {'Java' if compiled_sql else 'Python'} operators: running")
    started = time.monotonic()
    try:
        if queries and not rest:
            statements.execute().wait()
        else:
            if queries:
                statements.attach_as_datastream()
            env.execute(NAME)
    except Exception as exc:  # py4j's Py4JJavaError: pages of Java stack, the cause at the bottom
        causes = [line.strip() for line in str(exc).splitlines() if line.startswith("Caused by:")]
        raise BackfillError(f"the PyFlink batch job failed: {causes[-1] if causes else exc}; nothing of this run "
                            "is marked done, so running the same command again redoes it") from None
    log(f"the batch job took {time.monotonic() - started:.0f}s")
    for q in queries:
        rows = batch.write_compiled(out / q.kind.name, q.columns, list(q.kind.join_keys), files, q.lists)
        log(f"{q.kind.name}: {rows:,} rows of the compiled definitions written")
    if rest and compiled_sql:
        rows = batch.write_lines(finals, files)
        log(f"{rows:,} final rows of {', '.join(d.name for d in rest)} written")


@dataclass
class Report:
    days_written: list[str]
    days_skipped: list[str]
    staged: Staged | None
    seconds: float
    rejected_file: Path

    @property
    def events_per_s(self) -> float:
        return self.staged.events / self.seconds if self.staged and self.seconds else 0.0


def backfill(s: Settings, sources: list[Path], start: int, end: int, fmt: str = "auto",
             materialize: bool = False, progress: bool = True, compiled_sql: bool = True) -> Report:
    """Run the catalogue over ``sources`` for the days of [start, end); see the module docstring."""
    if end <= start:
        raise BackfillError(f"--to ({day_of(end)}) must come after --from ({day_of(start)})")
    if end - start > 3660 * DAY_MS:
        raise BackfillError(f"--from {day_of(start)} --to {day_of(end)} spans over ten years of days; give the "
                            "range the logs cover")
    for p in sources:
        if not p.is_file():
            raise BackfillError(f"--source {p}: no such file")
    defs = load(s.features)
    fingerprint = catalogue_print(defs)
    layout = Layout(repo_dir(s) / "offline")
    t0 = time.monotonic()
    wanted = days(start, end)
    todo = {d: (lo, hi) for d, lo, hi in wanted if not layout.done(d, lo, hi, fingerprint)}
    skipped = [d for d, _, _ in wanted if d not in todo]
    rejected = layout.books / f"rejected-{datetime.now(UTC):%Y%m%dT%H%M%S}-{os.getpid()}.jsonl"
    if skipped:
        log(f"{len(skipped)} of {len(wanted)} days already done for this catalogue: {skipped[0]}..{skipped[-1]}")
    if not todo:
        log("nothing to do")
        return Report([], skipped, None, time.monotonic() - t0, rejected)
    # Values at the first day's start need the events of the longest window before it.
    first = min(lo for lo, _ in todo.values())
    reach = max_window_ms(defs) + s.allowed_lateness_ms + s.out_of_orderness_ms
    with exclusive(layout, start, end), tempfile.TemporaryDirectory(prefix="freshrec-backfill-") as tmp:
        log(f"{len(todo)} days to write ({min(todo)}..{max(todo)}), reading events from {day_of(first - reach)} "
            f"on; catalogue {s.features}: {len(defs)} definitions")
        staged = stage(sources, fmt, first - reach, end, s, Path(tmp) / "events.tsv", rejected, progress)
        log(f"staged {staged.events:,} events; refused {staged.refused:,} ({staged.late:,} late) -> {rejected}; "
            f"{staged.duplicates:,} duplicates dropped; {staged.outside:,} outside the range")
        run = f"{int(time.time())}-{os.getpid()}"
        for d in todo:
            for old in layout.root.glob(f"*/date={d}/backfill-*.parquet"):
                old.unlink()  # an earlier run's rows of this day, complete or not
        if staged.events:
            layouts = {v.name: (join_keys(v), arrow_schema(v)) for v in definition_views(defs)}
            run_job(s, staged, DayFiles(str(layout.root), layouts, todo, run), defs, Path(tmp), compiled_sql)
        for d, (lo, hi) in sorted(todo.items()):
            rows = layout.rows(d, run)
            layout.finish(d, fingerprint, lo, hi, rows, run if rows else "empty")
            log(f"day {d} written: {sum(rows.values()):,} rows over {len(rows)} definitions")
        seconds = time.monotonic() - t0
        log(f"done in {seconds:.0f}s: {staged.events / seconds:,.0f} events/s over {len(todo)} days")
    if materialize:
        from features.store import feature_store

        log("materializing the newest values into the online store (Feast)")
        feature_store(s).materialize(datetime.fromtimestamp(start / 1000, UTC), datetime.fromtimestamp(end / 1000, UTC),
                                     feature_views=[d.name for d in defs])
    return Report(sorted(todo), skipped, staged, seconds, rejected)
