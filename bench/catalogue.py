"""Feature catalogue speed; writes bench/results/catalogue.json.

1. Backfill throughput (events/s, whole command: staging + the PyFlink batch job) over the
   shared Taobao slice (when present) and over a generated log of --generated events (the
   simulator, written to a temporary JSONL file first): the default catalogue and the part of
   it that compiles to SQL, each with compiled definitions and with every definition on the
   Python operators, one after the other (ratio_to_python).
2. Streaming throughput of the catalogue job alone, with 10 and 40 generated counts, sums,
   means, min and max, and with the default catalogue, each with FRESHREC_CATALOGUE_ENGINE=sql
   and =python (ratio_to_python): --stream-events are loaded into a topic, then the job starts;
   events/s = events / (time from the first row in Redis to the last event's user row), and
   events_per_s_from_start = events / (time from the job's start to that row). The first row
   comes late (the JIT, the mini-batches and the first checkpoint start with the job), so the
   first figure runs ahead of the job's steady rate (bench/python_hops.py measures that one).
   --stream-log: the Taobao slice when present (issue 21's workload: real users, about one
   co-visit pair per event), or the simulator's demo shape (about 33 pairs per event).

    python bench/catalogue.py [--generated 1000000] [--stream-events 20000] [--skip-backfill]
                              [--stream-log taobao|demo]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import redis
from freshness import workload  # bench/freshness.py, beside this script

from connectors.embedded import start_broker, start_redis
from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer
from connectors.simulator import simulate
from features.dsl import load
from features.registry import all_views
from features.store import apply
from freshrec.config import Settings
from freshrec.stack import start_job, stop_group
from jobs.backfill import backfill
from jobs.topics import prepare_log
from streaming.sql import split

ROOT = Path(__file__).resolve().parents[1]
TAOBAO = ROOT.parent / "shared" / "data" / "taobao_userbehavior_timeslice_110k.csv"
DAY = 86_400_000
START_MS = 1_700_000_000_000  # the generated log: 100 events/s of event time from here


def catalogue(n: int, counts_only: bool = False) -> str:
    """A catalogue of n definitions over all entity kinds: counts, sums, distinct counts, last-N
    and max; ``counts_only``: counts, sums, means, min and max (what a stream runs in SQL)."""
    kinds = ["user", "item", "category", "user_category"]
    aggs = (["Count()", "Sum(of={'view': 1, 'buy': 5})", "Mean(of='hour')", "Min(of='ts')", "Max(of='ts')"]
            if counts_only else ["Count()", "Sum(of={'view': 1, 'buy': 5})", "DistinctCount(of='item_id')",
                                 "LastN(of='item_id', n=5)", "Max(of='ts')"])
    windows = ["Sliding(size=td(hours=1), slide=td(minutes=5))", "Tumbling(size=td(hours=1))",
               "Sliding(size=td(days=1), slide=td(hours=1))"]
    lines = ["from datetime import timedelta as td", "from features.dsl import *"]
    for i in range(n):
        lines.append(f"f{i} = Feature(name='f{i}', entity={kinds[i % 4]}, aggregation={aggs[i % 5]}, "
                     f"window={windows[i % 3]}, ttl=td(days=2), owner='bench', description='bench feature {i}')")
    return "\n".join(lines) + "\n"


def generated_log(n: int, path: Path) -> int:
    """n simulated events written as JSONL; returns the last event time. Shaped like Taobao's
    full UserBehavior log (about 100 events per user, 25 per item): users come back in short
    sessions spread over a day and a half, so a view pairs with a few others (~5 co-visit pairs
    per event), not with the user's whole history (the simulator's demo settings pack 50 events
    per user into 30 minutes: ~38 pairs per event)."""
    rate = n / (5 * DAY / 1000)  # the simulator's sessions compress this to ~1.5 days of event time
    last = START_MS
    with path.open("w") as f:
        for i, e in enumerate(simulate(n, n_users=max(1000, n // 100), n_items=max(2000, n // 25),
                                       n_categories=max(50, n // 10_000), seed=7, events_per_second=rate,
                                       start_ms=START_MS)):
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
            last = e["ts"]
            if i % 500_000 == 0 and i:
                print(f"  generated {i:,} events", file=sys.stderr, flush=True)
    return last


def bench_backfill(source: Path, tmp: Path, label: str, start: int, end: int, features: str,
                   compiled_sql: bool) -> dict[str, Any]:
    engine = "compiled" if compiled_sql else "python"
    s = Settings(state_dir=tmp / f"backfill-{label}-{engine}", feast_project=f"bench{label}{engine}",
                 features=features)
    t0 = time.monotonic()
    report = backfill(s, [source], start, end, progress=False, compiled_sql=compiled_sql)
    seconds = time.monotonic() - t0
    staged = report.staged
    assert staged is not None
    return {"source": str(source), "catalogue": features, "engine": engine, "events": staged.events,
            "days": len(report.days_written), "seconds": round(seconds, 1),
            "events_per_s": round(staged.events / seconds)}


def bench_engines(source: Path, tmp: Path, label: str, start: int, end: int) -> list[dict[str, Any]]:
    """The backfill with definitions compiled to SQL and with every definition on the Python
    operators (the engine before), one after the other: the default catalogue, and the part of
    it that compiles."""
    subset = tmp / "compiled_catalog.py"
    names = [d.name for d in split(load("features.catalog"))[0]]
    subset.write_text(f"from features.catalog import {', '.join(names)}  # noqa: F401\n")
    out = []
    for features in ("features.catalog", str(subset)):
        pair = [bench_backfill(source, tmp, label, start, end, features, compiled) for compiled in (True, False)]
        pair[0]["ratio_to_python"] = round(pair[0]["events_per_s"] / pair[1]["events_per_s"], 2)
        for r in pair:
            print(f"backfill, {label}: {r}", flush=True)
        out += pair
    return out


def bench_stream(label: str, text: str, engine: str, events: list[dict[str, Any]], tmp: Path, broker: Any,
                 redis_server: Any, db: int) -> dict[str, Any]:
    """The catalogue job alone over ``events`` preloaded in a topic, with the catalogue ``text``
    and FRESHREC_CATALOGUE_ENGINE ``engine``."""
    cat = tmp / f"catalogue_{label}_{engine}.py"
    cat.write_text(text)
    name = f"b{db}"
    # a database of its own: the first row of any kind starts the clock
    s = Settings(kafka_bootstrap=f"127.0.0.1:{broker.port}", redis_url=f"redis://127.0.0.1:{redis_server.port}/{db}",
                 events_topic=f"{name}-events", dlq_topic=f"{name}-dlq", feast_project=name,
                 state_dir=tmp / f"stream-{name}", features=str(cat), catalogue_engine=engine, catalogue_nice=0)
    prepare_log(s)
    apply(s)
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
        for e in events:
            p.send(e)
    client = redis.Redis.from_url(s.redis_url)
    reader = FeastRedisReader(client, s.feast_project, all_views(s))
    last = events[-1]
    # Done when the last event's user has its row of a user definition.
    view = next(d.name for d in load(s.features) if d.entity_kind.join_keys == ("user_id",))
    job = start_job("catalogue_job", s, s.state_dir)
    started = time.monotonic()
    try:
        deadline = time.monotonic() + 900
        start = None
        while time.monotonic() < deadline:
            if start is None and client.dbsize() > 0:
                start = time.monotonic()
            row = reader.read([(view, str(last["user_id"]))])[0]
            if start is not None and row and row.get("_event_ts_ms", 0) >= last["ts"]:
                seconds = time.monotonic() - start
                # from the job's start too: a job whose first row comes late would look fast otherwise
                from_start = time.monotonic() - started
                return {"catalogue": label, "engine": engine, "events": len(events), "seconds": round(seconds, 1),
                        "events_per_s": round(len(events) / seconds), "seconds_from_start": round(from_start, 1),
                        "events_per_s_from_start": round(len(events) / from_start)}
            if job.poll() is not None:
                raise RuntimeError(f"the catalogue job exited; see {s.state_dir}/catalogue_job.log")
            time.sleep(0.05)
        raise RuntimeError("the job did not finish within 15 minutes")
    finally:
        stop_group(job.pid)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--generated", type=int, default=1_000_000)
    ap.add_argument("--stream-events", type=int, default=20_000)
    ap.add_argument("--skip-backfill", action="store_true")
    ap.add_argument("--skip-stream", action="store_true")
    ap.add_argument("--catalogues", default="10 counts,40 counts,features.catalog",
                    help="the stream part's catalogues, comma-separated")
    ap.add_argument("--engines", default="sql,python", help="the stream part's engines; python is the baseline")
    ap.add_argument("--stream-log", choices=("taobao", "demo"), default="taobao" if TAOBAO.exists() else "demo",
                    help="the stream part's events: the Taobao slice (when present) or the simulator's demo shape")
    ap.add_argument("--out", default="bench/results/catalogue.json")
    args = ap.parse_args()
    # What this run skips keeps the figures of an earlier run.
    before = json.loads(Path(args.out).read_text()) if Path(args.out).exists() else {}
    out: dict[str, Any] = {**before, "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "catalogue": "features.catalog (12 definitions)",
                           "backfill": [] if not args.skip_backfill else before.get("backfill", []),
                           "stream": [] if not args.skip_stream else before.get("stream", [])}

    def save() -> None:  # after every figure: a long run that stops keeps what it measured
        Path(args.out).write_text(json.dumps(out, indent=2) + "\n")

    with tempfile.TemporaryDirectory(prefix="freshrec-bench-") as d:
        tmp = Path(d)
        if not args.skip_backfill:
            if TAOBAO.exists():
                out["backfill"] += bench_engines(TAOBAO, tmp, "taobao", 1_511_654_400_000,
                                                 1_511_654_400_000 + 2 * DAY)
                save()
            if args.generated:
                log = tmp / "generated.jsonl"
                last = generated_log(args.generated, log)
                out["backfill"] += bench_engines(log, tmp, "generated", START_MS - START_MS % DAY,
                                                 last + DAY - last % DAY)
                save()
        if not args.skip_stream:
            broker, redis_server = start_broker(tmp / "broker"), start_redis(tmp / "redis")
            try:
                start_ms = int(time.time() * 1000) - 3_600_000
                if args.stream_log == "taobao":
                    _, real = workload(args.stream_events, start_ms)
                    events = [asdict(e) for e in real]
                else:
                    events = list(simulate(args.stream_events, n_users=500, n_items=2000, n_categories=30, seed=3,
                                           events_per_second=50.0, start_ms=start_ms))
                catalogues = {"10 counts": lambda: catalogue(10, counts_only=True),
                              "40 counts": lambda: catalogue(40, counts_only=True),
                              "features.catalog": lambda: (ROOT / "features" / "catalog.py").read_text()}
                db = 0
                for label in args.catalogues.split(","):
                    pair = []
                    for engine in args.engines.split(","):  # the engine before, in the same run
                        db += 1
                        pair.append({"log": args.stream_log, **bench_stream(label, catalogues[label](), engine,
                                                                             events, tmp, broker, redis_server, db)})
                        print(f"stream: {pair[-1]}", flush=True)
                    if [p["engine"] for p in pair] == ["sql", "python"]:
                        pair[0]["ratio_to_python"] = round(pair[0]["events_per_s"] / pair[1]["events_per_s"], 2)
                    out["stream"] += pair
                    save()
            finally:
                broker.stop()
                redis_server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
