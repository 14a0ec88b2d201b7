"""Where a job's time goes, task by task; writes bench/results/python-hops.json.

The catalogue job (or --job feature_job) runs over --events simulated events preloaded in a
topic (bench/catalogue.py's log). Once its source reads, Flink's REST API is sampled every
second for --seconds: each task's busyTimeMsPerSecond and the records it takes in and sends
out per second, summed over subtasks. A task's cost per event is its busy time per second over
the events the source reads per second. A task is a chain of operators: the Python operators
of one chain show as one task.

    python bench/python_hops.py [--events 40000] [--seconds 30] [--catalogue FILE] [--engine sql]
                                [--job catalogue_job|feature_job]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from connectors.embedded import free_port, start_broker, start_redis
from connectors.kafka import EventProducer
from connectors.simulator import simulate
from features.store import apply
from freshrec.config import Settings
from freshrec.stack import start_job, stop_group
from jobs.topics import prepare_log

# Rates from the counters' differences: Flink's per-second meters average over a minute, so
# they lag far behind a job that has just started (they rose from 6 to 1,093 over the first
# minute of a job reading at about 2,000 events/s).
METRICS = ("busyTimeMsPerSecond", "numRecordsIn", "numRecordsOut")


def get(port: int, path: str) -> Any:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as r:
        return json.loads(r.read())


def sample(port: int, job: str, vertices: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out = {}
    for v in vertices:
        got = get(port, f"/jobs/{job}/vertices/{v['id']}/subtasks/metrics?get={','.join(METRICS)}&agg=sum")
        out[v["name"]] = {m["id"]: float(m["sum"]) for m in got}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--seconds", type=int, default=30)
    ap.add_argument("--catalogue", default=str(Path(__file__).resolve().parents[1] / "features" / "catalog.py"))
    ap.add_argument("--engine", default="sql", choices=("sql", "python"))
    ap.add_argument("--job", default="catalogue_job", choices=("catalogue_job", "feature_job"))
    ap.add_argument("--out", default="bench/results/python-hops.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="freshrec-hops-") as d:
        tmp = Path(d)
        broker, redis_server = start_broker(tmp / "broker"), start_redis(tmp / "redis")
        port = free_port()
        s = Settings(kafka_bootstrap=f"127.0.0.1:{broker.port}", redis_url=f"redis://127.0.0.1:{redis_server.port}/0",
                     events_topic="hops-events", dlq_topic="hops-dlq", feast_project="hops", state_dir=tmp / "state",
                     features=args.catalogue, catalogue_engine=args.engine, catalogue_nice=0, flink_rest_port=port)
        job = None
        try:
            prepare_log(s)
            apply(s)
            with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
                for e in simulate(args.events, n_users=500, n_items=2000, n_categories=30, seed=3,
                                  events_per_second=50.0, start_ms=int(time.time() * 1000) - 3_600_000):
                    p.send(e)
            job = start_job(args.job, s, s.state_dir)
            deadline = time.monotonic() + 180
            while True:
                try:
                    running = [j for j in get(port, "/jobs/overview")["jobs"] if j["state"] == "RUNNING"]
                except OSError:
                    running = []
                if running:
                    break
                if time.monotonic() > deadline or job.poll() is not None:
                    raise RuntimeError(f"the {args.job} did not start; see {s.state_dir}/{args.job}.log")
                time.sleep(1)
            jid = running[0]["jid"]
            vertices = get(port, f"/jobs/{jid}")["vertices"]
            time.sleep(10)  # the Python workers and the first checkpoint settle
            deadline = time.monotonic() + 60  # TaskManagers report metrics every few seconds
            while (time.monotonic() < deadline
                   and not all(set(METRICS) <= set(m) for m in sample(port, jid, vertices).values())):
                time.sleep(1)
            samples, times = [], []
            for _ in range(args.seconds):
                samples.append(sample(port, jid, vertices))
                times.append(time.monotonic())
                time.sleep(1)
        finally:
            if job is not None:
                stop_group(job.pid)
            broker.stop()
            redis_server.stop()
    source = next(v["name"] for v in vertices if v["name"].startswith("Source"))
    elapsed = times[-1] - times[0]

    def rate(task: str, counter: str) -> float:
        return (samples[-1][task][counter] - samples[0][task][counter]) / elapsed

    events_per_s = rate(source, "numRecordsOut")
    tasks = []
    for v in vertices:
        busy = sum(x[v["name"]]["busyTimeMsPerSecond"] for x in samples) / len(samples)
        tasks.append({"task": v["name"], "parallelism": v["parallelism"], "busy_ms_per_s": round(busy),
                      "records_in_per_s": round(rate(v["name"], "numRecordsIn")),
                      "us_per_event": round(busy * 1000 / events_per_s) if events_per_s else None})
    tasks.sort(key=lambda t: -t["busy_ms_per_s"])
    result = {"machine": {"cpus": os.cpu_count(), "python": platform.python_version()}, "job": args.job,
              "catalogue": args.catalogue, "engine": args.engine, "events_per_s": round(events_per_s),
              "seconds": args.seconds, "tasks": tasks}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{round(events_per_s)} events/s read by the source")
    for t in tasks:
        print(f"{t['busy_ms_per_s']:>5} ms/s busy  {t['us_per_event'] or 0:>6} us/event  "
              f"{t['records_in_per_s']:>7} in/s  {t['task'][:110]}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
