"""Each part of a running pipeline: up or down, how far behind, what happened.

    broker         up    127.0.0.1:40123, log epoch 3f2a9c0e1b7d (since 2026-11-24 12:00:01); 51234 events on ...
    feature_job    up    behind by 0 events (as of its last checkpoint); last checkpoint chk-41, 2 s ago; ...
    ...
    dead letters         14 on behavior-events-dlq; newest: ts: more than a day ahead (api)

``freshrec status`` prints it, and the API returns the same collection at ``GET /status``
(the live page at ``/ui`` reads it there): one source for both.

"Behind" is the log's end minus what a component has made durable: each Flink job's offsets
committed with its last checkpoint, the offline-store writer's committed offsets, the
trainer's offsets in its newest published version. Below the table, the stack's recent
events (restarts), newest last.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from kafka import KafkaAdminClient, TopicPartition
from kafka.errors import KafkaError

from connectors.embedded import alive
from connectors.kafka import BrokerError, consumer, log_ends
from connectors.log_epoch import read_epoch
from features.dsl import trending_key
from freshrec.config import Settings
from jobs.topics import epoch_topic, examples_topic, feature_log_topic, jobs_to_run, offline_group
from online_learning.publish import ParameterStore
from streaming.flink import checkpoint_root, latest_checkpoint

DLQ_SHOWN = 5  # newest refused events listed with their reasons


@dataclass
class Part:
    component: str
    state: str  # "up", "DOWN", or "" (not a process, or not one this stack started)
    details: list[str] = field(default_factory=list)
    figures: dict[str, Any] = field(default_factory=dict)  # the same, for --json and the page


def stack_file(state_dir: Path) -> Path:
    return state_dir / "stack.json"


def stack_doc(state_dir: Path) -> dict[str, Any] | None:
    """What ``freshrec up`` wrote about the stack it runs (ports, pids, web UIs), if one runs."""
    path = stack_file(state_dir)
    return json.loads(path.read_text()) if path.exists() else None


def events_file(state_dir: Path) -> Path:
    return state_dir / "events.jsonl"


def recent_events(state_dir: Path, n: int = 10) -> list[dict[str, Any]]:
    """The stack's newest ``n`` events (restarts and the like), oldest first."""
    path = events_file(state_dir)
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()[-n:] if line.strip()]


def _ago(seconds: float) -> str:
    return f"{seconds:.0f} s ago" if seconds < 120 else f"{seconds / 60:.0f} min ago"


class LogOffsets:
    """Log ends, committed offsets and the newest records, read from the broker.

    Fetches wait at most 20 ms at the broker: the embedded one holds a fetch for its whole
    wait even once records are there (500 ms by default), which made ``status`` take ~8 s."""

    def __init__(self, bootstrap: str) -> None:
        self.c = consumer(bootstrap, bootstrap_timeout_ms=3000, request_timeout_ms=5000, fetch_max_wait_ms=20)
        # One admin client answers for every group (a consumer per group took ~0.2 s to connect).
        self.admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)

    def end(self, topic: str) -> dict[int, int]:
        return self.ends([topic])[topic]

    def ends(self, topics: list[str]) -> dict[str, dict[int, int]]:
        """Each topic's partitions' log ends, all read in one pass."""
        # From the metadata cache (read_epoch filled it); a missing topic asks the broker once more.
        tps = [TopicPartition(t, p) for t in topics for p in sorted(self.c.partitions_for_topic(t))]
        got = log_ends(self.c, tps, settle_ms=60) if tps else {}
        out: dict[str, dict[int, int]] = {t: {} for t in topics}
        for tp, n in got.items():
            out[tp.topic][tp.partition] = n
        return out

    def committed(self, group: str, topic: str) -> dict[int, int]:
        got = self.admin.list_group_offsets(group).get(group, {})
        return {tp.partition: o.offset for tp, o in got.items() if tp.topic == topic and o.offset >= 0}

    def behind(self, topic: str, group: str) -> int:
        """Records of ``topic`` past what ``group`` has committed."""
        return _behind(self.end(topic), self.committed(group, topic))

    def newest(self, topic: str, ends: dict[int, int], n: int) -> list[bytes]:
        """The values of the newest ``n`` records over the partitions (``ends``: their log ends),
        oldest first."""
        tps = [TopicPartition(topic, p) for p, end in ends.items() if end]
        if not tps:
            return []
        self.c.assign(tps)
        for tp in tps:
            self.c.seek(tp, max(ends[tp.partition] - n, 0))
        got: list[Any] = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(got) < n * len(tps):
            batch = self.c.poll(timeout_ms=100)
            if not batch:
                break
            got += [r for records in batch.values() for r in records]
        got.sort(key=lambda r: r.timestamp)
        return [r.value for r in got[-n:]]

    def close(self) -> None:
        self.admin.close()
        self.c.close()


def _get_json(url: str) -> Any:
    """A local GET (urllib: httpx builds an SSL context per call, ~0.15 s of a status)."""
    with urllib.request.urlopen(url, timeout=2) as r:
        return json.load(r)


def _behind(ends: dict[int, int], done: dict[int, int]) -> int:
    return sum(max(end - done.get(p, 0), 0) for p, end in ends.items())


def _refused(raw: bytes) -> dict[str, Any]:
    try:
        r = json.loads(raw)
        return {"field": r.get("field", ""), "reason": r.get("reason", ""), "source": r.get("source", ""),
                "at": r.get("at")}
    except ValueError:
        return {"field": "", "reason": "unreadable DLQ record", "source": "", "at": None}


def collect(settings: Settings, doc: dict[str, Any] | None, offsets: LogOffsets | None = None,
            api: dict[str, Any] | None = None) -> list[Part]:
    """The parts of the pipeline. ``doc``: the stack's stack.json (None: not started by
    ``freshrec up``, e.g. docker-compose: processes are then not checked). ``offsets``: a
    broker connection to reuse (one is opened and closed otherwise). ``api``: the API's own
    ``/model`` answer, when the API asks (otherwise it is asked over HTTP)."""
    s = settings
    pids: dict[str, int] = doc["pids"] if doc else {}
    ui: dict[str, str] = doc.get("flink_ui", {}) if doc else {}

    def part(name: str) -> Part:
        if doc is None:
            return Part(name, "")
        pid = pids.get(name)
        return Part(name, "up" if pid and alive(pid, group=True) else "DOWN")

    broker, redis_part, offline, trainer, api_part = (part(n) for n in ("broker", "redis", "offline_store",
                                                                       "trainer", "api"))
    groups = jobs_to_run(s)  # job -> its id (consumer group, checkpoint folder)
    jobs = [(part(n), group) for n, group in groups.items() if doc is None or n in pids]
    for job, _ in jobs:
        if job.component in ui:
            job.figures["web_ui"] = ui[job.component]
    dlq = Part("dead letters", "")
    log = offsets
    examples_end: dict[int, int] = {}
    epoch = None
    try:
        epoch = read_epoch(s.kafka_bootstrap, epoch_topic(s), timeout_s=3, using=offsets.c if offsets else None)
        broker.details.append(f"{s.kafka_bootstrap}, log epoch {epoch or 'none (topics not created)'}")
        broker.figures["epoch"] = epoch.id if epoch else None
        log = log or LogOffsets(s.kafka_bootstrap)
    except (BrokerError, KafkaError) as exc:
        broker.details.append(f"not answering at {s.kafka_bootstrap}: {exc}")
    if log is not None:
        try:
            ends = log.ends([s.events_topic, feature_log_topic(s), s.dlq_topic, examples_topic(s)])
            events_end, examples_end = ends[s.events_topic], ends[examples_topic(s)]
            broker.figures["events"] = total = sum(events_end.values())
            broker.details.append(f"{total} events on {s.events_topic}")
            for job, group in jobs:
                job.figures["behind"] = lag = _behind(events_end, log.committed(group, s.events_topic))
                job.details.append(f"behind by {lag} events (as of its last checkpoint)")
            if epoch is not None:
                group = offline_group(s, epoch.id)
                offline.figures["behind"] = lag = _behind(ends[feature_log_topic(s)],
                                                          log.committed(group, feature_log_topic(s)))
                offline.details.append(f"behind by {lag} feature rows")
            dlq_end = ends[s.dlq_topic]
            dlq.figures["count"] = dead = sum(dlq_end.values())
            dlq.details.append(f"{dead} on {s.dlq_topic}")
            if dead:
                dlq.figures["newest"] = newest = [_refused(v) for v in log.newest(s.dlq_topic, dlq_end, DLQ_SHOWN)]
                if newest:
                    r = newest[-1]
                    dlq.details.append(f"newest: {r['field'] or 'payload'}: {r['reason']} ({r['source']})")
        except KafkaError as exc:
            broker.details.append(f"could not read offsets: {exc}")
        finally:
            if offsets is None:
                log.close()

    for job, job_id in jobs:
        ckpt = latest_checkpoint(checkpoint_root(s, job_id))
        if ckpt is None:
            job.details.append("no checkpoint yet")
        else:
            age = time.time() - (ckpt / "_metadata").stat().st_mtime
            job.figures |= {"checkpoint": ckpt.name, "checkpoint_age_s": round(age, 1)}
            job.details.append(f"last checkpoint {ckpt.name}, {_ago(age)}")
        if "web_ui" in job.figures:
            job.details.append(f"web UI {job.figures['web_ui']}")

    try:
        client = redis.Redis.from_url(s.redis_url, socket_timeout=2, socket_connect_timeout=2)
        redis_part.figures["keys"] = keys = client.dbsize()
        redis_part.details.append(f"{s.redis_url}, {keys} keys")
        trending = client.get(trending_key(s.feast_project))
        if trending and jobs:
            # The feature job writes the trending list with the newest event time it has counted.
            newest_ms = json.loads(trending)["ts"]
            age = time.time() - newest_ms / 1000
            jobs[0][0].figures |= {"newest_event_ms": newest_ms, "newest_event_age_s": round(age, 3)}
            jobs[0][0].details.append(f"newest event counted {age:.1f} s ago (event time)")
        store = ParameterStore(client, s.feast_project)
        head = store.head()
        version = store.get(head, blobs=False) if head else None
        if version is None:
            trainer.details.append("nothing published yet")
        else:
            age = time.time() - version.created_ms / 1000
            trainer.figures |= {"published_version": head, "published_age_s": round(age, 1),
                                "auc": version.meta.get("auc")}
            trainer.details.append(f"published version {head}, {_ago(age)}")
            if examples_end and version.meta.get("epoch") == broker.figures.get("epoch"):
                done = {int(p): o for p, o in version.meta.get("offsets", {}).items()}
                trainer.figures["behind"] = lag = _behind(examples_end, done)
                trainer.details.append(f"behind by {lag} examples (as of that version)")
    except (redis.RedisError, ValueError, KeyError) as exc:
        redis_part.details.append(f"not answering at {s.redis_url}: {exc}")
        redis_part.figures["error"] = str(exc)

    url = doc["api"] if doc else f"http://{s.api_host}:{s.api_port}"
    try:
        model = api if api is not None else _get_json(url + "/model")
        api_part.figures |= {"served_version": model["version"], "parameter_lag_ms": model["lag_ms"]}
        api_part.details.append(f"{url}, serving model version {model['version']}"
                                + (f" (published {model['lag_ms']} ms ago)" if model["lag_ms"] is not None else ""))
    except (OSError, ValueError, KeyError) as exc:
        api_part.details.append(f"not answering at {url}: {exc}")
    return [broker, redis_part, *(job for job, _ in jobs), offline, trainer, api_part, dlq]


def render(parts: list[Part], events: list[dict[str, Any]]) -> str:
    lines = [f"{p.component:14} {p.state:5} {'; '.join(p.details)}" for p in parts]
    if events:
        lines += ["", "what happened (newest last):"]
        lines += [f"  {time.strftime('%H:%M:%S', time.localtime(e['ts']))} {e['component']:14} {e['what']}"
                  for e in events]
    return "\n".join(lines)


def as_dict(parts: list[Part], events: list[dict[str, Any]]) -> dict[str, Any]:
    return {"components": [asdict(p) for p in parts], "events": events}


def as_json(parts: list[Part], events: list[dict[str, Any]]) -> str:
    return json.dumps(as_dict(parts, events), indent=2)


class StatusFeed:
    """The status, collected every ``every_s`` by a thread while someone asks for it (the
    page polls every second; the thread stops after ``idle_s`` without a question), with the
    rates between two collections. ``extra()`` adds the caller's own figures (the API's
    request latencies and candidate mix)."""

    def __init__(self, settings: Settings, api: Callable[[], dict[str, Any]],
                 extra: Callable[[], dict[str, Any]] | None = None, every_s: float = 1.0, idle_s: float = 30.0) -> None:
        self.settings, self.api, self.extra = settings, api, extra
        self.every_s, self.idle_s = every_s, idle_s
        self._latest: dict[str, Any] | None = None
        self._asked = 0.0
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None

    def latest(self, wait_s: float = 10.0) -> dict[str, Any]:
        with self._lock:
            self._asked = time.monotonic()
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="status-feed", daemon=True)
                self._thread.start()
            self._ready.wait_for(lambda: self._latest is not None, wait_s)
            return self._latest or {"at": int(time.time() * 1000), "components": [], "events": [],
                                    "rates": {}, "collecting": True}

    def stop(self) -> None:
        self._asked = float("-inf")

    def _run(self) -> None:
        offsets: LogOffsets | None = None
        previous: tuple[float, dict[str, Any]] | None = None
        try:
            while time.monotonic() - self._asked < self.idle_s:
                started = time.monotonic()
                s = self.settings
                if offsets is None:
                    with contextlib.suppress(KafkaError):  # no broker: collect() says so
                        offsets = LogOffsets(s.kafka_bootstrap)
                try:
                    parts = collect(s, stack_doc(s.state_dir), offsets, self.api())
                except Exception as exc:  # noqa: BLE001 - e.g. the broker went away mid-read
                    if offsets is not None:  # connect afresh next time
                        offsets.close()
                    offsets = None
                    with self._lock:  # said, not swallowed: the page shows it
                        self._latest = {"at": int(time.time() * 1000), "components": [], "events": [], "rates": {},
                                        "error": f"collecting the status failed: {type(exc).__name__}: {exc}"}
                        self._ready.notify_all()
                    time.sleep(self.every_s)
                    continue
                doc = as_dict(parts, recent_events(s.state_dir))
                counts = {p.component: p.figures for p in parts}
                now = time.monotonic()
                doc["rates"] = _rates(previous, now, counts)
                previous = (now, counts)
                doc["at"] = int(time.time() * 1000)
                doc["collect_ms"] = round((now - started) * 1000, 1)
                if self.extra is not None:
                    doc |= self.extra()
                with self._lock:
                    self._latest = doc
                    self._ready.notify_all()
                time.sleep(max(self.every_s - (time.monotonic() - started), 0.05))
        finally:
            if offsets is not None:
                offsets.close()
            with self._lock:
                self._thread = None


def _rates(previous: tuple[float, dict[str, Any]] | None, now: float,
           counts: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Events and dead letters per second since the previous collection.

    >>> _rates((0.0, {"broker": {"events": 100}}), 2.0, {"broker": {"events": 300}})
    {'events_per_s': 100.0}
    """
    if previous is None:
        return {}
    then, before = previous
    out = {}
    for name, component, figure in (("events_per_s", "broker", "events"), ("dead_letters_per_s", "dead letters",
                                                                             "count")):
        a, b = before.get(component, {}).get(figure), counts.get(component, {}).get(figure)
        if a is not None and b is not None and now > then:
            out[name] = round(max(b - a, 0) / (now - then), 1)
    return out
