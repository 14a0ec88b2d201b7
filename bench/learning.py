"""Online-learning benchmarks; writes bench/results/learning.json.

1. Learner throughput, examples/s on one core (torch and BLAS single-threaded), of each model
   and of the pair as the trainer runs them, over examples built from the workload (the Taobao
   slice in ../shared/data when present, else the simulator) by the batch example builder.
2. Embedding-table memory over a long replay: the workload looped ``--loops`` times with new
   item and user ids each loop (a catalogue that turns over), with TTL + LRU eviction and
   without; rows and bytes every 10% of the run.
3. Event -> new parameters visible in the API, on the embedded stack (broker, PyFlink job,
   trainer, API, all on this machine) under each ``--rate`` events/s of background load: each probe
   is two views of a brand-new item (admission needs two sightings), timed from sending to
   ``GET /model?item_id=`` reporting that the served version has the item's row. p50/p99 in
   steady state: unrecorded warm-up probes run first until one is visible within 2 s (the job
   and the trainer start behind the background load); the warm-up time is reported. Run once
   per ``--features`` catalogue (default: the default catalogue, then ``features.none``, the
   job's built-in views only), since the catalogue's definitions are most of the job's work.
   Each probe is split in two stages: the feature job (sent -> the second view's training
   example read back from the examples topic) and the rest (trainer, publish, API). Probes
   whose window holds a periodic snapshot of the trainer are listed (it stalls the trainer).

    python bench/learning.py [--events 50000] [--loops 4] [--rate 100 200 300] [--probes 60]
                             [--features SPEC ...] [--skip-inprocess] [--skip-stack]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent))
from freshness import workload  # noqa: E402

from connectors.embedded import free_port  # noqa: E402
from connectors.kafka import EventProducer, consumer  # noqa: E402
from connectors.schema import BehaviorEvent  # noqa: E402
from freshrec.config import Settings  # noqa: E402
from freshrec.stack import Stack  # noqa: E402
from jobs.topics import examples_topic, jobs_to_run  # noqa: E402
from online_learning.embeddings import TwoTower  # noqa: E402
from online_learning.examples import BatchExamples, Example, ExampleBuilder  # noqa: E402
from online_learning.publish import ParameterStore  # noqa: E402
from online_learning.ranker import FTRLRanker  # noqa: E402
from online_learning.recommender import OnlineRecommender  # noqa: E402
from online_learning.threads import one_thread  # noqa: E402
from serving.status import LogOffsets  # noqa: E402
from streaming.state import Ev  # noqa: E402

RESULTS = Path(__file__).parent / "results"


def examples_of(events: list[BehaviorEvent]) -> list[list[Example]]:
    batch = BatchExamples(ExampleBuilder())
    out = []
    for e in events:
        group = batch.add(Ev.of(e))
        if group:
            out.append(group)
    return out


def throughput(groups: list[list[Example]]) -> dict[str, Any]:
    n = sum(len(g) for g in groups)
    out: dict[str, Any] = {"examples": n}
    for name, make in (("ftrl", FTRLRanker), ("two_tower", TwoTower)):
        model = make()
        started = time.perf_counter()
        for g in groups:
            for ex in g:
                model.learn_one(ex)
        out[f"{name}_examples_per_s"] = round(n / (time.perf_counter() - started))
    rec = OnlineRecommender.default()
    started = time.perf_counter()
    for g in groups:
        rec.learn_many(g)
    out["trainer_examples_per_s"] = round(n / (time.perf_counter() - started))
    return out


def memory(events: list[BehaviorEvent], loops: int) -> dict[str, Any]:
    span = events[-1].ts - events[0].ts + 1000
    looped = [replace(e, user_id=f"{e.user_id}~{k}", item_id=f"{e.item_id}~{k}", event_id=f"{e.event_id}~{k}",
                      ts=e.ts + k * span) for k in range(loops) for e in events]
    groups = examples_of(looped)
    ttl = span  # an id unseen for one loop's span is gone
    runs = {"with_eviction": TwoTower(ttl_ms=ttl, max_rows=len(events) // 2),
            "without_eviction": TwoTower(ttl_ms=10**15, max_rows=None)}
    out: dict[str, Any] = {"events": len(looped), "loops": loops, "ttl_ms": ttl}
    for name, model in runs.items():
        trace = []
        step = max(1, len(groups) // 10)
        for n, g in enumerate(groups):
            for ex in g:
                model.learn_one(ex)
            if n % step == step - 1:
                trace.append({"events_done": n + 1, "item_rows": len(model.items), "user_rows": len(model.users),
                              "table_mb": round((model.items.nbytes + model.users.nbytes) / 2**20, 1)})
        out[name] = {"trace": trace, "evicted": model.items.evicted + model.users.evicted}
    return out


def visibility(rate: float, probes: int, events: list[BehaviorEvent], features: str) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
    settings = Settings.from_env(state_dir=state, api_port=free_port(), features=features)
    stack = Stack.start(settings, log=lambda m: print(m, file=sys.stderr, flush=True))
    s = stack.settings
    stop = threading.Event()

    def background() -> None:
        with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, source="bench") as p:
            started, n = time.monotonic(), 0
            for e in events:
                if stop.is_set():
                    break
                p.send_valid(replace(e, ts=int(time.time() * 1000)))
                n += 1
                wait = started + n / rate - time.monotonic()
                if wait > 0:
                    time.sleep(wait)

    arrived: dict[str, float] = {}  # probe item -> when its second view's example was read back

    def examples() -> None:
        c = consumer(s.kafka_bootstrap, examples_topic(s), auto_offset_reset="latest",
                     fetch_max_wait_ms=s.fetch_wait_ms)
        try:
            while not stop.is_set():
                for records in c.poll(timeout_ms=20).values():
                    for r in records:
                        if b'"probe-user-b"' in r.value:
                            ex = json.loads(r.value)
                            if ex["user_id"] == "probe-user-b" and ex["label"] == 1:
                                arrived.setdefault(ex["item_id"], time.monotonic())
        finally:
            c.close()

    load = threading.Thread(target=background, daemon=True)
    reader = threading.Thread(target=examples, daemon=True)
    latencies: list[float] = []
    job_ms: list[float | None] = []  # per visible probe: its feature-job stage
    windows: list[tuple[int, int]] = []  # per visible probe: wall-clock ms sent, seen
    snapshots: list[int] = []  # wall-clock ms of each snapshot the trainer published meanwhile
    missed = 0
    try:
        load.start()
        reader.start()
        with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, source="probe") as p, \
                httpx.Client(base_url=stack.api_url, timeout=2) as api:

            def probe(name: str) -> float | None:
                item = f"{name}-{time.time_ns()}"
                sent = time.monotonic()
                for u in ("probe-user-a", "probe-user-b"):
                    p.send({"user_id": u, "item_id": item, "behavior": "view", "ts": int(time.time() * 1000)})
                p.flush()
                while time.monotonic() - sent < 30:
                    if api.get("/model", params={"item_id": item}).json()["item"]["embedding"]:
                        seen = time.monotonic()
                        while item not in arrived and time.monotonic() - seen < 2:
                            time.sleep(0.005)
                        if not name.startswith("warmup"):
                            job_ms.append((arrived[item] - sent) * 1000 if item in arrived else None)
                            now_ms = time.time() * 1000
                            windows.append((int(now_ms - (seen - sent) * 1000), int(now_ms)))
                        return (seen - sent) * 1000
                    time.sleep(0.01)
                return None

            warm_started = time.monotonic()
            while time.monotonic() - warm_started < 180:
                seen = probe("warmup")
                if seen is not None and seen < 2000:
                    break
                time.sleep(1)
            warmup_s = time.monotonic() - warm_started
            for k in range(probes):
                seen = probe(f"probe-{k}")
                if seen is None:
                    missed += 1
                    if missed == 3:  # fallen behind: more probes would only measure the backlog
                        break
                else:
                    latencies.append(seen)
                time.sleep(0.3)
        # How far each Flink job is behind the log (as of its last checkpoint): a job the CPU
        # cannot keep up with (FRESHREC_CATALOGUE_NICE) shows here, not in the probes.
        offsets = LogOffsets(s.kafka_bootstrap)
        try:
            behind = {name: offsets.behind(s.events_topic, group) for name, group in jobs_to_run(s).items()}
        finally:
            offsets.close()
        store = ParameterStore(redis.Redis.from_url(s.redis_url), s.feast_project)
        for v in store.versions_after(0):
            ver = store.get(v, blobs=False)
            if ver is not None and ver.kind == "snapshot" and windows and ver.created_ms >= windows[0][0]:
                snapshots.append(ver.created_ms)
    finally:
        stop.set()
        load.join(10)
        reader.join(10)
        stack.stop()

    def quantiles(xs: list[float]) -> list[float]:
        return statistics.quantiles(xs, n=100, method="inclusive") if len(xs) >= 2 else [float("nan")] * 99

    q, qj = quantiles(latencies), quantiles([x for x in job_ms if x is not None])
    qa = quantiles([t - j for t, j in zip(latencies, job_ms, strict=True) if j is not None])
    return {"features": features, "when": time.strftime("%Y-%m-%d %H:%M"), "background_rate": rate,
            "probes": probes, "warmup_s": round(warmup_s, 1), "visible": len(latencies),
            "missed_30s": missed, "kept_up": missed < 3, "catalogue_nice": s.catalogue_nice,
            "jobs_behind_events": behind,
            "p50_ms": round(q[49]), "p99_ms": round(q[98]), "max_ms": round(max(latencies, default=float("nan"))),
            "feature_job_p50_ms": round(qj[49]), "feature_job_p99_ms": round(qj[98]),
            # the rest of each probe: examples topic -> trainer -> publish -> Redis -> API
            "after_job_p50_ms": round(qa[49]), "after_job_p99_ms": round(qa[98]),
            "fetch_wait_ms": s.fetch_wait_ms,
            "publish_interval_ms": s.publish_interval_ms, "api_poll_ms": s.model_poll_ms,
            # A periodic snapshot stalls the trainer (~0.3 s: encode, check, a 30 MB write)
            "snapshots": len(snapshots),
            "probes_across_a_snapshot_ms": [round(t) for t, (a, b) in zip(latencies, windows, strict=True)
                                            if any(a <= c <= b + 50 for c in snapshots)],
            "latencies_ms": [round(x) for x in latencies],
            "feature_job_ms": [None if x is None else round(x) for x in job_ms]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--loops", type=int, default=4)
    ap.add_argument("--rate", type=float, nargs="+", default=[100, 200, 300],
                    help="background events/s; visibility is measured at each (default: 100 200 300)")
    ap.add_argument("--probes", type=int, default=60)
    ap.add_argument("--features", action="append", help="catalogue(s) for the stack's feature job "
                    "(default: features.catalog and features.none)")
    ap.add_argument("--skip-stack", action="store_true", help="only the in-process figures")
    ap.add_argument("--skip-inprocess", action="store_true", help="only the stack's figures; keep the "
                    "throughput and memory figures already in learning.json")
    args = ap.parse_args()
    one_thread()
    source, events = workload(args.events, int(time.time() * 1000) - 86_400_000)
    print(f"workload: {source}, {len(events)} events", file=sys.stderr)
    out = RESULTS / "learning.json"
    report: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    report |= {"workload": source, "machine": f"{platform.machine()}, {platform.python_version()}"}
    if not args.skip_inprocess:  # "when" dates these figures; each visibility run carries its own
        report["when"] = time.strftime("%Y-%m-%d %H:%M")
        groups = examples_of(events)
        report["throughput"] = throughput(groups)
        print(json.dumps(report["throughput"]), file=sys.stderr)
        report["memory"] = memory(events[: min(len(events), 30_000)], args.loops)
        print(json.dumps({k: v["trace"][-1] for k, v in report["memory"].items() if isinstance(v, dict)}),
              file=sys.stderr)
    if not args.skip_stack:
        report["visibility"] = []
        for features in args.features or ["features.catalog", "features.none"]:
            for rate in args.rate:
                report["visibility"].append(visibility(rate, args.probes, events, features))
                print(json.dumps({k: v for k, v in report["visibility"][-1].items() if not isinstance(v, list)}),
                      file=sys.stderr)
    RESULTS.mkdir(exist_ok=True)
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
