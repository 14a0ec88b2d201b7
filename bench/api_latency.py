"""Ranking service latency under load, and freshrec's feature read against Feast's.

    python bench/api_latency.py [--workers N] [--seconds 15]  ->  bench/results/serving.json

Set-up (not timed): an embedded Redis holds the feature rows the streaming job would have
written after a simulated log (users, items, co-visitation, trending; written in Feast's
layout), and a model learned on that log is published. The API runs as
``uvicorn serving.app:app`` with N workers; the load comes from a separate process on
loopback, open loop (request i is due at i/rate whatever happened before, and its latency
counts from when it was due, so a stalled server shows up as latency, not as a lower rate).
Every request asks for k=10 out of ~200 candidates.

Results: p50/p99 at 100, 500 and 1000 requests/s; the highest rate of a ladder the server
sustains (>= 97% of the offered rate answered and p99 < 50 ms); and, in the same run, 200
item rows read by Feast's ``get_online_features`` and by freshrec's reader.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RATES = (100, 500, 1000)
LADDER = (200, 250, 300, 350, 400, 450, 500, 600, 750, 1000)


# -- the load generator (its own process) -----------------------------------------------------
async def _load(host: str, port: int, paths: list[str], rate: float, seconds: float, conns: int) -> dict:
    n = int(rate * seconds)
    due = [i / rate for i in range(n)]
    latencies: list[float] = []
    errors: Counter[int] = Counter()
    nxt = 0
    t0 = time.perf_counter() + 0.2

    async def worker() -> None:
        nonlocal nxt
        reader, writer = await asyncio.open_connection(host, port)
        while nxt < n:
            i = nxt
            nxt += 1
            wait = t0 + due[i] - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            writer.write(f"GET {paths[i % len(paths)]} HTTP/1.1\r\nHost: bench\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                          if line.lower().startswith(b"content-length"))
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - (t0 + due[i]))
            if status != 200:
                errors[status] += 1
        writer.close()

    await asyncio.gather(*(worker() for _ in range(conns)))
    elapsed = time.perf_counter() - t0
    latencies.sort()
    return {"offered_rps": rate, "answered_rps": round(len(latencies) / elapsed, 1), "requests": len(latencies),
            "p50_ms": round(latencies[len(latencies) // 2] * 1000, 2),
            "p99_ms": round(latencies[int(len(latencies) * 0.99)] * 1000, 2),
            "max_ms": round(latencies[-1] * 1000, 2), "non_200": dict(errors)}


def load_main(argv: list[str]) -> None:
    host, port, rate, seconds, paths_file = argv[0], int(argv[1]), float(argv[2]), float(argv[3]), argv[4]
    paths = json.loads(Path(paths_file).read_text())
    print(json.dumps(asyncio.run(_load(host, port, paths, rate, seconds, conns=64))))


def cpu_seconds(root: int) -> float:
    """User + system CPU of a process and its children (the API's workers), from /proc."""
    pids, total = {root}, 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == root:
            pids.add(int(stat.parent.name))
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return total


def run_load(port: int, paths_file: Path, rate: float, seconds: float, api_pid: int | None = None) -> dict:
    before = cpu_seconds(api_pid) if api_pid else 0.0
    out = subprocess.run([sys.executable, __file__, "--load", "127.0.0.1", str(port), str(rate), str(seconds),
                          str(paths_file)], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    if api_pid:
        result["api_cpu_ms_per_request"] = round((cpu_seconds(api_pid) - before) / result["requests"] * 1000, 3)
    return result


# -- set-up -------------------------------------------------------------------------------------
def feast_vs_freshrec(settings, items: list[str], repeats: int = 50) -> dict:  # noqa: ANN001
    import redis

    from connectors.feast_redis import FeastRedisReader
    from features.definitions import FEATURE_VIEWS, item_recent
    from features.store import apply

    fs = apply(settings)
    refs = [f"item_recent:{f.name}" for f in item_recent.features]
    reader = FeastRedisReader(redis.Redis.from_url(settings.redis_url), settings.feast_project, FEATURE_VIEWS)
    ours = reader.read([("item_recent", i) for i in items])
    theirs = fs.get_online_features(features=refs, entity_rows=[{"item_id": i} for i in items]).to_dict()
    assert [r["views"] if r else None for r in ours] == theirs["views"], "the two reads disagree"

    def timed(fn) -> list[float]:  # noqa: ANN001
        out = []
        for _ in range(repeats):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1000)
        return sorted(out)

    feast_ms = timed(lambda: fs.get_online_features(features=refs, entity_rows=[{"item_id": i} for i in items]))
    fresh_ms = timed(lambda: reader.read([("item_recent", i) for i in items]))
    # A reader that has not seen these entities yet (cold caches) does the whole work.
    cold = [FeastRedisReader(reader.client, settings.feast_project, FEATURE_VIEWS) for _ in range(repeats)]
    it = iter(cold)
    cold_ms = timed(lambda: next(it).read([("item_recent", i) for i in items]))
    p50 = statistics.median
    return {"entities": len(items), "feast_get_online_features_p50_ms": round(p50(feast_ms), 3),
            "freshrec_reader_p50_ms": round(p50(fresh_ms), 3),
            "freshrec_reader_cold_p50_ms": round(p50(cold_ms), 3),
            "speedup": round(p50(feast_ms) / p50(fresh_ms), 1),
            "speedup_cold": round(p50(feast_ms) / p50(cold_ms), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Two per core: uvicorn's workers share one listening socket, and a burst of new connections
    # goes mostly to the first worker to wake (51 of 64 seen with two workers); with more
    # workers than cores the kernel's scheduler evens out what the accept split does not.
    ap.add_argument("--workers", type=int, default=2 * (os.cpu_count() or 1), help="uvicorn worker processes")
    ap.add_argument("--seconds", type=float, default=15, help="per load step")
    ap.add_argument("--events", type=int, default=100_000, help="simulated log behind the features and model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serving.json")
    args = ap.parse_args()

    from connectors.embedded import free_port, start_redis, wait_for_port
    from freshrec.config import Settings

    tmp = Path(tempfile.mkdtemp(prefix="freshrec-bench-"))
    redis_svc = start_redis(tmp / "redis")
    settings = Settings(redis_url=f"redis://127.0.0.1:{redis_svc.port}/0", feast_project="bench", state_dir=tmp,
                        api_port=free_port(), api_workers=args.workers)
    api = None
    try:
        print(f"populating from {args.events} simulated events ...", file=sys.stderr)
        from freshrec.seed import seed_online_state

        users = seed_online_state(settings, args.events)
        rng = random.Random(1)
        paths = [f"/recommendations?user_id={rng.choice(users)}&k=10" for _ in range(5000)]
        paths_file = tmp / "paths.json"
        paths_file.write_text(json.dumps(paths))
        env = {**os.environ, **settings.to_env(), "PYTHONPATH": str(ROOT)}
        api = subprocess.Popen([sys.executable, "-m", "uvicorn", "serving.app:app", "--host", "127.0.0.1",
                                "--port", str(settings.api_port), "--workers", str(args.workers),
                                "--no-access-log", "--log-level", "warning"], env=env, cwd=ROOT)
        wait_for_port(settings.api_port, 60, api, "the API")
        import httpx

        deadline = time.monotonic() + 120
        streak = 0  # every worker has loaded the model: many answers in a row scored by it
        while streak < 40:
            r = httpx.get(f"http://127.0.0.1:{settings.api_port}{paths[0]}")
            streak = streak + 1 if r.status_code == 200 and r.json()["model_version"] else 0
            if time.monotonic() > deadline:
                raise SystemExit("the API never became ready")
            time.sleep(0.05)
        probe = [httpx.get(f"http://127.0.0.1:{settings.api_port}{p}&debug=true").json() for p in paths[:200]]
        odd = [p for p in probe if p.get("degraded") or "features" not in p.get("stages_ms", {})]
        if odd:
            raise SystemExit(f"{len(odd)} of {len(probe)} probes did not take the full path, e.g. {odd[0]}")
        candidates = statistics.mean(p["candidates"] for p in probe)
        stages = {s: round(statistics.median(p["stages_ms"][s] for p in probe), 3) for s in probe[0]["stages_ms"]}
        print(f"mean candidates per request {candidates:.0f}; median stage ms {stages}", file=sys.stderr)
        run_load(settings.api_port, paths_file, 200, 3)  # warm-up
        at_rates = []
        for rate in RATES:
            r = run_load(settings.api_port, paths_file, rate, args.seconds, api.pid)
            print(f"{rate:>5} rps offered: {r}", file=sys.stderr)
            at_rates.append(r)
        ladder = []
        for rate in LADDER:
            r = run_load(settings.api_port, paths_file, rate, args.seconds / 2, api.pid)
            r["sustained"] = r["answered_rps"] >= 0.97 * rate and r["p99_ms"] < 50 and not r["non_200"]
            print(f"ladder {rate:>5} rps: {r}", file=sys.stderr)
            ladder.append(r)
            if not r["sustained"]:
                break
        max_rate = max((r["offered_rps"] for r in ladder if r["sustained"]), default=0)
        items = [p["item_id"] for p in probe[0]["items"]]
        all_items = list(dict.fromkeys(items + [str(i) for i in range(20_000)]))[:200]
        reads = feast_vs_freshrec(settings, all_items)
        print(f"features for 200 items: {reads}", file=sys.stderr)
        result = {"when": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{os.cpu_count()} cores",
                  "api_workers": args.workers, "k": 10,
                  "mean_candidates": round(candidates, 1), "median_stage_ms": stages,
                  "at_rates": at_rates, "ladder": ladder, "max_sustained_rps": max_rate, "feature_read": reads}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.out}", file=sys.stderr)
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        redis_svc.stop()
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--load":
        load_main(sys.argv[2:])
    else:
        sys.exit(main())
