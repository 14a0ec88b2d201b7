"""``freshrec status``: each part of a running stack, up or down, how far behind, what happened.

    broker         up    127.0.0.1:40123, log epoch 3f2a9c0e1b7d (since 2026-11-24 12:00:01)
    feature_job    up    behind by 0 events (as of its last checkpoint); last checkpoint chk-41, 2 s ago
    ...
    dead letters         14 on behavior-events-dlq

"Behind" is the log's end minus what a component has made durable: each Flink job's offsets
committed with its last checkpoint, the offline-store writer's committed offsets, the
trainer's offsets in its newest published version. Below the table, the stack's recent
events (restarts), newest last.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import httpx
import redis
from kafka import TopicPartition
from kafka.errors import KafkaError

from connectors.kafka import BrokerError, consumer, log_ends
from connectors.log_epoch import read_epoch
from freshrec.config import Settings
from freshrec.stack import alive
from jobs.topics import JOB_IDS, epoch_topic, examples_topic, feature_log_topic, offline_group
from online_learning.publish import ParameterStore
from streaming.flink import checkpoint_root, latest_checkpoint


@dataclass
class Part:
    component: str
    state: str  # "up", "DOWN" or "" (not a process)
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # the same, for --json


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


class LogOffsets:
    """Log ends and committed offsets, read from the broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.c = consumer(bootstrap, bootstrap_timeout_ms=3000, request_timeout_ms=5000)

    def end(self, topic: str) -> dict[int, int]:
        parts = self.c.partitions_for_topic(topic)
        if not parts:
            return {}
        ends = log_ends(self.c, [TopicPartition(topic, p) for p in sorted(parts)])
        return {tp.partition: n for tp, n in ends.items()}

    def committed(self, group: str, topic: str, partitions: list[int]) -> dict[int, int]:
        c = consumer(self.bootstrap, group=group, enable_auto_commit=False, bootstrap_timeout_ms=3000,
                     request_timeout_ms=5000)
        try:
            got = {p: c.committed(TopicPartition(topic, p)) for p in partitions}
        finally:
            c.close()
        return {p: o for p, o in got.items() if o is not None}

    def behind(self, topic: str, group: str) -> int:
        """Records of ``topic`` past what ``group`` has committed."""
        ends = self.end(topic)
        return _behind(ends, self.committed(group, topic, list(ends)))

    def close(self) -> None:
        self.c.close()


def _behind(ends: dict[int, int], done: dict[int, int]) -> int:
    return sum(max(end - done.get(p, 0), 0) for p, end in ends.items())


def collect(settings: Settings, doc: dict[str, Any]) -> list[Part]:
    """The parts of the stack described by ``doc`` (its stack.json)."""
    s = settings
    pids: dict[str, int] = doc["pids"]

    def part(name: str) -> Part:
        pid = pids.get(name)
        return Part(name, "up" if pid and alive(pid, group=True) else "DOWN")

    broker, redis_part, offline, trainer, api = (part(n) for n in ("broker", "redis", "offline_store", "trainer",
                                                                  "api"))
    # The catalogue job runs only when the catalogue defines something (see freshrec/stack.py).
    jobs = [(part(n), job_id(s)) for n, job_id in JOB_IDS.items() if n in pids]
    dlq = Part("dead letters", "")
    log: LogOffsets | None = None
    examples_end: dict[int, int] = {}
    try:
        epoch = read_epoch(s.kafka_bootstrap, epoch_topic(s), timeout_s=3)
        broker.details.append(f"{s.kafka_bootstrap}, log epoch {epoch or 'none (topics not created)'}")
        broker.figures["epoch"] = epoch.id if epoch else None
        log = LogOffsets(s.kafka_bootstrap)
    except (BrokerError, KafkaError) as exc:
        broker.details.append(f"not answering at {s.kafka_bootstrap}: {exc}")
    if log is not None:
        try:
            for job, job_id in jobs:
                job.figures["behind"] = lag = log.behind(s.events_topic, job_id)
                job.details.append(f"behind by {lag} events (as of its last checkpoint)")
            if epoch is not None:
                offline.figures["behind"] = lag = log.behind(feature_log_topic(s), offline_group(s, epoch.id))
                offline.details.append(f"behind by {lag} feature rows")
            dead = sum(log.end(s.dlq_topic).values())
            dlq.figures["count"] = dead
            dlq.details.append(f"{dead} on {s.dlq_topic}")
            examples_end = log.end(examples_topic(s))
        except KafkaError as exc:
            broker.details.append(f"could not read offsets: {exc}")
        finally:
            log.close()

    for job, job_id in jobs:
        ckpt = latest_checkpoint(checkpoint_root(s, job_id))
        if ckpt is None:
            job.details.append("no checkpoint yet")
        else:
            age = time.time() - (ckpt / "_metadata").stat().st_mtime
            job.figures |= {"checkpoint": ckpt.name, "checkpoint_age_s": round(age, 1)}
            job.details.append(f"last checkpoint {ckpt.name}, {_ago(age)}")

    try:
        client = redis.Redis.from_url(s.redis_url, socket_timeout=2, socket_connect_timeout=2)
        redis_part.figures["keys"] = keys = client.dbsize()
        redis_part.details.append(f"{s.redis_url}, {keys} keys")
        store = ParameterStore(client, s.feast_project)
        head = store.head()
        version = store.get(head) if head else None
        if version is None:
            trainer.details.append("nothing published yet")
        else:
            age = time.time() - version.created_ms / 1000
            trainer.figures |= {"published_version": head, "published_age_s": round(age, 1)}
            trainer.details.append(f"published version {head}, {_ago(age)}")
            if examples_end and version.meta.get("epoch") == broker.figures.get("epoch"):
                done = {int(p): o for p, o in version.meta.get("offsets", {}).items()}
                trainer.figures["behind"] = lag = _behind(examples_end, done)
                trainer.details.append(f"behind by {lag} examples (as of that version)")
    except redis.RedisError as exc:
        redis_part.details.append(f"not answering at {s.redis_url}: {exc}")

    try:
        model = httpx.get(doc["api"] + "/model", timeout=2).json()
        api.figures |= {"served_version": model["version"], "parameter_lag_ms": model["lag_ms"]}
        api.details.append(f"{doc['api']}, serving model version {model['version']}"
                           + (f" (published {model['lag_ms']} ms ago)" if model["lag_ms"] is not None else ""))
    except (httpx.HTTPError, ValueError, KeyError) as exc:
        api.details.append(f"not answering at {doc['api']}: {exc}")
    return [broker, redis_part, *(job for job, _ in jobs), offline, trainer, api, dlq]


def render(parts: list[Part], events: list[dict[str, Any]]) -> str:
    lines = [f"{p.component:14} {p.state:5} {'; '.join(p.details)}" for p in parts]
    if events:
        lines += ["", "what happened (newest last):"]
        lines += [f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['component']:14} {e['what']}"
                  for e in events]
    return "\n".join(lines)


def as_json(parts: list[Part], events: list[dict[str, Any]]) -> str:
    return json.dumps({"components": [asdict(p) for p in parts], "events": events}, indent=2)
