"""The log epoch: which incarnation of the event log a broker holds.

The embedded broker keeps everything in memory. After a restart its topics are gone and new
ones count offsets from 0 again, so whatever a component remembered (the feature job's
checkpointed offsets, the trainer's published offsets, a consumer's position) points past the
end of the new log: the broker answers such fetches with nothing, and the component would
silently skip the new log's first events. (A durable Apache Kafka does not lose its log; the
epoch then never changes.)

So the log carries a marker: one record on topic ``<events>-epoch``, written when the topics
are created, naming the epoch. Components key what they remember by it; a :class:`EpochWatch`
tells a running one when the marker names another epoch, or is gone (the broker came back
empty: the watch creates the topics and a new marker), and the component then reads the new
log from its start and says so. Two components creating a marker at once is harmless: the
first record of the topic is the epoch.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass

from kafka import KafkaConsumer, TopicPartition
from kafka.errors import KafkaError

from connectors.kafka import BrokerError, consumer, ensure_topics, producer


@dataclass(frozen=True)
class Epoch:
    id: str
    created_ms: int

    def __str__(self) -> str:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.created_ms / 1000))
        return f"{self.id} (since {when})"


def read_epoch(bootstrap: str, marker_topic: str, timeout_s: float = 5.0,
               using: KafkaConsumer | None = None) -> Epoch | None:
    """The epoch the broker's log is in; None when the marker is missing. Raises
    :class:`BrokerError` when the broker does not answer. ``using``: a consumer to reuse (it
    is reassigned; a new one takes ~0.1-0.3 s to connect), else one is opened and closed."""
    try:
        c = using or consumer(bootstrap, bootstrap_timeout_ms=int(timeout_s * 1000),
                              request_timeout_ms=int(timeout_s * 1000) + 1000)
    except KafkaError:
        raise BrokerError(f"no Kafka broker answers at {bootstrap}") from None
    try:
        if marker_topic not in c.topics():
            return None
        tp = TopicPartition(marker_topic, 0)
        if not c.end_offsets([tp])[tp]:
            return None  # the topic exists, its marker was never written (a crash in between)
        c.assign([tp])
        c.seek(tp, 0)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for records in c.poll(timeout_ms=200, max_records=1).values():
                doc = json.loads(records[0].value)
                return Epoch(str(doc["epoch"]), int(doc["created_ms"]))
        raise BrokerError(f"the epoch marker on {marker_topic} could not be read within {timeout_s:.0f}s")
    except KafkaError as exc:
        raise BrokerError(f"the broker at {bootstrap} did not answer: {exc}") from None
    finally:
        if using is None:
            c.close()


def ensure_log(bootstrap: str, plan: dict[str, int], marker_topic: str) -> Epoch:
    """Create the topics that are missing and, for a new log, its epoch marker; the epoch."""
    ensure_topics(bootstrap, {**plan, marker_topic: 1})
    epoch = read_epoch(bootstrap, marker_topic)
    if epoch is not None:
        return epoch
    p = producer(bootstrap)
    try:
        doc = {"epoch": uuid.uuid4().hex[:12], "created_ms": int(time.time() * 1000)}
        p.send(marker_topic, json.dumps(doc).encode()).get(timeout=30)
    except KafkaError as exc:
        raise BrokerError(f"could not write the log epoch to {marker_topic}: {exc}") from None
    finally:
        p.close(timeout=5)
    epoch = read_epoch(bootstrap, marker_topic)
    if epoch is None:
        raise BrokerError(f"the epoch marker written to {marker_topic} cannot be read back")
    return epoch


class EpochWatch:
    """Checks in a background thread, every ``every_ms``, whether the log was replaced;
    :meth:`changed` answers at once, so a component's loop never waits on the broker."""

    def __init__(self, bootstrap: str, plan: dict[str, int], marker_topic: str, every_ms: int = 2000,
                 current: Epoch | None = None) -> None:
        self.bootstrap, self.plan, self.marker_topic, self.every_ms = bootstrap, plan, marker_topic, every_ms
        self.current = current or ensure_log(bootstrap, plan, marker_topic)
        self.seen = self.current  # the newest epoch the thread saw
        self.unreachable_since: float | None = None  # monotonic time the broker stopped answering
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epoch-watch", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.every_ms / 1000):
            try:
                epoch = read_epoch(self.bootstrap, self.marker_topic, timeout_s=2)
                if epoch is None:  # the broker came back empty: make the log again, as `freshrec init` would
                    epoch = ensure_log(self.bootstrap, self.plan, self.marker_topic)
            except BrokerError:
                if self.unreachable_since is None:
                    self.unreachable_since = time.monotonic()
                continue
            self.unreachable_since = None
            self.seen = epoch

    def changed(self) -> Epoch | None:
        """The new epoch, once, when the log was replaced since the last call; else None."""
        seen = self.seen
        if seen == self.current:
            return None
        self.current = seen
        return seen

    def close(self) -> None:
        self._stop.set()
