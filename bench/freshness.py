"""Freshness and throughput of the embedded stack; writes bench/results/freshness.json.

Workload: the Taobao slice in ../shared/data when present (real users, items and sessions),
else the simulator with as many users as a real stream of that size has (see ``workload``).

1. Throughput: N events are loaded into the topic first, then the feature job starts;
   events/s = N / (time from the first feature row in Redis to the last event's).
2. Freshness: while --producers background processes replay the workload at --rate events/s
   in total (timestamps = the wall clock at sending, as in production), probe events (one new
   user each) are produced; we time event -> its features readable in Redis, and
   event -> the API answering for that user as a known user. p50/p99 over --probes, all sent
   while the background load runs; a run stops early (kept_up: false) when a probe is not
   visible within 30 s.

    python bench/freshness.py [--events 100000] [--rate 1000 --rate 2000 ...] [--probes 200]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import multiprocessing as mp
import platform
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import redis

from connectors.feast_redis import FeastRedisReader
from connectors.kafka import EventProducer
from connectors.logfile import open_log
from connectors.replay import replay
from connectors.schema import BehaviorEvent, validate
from connectors.simulator import simulate
from features.definitions import FEATURE_VIEWS
from features.store import apply
from freshrec.config import Settings
from freshrec.stack import Stack, start_job, stop_group
from jobs.topics import prepare_log
from streaming.state import Ev, RecentViews, Spec

RESULTS = Path(__file__).parent / "results"
MAX_BACKGROUND_S = 400  # the longest a freshness run loads the job


class BackgroundStats(ctypes.Structure):
    _fields_ = [("ready", ctypes.c_int), ("rate", ctypes.c_double)]
TAOBAO = Path(__file__).resolve().parent.parent.parent / "shared/data/taobao_userbehavior_timeslice_110k.csv"


def workload(n: int, start_ms: int) -> tuple[str, list[BehaviorEvent]]:
    """``n`` events in time order from ``start_ms`` on, and where they came from."""
    if TAOBAO.exists():
        rows = sorted((validate(r) for r, _ in open_log(TAOBAO, "auto") if r is not None), key=lambda e: e.ts)
        span = rows[-1].ts - rows[0].ts + 1000
        shift = start_ms - rows[0].ts
        # Looped with fresh ids and later times when n is larger than the slice.
        events = [replace(e, event_id=f"{e.event_id}~{k}", ts=e.ts + shift + k * span)
                  for k in range(n // len(rows) + 1) for e in rows][:n]
        return f"Taobao slice ({TAOBAO.name})", events
    # ~66k users per 110k events in the Taobao slice: a user's events are few and far apart.
    users = max(2_000, n // 2)
    raw = simulate(n, n_users=users, n_items=users, n_categories=500, start_ms=start_ms, seed=4)
    return f"simulator ({users} users)", [validate(e) for e in raw]


def pairs_per_event(events: list[BehaviorEvent], settings: Settings) -> float:
    """Co-visit pair records per event: the fan-out that drives the job's cost."""
    spec, views, n = Spec.of(settings), {}, 0
    for e in events:
        if e.behavior == "view":
            ev = Ev.of(e)
            n += len(views.setdefault(e.user_id, RecentViews()).add(ev, spec))
    return round(n / len(events), 2)


def pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]


def background(settings: Settings, part: int, producers: int, rate: float, stop: Any, sent: Any) -> None:
    """One of ``producers`` processes replaying the workload at ``rate``/s in total, stamped with the
    wall clock, until ``stop`` is set; adds its achieved rate to ``sent`` and counts itself in ``ready``."""
    _, events = workload(int(rate * MAX_BACKGROUND_S), 0)
    mine = events[part::producers]
    started = 0.0

    def stamped() -> Iterator[BehaviorEvent]:
        nonlocal started
        started = time.monotonic()
        for i, e in enumerate(mine):
            if stop.is_set():
                return
            if i == 1000:
                with sent.get_lock():
                    sent.ready += 1
            yield replace(e, event_id=f"bg{part}-{i}", ts=int(time.time() * 1000))

    with EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic) as p:
        stats = replay(stamped(), p, rate=rate / producers, progress=False)
    with sent.get_lock():
        sent.rate += stats.accepted / (time.monotonic() - started)


def throughput(stack: Stack, n: int) -> dict[str, float]:
    s = stack.settings.replace(events_topic="tput-events", dlq_topic="tput-dlq", feast_project="tput")
    prepare_log(s)
    apply(s)
    source, events = workload(n, int(time.time() * 1000) - 86_400_000)
    pairs = pairs_per_event(events, s)
    print(f"throughput: {n} events from the {source}, {pairs} co-visit pairs per event", flush=True)
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic) as p:
        replay(events, p, total=n)
    last = events[-1]
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    job = start_job("feature_job", s, stack.log_dir / "tput")
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
    return {"workload": source, "covisit_pairs_per_event": pairs, "events": n,
            "seconds": round(done_at - first_at, 2), "events_per_s": round(n / (done_at - first_at))}


def freshness(stack: Stack, rate: float, probes: int, producers: int, trace: bool = False) -> dict[str, Any]:
    """Probe while the background load runs; stops early when a probe is not visible in 30 s."""
    s = stack.settings
    reader = FeastRedisReader(redis.Redis.from_url(s.redis_url), s.feast_project, FEATURE_VIEWS)
    api = httpx.Client(base_url=stack.api_url)
    ctx = mp.get_context("spawn")
    stop = ctx.Event()
    sent = ctx.Value(BackgroundStats)
    bg = [ctx.Process(target=background, args=(s, k, producers, rate, stop, sent)) for k in range(producers)]
    for proc in bg:
        proc.start()
    wait = time.monotonic() + 120
    while sent.ready < producers and time.monotonic() < wait:  # each loads its workload first
        time.sleep(0.2)
    time.sleep(5)  # let the job meet the load
    print(f"freshness: {probes} probes with {rate:.0f} events/s in the background", flush=True)
    started = time.monotonic()
    to_redis: list[float] = []
    to_api: list[float] = []
    kept_up = True
    with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, linger_ms=0) as p:
        for i in range(probes):
            if time.monotonic() - started > MAX_BACKGROUND_S - 60:
                break
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
                kept_up = False
                print(f"probe {i} not visible after 30 s: the job is not keeping up with {rate:.0f}/s", flush=True)
                break
            to_redis.append((got_redis - t0) * 1000)
            to_api.append((got_api - t0) * 1000)
            if trace:
                print(f"probe {i} at {time.monotonic() - started:.1f}s: {to_redis[-1]:.0f} ms", flush=True)
            time.sleep(0.2)
    probing_s = time.monotonic() - started
    stop.set()
    for proc in bg:
        proc.join()

    def summary(xs: list[float]) -> dict[str, float]:
        if not xs:
            return {}
        return {"p50": round(statistics.median(xs), 1), "p99": round(pct(xs, 99), 1), "max": round(max(xs), 1),
                "over_1s": sum(x > 1000 for x in xs)}

    return {"background_rate": rate, "background_rate_achieved": round(sent.rate),
            "background_producers": producers, "probing_seconds": round(probing_s, 1),
            "probes": len(to_redis), "kept_up": kept_up,
            "event_to_redis_ms": summary(to_redis), "event_to_api_ms": summary(to_api)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=100_000)
    ap.add_argument("--rate", type=float, action="append",
                    help="background events/s while probing; repeat for several runs, run from low to high "
                    "so that a backlog left by a run the job could not keep up with spoils no other "
                    "(default 1000 and 2000)")
    ap.add_argument("--probes", type=int, default=200)
    ap.add_argument("--producers", type=int, default=2, help="background producer processes")
    ap.add_argument("--trace", action="store_true", help="print every probe's latency")
    ap.add_argument("--only", choices=("throughput", "freshness"), help="run one part (no results file)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        settings = Settings.from_env(state_dir=Path(tmp), api_port=18000 + int(time.time()) % 1000)
        stack = Stack.start(settings)
        try:
            result: dict[str, Any] = {"machine": f"{platform.machine()} {mp.cpu_count()} cores",
                                      "when": time.strftime("%F %T")}
            if args.only != "freshness":
                result["feature_job_throughput"] = throughput(stack, args.events)
                print(json.dumps(result), flush=True)
            if args.only != "throughput":
                result["freshness"] = [freshness(stack, rate, args.probes, args.producers, args.trace)
                                       for rate in sorted(args.rate or [1000.0, 2000.0])]
        finally:
            stack.stop()
    if args.only:
        print(json.dumps(result, indent=2))
        return
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "freshness.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
