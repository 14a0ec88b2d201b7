"""The demo's traffic, and the proof that an app's event changes its user's recommendations.

Simulated behavior (connectors/simulator.py) is stamped with the wall clock as it is sent,
so the stream's event time is the real time an app's own events carry. Its pace follows
what the stack keeps up with: a fixed rate that one machine holds swamps a smaller one (the
jobs fall minutes behind, checkpoints take minutes, and a user's click waits its turn).

>>> t = Throttle(ceiling=100, rate=20)
>>> [round(t.update(behind_s=s, interval_s=5)) for s in (1, 1, 40, None, 30, 35, 12)]
[23, 26, 13, 13, 13, 7, 7]
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import httpx

from connectors.kafka import BrokerError, EventProducer
from connectors.simulator import simulate
from freshrec.config import Settings
from jobs.topics import jobs_to_run
from serving.status import LogOffsets, _behind, collect, stack_doc

CHECK_EVERY_S = 5.0


@dataclass
class Throttle:
    """The demo's rate: grows slowly (10 % + 1/s per update) while the Flink jobs keep up,
    halves when they fall behind. ``behind_s`` is the age of the oldest event a job has not
    checkpointed: offsets move at each checkpoint, so a healthy job is about one checkpoint
    interval behind; far more means checkpoints or records wait."""

    ceiling: float
    rate: float = 20.0
    floor: float = 2.0
    last: float | None = None  # the lag at the previous update

    def update(self, behind_s: float | None, interval_s: float) -> float:
        if behind_s is None:  # unknown (a job starting, the broker restarting): hold
            return self.rate
        draining = self.last is not None and behind_s < self.last
        self.last = behind_s
        if behind_s > 3 * interval_s + 5:
            if not draining:  # a backlog that shrinks already: halving again would overshoot
                self.rate = max(self.floor, self.rate / 2)
        elif behind_s < 1.5 * interval_s + 1:
            self.rate = min(self.ceiling, self.rate * 1.1 + 1)
        return self.rate


class SendTimes:
    """When the n-th event was sent, from samples: how old the oldest event a job still has to
    count is. (Lag in events over the current rate would double when the rate halves.)

    >>> t = SendTimes()
    >>> for when, sent in ((0, 0), (5, 100), (10, 150)):
    ...     t.mark(when, sent)
    >>> t.age(now=12, n=120), t.age(now=12, n=150), t.age(now=12, n=-5)
    (5.0, 2.0, 12)
    """

    def __init__(self, keep: int = 240) -> None:
        self.samples: deque[tuple[float, int]] = deque(maxlen=keep)

    def mark(self, when: float, sent: int) -> None:
        self.samples.append((when, sent))

    def age(self, now: float, n: int) -> float:
        """Seconds since event ``n`` was sent (interpolated between samples; the oldest sample's
        age for an event before it)."""
        before: tuple[float, int] | None = None
        for when, sent in self.samples:
            if sent >= n:
                if before is None or sent == before[1]:
                    return now - when
                return now - (before[0] + (when - before[0]) * (n - before[1]) / (sent - before[1]))
            before = (when, sent)
        return now - self.samples[-1][0] if self.samples else 0.0


class JobLag:
    """How many events the stack's Flink jobs have not checkpointed yet."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.groups = list(jobs_to_run(settings).values())
        self.log: LogOffsets | None = None

    def behind(self) -> int | None:
        """The furthest-behind job's lag in events; None before every job has committed."""
        try:
            if self.log is None:
                self.log = LogOffsets(self.settings.kafka_bootstrap)
            ends = self.log.end(self.settings.events_topic)
            done = [self.log.committed(g, self.settings.events_topic) for g in self.groups]
        except Exception:  # noqa: BLE001 - a restarting broker: ask again next time, on a new client
            self.close()
            return None
        return None if not all(done) else max(_behind(ends, d) for d in done)

    def close(self) -> None:
        if self.log is not None:
            self.log.close()
            self.log = None


def feed(settings: Settings, n_events: int, ceiling: float, seed: int = 0,
         log: Callable[[str], None] = print, report_every_s: float = 60.0,
         stop: threading.Event | None = None, throttle: Throttle | None = None) -> int:
    """Send ``n_events`` simulated events (or until ``stop`` is set), at most ``ceiling`` per
    second, slower while the jobs fall behind; returns how many were sent."""
    throttle = throttle or Throttle(ceiling, rate=min(ceiling, Throttle.rate))
    lag, sends = JobLag(settings), SendTimes()
    interval_s = settings.checkpoint_interval_ms / 1000
    sent = 0
    try:
        with EventProducer(settings.kafka_bootstrap, settings.events_topic, settings.dlq_topic,
                           source="demo") as producer:
            now = time.monotonic()
            due, next_check, next_report = now, now + CHECK_EVERY_S, now + report_every_s
            for event in simulate(n_events, start_ms=int(time.time() * 1000), seed=seed):
                if stop is not None and stop.is_set():
                    break
                now = time.monotonic()
                if now >= next_check:
                    sends.mark(now, sent)
                    behind = lag.behind()
                    throttle.update(None if behind is None else sends.age(now, sent - behind), interval_s)
                    next_check = now + CHECK_EVERY_S
                if now >= next_report:
                    log(f"demo: {sent:,} events sent; now {throttle.rate:.0f}/s (the most the jobs keep up with, "
                        f"up to --rate {ceiling:.0f})")
                    next_report = now + report_every_s
                if due > now:
                    time.sleep(due - now)
                event["ts"] = int(time.time() * 1000)  # the wall clock, as an app's events carry
                producer.send(event)
                sent += 1
                due = max(due, time.monotonic() - 1.0) + 1 / throttle.rate  # no burst after a stall
    finally:
        lag.close()
    return sent


@dataclass(frozen=True)
class Probe:
    """One event sent for a user, and what became of their recommendations."""

    user_id: str
    item_id: str
    seconds: float | None  # from sending the event to an answer built on it; None: not within the timeout
    changed: bool  # that answer's items differ from the ones before the event
    degraded: int = 0  # answers marked degraded on the way
    causes: tuple[str, ...] = ()  # why, as the answers said (the read that failed may have been another request's)


def _items(api: httpx.Client, user_id: str) -> tuple[list[str], dict]:
    body = api.get("/recommendations", params={"user_id": user_id, "k": 10}).json()
    return [i["item_id"] for i in body["items"]], body


def probe(api_url: str, user_id: str, item_id: str, behavior: str = "view", timeout_s: float = 10.0) -> Probe:
    """Send one event through ``POST /events`` and poll the user's recommendations until an
    answer is built on the user's features as of that event (the list also moves with
    trending and the model; that would say nothing about this event)."""
    causes: list[str] = []

    def degraded(body: dict) -> int:
        reason = body.get("degraded_reason") or ""
        if body["degraded"]:
            causes.append(reason)
        return int(body["degraded"])

    with httpx.Client(base_url=api_url, timeout=5) as api:
        before, body = _items(api, user_id)
        n = degraded(body)
        ts = int(time.time() * 1000)
        started = time.monotonic()
        api.post("/events", json=[{"user_id": user_id, "item_id": item_id, "behavior": behavior, "ts": ts}]) \
            .raise_for_status()
        while time.monotonic() - started < timeout_s:
            items, body = _items(api, user_id)
            n += degraded(body)
            if ((body.get("features") or {}).get("user_recent") or 0) >= ts:
                return Probe(user_id, item_id, time.monotonic() - started, items != before, n, tuple(causes))
            time.sleep(0.02)
    return Probe(user_id, item_id, None, False, n, tuple(causes))


def popular_item(api_url: str) -> str | None:
    """An item trending now (what a new user is shown first)."""
    with httpx.Client(base_url=api_url, timeout=5) as api:
        items, _ = _items(api, f"demo-nobody-{random.randrange(10**9)}")
    return items[0] if items else None


def try_it(api_url: str, log: Callable[[str], None] = print, after_s: float = 20.0) -> threading.Thread:
    """In the background, once traffic flows: show a view changing a new user's list, and the
    two requests that do it by hand."""

    def run() -> None:
        time.sleep(after_s)
        try:
            item = popular_item(api_url)
            if item is None:
                return
            p = probe(api_url, f"demo-try-{random.randrange(10**6)}", item)
        except (httpx.HTTPError, BrokerError) as exc:
            log(f"try it: the probe failed ({exc}); the API may still be starting")
            return
        if p.seconds is None:
            seen = "was not taken in within 10 s (see `freshrec status`)"
        elif p.changed:
            seen = f"changed their recommendations {p.seconds * 1000:.0f} ms after it was sent"
        else:
            seen = f"reached their recommendations after {p.seconds * 1000:.0f} ms (the same items still come first)"
        log(f"\ntry it: a view of item {item} by new user {p.user_id} {seen}. By hand:\n"
            f"  curl -X POST {api_url}/events -H 'content-type: application/json' \\\n"
            f"       -d '[{{\"user_id\": \"me\", \"item_id\": \"{item}\", \"behavior\": \"view\", "
            f"\"ts\": '$(date +%s000)'}}]'\n"
            f"  curl '{api_url}/recommendations?user_id=me&k=10'\n"
            f"  or click items on the live page: {api_url}/ui/\n")

    thread = threading.Thread(target=run, name="try-it", daemon=True)
    thread.start()
    return thread


def checkpoints(web_ui: str) -> dict[str, float | int | None]:
    """A local job's checkpoints as its Flink web UI reports them: how many completed, their
    end-to-end time (ms, mean and max) and the newest one's age (s)."""
    with httpx.Client(base_url=web_ui, timeout=5) as ui:
        running = [j["jid"] for j in ui.get("/jobs/overview").json()["jobs"] if j["state"] == "RUNNING"]
        if not running:
            return {"completed": 0, "mean_ms": None, "max_ms": None, "newest_age_s": None}
        got = ui.get(f"/jobs/{running[0]}/checkpoints").json()
    took = got["summary"]["end_to_end_duration"]
    newest = (got.get("latest") or {}).get("completed") or {}
    return {"completed": got["counts"]["completed"], "mean_ms": took.get("avg"), "max_ms": took.get("max"),
            "newest_age_s": round(time.time() - newest["latest_ack_timestamp"] / 1000, 1) if newest else None}


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (of 20 values, p99 is the largest).

    >>> percentile([0.3, 0.1, 0.2], 0.5), percentile([0.3, 0.1, 0.2], 0.99)
    (0.2, 0.3)
    """
    ranked = sorted(values)
    return ranked[max(0, math.ceil(q * len(ranked)) - 1)]


def run(settings: Settings, api_url: str, flink_ui: dict[str, str], seconds: float, users: int = 20,
        ceiling: float = 200.0, log: Callable[[str], None] = print) -> dict[str, Any]:
    """The demo's workload for ``seconds``, then, with it still running, one view each by
    ``users`` new users: how long until their lists change, and how the stack kept up."""
    stop, throttle = threading.Event(), Throttle(ceiling, rate=min(ceiling, Throttle.rate))
    sent: list[int] = []
    feeder = threading.Thread(target=lambda: sent.append(feed(settings, 10**9, ceiling, log=log, stop=stop,
                                                               throttle=throttle, report_every_s=30)),
                              name="demo-feed", daemon=True)
    started = time.monotonic()
    feeder.start()
    try:
        while time.monotonic() - started < seconds:
            if not feeder.is_alive():
                raise RuntimeError("the demo traffic stopped early; see the log above")
            time.sleep(1)
        probes = []
        for i in range(users):
            item = popular_item(api_url) or "0"
            probes.append(probe(api_url, f"demo-new-{random.randrange(10**9)}-{i}", item))
        doc = stack_doc(settings.state_dir)
        parts = {p.component: p for p in collect(settings, doc)}
        ckpts = {job: checkpoints(url) for job, url in flink_ui.items()}
    finally:
        stop.set()
        feeder.join(30)
    took = [p.seconds for p in probes if p.seconds is not None]
    return {
        "workload_s": round(time.monotonic() - started, 1), "events_sent": sent[0] if sent else None,
        "rate_at_end": round(throttle.rate, 1), "users": users,
        "taken_in": len(took), "changed": sum(p.changed for p in probes),
        "degraded_answers": sum(p.degraded for p in probes),
        "degraded_causes": sorted({c for p in probes for c in p.causes}),
        "post_to_changed_p50_s": round(percentile(took, 0.5), 3) if took else None,
        "post_to_changed_p99_s": round(percentile(took, 0.99), 3) if took else None,
        "post_to_changed_s": [round(t, 3) for t in took],
        "feature_lag_s": parts["feature_job"].figures.get("newest_event_age_s"),
        "behind_events": {j: parts[j].figures.get("behind") for j in flink_ui if j in parts},
        "checkpoints": ckpts,
    }
