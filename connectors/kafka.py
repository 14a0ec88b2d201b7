"""Kafka in and out with kafka-python: topic setup, and a validating event producer.

:class:`EventProducer` is the only way events enter the log: every record is checked
against :mod:`connectors.schema`; a good one goes to the events topic keyed by user, a bad
one to the dead-letter topic with its original payload and the reason.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from connectors.schema import BehaviorEvent, InvalidEvent, dead_letter, validate


class BrokerError(RuntimeError):
    """The broker cannot be reached or refused a request."""


def admin(bootstrap: str, timeout_s: float = 15.0) -> KafkaAdminClient:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
        except KafkaError:
            if time.monotonic() > deadline:
                raise BrokerError(f"no Kafka broker answers at {bootstrap}; start one with `freshrec up`") from None
            time.sleep(0.3)


def ensure_topics(bootstrap: str, topics: dict[str, int]) -> None:
    """Create the topics that do not exist yet, with their final partition counts.

    Partitions cannot be added later on the embedded broker, so the count is set once here.
    """
    client = admin(bootstrap)
    try:
        existing = set(client.list_topics())
        new = [NewTopic(name, n, 1) for name, n in topics.items() if name not in existing]
        if new:
            try:
                client.create_topics(new)
            except TopicAlreadyExistsError:
                pass
    finally:
        client.close()


def producer(bootstrap: str, **overrides: Any) -> KafkaProducer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "acks": "all",
        "linger_ms": 5,
        "batch_size": 256 * 1024,
        "retries": 5,
        "max_in_flight_requests_per_connection": 1,  # keeps per-key order across retries
        # An idempotent producer dies for good when the embedded broker restarts (its producer id
        # is unknown there: UnknownProducerIdError). Duplicates from a retry carry the same
        # event_id, and the job counts each event_id once.
        "enable_idempotence": False,
    }
    config.update(overrides)
    try:
        return KafkaProducer(**config)
    except KafkaError:
        raise BrokerError(f"no Kafka broker answers at {bootstrap}; start one with `freshrec up`") from None


def consumer(bootstrap: str, *topics: str, group: str | None = None, **overrides: Any) -> KafkaConsumer:
    config: dict[str, Any] = {
        "bootstrap_servers": bootstrap,
        "group_id": group,
        "auto_offset_reset": "earliest",
        "enable_auto_commit": group is not None,
        # The embedded broker makes a group join wait half the session timeout.
        "session_timeout_ms": 6000,
        "heartbeat_interval_ms": 2000,
    }
    config.update(overrides)
    return KafkaConsumer(*topics, **config)


def log_ends(c: KafkaConsumer, tps: list[TopicPartition], settle_ms: int = 300,
             max_ms: int = 1500) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition. The embedded broker answers a
    log-end query with the first offset of the last batch + 1, so this reads on from there
    to the real end: until nothing came for ``settle_ms``, or for ``max_ms`` at most (a log
    written to all the time has no end to wait for). Reassigns ``c``."""
    ends = dict(c.end_offsets(tps))
    c.assign(tps)
    for tp in tps:
        if ends[tp]:
            c.seek(tp, ends[tp] - 1)
    started = quiet_since = time.monotonic()
    while time.monotonic() - quiet_since < settle_ms / 1000 and time.monotonic() - started < max_ms / 1000:
        for tp, records in c.poll(timeout_ms=100).items():
            ends[tp] = max(ends[tp], records[-1].offset + 1)
            quiet_since = time.monotonic()
    return ends


@dataclass
class ProduceStats:
    accepted: int = 0
    rejected: int = 0
    reasons: dict[str, int] = field(default_factory=dict)


class EventProducer:
    """Validate and produce behavior events; refused ones go to the DLQ, none vanish.

    ``send`` returns the normalized event or the :class:`InvalidEvent`; ``flush`` waits for
    every record (acks=all) and raises if any could not be delivered.
    """

    def __init__(self, bootstrap: str, events_topic: str, dlq_topic: str, source: str = "producer",
                 **producer_overrides: Any) -> None:
        self.events_topic = events_topic
        self.dlq_topic = dlq_topic
        self.source = source
        self.stats = ProduceStats()
        self._producer = producer(bootstrap, **producer_overrides)
        self._futures: list[Any] = []

    def send(self, raw: dict[str, Any] | bytes | str, now_ms: int | None = None) -> BehaviorEvent | InvalidEvent:
        payload = raw if isinstance(raw, bytes | str) else json.dumps(raw, default=str)
        try:
            event = validate(raw, now_ms, size=len(payload) if isinstance(raw, dict) else None)
        except InvalidEvent as err:
            self.send_dead_letter(payload, err)
            return err
        self.send_valid(event)
        return event

    def send_valid(self, event: BehaviorEvent) -> None:
        self._send(self.events_topic, key=event.key, value=event.to_json(), timestamp_ms=event.ts)
        self.stats.accepted += 1

    def send_dead_letter(self, payload: bytes | str, err: InvalidEvent) -> None:
        self._send(self.dlq_topic, value=dead_letter(payload, err, self.source))
        self.stats.rejected += 1
        self.stats.reasons[err.field] = self.stats.reasons.get(err.field, 0) + 1

    def _send(self, topic: str, **record: Any) -> None:
        try:
            future = self._producer.send(topic, **record)
        except KafkaError as exc:  # no metadata for the topic within max_block_ms: no broker, or no topic
            raise BrokerError(f"could not send to {topic}: {exc}") from exc
        self._futures.append(future)
        if len(self._futures) >= 10_000:
            self._check(self._futures[:5_000])
            del self._futures[:5_000]

    def _check(self, futures: Iterable[Any]) -> None:
        for fut in futures:
            try:
                fut.get(timeout=30)
            except KafkaError as exc:
                raise BrokerError(f"the broker did not accept a record: {exc}") from exc

    def flush(self, timeout_s: float = 60.0) -> None:
        try:
            self._producer.flush(timeout=timeout_s)
        except KafkaError as exc:
            raise BrokerError(f"the broker did not acknowledge records within {timeout_s:.0f}s: {exc}") from exc
        self._check(self._futures)
        self._futures.clear()

    def close(self) -> None:
        self.flush()
        self._producer.close()

    def abort(self) -> None:
        """Close without waiting on a broker that may be gone (records still in flight are dropped)."""
        try:
            self._producer.close(timeout=2)
        except KafkaError:
            # kafka-python's close() flushes first and raises when that times out, leaving its
            # network thread running and a close() in __del__ that raises again: end both here.
            sender = getattr(self._producer, "_sender", None)
            if sender is not None:
                sender.force_close()
            self._producer._closed = True

    def __enter__(self) -> EventProducer:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            self.close()
        else:  # interrupted or failed: don't hang on a flush
            self.abort()
