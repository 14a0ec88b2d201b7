"""Online/offline consistency: the streaming job's final rows against the backfill's.

Both sides are read as point-in-time series per (definition, entity); at every point where
either side has a row, each side's value is the newest row at or before it. Numbers agree
within a relative 1e-9 (float sums may round differently); everything else must be equal.

>>> a = {("n", "u1"): {10: 1, 20: 2}}
>>> b = {("n", "u1"): {10: 1, 20: 3}}
>>> r = compare(a, b)
>>> r.rates()["n"], r.mismatches[0][:3]
(0.5, ('n', 'u1', 20))
"""

from __future__ import annotations

import json
import math
from bisect import bisect_right
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from features.dsl import KEY_SEPARATOR, Definition, expand
from freshrec.config import Settings

Series = dict[tuple[str, str], dict[int, Any]]  # (definition, entity) -> ts ms -> value


def same(x: Any, y: Any) -> bool:
    if isinstance(x, float) or isinstance(y, float):
        if x is None or y is None:
            return x is y
        return math.isclose(x, y, rel_tol=1e-9, abs_tol=1e-12)
    return x == y


@dataclass
class Report:
    points: dict[str, int] = field(default_factory=dict)
    equal: dict[str, int] = field(default_factory=dict)
    mismatches: list[tuple[str, str, int, Any, Any]] = field(default_factory=list)  # name, entity, ts, stream, batch

    def rates(self) -> dict[str, float]:
        return {n: self.equal[n] / p if p else 1.0 for n, p in self.points.items()}

    def render(self, show: int = 20) -> str:
        lines = [f"{'definition':32} {'points':>10} {'consistent':>11}"]
        for name, rate in sorted(self.rates().items()):
            lines.append(f"{name:32} {self.points[name]:>10,} {100 * rate:>10.2f}%")
        total = sum(self.points.values())
        lines.append(f"{'all':32} {total:>10,} {100 * sum(self.equal.values()) / max(total, 1):>10.2f}%")
        for name, entity, ts, a, b in self.mismatches[:show]:
            when = datetime.fromtimestamp(ts / 1000, UTC).isoformat(timespec="milliseconds")
            lines.append(f"  MISMATCH {name} {entity.replace(KEY_SEPARATOR, '|')} at {when}: "
                         f"stream={a!r} backfill={b!r}")
        if len(self.mismatches) > show:
            lines.append(f"  ... and {len(self.mismatches) - show} more")
        return "\n".join(lines)


def _as_of(series: dict[int, Any], times: list[int], t: int) -> Any:
    i = bisect_right(times, t)
    return series[times[i - 1]] if i else None


def compare(stream: Series, batch: Series, until: int | None = None) -> Report:
    """Every point of either side (up to ``until``), as of that point on both."""
    report = Report()
    for key in sorted(set(stream) | set(batch)):
        name, entity = key
        a, b = stream.get(key, {}), batch.get(key, {})
        ta, tb = sorted(a), sorted(b)
        for t in sorted(set(ta) | set(tb)):
            if until is not None and t > until:
                break
            x, y = _as_of(a, ta, t), _as_of(b, tb, t)
            report.points[name] = report.points.get(name, 0) + 1
            if same(x, y):
                report.equal[name] = report.equal.get(name, 0) + 1
            else:
                report.equal.setdefault(name, 0)
                report.mismatches.append((name, entity, t, x, y))
    return report


def from_feature_log(lines: Iterable[bytes | str], names: set[str]) -> Series:
    """The final catalogue rows of the feature-log topic."""
    out: Series = {}
    for raw in lines:
        row = json.loads(raw)
        if not row.get("final"):
            continue
        for name, values in expand(row["view"], row["values"]):
            if name in names:
                out.setdefault((name, row["entity"]), {})[row["ts"]] = values[name]
    return out


def from_offline(root: Path, defs: list[Definition], pattern: str = "*.parquet") -> Series:
    """What the offline store holds for the catalogue (``pattern``: e.g. only the backfill's files)."""
    out: Series = {}
    for d in defs:
        keys = list(d.entity_kind.join_keys)
        for f in sorted((root / d.name).glob(f"date=*/{pattern}")):
            t = pq.read_table(f).to_pydict()
            for i, when in enumerate(t["event_timestamp"]):
                entity = KEY_SEPARATOR.join(t[k][i] for k in keys)
                out.setdefault((d.name, entity), {})[int(when.timestamp() * 1000)] = t[d.name][i]
    return out


def run(source: Path, settings: Settings, fmt: str = "auto", timeout_s: float = 1800) -> Report:
    """Both executors over one log file, on services of their own (an embedded broker and Redis,
    a fresh Feast project): the file in order through the streaming job, then the backfill;
    compares every final row."""
    import tempfile
    import time

    from connectors.embedded import start_broker, start_redis
    from connectors.kafka import EventProducer, consumer
    from connectors.logfile import detect_format, open_log
    from features.dsl import load
    from features.store import apply, repo_dir
    from freshrec.stack import start_job, stop_group
    from jobs.backfill import backfill
    from jobs.topics import feature_log_topic, prepare_log
    from streaming.definitions import max_window_ms

    defs = load(settings.features)
    names = {d.name for d in defs}
    reach = max_window_ms(defs)
    with tempfile.TemporaryDirectory(prefix="freshrec-parity-") as tmp:
        broker, redis_server = start_broker(Path(tmp) / "broker"), start_redis(Path(tmp) / "redis")
        job = None
        try:
            s = settings.replace(kafka_bootstrap=f"127.0.0.1:{broker.port}",
                                 redis_url=f"redis://127.0.0.1:{redis_server.port}/0", state_dir=Path(tmp) / "state",
                                 events_topic="parity-events", dlq_topic="parity-dlq", feast_project="parity")
            prepare_log(s)
            apply(s)
            job = start_job("catalogue_job", s, Path(tmp))
            fmt = detect_format(source) if fmt == "auto" else fmt
            sent, first, last = 0, 2**63, 0
            print(f"[parity] streaming {source} through the catalogue job (log: {tmp}/catalogue_job.log)", flush=True)
            with EventProducer(s.kafka_bootstrap, s.events_topic, s.dlq_topic, source="parity") as p:
                for row, line in open_log(source, fmt):
                    e = p.send(row if row is not None else line)
                    if not isinstance(e, Exception):
                        sent, first, last = sent + 1, min(first, e.ts), max(last, e.ts)
                # Far ahead, from many users (every partition): the watermark passes the whole log.
                for u in range(32):
                    p.send({"event_id": f"parity-end-{u}", "user_id": f"parity-end-{u}", "item_id": "parity-end",
                            "behavior": "view", "ts": last + 2 * (s.allowed_lateness_ms + reach)})
            print(f"[parity] {sent:,} events sent; backfilling the same file", flush=True)
            day = 86_400_000
            backfill(s, [source], first - first % day, last + day, fmt=fmt)
            root = repo_dir(s) / "offline"
            batch = from_offline(root, defs, "backfill-*.parquet")
            expected = sum(1 for v in batch.values() for t in v if t <= last)
            c = consumer(s.kafka_bootstrap, feature_log_topic(s))
            stream: Series = {}
            deadline, n, shown = time.monotonic() + timeout_s, 0, 0.0
            while n < expected:
                if job.poll() is not None:
                    raise RuntimeError(f"the catalogue job exited ({job.returncode}); see {tmp}/catalogue_job.log")
                if time.monotonic() > deadline:
                    print(f"[parity] gave up waiting after {timeout_s:.0f}s: {n:,} of {expected:,} rows", flush=True)
                    break
                for records in c.poll(timeout_ms=1000).values():  # counted as they come: the log is big
                    for key, series in from_feature_log((r.value for r in records), names).items():
                        known = stream.setdefault(key, {})
                        n += sum(1 for t in series if t <= last and t not in known)
                        known.update(series)
                if time.monotonic() - shown > 5:
                    shown = time.monotonic()
                    print(f"[parity] stream: {n:,}/{expected:,} final rows", flush=True)
            c.close()
            return compare(stream, batch, until=last)
        finally:
            if job is not None:
                stop_group(job.pid)
            broker.stop()
            redis_server.stop()
