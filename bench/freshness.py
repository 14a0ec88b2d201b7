"""Freshness and throughput of the embedded stack; writes bench/results/freshness.json.

1. Throughput: N simulated events are loaded into the topic first, then the feature job
   starts; events/s = N / (time from the first feature row in Redis to the last event's).
2. Freshness: while a background process replays at --rate events/s, probe events (one new
   user each) are produced; we time event -> its features readable in Redis, and
   event -> the API answering for that user as a known user. p50/p99 over --probes.

    python bench/freshness.py [--events 50000] [--rate 2000] [--probes 200]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from pathlib import Path

import httpx
import redis

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer, ensure_topics
from connectors.replay import replay
from connectors.schema import validate
from connectors.simulator import simulate
from features.definitions import FEATURE_VIEWS
from features.store import apply
from freshrec.config import Settings
from freshrec.stack import Stack, start_feature_job, stop_group
from jobs.topics import topic_plan

RESULTS = Path(__file__).parent / "results"


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def background(settings: Settings, rate: float, seconds: float) -> None:
    start = int(time.time() * 1000) - 1000
    n = int(rate * seconds)
    with EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic) as p:
        replay(simulate(n, start_ms=start, events_per_second=rate, seed=9), p, rate=rate, progress=False)


def throughput(stack: Stack, n: int) -> dict[str, float]:
    s = stack.settings.replace(events_topic="tput-events", dlq_topic="tput-dlq", feast_project="tput")
    ensure_topics(s.kafka_bootstrap, topic_plan(s))
    apply(s)
    events = [validate(e) for e in simulate(n, start_ms=int(time.time() * 1000) - 86_400_000, seed=4)]
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
        replay(events, p, total=n)
    last = events[-1]
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    job = start_feature_job(s, stack.log_dir / "tput")
    first_at = None
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            row = reader.read([("user_recent", last.user_id), ("item_recent", events[0].item_id)])
            if first_at is None and row[1] is not None:
                first_at = time.monotonic()
            if row[0] is not None and row[0]["_event_ts_ms"] == last.ts:
                done_at = time.monotonic()
                break
            time.sleep(0.05)
        else:
            raise SystemExit("the throughput job did not finish within 10 minutes")
    finally:
        stop_group(job.pid)
    assert first_at is not None
    return {"events": n, "seconds": round(done_at - first_at, 2), "events_per_s": round(n / (done_at - first_at))}


def freshness(stack: Stack, rate: float, probes: int) -> dict[str, float]:
    s = stack.settings
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    api = httpx.Client(base_url=stack.api_url)
    bg = mp.get_context("spawn").Process(target=background, args=(s, rate, probes * 0.25 + 30))
    bg.start()
    time.sleep(5)  # let the background load reach its rate
    to_redis: list[float] = []
    to_api: list[float] = []
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, linger_ms=0) as p:
        for i in range(probes):
            user = f"probe-{time.time_ns()}-{i}"
            t0 = time.perf_counter()
            p.send({"user_id": user, "item_id": "probe-item", "behavior": "view", "ts": int(time.time() * 1000)})
            p.flush()
            got_redis = got_api = None
            while (got_redis is None or got_api is None) and time.perf_counter() - t0 < 30:
                now = time.perf_counter()
                if got_redis is None and reader.read([("user_recent", user)])[0] is not None:
                    got_redis = now
                if got_api is None and api.get("/recommendations", params={"user_id": user}).json()["known_user"]:
                    got_api = now
                time.sleep(0.002)
            if got_redis is None or got_api is None:
                raise SystemExit(f"probe {i} not visible after 30 s; is the job keeping up with {rate}/s?")
            to_redis.append((got_redis - t0) * 1000)
            to_api.append((got_api - t0) * 1000)
            time.sleep(0.2)
    bg.join()
    return {"background_rate": rate, "probes": probes,
            "event_to_redis_ms": {"p50": round(statistics.median(to_redis), 1), "p99": round(pct(to_redis, 99), 1)},
            "event_to_api_ms": {"p50": round(statistics.median(to_api), 1), "p99": round(pct(to_api, 99), 1)}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--rate", type=float, default=2000)
    ap.add_argument("--probes", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(state_dir=Path(tmp), api_port=18000 + int(time.time()) % 1000)
        stack = Stack.start(settings)
        try:
            result = {"machine": f"{platform.machine()} {mp.cpu_count()} cores", "when": time.strftime("%F %T"),
                      "feature_job_throughput": throughput(stack, args.events)}
            print(json.dumps(result), flush=True)
            result["freshness"] = freshness(stack, args.rate, args.probes)
        finally:
            stack.stop()
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "freshness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
