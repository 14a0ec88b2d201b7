"""The compiled definitions' two plans (streaming/sql.py), timed on one log; writes
bench/results/compiled_stream.json.

The default catalogue's definitions that compile for a stream (counts, sums, means, min and
max, and Ratios of them), over a generated log shaped like bench/catalogue.py's, read from a file
(bounded: a stream run ends when the file does), written to blackhole sinks:

1. the batch plan in batch runtime mode (what the backfill runs);
2. the stream plan in streaming runtime mode, the watermark the allowed lateness and
   out-of-orderness behind the newest event (what a stream would run);
3. the stream plan in batch runtime mode.

Each is the job alone (no staging, no Kafka, no Redis), parallelism 1, one after the other.

    python bench/compiled_stream.py [--events 1000000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from catalogue import generated_log  # bench/catalogue.py: the same log shape

from features.dsl import load
from freshrec.config import Settings
from streaming import sql
from streaming.flink import table_environment

RUNS = (("batch", "batch"), ("stream", "stream"), ("batch", "stream"))  # (runtime mode, plan)


def to_tsv(jsonl: Path, tsv: Path) -> int:
    n = 0
    with jsonl.open() as src, tsv.open("w") as out:
        for line in src:
            e = json.loads(line)
            out.write("\t".join("" if e.get(c) is None else str(e[c]) for c, _ in sql.EVENT_COLUMNS) + "\n")
            n += 1
    return n


def run(path: Path, mode: str, plan: str, lateness_ms: int) -> float:
    """Seconds the job took, from submission to its end."""
    t_env = table_environment(batch=mode == "batch", parallelism=1)
    t_env.execute_sql(sql.table("events", sql.EVENT_COLUMNS, str(path), lateness_ms=lateness_ms))
    statements = t_env.create_statement_set()
    for q in sql.queries(sql.split(load("features.catalog"), stream=True)[0]):
        t_env.execute_sql(f"CREATE TEMPORARY TABLE rows_{q.kind.name} ({sql.column_list(q.columns)}) "
                          "WITH ('connector' = 'blackhole')")
        statements.add_insert_sql(q.insert("events", f"rows_{q.kind.name}", stream=plan == "stream"))
    started = time.monotonic()
    statements.execute().wait()
    return time.monotonic() - started


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--out", default="bench/results/compiled_stream.json")
    ap.add_argument("--one", nargs=3, metavar=("LOG", "MODE", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    s = Settings()
    lateness = s.allowed_lateness_ms + s.out_of_orderness_ms
    if args.one:  # one run in a process of its own: each gets a fresh JVM
        print(json.dumps({"seconds": run(Path(args.one[0]), args.one[1], args.one[2], lateness)}))
        return 0
    compiled = [d.name for d in sql.split(load("features.catalog"), stream=True)[0]]
    out: dict[str, Any] = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
                           "definitions": compiled, "parallelism": 1, "runs": []}
    with tempfile.TemporaryDirectory(prefix="freshrec-bench-") as d:
        jsonl, tsv = Path(d) / "generated.jsonl", Path(d) / "events.tsv"
        generated_log(args.events, jsonl)
        n = to_tsv(jsonl, tsv)
        for mode, plan in RUNS:
            print(f"{mode} mode, {plan} plan: running over {n:,} events", file=sys.stderr, flush=True)
            done = subprocess.run([sys.executable, __file__, "--one", str(tsv), mode, plan], check=True,
                                  capture_output=True, text=True)
            seconds = json.loads(done.stdout.strip().splitlines()[-1])["seconds"]
            r = {"mode": mode, "plan": plan, "events": n, "seconds": round(seconds, 1),
                 "events_per_s": round(n / seconds)}
            print(r, flush=True)
            out["runs"].append(r)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
