"""The ranking request path in a hot loop, without HTTP: where a request's time goes.

    python bench/request_path.py [--requests 1000] [--events 30000]  ->  bench/results/request-path.json

Set-up (not timed): an embedded Redis seeded from a simulated log (freshrec/seed.py), and the
model learned on it. Then ``--requests`` recommendations (k=10) for random users of the log,
after 200 to warm the caches, with the item cache off (every request reads its candidates'
rows). Reports the mean of each stage (serving/request_path.py) and the ranker's
``score_many`` over the same requests' candidates with and without their co-visitation rows,
which is what the co-visitation feature costs the scoring stage.

api_latency.py measures the API as apps see it (HTTP, load, workers); this one is for A/B
runs of a change to the path itself, e.g. ``PYTHONPATH=<other checkout>`` for the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

COVISIT_FIELDS = ("neighbours", "neighbour_counts")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--events", type=int, default=30_000, help="simulated log behind the features and model")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "request-path.json")
    args = ap.parse_args()

    import redis

    from connectors.embedded import start_redis
    from freshrec.config import Settings
    from freshrec.seed import seed_online_state
    from online_learning.publish import ParameterStore
    from serving.models import ServedModels
    from serving.request_path import RequestPath, ranking_reader

    work = Path(tempfile.mkdtemp(prefix="freshrec-path-"))
    server = start_redis(work / "redis")
    try:
        s = Settings(redis_url=f"redis://127.0.0.1:{server.port}/0", feast_project="path", state_dir=work / "state")
        print(f"seeding Redis from {args.events:,} simulated events ...", flush=True)
        users = seed_online_state(s, args.events, n_users=2_000, n_items=8_000, seed=1)
        client = redis.Redis.from_url(s.redis_url)
        models = ServedModels(ParameterStore(client, s.feast_project), 1000)
        models.refresh()
        reader, inputs = ranking_reader(client, s)
        path = RequestPath(client, reader, models, s.feast_project, item_cache_ms=0, inputs=inputs)
        scored: list[tuple[dict[str, Any] | None, list[tuple[str, Any]]]] = []
        score = path._score

        def keep(user_id: str, user: Any, cands: list, rows: list, *rest: Any) -> Any:
            scored.append((user, [(i, r) for (i, _), r in zip(cands, rows, strict=True)]))
            return score(user_id, user, cands, rows, *rest)

        path._score = keep  # type: ignore[method-assign]
        rng = random.Random(0)
        for _ in range(200):
            path.recommend(rng.choice(users), 10)
        scored.clear()
        stages: Counter[str] = Counter()
        started = time.perf_counter()
        for _ in range(args.requests):
            stages.update(path.recommend(rng.choice(users), 10).stages_ms)
        per_request = (time.perf_counter() - started) / args.requests * 1000

        choice = models.choose(users[0])
        assert choice is not None
        rec = choice.recommender
        bare = [(u, [(i, r and {k: v for k, v in r.items() if k not in COVISIT_FIELDS}) for i, r in c])
                for u, c in scored]
        timing: dict[str, list[float]] = {"with_covisit_rows": [], "without": []}
        for _ in range(3):  # alternating, best of three
            for name, data in (("with_covisit_rows", scored), ("without", bare)):
                t = time.perf_counter()
                for user, cands in data:
                    rec.ranker.score_many(user, cands)
                timing[name].append((time.perf_counter() - t) / len(data) * 1000)
    finally:
        server.stop()
    result = {
        "machine": f"{platform.machine()} {os.cpu_count()} cores",
        "when": time.strftime("%Y-%m-%d %H:%M:%S"),
        "requests": args.requests, "events": args.events,
        "ms_per_request": round(per_request, 3),
        "stages_ms_mean": {k: round(v / args.requests, 3) for k, v in stages.items()},
        "candidates_per_request": round(sum(len(c) for _, c in scored) / max(1, len(scored)), 1),
        "ranker_score_many_ms": {k: round(min(v), 3) for k, v in timing.items()},
    }
    print(json.dumps(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
